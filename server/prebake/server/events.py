"""Wake-ups for job watchers.

The registry is the source of truth for job events (numbered, persisted); this hub only
tells waiting `WatchJob` streams that something may have changed, so they re-read the
registry. Watchers also re-read on a short timer, which covers changes made by another
process sharing the database.

Not thread-safe: owned by the server's event loop; call `notify` from that loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Iterable


class JobEventHub:
    def __init__(self) -> None:
        self._waiters: defaultdict[str, set[asyncio.Event]] = defaultdict(set)

    def subscribe(self, job_id: str) -> asyncio.Event:
        event = asyncio.Event()
        self._waiters[job_id].add(event)
        return event

    def unsubscribe(self, job_id: str, event: asyncio.Event) -> None:
        waiters = self._waiters.get(job_id)
        if waiters is not None:
            waiters.discard(event)
            if not waiters:
                del self._waiters[job_id]

    def notify(self, job_ids: Iterable[str]) -> None:
        for job_id in job_ids:
            for event in self._waiters.get(job_id, ()):
                event.set()

    def watchers(self, job_id: str) -> int:
        return len(self._waiters.get(job_id, ()))


class Pulse:
    """Wakes every current waiter at once (e.g. long-polling workers when work appears).

    Waiters re-check their condition after waking, so a pulse carries no data and a
    missed pulse only costs the waiter's own timeout. Event-loop only.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)
