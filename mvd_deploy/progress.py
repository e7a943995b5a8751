"""Progress of long steps: staged lines through module loggers, and tqdm bars on stderr.

Like any library, mvd_deploy shows nothing by default: its INFO records reach no handler (Python's
last-resort handler shows WARNING and above) until the application gives the ``mvd_deploy`` logger
one: the CLI does (:func:`show_progress`), a notebook may too. Bars follow the same switch: a bar is
drawn only where its module logger's INFO records are. The root logger is never touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator

from tqdm import tqdm

from mvd_deploy.metrics import peak_rss_mb

PACKAGE_LOGGER = "mvd_deploy"


class Stages:
    """Numbered stages of one long step: ``[name 1/3] text ...`` and ``[name 1/3] text: done in 2.0 s``."""

    def __init__(self, total: int, logger: logging.Logger, name: str = ""):
        self.total, self.done, self.logger = total, 0, logger
        self.name = f"{name} " if name else ""

    @contextlib.contextmanager
    def stage(self, text: str) -> Iterator[None]:
        self.done += 1
        start = time.perf_counter()
        tag = f"[{self.name}{self.done}/{self.total}]"
        self.logger.info("%s %s ...", tag, text)
        yield
        self.logger.info("%s %s: done in %.1f s%s", tag, text, time.perf_counter() - start, _memory())


def progress_bar(logger: logging.Logger, iterable: Iterable | None = None, **options) -> tqdm:
    """A tqdm bar on stderr, drawn only where ``logger``'s INFO records are shown."""
    return tqdm(iterable, file=sys.stderr, disable=not logger.isEnabledFor(logging.INFO), **options)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (a test runner may swap it)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


@contextlib.contextmanager
def show_progress(level: int = logging.INFO) -> Iterator[logging.Handler]:
    """Show mvd_deploy's progress lines on stderr (message only) for the block, then restore the
    ``mvd_deploy`` logger as it was. For a script or notebook: ``with show_progress(): export_build(...)``."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    previous = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # shown once here, not again by handlers an application gave the root logger
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous[0])
        logger.propagate = previous[1]


def _memory() -> str:
    """With MVD_TRACE_MEMORY=1: resident and peak memory after each stage (for finding peaks)."""
    if not os.environ.get("MVD_TRACE_MEMORY"):
        return ""
    peak = peak_rss_mb() / 2**10
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    return f" (RSS {rss:.2f} GiB, peak {peak:.2f} GiB)"
