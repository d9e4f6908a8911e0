"""Garbage collection and eviction of the blob store, written once above the seams.

One `GarbageCollector.collect` (the `CollectGarbage` rpc, `prebake gc`, and the background
collector every `gc_interval_seconds`) does, in order:

1. **Stale uploads**: unfinished uploads untouched for `stale_upload_seconds`, and the backend's
   own leftover temporary files (`BlobStore.collect_uploads`).
2. **Quarantined blobs** older than `quarantine_grace_seconds` (`BlobStore.collect_quarantined`;
   whatever quarantines a blob, a failed read check or the integrity sweep, moves it under
   `quarantine/`, which is all this step needs).
3. **Orphaned blobs**: stored blobs that no artifact (file or producer log) and no job log
   references, stored at least `unreferenced_blob_grace_seconds` ago. The grace is the time an
   uploader has to publish what it uploaded; until it passes such a blob counts against the
   quota like any other, afterwards it goes, so no client can fill the store for good.
4. **Eviction**, only with a quota: while blobs and uploads take more than
   `eviction_high_water` of `max_store_bytes`, unpinned artifacts are deleted least recently
   used first (`ArtifactIndex.least_recently_used`), down to `eviction_low_water`. Never one
   that is pinned, accessed (a lookup hit, or its publish) within `eviction_protect_seconds`
   (its download may still be running: presigned downloads bypass the server), or one of whose
   blobs this replica is streaming right now (`InUse`). An evicted artifact goes exactly as
   `DeleteArtifact` removes it: registry row first, then the blobs no other artifact uses.

Races. Deletes of blobs run under `ServerState.blob_refs`, the lock every publish holds from
"every blob is present" to its registry write, and re-check the reference inside it, so a publish
of this replica never loses a blob it relies on. Blobs a client was told are present
(`FindMissingBlobs`) within the grace are kept too (`InUse.wanted`), so a publish that reuses an
old orphaned blob instead of uploading it finds it. Across replicas the grace is what protects
(an upload on another replica is younger than it); an artifact about to be evicted is re-read
under the lock and kept if it changed (re-published, pinned or accessed) since it was chosen.

Dry run: nothing is removed; the report says what would be. Its eviction bytes are an upper
bound (blobs an evicted artifact shares with a kept one would not be freed).

Thread safety: event-loop only, like `ServerState`; blocking storage calls go to its I/O pool.
One collection runs at a time per server (a second caller waits for the first to finish).
Errors: what the seams raise (`Unavailable` for storage that cannot be reached); a failing step
stops the collection, and what was removed before it stays removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prebake.core.errors import FailedPrecondition, NotFound
from prebake.server.blobs import Collected, StoreUsage
from prebake.server.records import Artifact, Digest

if TYPE_CHECKING:
    from prebake.server.state import ServerState

log = logging.getLogger("prebake.server.gc")

# Unpinned artifacts read per eviction round, least recently used first.
EVICTION_SCAN = 1000
# Blobs found present by FindMissingBlobs remembered at most (oldest forgotten first).
MAX_WANTED = 100_000
# A blob found referenced is not checked again for this long (one registry query per blob
# per run would be most of a collection's cost on DynamoDB); an orphan left by a replace is
# collected this much later at most.
REFERENCED_RECHECK_SECONDS = 3600.0
NOTHING = Collected(0, 0)
NO_USAGE = StoreUsage(0, 0, 0, 0)


class InUse:
    """What this server is using right now: blobs being streamed, blobs promised present.

    In memory, of this replica only; event-loop only (no locks).
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._reading: Counter[Digest] = Counter()
        self._wanted: dict[Digest, float] = {}

    @contextlib.contextmanager
    def reading(self, digest: Digest) -> Iterator[None]:
        """Mark `digest` as being streamed to a client for the duration of the block."""
        self._reading[digest] += 1
        try:
            yield
        finally:
            self._reading[digest] -= 1
            if self._reading[digest] <= 0:
                del self._reading[digest]

    def is_reading(self, digest: Digest) -> bool:
        return self._reading[digest] > 0 if digest in self._reading else False

    def wanted(self, digests: Iterable[Digest]) -> None:
        """Record that a client was told these blobs are present (it may publish them next)."""
        now = self._clock()
        for digest in digests:
            self._wanted.pop(digest, None)
            self._wanted[digest] = now
        while len(self._wanted) > MAX_WANTED:
            del self._wanted[next(iter(self._wanted))]

    def wanted_since(self, digest: Digest, cutoff: float) -> bool:
        """Whether a client was told `digest` is present after `cutoff`."""
        at = self._wanted.get(digest)
        return at is not None and at > cutoff

    def forget_wanted_before(self, cutoff: float) -> None:
        for digest in [d for d, at in self._wanted.items() if at <= cutoff]:
            del self._wanted[digest]


