"""`ArtifactIndex` that keeps the manifest archive (`prebake.server.manifest_archive`) in step.

Every artifact the index holds is also an object in the blob store's object store, so that
`prebake reindex` can rebuild a lost registry from the bucket. The order of writes makes the
archive a superset of the index at every instant, never less:

* **put**: the manifest object is written with a conditional put (if absent) after the
  artifact's blobs (the caller checked them) and *before* the index write. If the index write
  fails, the object this call wrote is removed again, unless the index now holds that very
  manifest (a concurrent publisher of the same files won). Once the index write succeeds the
  object is made to hold exactly this artifact (it is rewritten if it was another writer's, or
  written again if a concurrent failed writer removed it), and a replaced manifest's object is
  removed.
* **delete**: after the index delete, the artifact's objects are removed (all but one the index
  holds again by then, should a new publish of the key have come in).
* **set_pinned**: the object is rewritten with the new pin, so `reindex` restores pins as they
  were last set (re-checked against the index afterwards, so a concurrent delete or replace
  never leaves a stale object behind).

Object-store calls block (S3 round trips), so they run on the event loop's default executor.
Failures before the index write raise (`QuotaExceeded` when storage is full, `Unavailable`
otherwise) and change nothing; failures after it are logged, never raised: the registry change
stands, and the log says which artifact's archive to check. What the archive cannot promise
under concurrency (two independent stores, no transaction between them): a failed writer may
remove an object in the instant between a concurrent winner's re-check and its own delete, and
a process killed between the object write and the index write leaves an object of an artifact
the index never held (`reindex` restores it, since its blobs are present).

Thread safety: like the inner index; this class keeps no state of its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable, Mapping
from typing import TypeVar

from prebake.core.errors import PrebakeError, QuotaExceeded, Unavailable
from prebake.server.blobs.objects import (
    ObjectInfo,
    ObjectStore,
    ObjectStoreError,
    PreconditionFailed,
    StorageFull,
)
from prebake.server.manifest_archive import artifact_prefix, encode, manifest_key, parse_manifest_key
from prebake.server.records import Artifact, Digest, NormalizedKey, RegistryCounts
from prebake.server.storage.artifact_index import ArtifactIndex, ArtifactQuery, JobWrite
from prebake.server.storage.page_tokens import Page

log = logging.getLogger("prebake.server.archive")
T = TypeVar("T")
# Rewrites of one artifact's object after a pin change, should pins keep changing meanwhile.
_PIN_ROUNDS = 3


def _blocking(fn: Callable[..., T], *args: object) -> asyncio.Future[T]:
    return asyncio.get_running_loop().run_in_executor(None, fn, *args)


class ArchivedArtifactIndex:
    """`inner`, with each artifact's manifest archived in `objects`; see the module docstring."""

    def __init__(self, inner: ArtifactIndex, objects: ObjectStore) -> None:
        self.inner = inner
        self.objects = objects

    # -- object-store steps (blocking; run off the loop) ----------------------------------

    def _create(self, key: str, body: bytes) -> ObjectInfo | None:
        """The object written, or None if one existed already (another writer's or stale)."""
        try:
            return self.objects.put(key, body, if_absent=True)
        except PreconditionFailed:
            return None

    def _settle(self, key: str, body: bytes, written: ObjectInfo | None) -> None:
        """After a successful index write: make the object hold `body`."""
        if written is None or self.objects.head(key) is None:
            self.objects.put(key, body)

    def _delete_if_unchanged(self, key: str, etag: str) -> None:
        info = self.objects.head(key)
        if info is not None and info.etag == etag:
            self.objects.delete(key)

    def _remove_all_but(self, artifact_id: str, keep: str | None) -> int:
        removed = 0
        for info in list(self.objects.list_objects(artifact_prefix(artifact_id))):
            parsed = parse_manifest_key(info.key)
            if parsed is not None and parsed[1] != keep and self.objects.delete(info.key):
                removed += 1
        return removed

    # -- writes -------------------------------------------------------------------------

    async def put(
        self, artifact: Artifact, *, expect_manifest: str | None, complete: JobWrite | None = None
    ) -> None:
        key = manifest_key(artifact.artifact_id, artifact.manifest_digest)
        body = encode(artifact)
        try:
            written = await _blocking(self._create, key, body)
        except StorageFull as exc:
            raise QuotaExceeded(
                f"no space left to archive the manifest of artifact {artifact.artifact_id}: {exc}"
            ) from exc
        except (OSError, ObjectStoreError) as exc:
            # The store's own errors name object keys; a plain OSError's text names a server
            # path, which no client may see: its reason only (the log has the rest).
            reason = str(exc) if isinstance(exc, ObjectStoreError) else exc.strerror or type(exc).__name__
            raise Unavailable(
                f"could not archive the manifest of artifact {artifact.artifact_id} in the blob store "
                f"({reason}); nothing was published, retry"
            ) from exc
        try:
            await self.inner.put(artifact, expect_manifest=expect_manifest, complete=complete)
        except Exception:
            if written is not None:
                await self._undo(artifact, key, written)
            raise
        await self._after_write(artifact.artifact_id, lambda: self._settle(key, body, written))
        if expect_manifest is not None and expect_manifest != artifact.manifest_digest:
            old = manifest_key(artifact.artifact_id, expect_manifest)
            await self._after_write(artifact.artifact_id, lambda: self.objects.delete(old))

    async def _undo(self, artifact: Artifact, key: str, written: ObjectInfo) -> None:
        """Remove the object a failed index write left, unless the index holds that manifest."""
        try:
            stored = await self.inner.get(artifact.artifact_id)
            if stored is not None and stored.manifest_digest == artifact.manifest_digest:
                return
            await _blocking(self._delete_if_unchanged, key, written.etag)
        except (PrebakeError, OSError, ObjectStoreError) as exc:
            log.warning(
                "could not remove the archived manifest %s of a publish that failed (%s); "
                "`prebake reindex` may restore that artifact",
                key,
                exc,
            )

    async def _after_write(self, artifact_id: str, step: Callable[[], object]) -> None:
        try:
            await _blocking(step)
        except (PrebakeError, OSError, ObjectStoreError) as exc:
            log.error(
                "the registry change of artifact %s stands, but its archived manifest under %s could not "
                "be updated (%s): `prebake reindex` would restore it as it was",
                artifact_id,
                artifact_prefix(artifact_id),
                exc,
            )

    async def delete(self, artifact_id: str, *, expect_manifest: str, expect_pinned: bool) -> None:
        await self.inner.delete(artifact_id, expect_manifest=expect_manifest, expect_pinned=expect_pinned)
        try:
            again = await self.inner.get(artifact_id)
        except PrebakeError as exc:
            log.error("artifact %s was deleted, but its archived manifest stays (%s)", artifact_id, exc)
            return
        keep = again.manifest_digest if again is not None else None
        await self._after_write(artifact_id, lambda: self._remove_all_but(artifact_id, keep))

    async def set_pinned(self, artifact_id: str, pinned: bool) -> Artifact | None:
        found = await self.inner.set_pinned(artifact_id, pinned)
        current = found
        for _ in range(_PIN_ROUNDS):
            if current is None:
                break
            key, body = manifest_key(artifact_id, current.manifest_digest), encode(current)
            try:
                info = await _blocking(self.objects.put, key, body)
                after = await self.inner.get(artifact_id)
                if after is None or after.manifest_digest != current.manifest_digest:
                    # Deleted or replaced meanwhile: the object just rewritten is stale.
                    await _blocking(self._delete_if_unchanged, key, info.etag)
                    break
            except (PrebakeError, OSError, ObjectStoreError) as exc:
                log.error(
                    "artifact %s was %s, but its archived manifest could not be updated (%s): "
                    "`prebake reindex` would restore the previous pin",
                    artifact_id,
                    "pinned" if pinned else "unpinned",
                    exc,
                )
                break
            current = None if after.pinned == current.pinned else after
        return found

    async def record_hits(self, hits: Mapping[str, tuple[int, float]]) -> None:
        await self.inner.record_hits(hits)

    async def record_lookups(self, lookups: int, hits: int) -> None:
        await self.inner.record_lookups(lookups, hits)

    async def mark_unavailable(
        self, artifact_id: str, reason: str, *, expect_manifest: str
    ) -> Artifact | None:
        # Not archived: the archive restores what was published; a sweep after `reindex` finds
        # a lost blob again.
        return await self.inner.mark_unavailable(artifact_id, reason, expect_manifest=expect_manifest)

    # -- reads ---------------------------------------------------------------------------

    async def get(self, artifact_id: str) -> Artifact | None:
        return await self.inner.get(artifact_id)

    def change_marker(self) -> Hashable | None:
        return self.inner.change_marker()

    async def list_page(self, query: ArtifactQuery, page_token: str, limit: int) -> Page[Artifact]:
        return await self.inner.list_page(query, page_token, limit)

    async def of_model(self, kind: str, model: str, limit: int) -> list[Artifact]:
        return await self.inner.of_model(kind, model, limit)

    async def nearest(self, key: NormalizedKey, limit: int) -> list[Artifact]:
        return await self.inner.nearest(key, limit)

    async def is_referenced(self, digest: Digest) -> bool:
        return await self.inner.is_referenced(digest)

    async def least_recently_used(self, limit: int) -> list[Artifact]:
        return await self.inner.least_recently_used(limit)

    async def counts(self) -> RegistryCounts:
        return await self.inner.counts()

    async def artifacts_using(self, digest: Digest, limit: int) -> list[str]:
        return await self.inner.artifacts_using(digest, limit)
