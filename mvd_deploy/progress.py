"""Staged progress lines on stderr, so long steps show where they are (stdout stays for results)."""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from collections.abc import Iterator


class Stages:
    def __init__(self, total: int, quiet: bool = False, name: str = ""):
        self.total, self.done, self.quiet = total, 0, quiet
        self.name = f"{name} " if name else ""

    @contextlib.contextmanager
    def stage(self, text: str) -> Iterator[None]:
        self.done += 1
        start = time.perf_counter()
        tag = f"[{self.name}{self.done}/{self.total}]"
        self._say(f"{tag} {text} ...")
        yield
        self._say(f"{tag} {text}: done in {time.perf_counter() - start:.1f} s{_memory()}")

    def _say(self, line: str) -> None:
        if not self.quiet:
            print(line, file=sys.stderr, flush=True)


def _memory() -> str:
    """With MVD_TRACE_MEMORY=1: resident and peak memory after each stage (for finding peaks)."""
    if not os.environ.get("MVD_TRACE_MEMORY"):
        return ""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    return f" (RSS {rss:.2f} GiB, peak {peak:.2f} GiB)"
