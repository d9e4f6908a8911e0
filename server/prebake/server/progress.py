"""Progress lines of long operations (`prebake reindex`, `prebake migrate`), at most one every
few seconds, so that a run over millions of objects shows it is alive without flooding a log."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

INTERVAL_SECONDS = 2.0


class Progress:
    """Prints a line to `stream` (default stderr) when `tick` finds the interval passed.

    Not thread-safe: tick from one thread.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        interval: float = INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream
        self._interval = interval
        self._clock = clock
        self._next = clock() + interval

    def tick(self, line: Callable[[], str]) -> None:
        """Print `line()` if the last line is older than the interval (else do not call it)."""
        now = self._clock()
        if now >= self._next:
            self._next = now + self._interval
            self.show(line())

    def show(self, text: str) -> None:
        """Print `text` now."""
        print(text, file=self._stream or sys.stderr, flush=True)
