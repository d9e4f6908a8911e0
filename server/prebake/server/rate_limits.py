"""Per-caller rate limits: token buckets keyed by who is calling.

A caller is its principal when authentication named one (`prebake.server.principal`),
else the host it connects from (the peer address without its port, so that opening new
connections buys nothing). Each limit is a burst that refills at a steady rate; a caller
beyond it gets `QuotaExceeded` (RESOURCE_EXHAUSTED) saying when to retry.

Buckets live in memory, one set per server process, and are used from the event loop
only (not thread-safe). The number of callers remembered is bounded: the least recently
seen bucket is forgotten first, and a forgotten caller starts again with a full burst,
which only ever loosens a limit for a caller idle long enough to be forgotten.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from prebake.core.errors import QuotaExceeded
from prebake.server import principal

# Callers whose buckets are remembered at once (a few hundred bytes each).
MAX_CALLERS = 10_000


def caller(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """Who limits apply to: "principal NAME" when authenticated, else "host HOST"."""
    who = principal.current()
    if who.authenticated:
        return f"principal {who.name}"
    return f"host {peer_host(context.peer())}"


def peer_host(peer: str) -> str:
    """The host of a gRPC peer string ("ipv4:1.2.3.4:5678", "ipv6:[::1]:5678",
    "unix:/path"), without the port; the string itself when it has no port."""
    scheme, _, address = peer.partition(":")
    if scheme in ("ipv4", "ipv6") and ":" in address:
        host, _, port = address.rpartition(":")
        if port.isdigit():
            return host.strip("[]")
    return peer


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimit:
    """A token bucket per caller: `burst` actions at once, refilled at `per_minute`.

    `per_minute <= 0` turns the limit off. `what` names the action in refusals ("compile
    jobs created"). Not thread-safe: call from the event loop.
    """

    def __init__(
        self,
        what: str,
        burst: int,
        per_minute: float,
        clock: Callable[[], float] = time.monotonic,
        max_callers: int = MAX_CALLERS,
    ) -> None:
        self.what = what
        self.burst = max(1, burst)
        self.rate = per_minute / 60.0
        self._clock = clock
        self._max_callers = max_callers
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, who: str) -> None:
        """Spend one action of `who`'s bucket; `QuotaExceeded` (nothing spent) if it is empty."""
        self.check(who)
        self.spend(who)

    def check(self, who: str) -> None:
        """`QuotaExceeded` if `who`'s bucket is empty; spends nothing.

        With `spend` once the action turned out to cost something (a lookup that created a
        job, not one that joined it): concurrent actions checked together may overdraw
        the bucket by as many as ran at once, and that debt is refilled before the next.
        """
        if not self.enabled:
            return
        bucket = self._refilled(who)
        if bucket.tokens < 1.0:
            wait = math.ceil((1.0 - bucket.tokens) / self.rate * 10) / 10
            raise QuotaExceeded(
                f"rate limit: at most {self.burst} {self.what} at once and {self.rate * 60:g} a minute "
                f"per caller; retry in {wait:g} s"
            )

    def spend(self, who: str) -> None:
        """Spend one action of `who`'s bucket (it may go below empty; see `check`)."""
        if self.enabled:
            self._refilled(who).tokens -= 1.0

    def _refilled(self, who: str) -> _Bucket:
        now = self._clock()
        bucket = self._buckets.pop(who, None)
        if bucket is None:
            bucket = _Bucket(float(self.burst), now)
        else:
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
        self._buckets[who] = bucket
        while len(self._buckets) > self._max_callers:
            self._buckets.popitem(last=False)
        return bucket
