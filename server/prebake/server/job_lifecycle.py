"""The rules of artifacts and jobs, written once over the storage seams.

Publishing (idempotent, no overwrite unless `replace`, completing the key's active
job), single-flight job creation, leases with fencing tokens, heartbeats, expiry,
retry backoff with bounded attempts, deterministic versus transient failure, release,
cancellation and complete-and-publish as one atomic step. Nothing here knows SQL,
DynamoDB or gRPC: every change is a conditional write of the seams
(`prebake.server.storage`), so the rules hold across processes and replicas exactly as
far as the engine's conditional writes do. A decision made on a stale read loses its
compare-and-set (`ConditionFailed`), re-reads and decides again, a bounded number of
times.

Thread safety: one `JobLifecycle` may serve any number of concurrent coroutines of one
event loop. Errors: domain errors of `prebake.core.errors`; a change that keeps
losing races raises `Busy` (ABORTED, retryable).
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from prebake.core.digests import manifest_digest as core_manifest_digest
from prebake.core.errors import AlreadyExists, Busy, FailedPrecondition, InvalidArgument, NotFound
from prebake.core.signing import Signature
from prebake.core.text_safety import displayable
from prebake.server.records import (
    Artifact,
    Digest,
    ErrorClass,
    EvaluationSpec,
    FileEntry,
    Job,
    JobPurpose,
    JobState,
    NormalizedKey,
    Producer,
    WorkerCapability,
)
from prebake.server.storage import ArtifactIndex, ConditionFailed, JobQueue, JobWrite

BACKOFF_BASE_SECONDS = 5.0
BACKOFF_MAX_SECONDS = 300.0
DEFAULT_LEASE_SECONDS = 60.0
# Enough for any realistic burst of concurrent deciders on one object; past it the
# caller is told to retry rather than spin.
MAX_RACES = 64
LEASE_SCAN = 32
EXPIRY_BATCH = 500
_EXPIRED = "lease expired"
# A failure's text comes from the compile (attacker-influenced: a model's config, a
# toolchain's output) and is shown to every deployer of the key for the negative-cache
# period: it is recorded displayable (no terminal escapes or invisible characters) and
# at most this long. Progress messages likewise, shorter.
MAX_RECORDED_ERROR = 4096
MAX_RECORDED_MESSAGE = 1024
# A decision of `JobLifecycle._change`: the new job, or None to leave it as it is.
_Decide = Callable[[Job, float], Job | None]
# Whether a stored artifact may be replaced by any new publish of its key (e.g. it is signed
# by a revoked key and no longer served).
Supersede = Callable[[Artifact], bool]


def _never(_artifact: Artifact) -> bool:
    return False


def new_job_id() -> str:
    """`j-` and 24 lowercase hex digits (96 random bits)."""
    return "j-" + secrets.token_hex(12)


def retry_backoff(attempts: int, base: float = BACKOFF_BASE_SECONDS) -> float:
    """Seconds a transiently failed job waits before it may be leased again."""
    return min(2.0 ** min(attempts, 16) * base, BACKOFF_MAX_SECONDS)


def manifest_digest(files: Sequence[FileEntry]) -> str:
    """The manifest digest of `files` (`prebake.core.digests.manifest_digest`); any order."""
    return core_manifest_digest((f.path, f.digest.hash, f.digest.size, f.executable) for f in files)


def _path(entry: FileEntry) -> str:
    return entry.path


def new_artifact(
    key: NormalizedKey,
    ordered: tuple[FileEntry, ...],
    producer: Producer,
    now: float,
    *,
    pinned: bool,
    signature: Signature | None = None,
) -> Artifact:
    """The artifact for `key` made of `ordered` (sorted by path), created at `now`."""
    return Artifact(
        artifact_id=key.digest,
        key=key,
        files=ordered,
        file_count=len(ordered),
        total_size=sum(f.digest.size for f in ordered),
        producer=producer,
        created_at=now,
        last_accessed_at=now,
        pinned=pinned,
        manifest_digest=manifest_digest(ordered),
        signature=signature,
    )


# A fencing token is a lease counter in the high bits and 32 random bits below it: it
# still grows with every lease (a later lease always holds a larger token), but a
# worker cannot act for another worker's lease by guessing "mine plus one".
_RANDOM_BITS = 32


def next_fencing_token(previous: int) -> int:
    """The token of the lease after one holding `previous` (0 for a job never leased)."""
    return (((previous >> _RANDOM_BITS) + 1) << _RANDOM_BITS) | secrets.randbits(_RANDOM_BITS)


def lease_number(fencing_token: int) -> int:
    """How many leases the job has had when its current lease holds `fencing_token`."""
    return fencing_token >> _RANDOM_BITS


def _not_leased(job: Job, fencing_token: int) -> FailedPrecondition:
    # The current token is not named: a caller that lost its lease must not learn the
    # token that would let it act for the new holder.
    return FailedPrecondition(
        f"job {job.job_id} is not leased under fencing token {fencing_token} "
        f"(it is {job.state.value}); stop working on it"
    )


def _succeeded(job: Job, artifact_id: str, now: float, log: Digest | None = None) -> Job:
    return replace(
        job,
        state=JobState.SUCCEEDED,
        artifact_id=artifact_id,
        progress=1.0,
        message="artifact published",
        error="",
        error_class=ErrorClass.NONE,
        lease_expires_at=None,
        log=job.log if log is None else log,
        updated_at=now,
        finished_at=now,
    )


class JobLifecycle:
    """Artifacts and jobs, over one `ArtifactIndex` and one `JobQueue` of one engine."""

    def __init__(
        self,
        artifacts: ArtifactIndex,
        jobs: JobQueue,
        *,
        clock: Callable[[], float] = time.time,
        backoff_base: float = BACKOFF_BASE_SECONDS,
    ) -> None:
        self.artifacts = artifacts
        self.jobs = jobs
        self._clock = clock
        self._backoff_base = backoff_base

    # --- the compare-and-set loop ----------------------------------------------------

    async def _change(self, job_id: str, decide: _Decide) -> Job:
        """Apply `decide(current, now)` to the job until its compare-and-set wins.

        `decide` returns the new job, or None to leave the job as it is (returned
        unchanged); it raises to refuse.
        """
        job, _ = await self._decide(job_id, decide)
        return job

    async def _decide(self, job_id: str, decide: _Decide) -> tuple[Job, bool]:
        """`_change`, and whether the job was changed by this call (False: left as it is)."""
        for _ in range(MAX_RACES):
            current = await self.jobs.get(job_id)
            if current is None:
                raise NotFound(f"job {job_id} not found")
            now = self._clock()
            new = decide(current, now)
            if new is None:
                return current, False
            try:
                return await self.jobs.compare_and_set(new, current.revision), True
            except ConditionFailed:
                continue
        raise Busy(f"job {job_id} is being changed concurrently; retry")

    # --- artifacts -------------------------------------------------------------------

    async def publish(
        self,
        key: NormalizedKey,
        files: Sequence[FileEntry],
        producer: Producer,
        replace_existing: bool = False,
        force: bool = False,
        *,
        signature: Signature | None = None,
        supersede: Supersede = _never,
    ) -> tuple[Artifact, bool, list[Job]]:
        """Store the manifest as the artifact for `key`; return (artifact, created, completed jobs).

        Publishing the same file list again changes nothing and returns created=False.
        A different file list raises `AlreadyExists` unless `replace_existing`, which
        swaps the files in (keeping the pin, resetting hits and times); a pinned
        artifact is replaced only with `force` (else `FailedPrecondition`). An artifact
        marked unavailable (`Artifact.unavailable`: a blob lost) is replaced by any publish,
        the same files too, so a republish makes the key available again. The key's
        active job succeeds with the artifact in the same atomic write, also on an
        idempotent re-publish (so a job that raced an earlier publish does not stay in
        flight). The caller has checked that every blob is present (and `signature`, which
        is recorded with the new artifact). A repeated path raises `InvalidArgument`. An
        existing artifact that `supersede` names is replaced by any publish, even of the
        same file list (its pin is kept).
        """
        if not files:
            raise InvalidArgument("an artifact needs at least one file")
        ordered = tuple(sorted(files, key=_path))
        manifest = manifest_digest(ordered)
        for _ in range(MAX_RACES):
            existing = await self.artifacts.get(key.digest)
            # An unavailable artifact (a blob lost) gives way to any publish of its key too: that
            # is how a rebuild or a re-upload repairs it.
            stale = existing is not None and (bool(existing.unavailable) or supersede(existing))
            if existing is not None and existing.manifest_digest == manifest and not stale:
                return existing, False, await self._complete_active(key.digest, existing.artifact_id)
            if existing is not None and replace_existing and existing.pinned and not force and not stale:
                raise FailedPrecondition(
                    f"artifact {existing.artifact_id} is pinned: deploy hosts rely on it staying as it is; "
                    "set `force` with `replace` to replace it anyway, or unpin it first"
                )
            if existing is not None and not replace_existing and not stale:
                raise AlreadyExists(
                    f"artifact {key.digest} for this key already exists with a different file list "
                    f"(manifest {existing.manifest_digest}); set `replace` to replace it"
                )
            now = self._clock()
            artifact = new_artifact(
                key,
                ordered,
                producer,
                now,
                pinned=existing is not None and existing.pinned,
                signature=signature,
            )
            active = await self.jobs.active(key.digest)
            write = None if active is None else JobWrite(_succeeded(active, key.digest, now), active.revision)
            try:
                await self.artifacts.put(
                    artifact,
                    expect_manifest=None if existing is None else existing.manifest_digest,
                    complete=write,
                )
            except ConditionFailed:
                continue
            completed = [] if write is None else [write.stored()]
            # A job created between our read and the write must not stay in flight.
            completed += await self._complete_active(key.digest, key.digest)
            return artifact, True, completed
        raise Busy(f"artifact {key.digest} is being published concurrently; retry")

    async def _complete_active(self, key_digest: str, artifact_id: str) -> list[Job]:
        """Succeed the key's active job, if any, with `artifact_id`."""
        completed: list[Job] = []
        for _ in range(MAX_RACES):
            active = await self.jobs.active(key_digest)
            if active is None:
                return completed
            try:
                stored = await self.jobs.compare_and_set(
                    _succeeded(active, artifact_id, self._clock()), active.revision
                )
            except ConditionFailed:
                continue
            completed.append(stored)
        raise Busy(f"the jobs of key {key_digest} are being changed concurrently; retry")

    async def delete_artifact(self, artifact_id: str, force: bool = False) -> list[Digest]:
        """Delete the artifact; return its blobs that nothing references any more, sorted.

        "Its blobs" are its files and its producer's log; "references" are the files
        of the remaining artifacts, their producers' logs and job logs. The caller
        deletes those blobs. Raises `NotFound`, or `FailedPrecondition` when the
        artifact is pinned and not `force`.
        """
        for _ in range(MAX_RACES):
            found = await self.artifacts.get(artifact_id)
            if found is None:
                raise NotFound(f"artifact {artifact_id} not found")
            if found.pinned and not force:
                raise FailedPrecondition(f"artifact {artifact_id} is pinned; unpin it or set `force`")
            try:
                await self.artifacts.delete(
                    artifact_id, expect_manifest=found.manifest_digest, expect_pinned=found.pinned
                )
            except ConditionFailed:
                continue
            blobs = {f.digest for f in found.files}
            if found.producer.log is not None:
                blobs.add(found.producer.log)
            return sorted([d for d in blobs if not await self.artifacts.is_referenced(d)])
        raise Busy(f"artifact {artifact_id} is being changed concurrently; retry")

    async def set_pinned(self, artifact_id: str, pinned: bool) -> Artifact:
        """Pin or unpin; return the artifact with its files. Raises `NotFound`."""
        found = await self.artifacts.set_pinned(artifact_id, pinned)
        if found is None:
            raise NotFound(f"artifact {artifact_id} not found")
        return found

    # --- jobs ------------------------------------------------------------------------

    async def create_or_join(
        self,
        key: NormalizedKey,
        model_source: str = "",
        max_attempts: int = 3,
        message: str = "waiting for a worker",
        request_id: str = "",
    ) -> tuple[Job, bool]:
        """Return (the active job for the key, whether this call created it).

        Single flight is the queue's `create_if_absent`. A joiner gets the existing job
        unchanged (its model_source, max_attempts and request_id win).
        """
        job = self._new_job(key, max_attempts, message, model_source=model_source, request_id=request_id)
        return await self.jobs.create_if_absent(job)

    def _new_job(
        self, key: NormalizedKey, max_attempts: int, message: str, *, model_source: str, request_id: str
    ) -> Job:
        """A queued compile job of `key`, created now."""
        if max_attempts < 1:
            raise InvalidArgument(f"max_attempts must be at least 1, got {max_attempts}")
        now = self._clock()
        return Job(
            job_id=new_job_id(),
            key=key,
            state=JobState.QUEUED,
            created_at=now,
            updated_at=now,
            max_attempts=max_attempts,
            message=message,
            model_source=model_source,
            request_id=request_id,
        )

    async def create_or_join_evaluation(
        self,
        key: NormalizedKey,
        spec: EvaluationSpec,
        *,
        model_source: str = "",
        max_attempts: int = 3,
        message: str = "waiting for a worker to evaluate",
        request_id: str = "",
    ) -> tuple[Job, bool]:
        """Return (the active evaluation job of `key`'s artifact for `spec`, whether this call
        created it).

        Single flight per key and spec (`Job.flight`): an identical evaluation in flight is
        joined unchanged; a compile job of the key neither blocks nor joins it. The job's
        `artifact_id` is the evaluated artifact (the key digest) from the start.
        """
        job = dataclasses.replace(
            self._new_job(key, max_attempts, message, model_source=model_source, request_id=request_id),
            artifact_id=key.digest,
            purpose=JobPurpose.EVALUATE,
            evaluation=spec,
        )
        return await self.jobs.create_if_absent(job)

    async def complete_evaluation(
        self, job_id: str, fencing_token: int, evaluation_id: str
    ) -> tuple[Job, bool]:
        """Succeed an evaluation job under its lease, recording `evaluation_id`; return (the job,
        whether this call changed it).

        The caller stores the evaluation under the id the returned job holds, after this: the
        job's compare-and-set is the fence, so a worker that lost its lease (`FailedPrecondition`)
        stores nothing. Completing again under the same token returns the job unchanged with
        the id first recorded (a retry after a lost answer stores under that id). Raises
        `NotFound`, and `InvalidArgument` for a compile job.
        """

        def decide(job: Job, now: float) -> Job | None:
            if job.purpose is not JobPurpose.EVALUATE:
                raise InvalidArgument(f"job {job_id} is a compile job; complete it with CompleteJob")
            if job.state is JobState.SUCCEEDED and job.fencing_token == fencing_token and job.evaluation_id:
                return None
            if job.state is not JobState.LEASED or job.fencing_token != fencing_token:
                raise _not_leased(job, fencing_token)
            return replace(
                job,
                state=JobState.SUCCEEDED,
                evaluation_id=evaluation_id,
                progress=1.0,
                message="evaluation stored",
                error="",
                error_class=ErrorClass.NONE,
                lease_expires_at=None,
                updated_at=now,
                finished_at=now,
            )

        return await self._decide(job_id, decide)

    async def evaluation_not_stored(self, job_id: str, error: str) -> Job:
        """Fail a succeeded evaluation job whose evaluation could not be stored after all (its
        artifact was deleted or replaced meanwhile): deterministic, it would not store again."""

        def decide(job: Job, now: float) -> Job | None:
            if job.state is not JobState.SUCCEEDED or job.purpose is not JobPurpose.EVALUATE:
                return None
            return replace(
                job,
                state=JobState.FAILED,
                evaluation_id="",
                message="failed",
                error=displayable(error, MAX_RECORDED_ERROR),
                error_class=ErrorClass.DETERMINISTIC,
                updated_at=now,
                finished_at=now,
            )

        return await self._change(job_id, decide)

    async def set_message(self, job_id: str, message: str) -> Job:
        """Change an active job's message (what a watcher sees it waiting for)."""

        def decide(job: Job, now: float) -> Job | None:
            if not job.state.active or job.message == message:
                return None
            return replace(job, message=message, updated_at=now)

        return await self._change(job_id, decide)

    async def cancel(self, job_id: str, reason: str = "") -> Job:
        """Cancel a queued or leased job; a cancelled job is returned unchanged.

        Raises `NotFound`, or `FailedPrecondition` for a job that already succeeded or
        failed. A worker holding the lease learns at its next heartbeat.
        """

        def decide(job: Job, now: float) -> Job | None:
            if job.state is JobState.CANCELLED:
                return None
            if not job.state.active:
                raise FailedPrecondition(f"job {job_id} already {job.state.value}; nothing to cancel")
            return replace(
                job,
                state=JobState.CANCELLED,
                error=displayable(reason, MAX_RECORDED_ERROR) or "cancelled",
                error_class=ErrorClass.NONE,
                message="cancelled",
                lease_expires_at=None,
                updated_at=now,
                finished_at=now,
            )

        return await self._change(job_id, decide)

    def _failed(self, job: Job, error: str, error_class: ErrorClass, log: Digest | None, now: float) -> Job:
        """The active `job` after a failed attempt: terminal, or queued after a backoff."""
        failed = replace(
            job,
            error=displayable(error, MAX_RECORDED_ERROR),
            error_class=error_class,
            lease_expires_at=None,
            log=job.log if log is None else log,
            updated_at=now,
        )
        if error_class is ErrorClass.DETERMINISTIC or job.attempts >= job.max_attempts:
            return replace(failed, state=JobState.FAILED, message="failed", finished_at=now)
        return replace(
            failed,
            state=JobState.QUEUED,
            progress=0.0,
            not_before=now + retry_backoff(job.attempts, self._backoff_base),
            message=f"retrying after a transient failure (attempt {job.attempts} of {job.max_attempts})",
        )

    async def fail(self, job_id: str, error: str, error_class: ErrorClass, log: Digest | None = None) -> Job:
        """Record a failed attempt of an active job (operators, tests).

        DETERMINISTIC, or no attempts left: the job FAILS (terminal). TRANSIENT with
        attempts left: back to QUEUED, not leasable for `retry_backoff(attempts)`
        seconds. Raises `NotFound`, `FailedPrecondition` for a finished job,
        `InvalidArgument` for ErrorClass.NONE.
        """
        if error_class is ErrorClass.NONE:
            raise InvalidArgument("a failure needs an error class: transient or deterministic")

        def decide(job: Job, now: float) -> Job:
            if not job.state.active:
                raise FailedPrecondition(f"job {job_id} already {job.state.value}; it cannot fail again")
            return self._failed(job, error, error_class, log, now)

        return await self._change(job_id, decide)

    # --- the worker protocol ---------------------------------------------------------

    async def lease(
        self,
        worker: str,
        capabilities: Sequence[WorkerCapability],
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        now: float | None = None,
    ) -> Job | None:
        """Claim the oldest runnable queued job one of `capabilities` serves; None if none.

        Claiming counts an attempt, bumps the fencing token and starts a lease. Two
        workers racing for one job: exactly one compare-and-set wins; the other moves
        on to the next candidate.
        """
        if not capabilities:
            raise InvalidArgument("a worker must advertise at least one capability")
        for _ in range(MAX_RACES):
            at = self._clock() if now is None else now
            candidates = await self.jobs.leasable(capabilities, at, LEASE_SCAN)
            if not candidates:
                return None
            for job in candidates:
                leased = replace(
                    job,
                    state=JobState.LEASED,
                    worker=worker,
                    attempts=job.attempts + 1,
                    fencing_token=next_fencing_token(job.fencing_token),
                    lease_expires_at=at + lease_seconds,
                    progress=0.0,
                    message=f"leased by {worker}",
                    updated_at=at,
                )
                try:
                    return await self.jobs.compare_and_set(leased, job.revision)
                except ConditionFailed:
                    continue
        return None

    async def heartbeat(
        self,
        job_id: str,
        fencing_token: int,
        progress: float,
        message: str,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
    ) -> Job:
        """Extend the lease and record progress (0.0-1.0); return the job.

        Raises `NotFound`, or `FailedPrecondition` when the job is no longer leased
        under `fencing_token` (cancelled, expired and re-leased, finished): the worker
        must stop.
        """
        if not 0.0 <= progress <= 1.0:
            raise InvalidArgument(f"progress must be between 0.0 and 1.0, got {progress}")

        def decide(job: Job, now: float) -> Job:
            if job.state is not JobState.LEASED or job.fencing_token != fencing_token:
                raise _not_leased(job, fencing_token)
            return replace(
                job,
                progress=progress,
                message=displayable(message, MAX_RECORDED_MESSAGE),
                lease_expires_at=now + lease_seconds,
                updated_at=now,
            )

        return await self._change(job_id, decide)

    async def complete(
        self,
        job_id: str,
        fencing_token: int,
        files: Sequence[FileEntry],
        producer: Producer,
        *,
        signature: Signature | None = None,
        supersede: Supersede = _never,
    ) -> tuple[Artifact, list[Job]]:
        """A worker's result: publish `files` as the artifact for the job's key.

        One atomic write conditioned on the lease (a worker that lost its lease, or a
        zombie, gets `FailedPrecondition` and nothing is stored): the artifact is
        created and the job succeeds together. An artifact that an operator published
        for the key meanwhile is kept (`replace` is never implied) and the job succeeds
        with it, unless `supersede` names it or it is marked unavailable (a blob lost: the
        job is its rebuild): then the job's output replaces it (keeping its pin). The caller
        has checked that every blob is present, and `signature`, which is recorded with the
        new artifact.
        """
        if not files:
            raise InvalidArgument("an artifact needs at least one file")
        ordered = tuple(sorted(files, key=_path))
        for _ in range(MAX_RACES):
            job = await self.jobs.get(job_id)
            if job is None:
                raise NotFound(f"job {job_id} not found")
            if job.purpose is not JobPurpose.COMPILE:
                raise InvalidArgument(
                    f"job {job_id} is an evaluation job; complete it with CompleteEvaluationJob"
                )
            if job.state is not JobState.LEASED or job.fencing_token != fencing_token:
                raise _not_leased(job, fencing_token)
            now = self._clock()
            existing = await self.artifacts.get(job.key.digest)
            try:
                if existing is not None and not existing.unavailable and not supersede(existing):
                    done = await self.jobs.compare_and_set(
                        _succeeded(job, existing.artifact_id, now, producer.log), job.revision
                    )
                    return existing, [done]
                artifact = new_artifact(
                    job.key,
                    ordered,
                    producer,
                    now,
                    pinned=existing is not None and existing.pinned,
                    signature=signature,
                )
                write = JobWrite(_succeeded(job, artifact.artifact_id, now, producer.log), job.revision)
                await self.artifacts.put(
                    artifact,
                    expect_manifest=None if existing is None else existing.manifest_digest,
                    complete=write,
                )
            except ConditionFailed:
                continue
            return artifact, [write.stored()]
        raise Busy(f"job {job_id} is being changed concurrently; retry")

    async def fail_leased(
        self, job_id: str, fencing_token: int, error: str, error_class: ErrorClass, log: Digest | None = None
    ) -> Job:
        """`fail` for a worker: only under its current lease (else `FailedPrecondition`)."""
        if error_class is ErrorClass.NONE:
            raise InvalidArgument("a failure needs an error class: transient or deterministic")

        def decide(job: Job, now: float) -> Job:
            if job.state is not JobState.LEASED or job.fencing_token != fencing_token:
                raise _not_leased(job, fencing_token)
            return self._failed(job, error, error_class, log, now)

        return await self._change(job_id, decide)

    async def release(self, job_id: str, fencing_token: int, reason: str = "") -> Job:
        """Give a leased job back to the queue without spending an attempt.

        For a worker shutting down gracefully: the job is runnable again at once.
        Raises `FailedPrecondition` when the lease is no longer the caller's.
        """

        def decide(job: Job, now: float) -> Job:
            if job.state is not JobState.LEASED or job.fencing_token != fencing_token:
                raise _not_leased(job, fencing_token)
            return replace(
                job,
                state=JobState.QUEUED,
                attempts=max(0, job.attempts - 1),
                lease_expires_at=None,
                progress=0.0,
                message=displayable(
                    f"released by {job.worker}" + (f": {reason}" if reason else ""), MAX_RECORDED_MESSAGE
                ),
                updated_at=now,
            )

        return await self._change(job_id, decide)

    async def expire_leases(self, now: float | None = None) -> list[Job]:
        """Treat every lease past its expiry as a transient failure; return the jobs changed.

        A heartbeat that wins the race keeps its lease: the expiry is re-decided on the
        job as it is now.
        """
        at = self._clock() if now is None else now
        changed: list[Job] = []
        for job in await self.jobs.expired_leases(at, EXPIRY_BATCH):
            updated, was_changed = await self._decide(job.job_id, self._expiry(job.fencing_token, at))
            # Not a job another replica expired meanwhile: only the ones this call changed.
            if was_changed:
                changed.append(updated)
        return changed

    def _expiry(self, token: int, at: float) -> _Decide:
        def decide(current: Job, _now: float) -> Job | None:
            expires = current.lease_expires_at
            if current.state is not JobState.LEASED or current.fencing_token != token:
                return None
            if expires is None or expires > at:
                return None
            error = f"{_EXPIRED}: worker {current.worker} stopped heartbeating"
            return self._failed(current, error, ErrorClass.TRANSIENT, None, at)

        return decide
