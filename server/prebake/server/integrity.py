"""Integrity of what the registry serves: the sweep that re-hashes blobs, and self-repair.

A blob can be lost behind the server's back (a disk's bit rot, a file deleted by hand, an object
removed from the bucket). Reads never serve such bytes (the blob store verifies, the client
verifies again), but without repair a lookup would keep answering HIT for an artifact that can no
longer be fetched. So whenever a blob is found missing or corrupt, by `sweep` (periodic, or
`prebake verify`) or by a `Read` that hit it (`blob_lost`):

1. a corrupt blob is quarantined (moved aside under `quarantine/`, kept for inspection;
   garbage collection removes it after a grace through `BlobStore.collect_quarantined`);
2. every artifact naming it is marked unavailable in the registry (`ArtifactIndex.mark_unavailable`):
   lookups stop hitting it and go down the miss path instead (single flight: COMPILING if a job
   is in flight, else a new job when the lookup asks to enqueue);
3. an artifact that was compiled here (its key's last job succeeded) is rebuilt at once: its
   compile is enqueued through the normal single-flight path with that job's model source, so
   the next lookup is COMPILING. Publishing the key again (the rebuild completing, or an
   operator's publish) stores a new, available artifact.

The sweep re-hashes stored blobs least recently verified first (each good one is recorded, in
the store, so several replicas and restarts share the order and a blob another replica just
verified is skipped), at most `bytes_per_second`, and checks that every blob an artifact names
is stored. Thread safety: coroutines of the server's event loop; the hashing runs on the loop's
default executor (not the I/O pool that serves reads) and stops soon after the sweep is
cancelled or closed.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

from prebake.server.blobs import ScrubOutcome, ScrubResult
from prebake.server.records import Artifact, Digest, Job, JobState
from prebake.server.state import ServerState
from prebake.server.storage import ArtifactQuery

log = logging.getLogger("prebake.server.integrity")

# Artifacts one lost blob can make unavailable in one repair (a blob shared by more is rare;
# the rest are found by the next sweep, which comes back to the blob while it is missing).
MAX_AFFECTED = 1000
_LIST_PAGE = 500


class Problem(enum.StrEnum):
    MISSING = "missing"
    CORRUPT = "corrupt"


@dataclass(frozen=True)
class Damage:
    """One lost blob and what was done about it."""

    digest: Digest
    problem: Problem
    detail: str
    artifact_ids: tuple[str, ...] = ()
    """Artifacts naming the blob (marked unavailable, when repairing)."""
    job_ids: tuple[str, ...] = ()
    """Compile jobs enqueued or joined to rebuild them."""


@dataclass
class SweepProgress:
    """Where a sweep stands; cumulative."""

    blobs_total: int = 0
    blobs_checked: int = 0
    bytes_hashed: int = 0
    damaged: list[Damage] = field(default_factory=list)
    done: bool = False


class SweepStopped(Exception):
    """The sweep was cancelled while a blob was being hashed."""


class Throttle:
    """Paces hashing to `bytes_per_second` (0: unlimited); raises `SweepStopped` once `stop` is set.

    Called from one executor thread at a time, after each chunk hashed.
    """

    def __init__(
        self,
        bytes_per_second: int,
        stop: threading.Event,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bytes_per_second = bytes_per_second
        self.stop = stop
        self._clock = clock
        self._due = clock()

    def __call__(self, n: int) -> None:
        if self.stop.is_set():
            raise SweepStopped
        if self.bytes_per_second <= 0:
            return
        now = self._clock()
        self._due = max(self._due, now) + n / self.bytes_per_second
        # Waits on the event, so that a stop ends the wait at once.
        if self.stop.wait(max(0.0, self._due - now)):
            raise SweepStopped


def _reason(digest: Digest, problem: Problem) -> str:
    if problem is Problem.MISSING:
        return f"blob {digest} is missing from the blob store"
    return f"blob {digest} was found corrupt in the blob store and quarantined"


async def _rebuild(state: ServerState, artifact: Artifact, reason: str) -> Job | None:
    """The key's compile job (in flight, or enqueued now) if a job can rebuild the artifact."""
    jobs = state.storage.jobs
    active = await jobs.active(artifact.artifact_id)
    if active is not None:
        return active
    last = await jobs.last_finished(artifact.artifact_id)
    if last is None or last.state is not JobState.SUCCEEDED:
        # Not compiled here (published from elsewhere): a lookup naming a model source will
        # enqueue a compile, since the artifact no longer hits.
        return None
    job, created = await state.lifecycle.create_or_join(
        artifact.key, last.model_source, state.config.job_max_attempts, message=f"rebuilding: {reason}"
    )
    if created:
        state.hub.notify([job.job_id])
        state.work.fire()
    return job


