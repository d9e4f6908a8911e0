"""One near-miss computation per key for the lookups that need it at the same time.

A miss explains itself with the artifacts nearest to its key (`prebake.server.nearest`),
which reads up to `SCAN_LIMIT` artifacts of the model and ranks them: milliseconds for a
model with many artifacts. Without sharing, each of the hundreds of deployers that miss
one key at once (and join its one compile job) would repeat it. Here the first caller
computes and everyone else who asks for the same key while its answer is fresh enough
awaits that same computation.

What "fresh enough" means is the caller's: a joiner of an in-flight job accepts any list
computed since the job was created (its own key cannot have been published meanwhile;
a near artifact published since then shows from the next job on), a plain miss only one
computed within `MISS_FRESH_SECONDS`.

Not thread-safe: used from the server's one event loop. A failed computation is not
kept; each caller waiting on it gets the error and the next one computes again.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")

# How old a shared answer a lookup without an in-flight job accepts: long enough to
# merge a stampede of misses into one computation, short enough that a publish of a near
# artifact shows almost at once.
MISS_FRESH_SECONDS = 1.0
# Keys remembered; the oldest is forgotten first (callers awaiting it keep their task).
CAPACITY = 4096


class NearestMemo(Generic[T]):
    def __init__(self, capacity: int = CAPACITY, clock: Callable[[], float] = time.time) -> None:
        self._capacity = capacity
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, asyncio.Task[T]]] = OrderedDict()
        self.computations = 0  # for tests and metrics: how often `compute` really ran

    async def get(self, key: str, compute: Callable[[], Awaitable[T]], fresh_after: float) -> T:
        """`compute()`'s answer for `key`, shared with every caller that accepts one
        started after `fresh_after` (a time on this memo's clock, wall-clock seconds by
        default)."""
        entry = self._entries.get(key)
        if entry is None or entry[0] < fresh_after:
            task = asyncio.ensure_future(compute())
            # Retrieved here too, so a failure that every waiter gave up on is not
            # reported as "never retrieved".
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            entry = (self._clock(), task)
            self.computations += 1
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)
        started, task = entry
        try:
            # Shielded: one caller giving up (a cancelled rpc) must not cancel the
            # computation the others are waiting for.
            return await asyncio.shield(task)
        except BaseException:
            # Forget a failed or cancelled computation (not one still running because
            # only this caller was cancelled).
            if task.done() and self._entries.get(key) == (started, task):
                del self._entries[key]
            raise
