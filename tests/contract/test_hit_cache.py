"""A replica's hit cache over every backend: what another replica changes shows within the TTL,
what this replica changes and what anyone publishes shows at once."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from prebake.server.storage.bundle import Storage
from prebake.server.storage.hit_cache import CachedArtifactIndex
from tests.contract.samples import Clock, make_artifact, make_key
from tests.contract.storage_backends import Backend

TTL = 5.0


async def test_a_publish_elsewhere_is_a_hit_at_once(storage: Storage, backend: Backend) -> None:
    clock = Clock()
    cached = CachedArtifactIndex(storage.artifacts, TTL, clock=clock)
    artifact = make_artifact()
    assert await cached.get(artifact.artifact_id) is None
    other = backend.open()
    try:
        await other.artifacts.put(artifact, expect_manifest=None)
    finally:
        other.close()
    # Misses are never cached.
    assert await cached.get(artifact.artifact_id) == artifact


async def test_a_delete_elsewhere_shows_within_the_ttl(storage: Storage, backend: Backend) -> None:
    clock = Clock()
    cached = CachedArtifactIndex(storage.artifacts, TTL, clock=clock)
    artifact = make_artifact()
    await storage.artifacts.put(artifact, expect_manifest=None)
    assert await cached.get(artifact.artifact_id) == artifact
    other = backend.open()
    try:
        await other.artifacts.delete(
            artifact.artifact_id, expect_manifest=artifact.manifest_digest, expect_pinned=False
        )
    finally:
        other.close()
    clock.advance(TTL - 0.5)
    assert await cached.get(artifact.artifact_id) == artifact  # still cached: hits are immutable
    clock.advance(1.0)
    assert await cached.get(artifact.artifact_id) is None


async def test_writes_through_the_cache_show_at_once(storage: Storage) -> None:
    clock = Clock()
    cached = CachedArtifactIndex(storage.artifacts, TTL, clock=clock)
    artifact = make_artifact()
    await cached.put(artifact, expect_manifest=None)
    assert await cached.get(artifact.artifact_id) == artifact
    pinned = await cached.set_pinned(artifact.artifact_id, True)
    assert pinned is not None and pinned.pinned
    got = await cached.get(artifact.artifact_id)
    assert got is not None and got.pinned
    await cached.delete(artifact.artifact_id, expect_manifest=artifact.manifest_digest, expect_pinned=True)
    assert await cached.get(artifact.artifact_id) is None


async def test_the_cache_is_bounded_least_recently_used_first(storage: Storage) -> None:
    clock = Clock()
    cached = CachedArtifactIndex(storage.artifacts, TTL, max_entries=2, clock=clock)
    artifacts = [make_artifact(make_key(model=f"m{i}")) for i in range(3)]
    for a in artifacts:
        await storage.artifacts.put(a, expect_manifest=None)
        assert await cached.get(a.artifact_id) == a
    # The first fell out, so a change to it elsewhere shows at once; the last two are cached.
    await storage.artifacts.set_pinned(artifacts[0].artifact_id, True)
    await storage.artifacts.set_pinned(artifacts[2].artifact_id, True)
    first = await cached.get(artifacts[0].artifact_id)
    last = await cached.get(artifacts[2].artifact_id)
    assert first is not None and first.pinned
    assert last == replace(artifacts[2], pinned=False)


class _GatedWrites:
    """An index whose `mark_unavailable` waits for `gate` before writing (a slow write)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def mark_unavailable(self, artifact_id: str, reason: str, *, expect_manifest: str) -> Any:
        self.waiting.set()
        await self.gate.wait()
        return await self.inner.mark_unavailable(artifact_id, reason, expect_manifest=expect_manifest)


async def test_a_read_overlapping_a_write_is_not_cached(storage: Storage) -> None:
    gated = _GatedWrites(storage.artifacts)
    cached = CachedArtifactIndex(gated, TTL, clock=Clock())
    artifact = make_artifact()
    await storage.artifacts.put(artifact, expect_manifest=None)
    write = asyncio.ensure_future(
        cached.mark_unavailable(artifact.artifact_id, "lost", expect_manifest=artifact.manifest_digest)
    )
    await gated.waiting.wait()
    # Read while the write is in flight: the old item, which must not stay cached.
    assert await cached.get(artifact.artifact_id) == artifact
    gated.gate.set()
    await write
    got = await cached.get(artifact.artifact_id)
    assert got is not None and got.unavailable == "lost"