@dataclass
class GcReport:
    """What one collection removed (or, in a dry run, would remove)."""

    dry_run: bool
    stale_uploads: Collected = NOTHING
    quarantined_blobs: Collected = NOTHING
    orphaned_blobs: Collected = NOTHING
    evicted_artifact_ids: list[str] = field(default_factory=list)
    evicted_blobs: Collected = NOTHING
    # Eviction candidates kept because they were in use (accessed lately or being read).
    kept_in_use: int = 0
    usage: StoreUsage = NO_USAGE

    @property
    def removed_anything(self) -> bool:
        return bool(
            self.stale_uploads.items
            or self.quarantined_blobs.items
            or self.orphaned_blobs.items
            or self.evicted_artifact_ids
        )

    def summary(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        return (
            f"garbage collection {verb} {self.stale_uploads.items} stale upload(s) "
            f"({self.stale_uploads.bytes} bytes), {self.quarantined_blobs.items} quarantined blob(s) "
            f"({self.quarantined_blobs.bytes} bytes), {self.orphaned_blobs.items} unreferenced blob(s) "
            f"({self.orphaned_blobs.bytes} bytes) and evicted {len(self.evicted_artifact_ids)} "
            f"artifact(s) ({self.evicted_blobs.bytes} bytes)"
        )


def _blobs_of(artifact: Artifact) -> set[Digest]:
    found = {f.digest for f in artifact.files}
    if artifact.producer.log is not None:
        found.add(artifact.producer.log)
    return found


class GarbageCollector:
    """See the module docstring. Built once per server over its `ServerState`."""

    def __init__(self, state: ServerState, clock: Callable[[], float] = time.time) -> None:
        self.s = state
        self._clock = clock
        self._one_at_a_time = asyncio.Lock()
        # Blobs found referenced, not asked about again before the time given (see _collect_orphans).
        self._referenced_until: dict[Digest, float] = {}
        self.runs = 0
        self.last_report: GcReport | None = None

    async def collect(self, dry_run: bool = False) -> GcReport:
        """Run one collection (see the module docstring) and return its report."""
        async with self._one_at_a_time:
            s, c = self.s, self.s.config
            report = GcReport(dry_run=dry_run)
            # Access times current before choosing what is least recently used; counters
            # current (other replicas' uploads and deletes) before comparing with the quota.
            await s.tracker.flush()
            await s.run_blocking(s.blobs.rescan)
            report.stale_uploads = await s.run_blocking(
                functools.partial(s.blobs.collect_uploads, c.stale_upload_seconds, dry_run=dry_run)
            )
            report.quarantined_blobs = await s.run_blocking(
                functools.partial(s.blobs.collect_quarantined, c.quarantine_grace_seconds, dry_run=dry_run)
            )
            report.orphaned_blobs = await self._collect_orphans(dry_run)
            await self._evict(report, dry_run)
            report.usage = s.blobs.usage()
            self.runs += 1
            self.last_report = report
            return report

    async def _collect_orphans(self, dry_run: bool) -> Collected:
        s = self.s
        now = self._clock()
        cutoff = now - s.config.unreferenced_blob_grace_seconds
        s.in_use.forget_wanted_before(cutoff)
        self._referenced_until = {d: t for d, t in self._referenced_until.items() if t > now}
        stored = await s.run_blocking(lambda: list(s.blobs.list_blobs()))
        index = s.storage.artifacts
        removed = NOTHING
        for blob in stored:
            digest = blob.digest
            if blob.stored_at > cutoff or self._in_use(digest, cutoff):
                continue
            if self._referenced_until.get(digest, 0.0) > now:
                continue
            if await index.is_referenced(digest):
                # Stays referenced until its artifact goes, and DeleteArtifact and eviction
                # delete the blobs they free themselves: no need to ask again every run.
                self._referenced_until[digest] = now + REFERENCED_RECHECK_SECONDS
                continue
            if dry_run:
                removed += Collected(1, digest.size)
                continue
            async with s.blob_refs:
                # Re-checked under the lock: a publish of this replica may have named it since.
                if self._in_use(digest, cutoff) or await index.is_referenced(digest):
                    continue
                if await s.run_blocking(s.blobs.delete, digest):
                    removed += Collected(1, digest.size)
        return removed

    def _in_use(self, digest: Digest, cutoff: float) -> bool:
        return self.s.in_use.is_reading(digest) or self.s.in_use.wanted_since(digest, cutoff)

    def _recent(self, artifact: Artifact) -> bool:
        return self._clock() - artifact.last_accessed_at < self.s.config.eviction_protect_seconds

    def _protected(self, artifact: Artifact) -> bool:
        """Accessed too recently, or one of its blobs is being read (files needed)."""
        return self._recent(artifact) or any(self.s.in_use.is_reading(d) for d in _blobs_of(artifact))

    async def _evict(self, report: GcReport, dry_run: bool) -> None:
        s, c = self.s, self.s.config
        quota = s.blobs.usage().max_store_bytes
        if not quota or s.blobs.usage().used_bytes <= c.eviction_high_water * quota:
            return
        target = c.eviction_low_water * quota
        # In a dry run nothing is freed: count down what would be.
        used = s.blobs.usage().used_bytes
        if dry_run:
            used -= report.orphaned_blobs.bytes + report.stale_uploads.bytes
        counted: set[Digest] = set()
        for candidate in await s.storage.artifacts.least_recently_used(EVICTION_SCAN):
            if used <= target:
                return
            if self._recent(candidate):  # decided without reading its files
                report.kept_in_use += 1
                continue
            artifact = await s.storage.artifacts.get(candidate.artifact_id)
            if artifact is None or artifact.pinned:
                continue
            if self._protected(artifact):
                report.kept_in_use += 1
                continue
            if dry_run:
                freed = _blobs_of(artifact) - counted
                counted |= freed
                report.evicted_artifact_ids.append(artifact.artifact_id)
                report.evicted_blobs += Collected(len(freed), sum(d.size for d in freed))
                used -= sum(d.size for d in freed)
                continue
            freed_now = await self._evict_one(artifact)
            if freed_now is None:
                continue
            report.evicted_artifact_ids.append(artifact.artifact_id)
            report.evicted_blobs += freed_now
            used = s.blobs.usage().used_bytes
        if used > target:
            log.warning(
                "the blob store stays above its eviction low-water mark (%d of %d bytes used): "
                "the rest is pinned, in use or not an artifact's",
                used,
                quota,
            )

    async def _evict_one(self, chosen: Artifact) -> Collected | None:
        """Delete `chosen` as DeleteArtifact does, unless it changed since it was chosen; None if kept."""
        s = self.s
        async with s.blob_refs:
            # Hits this replica answered since are written first, so the comparison sees them.
            await s.tracker.flush()
            current = await s.storage.artifacts.get(chosen.artifact_id)
            if (
                current is None
                or current.pinned
                or current.manifest_digest != chosen.manifest_digest
                or current.last_accessed_at != chosen.last_accessed_at
                or self._protected(current)
            ):
                return None
            try:
                unreferenced = await s.lifecycle.delete_artifact(chosen.artifact_id, force=False)
            except (NotFound, FailedPrecondition):
                return None  # deleted or pinned by someone else meanwhile
            freed = NOTHING
            for digest in unreferenced:
                if await s.run_blocking(s.blobs.delete, digest):
                    freed += Collected(1, digest.size)
        log.info("evicted artifact %s (%d bytes freed)", chosen.artifact_id, freed.bytes)
        return freed
