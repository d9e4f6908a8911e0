"""The job queue: compile and evaluation jobs, their events, and the one active job per flight.

Primitives only; the lifecycle rules live in `prebake.server.job_lifecycle`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from prebake.server.records import Job, JobEvent, JobState, WorkerCapability
from prebake.server.storage.page_tokens import Page


@dataclass(frozen=True)
class JobQuery:
    """Filters of `JobQueue.list_page`; empty filters match everything."""

    states: tuple[JobState, ...] = ()
    kind: str = ""


class JobQueue(Protocol):
    """Jobs by id, with at most one active (queued or leased) job per `Job.flight`.

    A compile job's flight is its key digest; an evaluation job's is its key and spec, so
    a key may have one active compile job and any number of active evaluation jobs (one
    per distinct spec). A job's purpose, spec, key and id never change. Jobs stored before
    purposes existed read as compile jobs.

    Every stored change of a job bumps its `revision` and appends a `JobEvent` whose
    sequence is that revision, in the same atomic write; `compare_and_set` on the
    revision is the only way to change a job, so concurrent deciders (two workers
    leasing, a heartbeat racing an expiry) cannot both win. Thread safety and failures:
    see `prebake.server.storage`.
    """

    async def get(self, job_id: str) -> Job | None: ...

    async def active(self, key_digest: str) -> Job | None:
        """The key's queued or leased compile job, if any (never an evaluation job)."""
        ...

    async def active_evaluation(self, key_digest: str, spec_digest: str) -> Job | None:
        """The queued or leased evaluation job of the key for the spec of `spec_digest`
        (`EvaluationSpec.digest`), if any: the job an identical evaluation would join."""
        ...

    async def last_finished(self, key_digest: str) -> Job | None:
        """The key's most recently finished compile job (by finished_at), if any."""
        ...

    async def create_if_absent(self, job: Job) -> tuple[Job, bool]:
        """Store `job` (active, revision 1) unless its flight has an active job already.

        Returns (the flight's active job, whether it is `job`). Single flight holds across
        processes and replicas: it is enforced by the engine (a unique index, a
        conditional put), not by a read before the write.
        """
        ...

    async def compare_and_set(self, job: Job, expect_revision: int) -> Job:
        """Store `job` if the stored revision is `expect_revision`; return it as stored.

        The stored job has revision `expect_revision + 1` and an event of that sequence.
        Raises `ConditionFailed` if the revision moved on (or the job is unknown).
        """
        ...

    async def events(self, job_id: str, after_sequence: int = 0) -> list[JobEvent]:
        """The job's events with sequence > `after_sequence`, in order ([] if unknown)."""
        ...

    async def list_page(self, query: JobQuery, page_token: str, limit: int) -> Page[Job]:
        """Jobs newest first (created_at descending, then id); deterministic pages."""
        ...

    async def leasable(self, capabilities: Sequence[WorkerCapability], now: float, limit: int) -> list[Job]:
        """Queued jobs whose retry backoff has passed (`not_before <= now`) that one of
        `capabilities` serves (`WorkerCapability.serves_job`: kind, toolchain, target and
        purpose), oldest first, at most `limit`."""
        ...

    async def expired_leases(self, now: float, limit: int) -> list[Job]:
        """Leased jobs whose lease expired at or before `now`, soonest-expired first."""
        ...

    async def queued_counts(self) -> dict[tuple[str, str], int]:
        """Queued jobs counted by (kind, compile target); only pairs with queued jobs.

        Reads the queued jobs only (an index), for metrics scraped every few seconds.
        """
        ...
