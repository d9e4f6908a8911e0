"""Heartbeating a leased job on a thread of its own, carrying the latest progress.

Contract:
* `Heartbeat(...)` is a context manager: entering starts a daemon thread that calls
  `Heartbeat` every `interval` seconds; leaving stops and joins it (at most one rpc's
  deadline later).
* The server answering `cancelled`, or refusing the lease (FAILED_PRECONDITION,
  NOT_FOUND), marks the run lost and ends the beats. An unreachable server is not a
  reason to stop (the lease may well survive a server restart): it is reported to the
  shared `Outage` and the next beat tries again. No exception ever leaves the thread:
  without heartbeats the lease would silently expire.
"""

from __future__ import annotations

import contextvars
import logging
import threading

from prebake.client.client import Client
from prebake.client.errors import DeadlineExceeded, FailedPrecondition, NotFound, PrebakeError, Unavailable
from prebake.compiler.job_run import JobRun
from prebake.compiler.outage import Outage

log = logging.getLogger("prebake.worker")

# Heartbeats go out at a third of the lease (the contract's advice), but at least this
# often, so that a cancellation reaches a compile within seconds even with long leases.
MAX_HEARTBEAT_INTERVAL = 10.0


def heartbeat_interval(lease_seconds: float) -> float:
    """Seconds between heartbeats for a lease of `lease_seconds`."""
    return min(MAX_HEARTBEAT_INTERVAL, max(0.05, lease_seconds / 3))


class Heartbeat:
    """Extends a job's lease every `interval` seconds with the latest progress, on a thread.

    Marks the run gone when the server answers `cancelled` or refuses the lease
    (FAILED_PRECONDITION, NOT_FOUND). An unreachable server is not a reason to stop: the
    lease may well survive a server restart.
    """

    def __init__(self, client: Client, run: JobRun, interval: float, outage: Outage) -> None:
        self._client = client
        self._run = run
        self._interval = interval
        self._outage = outage
        self._done = threading.Event()
        # In a copy of the starter's context: heartbeats (and their log lines) carry the job's
        # request id (`prebake.core.request_ids`).
        self._thread = threading.Thread(
            target=contextvars.copy_context().run,
            args=(self._loop,),
            name=f"heartbeat-{run.job_id}",
            daemon=True,
        )

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._done.wait(self._interval):
            self.beat()

    def beat(self) -> None:
        """One heartbeat now; never raises."""
        run = self._run
        progress, message = run.snapshot()
        try:
            reply = self._client.heartbeat(run.job_id, run.lease.token, progress, message)
        except (Unavailable, DeadlineExceeded) as exc:
            self._outage.down(exc)
            return
        except (FailedPrecondition, NotFound) as exc:
            run.lose(f"lease lost: {exc}")
            self._done.set()
            return
        except PrebakeError as exc:  # e.g. INVALID_ARGUMENT: a bug, but not a reason to stop
            log.warning("job %s: heartbeat refused: %s", run.job_id, exc)
            return
        except Exception:
            # The thread must survive: without heartbeats the lease would silently expire.
            log.exception("job %s: heartbeat failed", run.job_id)
            return
        self._outage.up()
        run.touch()
        if reply.cancelled:
            run.lose("cancelled")
            self._done.set()
