"""One leased job as the worker's threads share it: the lease, the latest progress, whether it is still ours.

Contract:
* `Lease` is what `LeaseJob` granted (job, fencing token, lease length); immutable.
* `JobRun` is thread-safe: the stdout reader writes progress, the heartbeat thread writes
  contact and loss, the job thread reads them. Once lost (cancelled, lease refused, or no
  contact for a whole lease) a run stays lost; `gone` is set and `gone_reason` says why.
* `LeaseGone` is raised by whoever learns that the job is no longer this worker's; the
  worker then drops the job without reporting anything (the fencing token would refuse it).
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass

from prebake.v1 import jobs_pb2

# The contract's limit on Heartbeat.message (workers.proto).
MAX_MESSAGE_CHARS = 1_024


class Outcome(enum.Enum):
    """How a leased job ended for this worker."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"  # reported with FailJob (deterministic or transient)
    RELEASED = "released"  # given back on shutdown
    DROPPED = "dropped"  # cancelled, or the lease was lost: nothing reported


@dataclass(frozen=True)
class Lease:
    """A job granted by `LeaseJob`, with the fencing token every later call must carry."""

    job: jobs_pb2.Job
    token: int
    lease_seconds: float


class LeaseGone(Exception):
    """The job is no longer this worker's (cancelled, lease lost or surely expired)."""


class JobRun:
    """One leased job: latest progress, last contact with the server, and the lost flag.

    Thread-safe: written by the stdout reader (progress) and the heartbeat thread (contact,
    loss), read by the job thread.
    """

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self.job_id = lease.job.job_id
        self._lock = threading.Lock()
        self._progress = 0.0
        self._message = "starting"
        self._last_contact = time.monotonic()
        self._gone_reason = ""
        self.gone = threading.Event()

    def report(self, progress: float, message: str) -> None:
        with self._lock:
            self._progress = min(1.0, max(0.0, progress))
            self._message = message[:MAX_MESSAGE_CHARS]

    def set_message(self, message: str) -> None:
        with self._lock:
            self._message = message[:MAX_MESSAGE_CHARS]

    def snapshot(self) -> tuple[float, str]:
        with self._lock:
            return self._progress, self._message

    def touch(self) -> None:
        """The server just accepted a call under this lease."""
        with self._lock:
            self._last_contact = time.monotonic()

    def surely_expired(self) -> bool:
        """No call was accepted for a whole lease: the job is (or, once the server is back,
        will be) another worker's."""
        with self._lock:
            return time.monotonic() - self._last_contact > self.lease.lease_seconds

    def lose(self, reason: str) -> None:
        with self._lock:
            if not self._gone_reason:
                self._gone_reason = reason
        self.gone.set()

    @property
    def gone_reason(self) -> str:
        with self._lock:
            return self._gone_reason
