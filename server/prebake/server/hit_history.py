"""The hit ratio over time: a ring buffer of periodic samples of the lookup counters.

`HitHistory.sample(now, lookups, hits)` records the cumulative counters
(`ServerState.counters`) at one instant; `intervals()` turns consecutive samples into the
hit ratio of each interval between them. Memory is bounded (`capacity` samples, the
oldest dropped first); nothing is persisted (the lifetime ratio lives in the counters and
the metrics). Event-loop only: sampled by a task of the server, read by the status page
through the loop.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from dataclasses import dataclass

from prebake.server.state import Counters

DEFAULT_CAPACITY = 360


@dataclass(frozen=True)
class Sample:
    """The cumulative counters at `at` (UNIX seconds)."""

    at: float
    lookups: int
    hits: int


@dataclass(frozen=True)
class Interval:
    """Lookups and hits between two consecutive samples; `ratio` is None without lookups."""

    start: float
    end: float
    lookups: int
    hits: int

    @property
    def ratio(self) -> float | None:
        return self.hits / self.lookups if self.lookups else None


class HitHistory:
    """The last `capacity` samples of the lookup and hit counters, oldest first."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 2:
            raise ValueError(f"capacity is {capacity}; at least 2 samples make an interval")
        self._samples: collections.deque[Sample] = collections.deque(maxlen=capacity)

    def sample(self, at: float, lookups: int, hits: int) -> None:
        """Record the counters at `at` (times are expected not to go backwards)."""
        self._samples.append(Sample(at, lookups, hits))

    def samples(self) -> list[Sample]:
        return list(self._samples)

    def intervals(self, now: Sample | None = None) -> list[Interval]:
        """One interval per pair of consecutive samples, oldest first; with `now` (the
        counters read at this instant) also the open interval from the last sample to it.
        A counter that went backwards (a reset) counts from zero."""
        samples = list(self._samples) + ([now] if now is not None else [])
        result = []
        for before, after in itertools.pairwise(samples):
            lookups = after.lookups - before.lookups
            hits = after.hits - before.hits
            if lookups < 0 or hits < 0:
                lookups, hits = after.lookups, after.hits
            result.append(Interval(before.at, after.at, lookups, hits))
        return result

    async def run(self, counters: Counters, every_seconds: float) -> None:
        """Sample `counters` now and then every `every_seconds`, until cancelled."""
        while True:
            self.sample(time.time(), counters.lookups, counters.hits)
            await asyncio.sleep(every_seconds)
