"""The integrity part of the `BlobStore` contract (scrub, its order, the quarantine area), checked
over every object-store backend. Damage is done behind the store's back through a second
instance of the backend's own object store, so it works the same on local disk and S3."""

from __future__ import annotations

import time

import pytest

from prebake.core.errors import DataLoss, InvalidArgument, NotFound
from prebake.server.blobs import ContentAddressedStore, ScrubOutcome
from prebake.server.blobs.cas import blob_key
from prebake.server.records import Digest
from tests.contract.blob_backends import ObjectBackend
from tests.contract.test_content_store import backend, blob_store, digest_of, get, payload, put

__all__ = ["backend", "blob_store"]  # fixtures of the content-store suite, shared


def damage(backend: ObjectBackend, digest: Digest, data: bytes) -> bytes:
    """Replace the stored bytes of `digest` with others of the same length."""
    bad = bytes([data[0] ^ 0xFF]) + data[1:] if data else b"x"
    backend.make().put(blob_key(digest), bad)
    return bad


def test_scrub_of_a_good_blob_hashes_it_and_records_when(blob_store: ContentAddressedStore) -> None:
    data = payload(70_000, seed=1)
    digest = put(blob_store, data)
    assert blob_store.last_verified(digest) is None
    before = blob_store.hashed_bytes
    started = time.time() - 5  # object stores keep whole-second times
    result = blob_store.scrub(digest)
    assert result.outcome is ScrubOutcome.GOOD and result.hashed_bytes == len(data)
    assert blob_store.hashed_bytes == before + len(data)
    verified = blob_store.last_verified(digest)
    assert verified is not None and verified >= started
    # Nothing visible changes: the blob is stored, counted and listed as before.
    assert blob_store.stats() == (1, len(data))
    assert list(blob_store.iter_digests()) == [digest]
    assert get(blob_store, digest) == data


def test_scrub_finds_damage_a_read_stamp_cannot_see(backend: ObjectBackend) -> None:
    store = backend.content_store()
    data = payload(50_000, seed=2)
    digest = put(store, data)
    bad = damage(backend, digest, data)
    result = store.scrub(digest)
    assert result.outcome is ScrubOutcome.CORRUPT
    assert "quarantined" in result.detail
    assert not store.contains(digest)
    assert store.stats() == (0, 0)
    [kept] = store.list_quarantined()
    assert kept.digest == digest and kept.size == len(bad)
    assert kept.key.startswith(f"quarantine/{digest.hash}-{digest.size}.")
    with pytest.raises(NotFound):
        store.read(digest)
    # The bytes are kept for inspection, byte for byte.
    assert b"".join(store.objects.get(kept.key)) == bad
    # The blob can be uploaded again and is then good.
    put(store, data, upload_id="again")
    assert store.scrub(digest).outcome is ScrubOutcome.GOOD


def test_scrub_of_a_wrong_length_blob_quarantines_it(backend: ObjectBackend) -> None:
    store = backend.content_store()
    data = payload(10_000, seed=3)
    digest = put(store, data)
    backend.make().put(blob_key(digest), data[:600])
    result = store.scrub(digest)
    assert result.outcome is ScrubOutcome.CORRUPT and "600 bytes instead of 10000" in result.detail
    assert [q.size for q in store.list_quarantined()] == [600]


def test_a_dry_scrub_reports_without_moving(backend: ObjectBackend) -> None:
    store = backend.content_store()
    data = payload(5_000, seed=4)
    digest = put(store, data)
    damage(backend, digest, data)
    assert store.scrub(digest, quarantine=False).outcome is ScrubOutcome.CORRUPT
    assert store.contains(digest)
    assert store.list_quarantined() == []


def test_scrub_of_an_absent_blob_is_missing(backend: ObjectBackend) -> None:
    store = backend.content_store()
    digest = put(store, payload(100, seed=5))
    backend.make().delete(blob_key(digest))
    result = store.scrub(digest)
    assert result.outcome is ScrubOutcome.MISSING and result.hashed_bytes == 0
    assert store.list_quarantined() == []
    never = digest_of(b"never stored")
    assert store.scrub(never).outcome is ScrubOutcome.MISSING


def test_scrub_honours_its_throttle(blob_store: ContentAddressedStore) -> None:
    data = payload(300_000, seed=6)
    digest = put(blob_store, data)
    seen: list[int] = []
    blob_store.scrub(digest, throttle=seen.append)
    assert sum(seen) == len(data)

    class Stop(Exception):
        pass

    def stop(n: int) -> None:
        raise Stop

    with pytest.raises(Stop):
        blob_store.scrub(digest, throttle=stop)
    assert blob_store.contains(digest)  # a stopped scrub changes nothing


def test_scrub_order_is_least_recently_verified_first(backend: ObjectBackend) -> None:
    store = backend.content_store()
    digests = [put(store, payload(100 + i, seed=10 + i), upload_id=f"o{i}") for i in range(3)]
    absent = digest_of(b"named by an artifact, never stored")
    order = store.scrub_order(also=[absent, digests[0]])
    assert order[0] == absent and sorted(order[1:]) == sorted(digests)
    # Verified ones go to the back. (S3 keeps whole seconds: verify in a later second than
    # the uploads, so that the times differ.)
    first = order[1]
    time.sleep(1.05 - time.time() % 1)
    store.scrub(first)
    order = store.scrub_order()
    assert order[-1] == first and set(order) == set(digests)
    # A deleted blob leaves no stale record behind.
    store.delete(first)
    assert first not in store.scrub_order()
    assert store.last_verified(first) is None


def test_quarantine_area_lists_removes_and_collects(backend: ObjectBackend) -> None:
    store = backend.content_store()
    found = []
    for i in range(2):
        data = payload(1_000, seed=20 + i)
        digest = put(store, data, upload_id=f"q{i}")
        damage(backend, digest, data)
        with pytest.raises(DataLoss):
            store.verify(digest) if backend.rehashes_on_read else _raise_scrub(store, digest)
        found.append(digest)
    listed = store.list_quarantined()
    assert sorted(q.digest for q in listed) == sorted(found)
    assert listed == sorted(listed, key=lambda q: q.quarantined_at)
    assert all(q.quarantined_at <= time.time() for q in listed)
    # Only quarantined keys can be removed through this door.
    for wrong in (blob_key(found[0]), "quarantine/../blobs/x", "uploads/a--b"):
        with pytest.raises(InvalidArgument):
            store.remove_quarantined(wrong)
    assert store.remove_quarantined(listed[0].key)
    assert not store.remove_quarantined(listed[0].key)
    # Collection (garbage collection's hook) takes only what is older than the grace.
    assert store.collect_quarantined(older_than_seconds=3600) == (0, 0)
    assert store.collect_quarantined(older_than_seconds=0) == (1, listed[1].size)
    assert store.list_quarantined() == []


def _raise_scrub(store: ContentAddressedStore, digest: Digest) -> None:
    """Where reads trust the backend's checksums, the sweep is what finds damage."""
    result = store.scrub(digest)
    raise DataLoss(result.detail)
