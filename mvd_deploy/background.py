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
