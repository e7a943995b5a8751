"""Staged progress lines on stderr, so long steps show where they are (stdout stays for results)."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator


class Stages:
    def __init__(self, total: int, quiet: bool = False):
        self.total, self.done, self.quiet = total, 0, quiet

    @contextlib.contextmanager
    def stage(self, text: str) -> Iterator[None]:
        self.done += 1
        start = time.perf_counter()
        self._say(f"[{self.done}/{self.total}] {text} ...")
        yield
        self._say(f"[{self.done}/{self.total}] {text}: done in {time.perf_counter() - start:.1f} s")

    def _say(self, line: str) -> None:
        if not self.quiet:
            print(line, file=sys.stderr, flush=True)
