"""Work on background threads that takes only CPU time the foreground leaves idle.

An export's critical path alternates between both cores busy (forwards, ONNX Runtime runs) and one
core busy (torch.onnx.export's trace, FLOP counts: Python). Hashes and ONNX Runtime checks that run
beside it at the lowest priority fill the idle core without slowing the forwards down.
"""

from __future__ import annotations

import contextlib
import os
import threading

LOWEST_NICE = 19


def at_idle_priority() -> None:
    """Lower the calling thread's CPU priority to the lowest (Linux: nice 19 for this thread only;
    threads it starts afterwards, such as ONNX Runtime's pool, inherit it). Elsewhere: nothing."""
    if hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
        with contextlib.suppress(OSError):  # lowering one's own priority needs no privilege
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOWEST_NICE)


class BackgroundTask:
    """One value computed on a daemon thread while the caller goes on. Subclasses implement ``run``
    (and ``cancel``, which asks a running ``run`` to stop soon) and call ``super().__init__()`` last:
    it starts the thread. A context manager whose exit on an error cancels the task and waits for
    it: a process that exits while the thread is inside a native call (a torch op, an ONNX Runtime
    run) aborts ("terminate called without an active exception")."""

    thread_name = "background"

    def __init__(self) -> None:
        self._value = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=self.thread_name, daemon=True)
        self._thread.start()

    def run(self):
        raise NotImplementedError

    def cancel(self) -> None:
        """Ask ``run`` to stop soon (default: nothing to ask; the exit waits for it to finish)."""

    def _main(self) -> None:
        try:
            self._value = self.run()
        except BaseException as e:  # re-raised in the caller's thread by result()
            self._error = e

    def result(self):
        """``run``'s value, once it is done; its error, raised here."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            self.cancel()
            self._thread.join()