async def blob_lost(
    state: ServerState, digest: Digest, problem: Problem, detail: str, *, detected_at: float | None = None
) -> Damage:
    """Mark every artifact naming `digest` unavailable and enqueue the rebuilds a job can do.

    Called once the blob is known missing or corrupt (a corrupt one already quarantined), with
    `detected_at` no later than the check that found it (default: now). Does nothing if the blob
    is stored again by now (re-uploaded meanwhile: nothing is lost), and leaves alone artifacts
    created at or after `detected_at`: they were published after their blobs were found present
    (a rebuild that raced this repair). Artifacts already marked are not marked again, but their
    rebuild is still ensured.
    """
    since = time.time() if detected_at is None else detected_at
    index = state.storage.artifacts
    ids = await index.artifacts_using(digest, MAX_AFFECTED)
    if not ids or await state.run_blocking(state.blobs.contains, digest):
        return Damage(digest, problem, detail)
    reason = _reason(digest, problem)
    marked: list[str] = []
    jobs: list[str] = []
    for artifact_id in ids:
        found = await index.get(artifact_id)
        if found is None or found.created_at >= since:
            continue
        if not found.unavailable:
            if (
                await index.mark_unavailable(artifact_id, reason, expect_manifest=found.manifest_digest)
                is None
            ):
                continue  # replaced or deleted meanwhile: the new manifest is judged on its own
            log.warning("artifact %s is unavailable: %s", artifact_id, reason)
        marked.append(artifact_id)
        job = await _rebuild(state, found, reason)
        if job is not None:
            jobs.append(job.job_id)
    return Damage(digest, problem, detail, tuple(marked), tuple(jobs))


async def referenced_blobs(state: ServerState) -> set[Digest]:
    """Every blob an artifact names (files and producer logs). One listing plus one read per artifact."""
    index = state.storage.artifacts
    found: set[Digest] = set()
    token = ""
    while True:
        page = await index.list_page(ArtifactQuery(), token, _LIST_PAGE)
        for listed in page.items:
            artifact = await index.get(listed.artifact_id)
            if artifact is None:
                continue
            found.update(f.digest for f in artifact.files)
            if artifact.producer.log is not None:
                found.add(artifact.producer.log)
        if not page.next_token:
            return found
        token = page.next_token


async def _damage_of(
    state: ServerState, result: ScrubResult, repair: bool, checked_at: float
) -> Damage | None:
    if result.outcome is ScrubOutcome.GOOD:
        return None
    problem = Problem.MISSING if result.outcome is ScrubOutcome.MISSING else Problem.CORRUPT
    if repair:
        return await blob_lost(state, result.digest, problem, result.detail, detected_at=checked_at)
    # A dry run: who would be affected, nothing changed.
    ids = await state.storage.artifacts.artifacts_using(result.digest, MAX_AFFECTED)
    return Damage(result.digest, problem, result.detail, tuple(ids))


async def sweep(
    state: ServerState, *, limit: int = 0, bytes_per_second: int = 0, repair: bool = True
) -> AsyncGenerator[SweepProgress, None]:
    """Check up to `limit` blobs (0: all), least recently verified first; yield progress.

    Yields once the blobs are counted (`blobs_total`), then after every blob, the last time with
    `done`. With `repair`, corrupt blobs are quarantined and lost ones repaired (`blob_lost`);
    without it nothing is changed and `damaged` says who would be affected. Stops hashing soon
    after the generator is closed or its task cancelled. Raises what the storage raises
    (`Unavailable`): what was checked until then stays recorded.
    """
    loop = asyncio.get_running_loop()
    stop = threading.Event()
    throttle = Throttle(bytes_per_second, stop)
    progress = SweepProgress()
    started = time.time()
    try:
        referenced = await referenced_blobs(state)
        order = await loop.run_in_executor(None, state.blobs.scrub_order, referenced)
        if limit > 0:
            order = order[:limit]
        progress.blobs_total = len(order)
        yield progress
        for digest in order:
            seen = await loop.run_in_executor(None, state.blobs.last_verified, digest)
            if seen is None or seen < started:  # else another replica just did it
                checked_at = time.time()
                result = await loop.run_in_executor(
                    None, functools.partial(state.blobs.scrub, digest, quarantine=repair, throttle=throttle)
                )
                progress.bytes_hashed += result.hashed_bytes
                damage = await _damage_of(state, result, repair, checked_at)
                if damage is not None:
                    progress.damaged.append(damage)
                    log.warning("integrity sweep: %s", damage.detail)
            progress.blobs_checked += 1
            yield progress
        progress.done = True
        yield progress
    finally:
        stop.set()


async def sweep_periodically(state: ServerState) -> None:
    """Run `sweep` every `integrity_sweep_seconds` (after the first interval), repairing, at
    `integrity_sweep_bytes_per_second`. Never returns; a failed pass is logged and retried at
    the next interval."""
    interval = state.config.integrity_sweep_seconds
    while True:
        await asyncio.sleep(interval)
        try:
            last = SweepProgress()
            async for progress in sweep(
                state, bytes_per_second=state.config.integrity_sweep_bytes_per_second
            ):
                last = progress
            log.info(
                "integrity sweep: %d blobs checked, %d bytes hashed, %d damaged",
                last.blobs_checked,
                last.bytes_hashed,
                len(last.damaged),
            )
        except Exception:
            log.exception("the integrity sweep failed; retrying at the next interval")
