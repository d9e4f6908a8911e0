"""Living with an unreachable server: one log line per outage, jittered backoff, retries under a lease.

Contract:
* `Outage` is thread-safe (the heartbeat thread and the job thread share one); it logs the
  loss of the server once per outage and the reconnection once, however many calls fail.
* `backoff(n)` is the jittered, doubling pause before retry number n+1 (0.5 s up to 10 s).
* `call_under_lease` retries a call while the server is unreachable (UNAVAILABLE,
  DEADLINE_EXCEEDED) and the lease may still be ours; it raises `LeaseGone` once the run
  is lost or no call was accepted for a whole lease, and any other PrebakeError as is.
  It blocks the calling thread while it waits.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from prebake.client.errors import DeadlineExceeded, PrebakeError, Unavailable
from prebake.compiler.job_run import JobRun, LeaseGone

T = TypeVar("T")
log = logging.getLogger("prebake.worker")

# Reconnect backoff while the server is unreachable (jittered, doubling).
RECONNECT_INITIAL = 0.5
RECONNECT_MAX = 10.0


class Outage:
    """Logs a lost server once per outage (and the reconnection), not once per retry."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._lock = threading.Lock()
        self._since: float | None = None

    def down(self, error: PrebakeError) -> None:
        with self._lock:
            if self._since is not None:
                return
            self._since = time.monotonic()
        log.warning(
            "cannot reach the prebake server at %s (%s); retrying until it is back", self.target, error
        )

    def up(self) -> None:
        with self._lock:
            since, self._since = self._since, None
        if since is not None:
            log.info("reconnected to %s after %.1f s", self.target, time.monotonic() - since)


def backoff(failures: int) -> float:
    """Seconds to wait after `failures` consecutive failures: jittered in [ceiling/2, ceiling]."""
    ceiling = min(RECONNECT_MAX, RECONNECT_INITIAL * 2**failures)
    return random.uniform(ceiling / 2, ceiling)


def call_under_lease(run: JobRun, outage: Outage, what: str, fn: Callable[[], T]) -> T:
    """`fn()`, retried while the server is unreachable and the lease may still be ours.

    Raises LeaseGone once it cannot be (or the heartbeat learned it is not), and any
    other PrebakeError as is. `what` names the step in the LeaseGone message.
    """
    failures = 0
    while True:
        if run.gone.is_set():
            raise LeaseGone(f"{run.gone_reason} (before {what})")
        try:
            result = fn()
        except (Unavailable, DeadlineExceeded) as exc:
            outage.down(exc)
            if run.surely_expired():
                raise LeaseGone(f"the server was unreachable for longer than the lease ({what})") from exc
            time.sleep(backoff(failures))
            failures += 1
            continue
        outage.up()
        run.touch()
        return result
