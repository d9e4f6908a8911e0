"""Limits on upload sessions (`Blobs.Write` streams): how many are open, and how long
one may sit idle.

Each open upload holds a file descriptor (or a multipart upload) and a partial file, so
the number open at once is capped, in all and per caller (`prebake.server.rate_limits.
caller`), and a stream that sends nothing for `idle_seconds` is ended: the handler
discards its partial upload, freeing both.

Used from the event loop only (not thread-safe).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import TypeVar

from prebake.core.errors import Aborted, QuotaExceeded

T = TypeVar("T")


class UploadIdle(Aborted):
    """The client sent nothing on its Write stream for too long; the upload was discarded.

    ABORTED: the client may start the upload again.
    """


class UploadSessions:
    """Counts open upload sessions; `open(who)` admits one or refuses it.

    `total` and `per_caller` of 0 mean no cap.
    """

    def __init__(self, total: int, per_caller: int) -> None:
        self.total = total
        self.per_caller = per_caller
        self._open: Counter[str] = Counter()

    @property
    def open_count(self) -> int:
        return self._open.total()

    @contextlib.contextmanager
    def open(self, who: str) -> Iterator[None]:
        """Hold one session for `who` while the block runs; `QuotaExceeded` if a cap is reached."""
        if self.total and self.open_count >= self.total:
            raise QuotaExceeded(
                f"{self.total} uploads are in progress on this server, its limit; retry when one finishes"
            )
        if self.per_caller and self._open[who] >= self.per_caller:
            raise QuotaExceeded(
                f"{self.per_caller} of your uploads are in progress, the limit per caller; "
                "retry when one of them finishes"
            )
        self._open[who] += 1
        try:
            yield
        finally:
            self._open[who] -= 1
            if self._open[who] <= 0:
                del self._open[who]


async def idle_limited(stream: AsyncIterator[T], idle_seconds: float) -> AsyncIterator[T]:
    """The items of `stream`; `UploadIdle` when the next one takes more than `idle_seconds`
    (0: wait forever)."""
    items = aiter(stream)
    while True:
        try:
            if idle_seconds > 0:
                async with asyncio.timeout(idle_seconds):
                    item = await anext(items)
            else:
                item = await anext(items)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise UploadIdle(
                f"nothing arrived on this upload for {idle_seconds:g} s; it was discarded, start it again"
            ) from None
        yield item
