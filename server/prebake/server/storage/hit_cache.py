"""A replica's short-lived cache of published artifacts, in front of a shared artifact index.

A hit is immutable apart from its pin, counters and (rarely) a replace or delete, so a replica
may answer repeated hits from memory instead of a DynamoDB read each. Only present artifacts are
cached: a miss always reads the engine, so an artifact published through any replica is a hit on
every replica at once. What another replica changes (delete, replace, pin, marking unavailable)
is seen here within
`ttl_seconds`; what this replica changes is seen at once (its own writes drop the entry). Hit
counts and access times in a cached artifact may be up to `ttl_seconds` old.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import TypeVar

from prebake.server.records import Artifact, Digest, NormalizedKey, RegistryCounts
from prebake.server.storage.artifact_index import ArtifactIndex, ArtifactQuery, JobWrite
from prebake.server.storage.page_tokens import Page

T = TypeVar("T")


class CachedArtifactIndex:
    """`ArtifactIndex` that answers `get` of recently read artifacts from memory.

    Bounded to `max_entries` (least recently used first out). Thread safe. Every other method
    passes straight through; writes through this instance drop the artifact's entry first.
    """

    def __init__(
        self,
        inner: ArtifactIndex,
        ttl_seconds: float,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner
        self.ttl_seconds = ttl_seconds
        self.max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[float, Artifact]] = OrderedDict()
        # Bumped by every write through this instance: a read that began before a write must
        # not cache what it read (it may predate the write).
        self._writes = 0

    def _forget(self, artifact_id: str) -> None:
        with self._lock:
            self._writes += 1
            self._entries.pop(artifact_id, None)

    def change_marker(self) -> Hashable | None:
        # What another replica changed reaches this cache only by expiry, which no marker of
        # the engine's would say: an answer reused on it could outlive `ttl_seconds`.
        return None

    async def get(self, artifact_id: str) -> Artifact | None:
        now = self._clock()
        with self._lock:
            entry = self._entries.get(artifact_id)
            if entry is not None and entry[0] > now:
                self._entries.move_to_end(artifact_id)
                return entry[1]
            writes = self._writes
        found = await self.inner.get(artifact_id)
        with self._lock:
            if found is None:
                self._entries.pop(artifact_id, None)
            elif writes == self._writes:
                self._entries[artifact_id] = (now + self.ttl_seconds, found)
                self._entries.move_to_end(artifact_id)
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
        return found

    async def _write(self, artifact_id: str, write: Awaitable[T]) -> T:
        # Forgotten before and after: a read that overlapped the write, even one that began
        # after the first forget and read the old item, is not cached.
        self._forget(artifact_id)
        try:
            return await write
        finally:
            self._forget(artifact_id)

    async def put(
        self, artifact: Artifact, *, expect_manifest: str | None, complete: JobWrite | None = None
    ) -> None:
        await self._write(
            artifact.artifact_id, self.inner.put(artifact, expect_manifest=expect_manifest, complete=complete)
        )

    async def delete(self, artifact_id: str, *, expect_manifest: str, expect_pinned: bool) -> None:
        await self._write(
            artifact_id,
            self.inner.delete(artifact_id, expect_manifest=expect_manifest, expect_pinned=expect_pinned),
        )

    async def set_pinned(self, artifact_id: str, pinned: bool) -> Artifact | None:
        return await self._write(artifact_id, self.inner.set_pinned(artifact_id, pinned))

    async def record_hits(self, hits: Mapping[str, tuple[int, float]]) -> None:
        await self.inner.record_hits(hits)

    async def record_lookups(self, lookups: int, hits: int) -> None:
        await self.inner.record_lookups(lookups, hits)

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

    async def mark_unavailable(
        self, artifact_id: str, reason: str, *, expect_manifest: str
    ) -> Artifact | None:
        return await self._write(
            artifact_id, self.inner.mark_unavailable(artifact_id, reason, expect_manifest=expect_manifest)
        )
