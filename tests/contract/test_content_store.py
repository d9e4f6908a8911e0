"""The `BlobStore` contract (`ContentAddressedStore`), checked over every object-store backend.

The suite talks to stores only through the `BlobStore`/`BlobWriter` protocols and the backend's
test hooks (`blob_backends`), so a new backend joins by adding one factory there. Local-disk
details are in tests/test_blobstore.py. A "restart" is a new store instance on the same storage.
"""

from __future__ import annotations

import multiprocessing
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from prebake.core.digests import hash_bytes
from prebake.core.errors import (
    Busy,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    QuotaExceeded,
    UploadDigestMismatch,
)
from prebake.server.blobs import (
    BlobReader,
    BlobStore,
    BlobWriter,
    Collected,
    ContentAddressedStore,
    PendingDigest,
    StoreStats,
    UploadStatus,
)
from prebake.server.blobs.cas import QUARANTINE_PREFIX
from prebake.server.records import Digest
from tests.contract.blob_backends import CONTENT_BACKENDS, ObjectBackend

MiB = 1 << 20
SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture(params=CONTENT_BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[ObjectBackend]:
    b: ObjectBackend = request.param(request)
    yield b
    b.cleanup()


@pytest.fixture
def blob_store(backend: ObjectBackend) -> ContentAddressedStore:
    return backend.content_store()


# -- helpers -------------------------------------------------------------------------


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def digest_of(data: bytes) -> Digest:
    return Digest(hash_bytes(data), len(data))


def put(store: BlobStore, data: bytes, upload_id: str = "up-1", chunk: int = 256 * 1024) -> Digest:
    digest = digest_of(data)
    writer = store.open_write(upload_id, digest)
    if writer.complete:
        return digest
    for i in range(0, len(data), chunk):
        writer.append(data[i : i + chunk])
    writer.commit()
    assert writer.complete
    return digest


def get(store: BlobStore, digest: Digest, **kw: int) -> bytes:
    reader = store.read(digest, **kw)
    try:
        return b"".join(reader)
    finally:
        reader.close()


def kept(store: ContentAddressedStore, digest: Digest, appended: int) -> int:
    """What a store keeps of `appended` bytes sent in one writer from 0 and then closed: every full
    part, and the tail if the backend takes a part that small."""
    part = store.part_size_for(digest)
    full = appended // part * part
    tail = appended - full
    return full + (tail if tail >= store.objects.min_part_size else 0)


def unit(store: ContentAddressedStore) -> int:
    """1 MiB, or the backend's minimum part size if bigger. The resume tests' sizes are multiples of
    it, so that whole parts are stored, kept and resumed on every backend (S3 keeps nothing under
    5 MiB)."""
    return max(MiB, store.objects.min_part_size)


def no_uploads_left(store: ContentAddressedStore) -> bool:
    return store.objects.find_uploads("") == [] and list(store.objects.list_objects("uploads/")) == []


MISSING = digest_of(b"never stored anywhere")


# -- round trips and reads -----------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096 + 7])
def test_round_trip_with_small_chunks(blob_store: ContentAddressedStore, size: int) -> None:
    data = payload(size, seed=size)
    digest = put(blob_store, data, chunk=1000)
    assert blob_store.contains(digest)
    blob_store.verify(digest)
    chunks = list(blob_store.read(digest, chunk_size=4096))
    assert b"".join(chunks) == data
    assert all(0 < len(c) <= 4096 for c in chunks)


@pytest.mark.parametrize("size", [MiB - 1, MiB, MiB + 1, 5 * MiB + 3])
def test_round_trip_default_chunks(blob_store: ContentAddressedStore, size: int) -> None:
    data = payload(size, seed=size)
    digest = put(blob_store, data, chunk=4 * MiB)
    chunks = list(blob_store.read(digest))
    assert b"".join(chunks) == data
    assert all(0 < len(c) <= MiB for c in chunks)
    blob_store.verify(digest)


def test_zero_size_blob(blob_store: ContentAddressedStore) -> None:
    digest = digest_of(b"")
    writer = blob_store.open_write("empty", digest)
    assert (writer.committed_size, writer.complete) == (0, False)
    assert not blob_store.contains(digest)
    writer.commit()
    assert blob_store.contains(digest)
    blob_store.verify(digest)
    assert list(blob_store.read(digest)) == []
    assert blob_store.stats() == (1, 0)
    assert blob_store.delete(digest)
    assert not blob_store.contains(digest)


def test_read_offset_and_limit(blob_store: ContentAddressedStore) -> None:
    data = payload(10_000, seed=1)
    digest = put(blob_store, data)
    assert get(blob_store, digest, offset=1234) == data[1234:]
    assert get(blob_store, digest, offset=1234, limit=100) == data[1234:1334]
    assert get(blob_store, digest, limit=1) == data[:1]
    assert get(blob_store, digest, offset=9_990, limit=100) == data[9_990:]
    assert get(blob_store, digest, offset=10_000) == b""
    assert get(blob_store, digest, offset=3, limit=5000, chunk_size=999) == data[3:5003]


def test_read_errors_are_raised_at_the_call(blob_store: ContentAddressedStore) -> None:
    digest = put(blob_store, b"0123456789")
    with pytest.raises(OutOfRange):
        blob_store.read(digest, offset=11)
    with pytest.raises(InvalidArgument):
        blob_store.read(digest, offset=-1)
    with pytest.raises(InvalidArgument):
        blob_store.read(digest, limit=-1)
    with pytest.raises(InvalidArgument):
        blob_store.read(digest, chunk_size=0)
    with pytest.raises(NotFound):
        blob_store.read(MISSING)
    with pytest.raises(NotFound):
        blob_store.verify(MISSING)


def test_reader_can_be_closed_early_and_survives_delete(blob_store: ContentAddressedStore) -> None:
    data = payload(50_000, seed=2)
    digest = put(blob_store, data)
    reader: BlobReader = blob_store.read(digest, chunk_size=1000)
    reader.close()
    reader.close()
    assert list(reader) == []


def test_find_missing_keeps_request_order_without_duplicates(blob_store: ContentAddressedStore) -> None:
    present = put(blob_store, b"present")
    a, b = digest_of(b"a"), digest_of(b"b")
    assert blob_store.find_missing([a, present, b, a, present, b, a]) == [a, b]
    assert blob_store.find_missing([present]) == []
    assert blob_store.find_missing(iter([])) == []


# -- bad uploads ---------------------------------------------------------------------


def test_wrong_hash_stores_nothing(blob_store: ContentAddressedStore) -> None:
    data = payload(5000, seed=3)
    claimed = Digest(hash_bytes(b"something else entirely"), len(data))
    writer = blob_store.open_write("liar", claimed)
    writer.append(data)
    with pytest.raises(UploadDigestMismatch, match="nothing was stored"):
        writer.commit()
    assert not blob_store.contains(claimed)
    assert blob_store.find_missing([claimed]) == [claimed]
    assert blob_store.upload_status("liar", claimed) == (0, False)
    assert blob_store.stats() == (0, 0)
    writer.close()  # ended writers tolerate close/abort
    writer.abort()


@pytest.mark.parametrize("pieces", [[11], [5, 6], [10, 1]])
def test_more_bytes_than_declared(blob_store: ContentAddressedStore, pieces: list[int]) -> None:
    data = payload(sum(pieces), seed=4)
    digest = digest_of(data[:10])
    writer = blob_store.open_write("too-long", digest)
    with pytest.raises(UploadDigestMismatch, match="more than its declared size 10"):
        pos = 0
        for n in pieces:
            writer.append(data[pos : pos + n])
            pos += n
    assert not blob_store.contains(digest)
    assert blob_store.upload_status("too-long", digest) == (0, False)
    with pytest.raises(FailedPrecondition):
        writer.append(b"x")


def test_commit_of_incomplete_upload_keeps_it(blob_store: ContentAddressedStore) -> None:
    data = payload(1000, seed=5)
    digest = digest_of(data)
    writer = blob_store.open_write("short", digest)
    writer.append(data[:600])
    with pytest.raises(InvalidArgument, match="incomplete: 600 of 1000 bytes") as exc:
        writer.commit()
    assert not isinstance(exc.value, UploadDigestMismatch)
    assert not blob_store.contains(digest)
    writer.append(data[600:])
    writer.commit()
    assert get(blob_store, digest) == data


@pytest.mark.parametrize("upload_id", ["", "a" * 129, "a/b", "../x", "a b", "ü", "id\n", "a:b"])
def test_malformed_upload_id(blob_store: ContentAddressedStore, upload_id: str) -> None:
    digest = digest_of(b"x")
    with pytest.raises(InvalidArgument, match="upload id"):
        blob_store.open_write(upload_id, digest)
    with pytest.raises(InvalidArgument, match="upload id"):
        blob_store.upload_status(upload_id, digest)


@pytest.mark.parametrize("upload_id", ["a", "a" * 128, "A.b_c-9", "..", "-x-", "a--b"])
def test_well_formed_upload_ids(blob_store: ContentAddressedStore, upload_id: str) -> None:
    data = payload(100, seed=6)
    digest = put(blob_store, data, upload_id=upload_id)
    assert get(blob_store, digest) == data


# -- writer lifecycle and resume -----------------------------------------------------


def test_interrupted_write_resumes_from_committed_size(blob_store: ContentAddressedStore) -> None:
    data = payload(3 * unit(blob_store) + 17, seed=7)
    digest = digest_of(data)
    half = len(data) // 2
    assert blob_store.upload_status("resume", digest) == (0, False)

    writer = blob_store.open_write("resume", digest)
    writer.append(data[:half])
    writer.close()
    committed = kept(blob_store, digest, half)
    assert writer.committed_size == committed
    assert blob_store.upload_status("resume", digest) == UploadStatus(committed, False)
    assert not blob_store.contains(digest)

    writer = blob_store.open_write("resume", digest)
    assert (writer.committed_size, writer.complete) == (committed, False)
    writer.append(data[committed:])
    writer.commit()
    assert writer.committed_size == len(data)
    assert blob_store.upload_status("resume", digest) == (len(data), True)
    blob_store.verify(digest)
    assert get(blob_store, digest) == data


def test_resume_over_several_sessions(blob_store: ContentAddressedStore) -> None:
    # Steps the backend keeps when a writer closes after each (at least a part's minimum).
    step = 3000 + (blob_store.objects.min_part_size if blob_store.objects.min_part_size > 1 else 0)
    data = payload(3 * step + 1000, seed=8)
    digest = digest_of(data)
    sessions = 0
    while True:
        writer = blob_store.open_write("many", digest)
        start = writer.committed_size
        writer.append(data[start : start + step])
        sessions += 1
        if writer.committed_size == len(data):
            break
        writer.close()
        assert blob_store.upload_status("many", digest).committed_size == writer.committed_size
    writer.commit()
    assert sessions >= 4
    assert get(blob_store, digest) == data


def test_other_upload_id_starts_from_zero(blob_store: ContentAddressedStore) -> None:
    data = payload(4000, seed=9)
    digest = digest_of(data)
    first = blob_store.open_write("first", digest)
    first.append(data[:1000])
    first.close()

    second = blob_store.open_write("second", digest)
    assert second.committed_size == 0
    assert blob_store.upload_status("second", digest) == (0, False)
    assert blob_store.upload_status("first", digest) == (kept(blob_store, digest, 1000), False)
    second.append(data)
    second.commit()

    # Once the blob is stored, every upload of it is complete.
    assert blob_store.upload_status("first", digest) == (4000, True)
    again = blob_store.open_write("first", digest)
    assert (again.complete, again.committed_size) == (True, 4000)


def test_writer_for_stored_blob_is_complete_and_inert(blob_store: ContentAddressedStore) -> None:
    data = b"already here"
    digest = put(blob_store, data)
    writer: BlobWriter = blob_store.open_write("late", digest)
    assert (writer.complete, writer.committed_size, writer.digest) == (True, len(data), digest)
    with pytest.raises(FailedPrecondition):
        writer.append(b"more")
    writer.commit()
    writer.abort()  # must not remove the stored blob
    writer.close()
    assert get(blob_store, digest) == data


def test_writer_end_states(blob_store: ContentAddressedStore) -> None:
    data = payload(300, seed=10)
    digest = digest_of(data)

    writer = blob_store.open_write("ends", digest)
    writer.append(data[:100])
    writer.append(b"")
    assert writer.committed_size == 100
    writer.close()
    writer.close()
    with pytest.raises(FailedPrecondition):
        writer.append(data[100:])
    with pytest.raises(FailedPrecondition):
        writer.commit()
    writer.abort()  # after close: a no-op, the partial stays
    assert blob_store.upload_status("ends", digest) == (kept(blob_store, digest, 100), False)

    writer = blob_store.open_write("ends", digest)
    writer.abort()
    writer.abort()
    assert blob_store.upload_status("ends", digest) == (0, False)
    with pytest.raises(FailedPrecondition):
        writer.append(data)

    writer = blob_store.open_write("ends", digest)
    assert writer.committed_size == 0
    writer.append(data)
    writer.commit()
    writer.commit()
    writer.close()
    writer.abort()
    assert writer.complete
    assert blob_store.contains(digest)


def test_unfinished_upload_is_never_visible(backend: ObjectBackend) -> None:
    store = backend.content_store()
    data = payload(2000, seed=11)
    digest = digest_of(data)
    writer = store.open_write("crash", digest)
    writer.append(data)  # every byte, but no commit
    assert not store.contains(digest)
    assert store.find_missing([digest]) == [digest]
    assert list(store.iter_digests()) == []
    assert store.stats() == (0, 0)
    with pytest.raises(NotFound):
        store.read(digest)
    writer.close()
    fresh = backend.content_store()
    assert not fresh.contains(digest)
    assert fresh.stats() == (0, 0)


# -- concurrency ---------------------------------------------------------------------


def test_same_upload_id_is_busy_while_held(blob_store: ContentAddressedStore) -> None:
    data = payload(1000, seed=12)
    digest = digest_of(data)
    holder = blob_store.open_write("shared", digest)
    holder.append(data[:400])
    with pytest.raises(Busy):
        blob_store.open_write("shared", digest)
    # Other upload ids, and the same id for another blob, are independent.
    other = blob_store.open_write("other", digest)
    other.close()
    unrelated = blob_store.open_write("shared", digest_of(b"unrelated"))
    unrelated.abort()

    holder.close()
    resumed = blob_store.open_write("shared", digest)
    assert resumed.committed_size == kept(blob_store, digest, 400)
    resumed.append(data[resumed.committed_size :])
    resumed.commit()
    assert get(blob_store, digest) == data


def test_same_upload_id_from_many_threads_admits_one(blob_store: ContentAddressedStore) -> None:
    digest = digest_of(b"contended")
    n = 8
    start, done = threading.Barrier(n), threading.Barrier(n)

    def attempt(_: int) -> BlobWriter | None:
        start.wait()
        try:
            writer: BlobWriter | None = blob_store.open_write("hot", digest)
        except Busy:
            writer = None
        done.wait()
        return writer

    with ThreadPoolExecutor(n) as pool:
        writers = [w for w in pool.map(attempt, range(n)) if w is not None]
    assert len(writers) == 1
    writers[0].append(b"contended")
    writers[0].commit()
    assert blob_store.contains(digest)


def test_concurrent_writers_of_one_blob_all_succeed(blob_store: ContentAddressedStore) -> None:
    data = payload(3 * MiB + 5, seed=13)
    digest = digest_of(data)
    n = 8
    barrier = threading.Barrier(n)

    def upload(i: int) -> bool:
        writer = blob_store.open_write(f"writer-{i}", digest)
        barrier.wait()
        if writer.complete:
            return True
        step = 64 * 1024 + i  # different chunkings, so the writers interleave differently
        for pos in range(0, len(data), step):
            writer.append(data[pos : pos + step])
        writer.commit()
        return writer.complete

    with ThreadPoolExecutor(n) as pool:
        assert all(pool.map(upload, range(n)))
    blob_store.verify(digest)
    assert get(blob_store, digest) == data
    assert blob_store.stats() == (1, len(data))
    assert list(blob_store.iter_digests()) == [digest]
    assert no_uploads_left(blob_store)
    # The losers' uploads and reservations no longer count against the quota.
    assert blob_store.usage() == (len(data), 0, 0, 0)


def _write_in_child(
    reopen: Callable[[], ContentAddressedStore], upload_id: str, seed: int, size: int, barrier: Any
) -> None:
    """Upload one blob; on Busy (another process finished or replaced the same session) start over."""
    store = reopen()
    data = payload(size, seed)
    digest = digest_of(data)
    barrier.wait(60)
    for _ in range(20):
        try:
            writer = store.open_write(upload_id, digest)
            start = writer.committed_size
            for pos in range(start, len(data), 100_000):
                writer.append(data[pos : pos + 100_000])
            writer.commit()
            return
        except Busy:
            continue
    raise SystemExit(3)


@pytest.mark.parametrize("same_upload_id", [False, True], ids=["two-upload-ids", "one-upload-id"])
def test_two_processes_race_to_upload_one_blob(backend: ObjectBackend, same_upload_id: bool) -> None:
    size, seed = 4 * unit(backend.content_store()) + 1, 14
    barrier = SPAWN.Barrier(2)
    ids = ["proc", "proc"] if same_upload_id else ["proc-0", "proc-1"]
    procs = [
        SPAWN.Process(target=_write_in_child, args=(backend.content_factory(), i, seed, size, barrier))
        for i in ids
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    data = payload(size, seed)
    digest = digest_of(data)
    fresh = backend.content_store()
    fresh.verify(digest)
    assert get(fresh, digest) == data
    assert fresh.stats() == (1, size)
    assert no_uploads_left(fresh), "one blob, no partial uploads left"
    assert backend.scratch() == []


def _upload_until_killed(reopen: Callable[[], ContentAddressedStore], size: int, sent: Any) -> None:
    store = reopen()
    data = payload(size, 40)
    writer = store.open_write("killed", digest_of(data))
    for pos in range(0, size, 64 * 1024):
        writer.append(data[pos : pos + 64 * 1024])
        sent.value = pos + 64 * 1024
    threading.Event().wait(60)  # never commits: the parent kills it first


def test_killed_upload_is_never_visible_and_resumes_after_restart(backend: ObjectBackend) -> None:
    u = unit(backend.content_store())
    size = 3 * u + 3
    sent = SPAWN.Value("q", 0)
    proc = SPAWN.Process(target=_upload_until_killed, args=(backend.content_factory(), size, sent))
    proc.start()
    try:
        while sent.value < 2 * u and proc.is_alive():
            threading.Event().wait(0.005)
    finally:
        proc.kill()  # SIGKILL
        proc.join(30)
    assert sent.value >= 2 * u
    data = payload(size, 40)
    digest = digest_of(data)
    store = backend.content_store()
    assert not store.contains(digest) and store.find_missing([digest]) == [digest]
    assert list(store.iter_digests()) == [] and store.stats() == (0, 0)
    committed, complete = store.upload_status("killed", digest)
    assert not complete
    # Whole parts survive the kill (what was only buffered in the child is lost).
    part = store.part_size_for(digest)
    assert committed % part == 0 and committed >= (2 * u - part) // part * part
    writer = store.open_write("killed", digest)
    assert writer.committed_size == committed
    writer.append(data[committed:])
    writer.commit()
    assert get(backend.content_store(), digest) == data
    assert no_uploads_left(store)


def test_resume_in_a_new_store_instance_reads_the_stored_parts_back_once(backend: ObjectBackend) -> None:
    first = backend.content_store()
    u = unit(first)
    data = payload(2 * u + 9, seed=41)
    digest = digest_of(data)
    writer = first.open_write("restart", digest)
    writer.append(data[: u + 5])
    writer.close()
    committed = writer.committed_size
    del first, writer

    second = backend.content_store()  # a restart: nothing in memory
    writer = second.open_write("restart", digest)
    assert writer.committed_size == committed == second.upload_status("restart", digest).committed_size
    writer.append(data[committed:])
    writer.commit()
    # Only the parts this instance did not receive had to be read back (all of the blob, once).
    assert second.hashed_bytes == (len(data) if committed else 0)
    assert get(second, digest) == data


def test_resume_in_the_same_instance_hashes_nothing_again(blob_store: ContentAddressedStore) -> None:
    u = unit(blob_store)
    data = payload(2 * u + 9, seed=42)
    digest = digest_of(data)
    writer = blob_store.open_write("same", digest)
    writer.append(data[: u + 5])
    writer.close()
    writer = blob_store.open_write("same", digest)
    writer.append(data[writer.committed_size :])
    writer.commit()
    assert blob_store.hashed_bytes == 0
    assert blob_store.contains(digest)


def test_wrong_bytes_in_a_multipart_upload_are_discarded(blob_store: ContentAddressedStore) -> None:
    u = unit(blob_store)
    data = payload(3 * u, seed=43)
    claimed = Digest(hash_bytes(b"not these bytes"), len(data))
    writer = blob_store.open_write("liar-big", claimed)
    writer.append(data[:u])
    writer.close()
    writer = blob_store.open_write("liar-big", claimed)
    writer.append(data[writer.committed_size :])
    with pytest.raises(UploadDigestMismatch):
        writer.commit()
    assert not blob_store.contains(claimed)
    assert blob_store.upload_status("liar-big", claimed) == (0, False)
    assert no_uploads_left(blob_store)
    assert list(blob_store.objects.list_objects("")) == []


# -- digest-late uploads (the digest is stated at commit) -----------------------------


def put_late(store: BlobStore, data: bytes, upload_id: str = "late-1", chunk: int = 256 * 1024) -> Digest:
    """Upload `data` digest-late: opened with its size only, its digest stated at commit."""
    writer = store.open_write(upload_id, PendingDigest(len(data)))
    assert (writer.complete, writer.committed_size, writer.digest) == (False, 0, PendingDigest(len(data)))
    for i in range(0, len(data), chunk):
        writer.append(data[i : i + chunk])
    digest = digest_of(data)
    writer.commit(digest)
    assert writer.complete
    assert writer.digest == digest
    return digest


def late_size(store: ContentAddressedStore, size: int | str) -> int:
    """`size`, or for "parts" one that is stored as several parts on every backend."""
    return 3 * unit(store) + 17 if size == "parts" else int(size)


@pytest.mark.parametrize("size", [0, 1, 5000, "parts"])
def test_digest_late_upload_round_trip(blob_store: ContentAddressedStore, size: int | str) -> None:
    data = payload(late_size(blob_store, size), seed=60)
    digest = put_late(blob_store, data)
    assert blob_store.contains(digest)
    assert get(blob_store, digest) == data
    assert blob_store.stats() == (1, len(data))
    assert blob_store.upload_status("late-1", digest) == (len(data), True)
    # Committed: the digest-late upload holds nothing any more, and is never reported complete.
    assert blob_store.upload_status("late-1", PendingDigest(len(data))) == (0, False)
    assert no_uploads_left(blob_store)


@pytest.mark.parametrize("size", [5000, "parts"])
def test_digest_late_upload_with_a_wrong_digest_stores_nothing(
    blob_store: ContentAddressedStore, size: int | str
) -> None:
    data = payload(late_size(blob_store, size), seed=61)
    writer = blob_store.open_write("late-liar", PendingDigest(len(data)))
    writer.append(data)
    # No digest, or one of another size: refused, nothing changes, the writer stays open.
    with pytest.raises(InvalidArgument, match="must state it") as missing:
        writer.commit()
    with pytest.raises(InvalidArgument, match="started for") as other_size:
        writer.commit(digest_of(data[:-1]))
    assert not isinstance(missing.value, UploadDigestMismatch)
    assert not isinstance(other_size.value, UploadDigestMismatch)
    claimed = Digest(hash_bytes(b"not these bytes"), len(data))
    with pytest.raises(UploadDigestMismatch, match="nothing was stored"):
        writer.commit(claimed)
    assert not blob_store.contains(claimed)
    assert not blob_store.contains(digest_of(data))
    assert blob_store.stats() == (0, 0)
    assert blob_store.upload_status("late-liar", PendingDigest(len(data))) == (0, False)
    assert no_uploads_left(blob_store)
    assert list(blob_store.objects.list_objects("")) == []
    writer.close()  # ended writers tolerate close/abort
    writer.abort()


def test_digest_late_upload_claiming_a_stored_blob_is_refused(blob_store: ContentAddressedStore) -> None:
    stored = payload(4000, seed=62)
    digest = put(blob_store, stored)
    writer = blob_store.open_write("late-claim", PendingDigest(len(stored)))
    writer.append(payload(4000, seed=63))
    with pytest.raises(UploadDigestMismatch):
        writer.commit(digest)
    assert get(blob_store, digest) == stored
    assert blob_store.stats() == (1, len(stored))
    assert no_uploads_left(blob_store)


def test_digest_late_duplicate_of_a_stored_blob_is_dropped(blob_store: ContentAddressedStore) -> None:
    u = unit(blob_store)
    for size in (3000, 2 * u + 5):
        data = payload(size, seed=size)
        digest = put(blob_store, data, upload_id=f"first-{size}")
        before = blob_store.stats()
        assert put_late(blob_store, data, upload_id=f"again-{size}") == digest
        assert blob_store.stats() == before
        assert get(blob_store, digest) == data
        assert no_uploads_left(blob_store)


def test_digest_late_upload_resumes_after_a_restart(backend: ObjectBackend) -> None:
    first = backend.content_store()
    u = unit(first)
    data = payload(3 * u + 9, seed=64)
    pending = PendingDigest(len(data))
    digest = digest_of(data)
    writer = first.open_write("late-resume", pending)
    writer.append(data[: u + 5])
    writer.close()
    committed = writer.committed_size
    assert committed == kept(first, digest, u + 5) > 0
    assert first.upload_status("late-resume", pending) == (committed, False)
    # Staged under its upload id and size, apart from a digest-first upload of the same id.
    assert first.upload_status("late-resume", digest) == (0, False)
    assert first.upload_status("late-resume", PendingDigest(len(data) + 1)) == (0, False)
    del first, writer

    second = backend.content_store()  # a restart: nothing in memory
    assert second.upload_status("late-resume", pending) == (committed, False)
    writer = second.open_write("late-resume", pending)
    assert (writer.committed_size, writer.complete) == (committed, False)
    writer.append(data[committed:])
    writer.commit(digest)
    # The parts stored before the restart were read back to check the digest (all of it, once).
    assert second.hashed_bytes == len(data)
    assert get(second, digest) == data
    assert no_uploads_left(second)


def test_digest_late_upload_resumed_in_the_same_instance_hashes_nothing_again(
    blob_store: ContentAddressedStore,
) -> None:
    u = unit(blob_store)
    data = payload(2 * u + 9, seed=65)
    writer = blob_store.open_write("late-same", PendingDigest(len(data)))
    writer.append(data[: u + 5])
    writer.close()
    writer = blob_store.open_write("late-same", PendingDigest(len(data)))
    writer.append(data[writer.committed_size :])
    writer.commit(digest_of(data))
    assert blob_store.hashed_bytes == 0
    assert get(blob_store, digest_of(data)) == data


def test_digest_late_uploads_are_busy_while_held_and_swept_when_stale(
    blob_store: ContentAddressedStore,
) -> None:
    step = max(300_000, blob_store.objects.min_part_size)
    data = payload(2 * step, seed=66)
    pending = PendingDigest(len(data))
    old = blob_store.open_write("late-old", pending)
    old.append(data[:step])
    old.close()
    held = blob_store.open_write("late-held", pending)
    held.append(data[:step])
    with pytest.raises(Busy):
        blob_store.open_write("late-held", pending)
    assert blob_store.sweep_uploads(0) == 1
    assert blob_store.upload_status("late-old", pending) == (0, False)
    held.append(data[step:])
    held.commit(digest_of(data))
    assert get(blob_store, digest_of(data)) == data
    assert no_uploads_left(blob_store)


def test_digest_first_commit_may_restate_its_digest_only(blob_store: ContentAddressedStore) -> None:
    data = payload(100, seed=67)
    digest = digest_of(data)
    writer = blob_store.open_write("restate", digest)
    writer.append(data)
    with pytest.raises(InvalidArgument, match="cannot be committed as"):
        writer.commit(digest_of(b"other"))
    writer.commit(digest)
    assert get(blob_store, digest) == data


# -- verification on read ------------------------------------------------------------


def test_reading_a_verified_blob_hashes_nothing(backend: ObjectBackend) -> None:
    store = backend.content_store()
    data = payload(3 * MiB, seed=44)
    digest = put(store, data)
    backend.settle_blob(digest)
    store.verify(digest)
    before = store.hashed_bytes
    assert get(store, digest, offset=MiB, limit=1) == data[MiB : MiB + 1]
    store.verify(digest)
    assert store.hashed_bytes == before, "a 1-byte read of a verified blob must not hash the blob"
    # Also after a restart: what was verified stays verified while the bytes are unchanged.
    fresh = backend.content_store()
    assert get(fresh, digest, limit=1) == data[:1]
    assert fresh.hashed_bytes == 0


def test_a_changed_blob_is_hashed_again_before_it_is_served(backend: ObjectBackend) -> None:
    if not backend.rehashes_on_read:
        pytest.skip("this backend trusts its own checksums")
    store = backend.content_store()
    data = payload(100_000, seed=45)
    digest = put(store, data)
    backend.settle_blob(digest)
    store.verify(digest)
    backend.corrupt_blob(digest)  # immediately: the same clock tick must not hide the change
    with pytest.raises(DataLoss, match="quarantined"):
        store.read(digest, limit=1)
    assert not store.contains(digest)


def test_a_blob_assembled_from_parts_is_not_hashed_again_and_a_change_is_still_seen(
    backend: ObjectBackend,
) -> None:
    # The upload hashed the parts on their way in, so its first check (PublishArtifact's) reads
    # nothing; an immediate change afterwards is still caught.
    store = backend.content_store()
    data = payload(2 * store.part_size + 5, seed=46)
    digest = put(store, data, chunk=store.part_size // 2)
    before = store.hashed_bytes
    store.verify(digest)
    assert store.hashed_bytes == before
    if not backend.rehashes_on_read:
        return
    backend.corrupt_blob(digest)
    with pytest.raises(DataLoss, match="quarantined"):
        store.read(digest, limit=1)


# -- corruption, deletion, stats -----------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 70_000])
def test_corrupt_blob_is_quarantined(backend: ObjectBackend, size: int) -> None:
    if not backend.rehashes_on_read:
        pytest.skip("this backend trusts its own checksums")
    store = backend.content_store()
    data = payload(size, seed=15)
    digest = put(store, data)
    backend.corrupt_blob(digest)
    with pytest.raises(DataLoss, match=rf"blob {digest} is corrupt in storage .*quarantined"):
        store.verify(digest)
    assert not store.contains(digest)
    assert store.find_missing([digest]) == [digest]
    assert store.stats() == (0, 0)
    with pytest.raises(NotFound):
        store.verify(digest)
    with pytest.raises(NotFound):
        store.read(digest)
    # It can be uploaded again.
    put(store, data, upload_id="again")
    store.verify(digest)
    assert get(store, digest) == data


def test_delete(blob_store: ContentAddressedStore) -> None:
    digest = put(blob_store, b"to be deleted")
    keep = put(blob_store, b"to be kept")
    assert blob_store.delete(digest)
    assert not blob_store.delete(digest)
    assert not blob_store.contains(digest)
    assert not blob_store.delete(MISSING)
    assert blob_store.contains(keep)
    assert list(blob_store.iter_digests()) == [keep]


def test_stats_and_iter_digests(backend: ObjectBackend) -> None:
    store = backend.content_store()
    assert store.stats() == StoreStats(0, 0)
    sizes = [0, 10, 1000, 123_457]
    digests = {put(store, payload(n, seed=n), upload_id=f"s{n}") for n in sizes}
    put(store, payload(1000, seed=1000), upload_id="duplicate")  # stored once
    assert store.stats() == (len(sizes), sum(sizes))
    assert set(store.iter_digests()) == digests
    store.delete(digest_of(payload(10, seed=10)))
    assert store.stats() == (len(sizes) - 1, sum(sizes) - 10)
    assert backend.content_store().stats() == store.stats()


# -- quotas --------------------------------------------------------------------------


def test_max_blob_bytes(backend: ObjectBackend) -> None:
    store = backend.content_store(max_blob_bytes=10)
    big = payload(11, seed=16)
    with pytest.raises(QuotaExceeded, match="at most 10 bytes"):
        store.open_write("big", digest_of(big))
    assert not store.contains(digest_of(big))
    assert store.upload_status("big", digest_of(big)) == (0, False)
    assert store.stats() == (0, 0)
    put(store, big[:10])


def test_max_store_bytes(backend: ObjectBackend) -> None:
    store = backend.content_store(max_store_bytes=100)
    first = put(store, payload(60, seed=17), upload_id="a")
    too_big = digest_of(payload(50, seed=18))
    with pytest.raises(QuotaExceeded, match="max_store_bytes"):
        store.open_write("b", too_big)
    assert not store.contains(too_big)
    assert store.upload_status("b", too_big) == (0, False)
    put(store, payload(40, seed=19), upload_id="c")
    assert store.stats() == (2, 100)
    # A blob that is already stored needs no space.
    assert store.open_write("d", first).complete
    store.delete(first)
    put(store, payload(50, seed=18), upload_id="b")


def during_next_listing(
    monkeypatch: pytest.MonkeyPatch,
    store: ContentAddressedStore,
    method: str,
    prefix: str,
    action: Callable[[], Any],
) -> list[bool]:
    """Make the store's next `method` listing of `prefix` answer what was stored before `action`,
    which runs (once) before the listing's first item is returned: a write of this store racing a
    `rescan`, deterministically. The list says whether it ran."""
    original = getattr(store.objects, method)
    ran: list[bool] = []

    def listing(listed: str) -> Iterator[Any]:
        items = list(original(listed))
        if listed == prefix and not ran:
            ran.append(True)
            action()
        return iter(items)

    monkeypatch.setattr(store.objects, method, listing)
    return ran


def test_rescan_keeps_a_publish_made_while_it_listed(
    backend: ObjectBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = backend.content_store()
    put(store, payload(100, seed=40), upload_id="a")
    late = payload(200, seed=41)
    ran = during_next_listing(monkeypatch, store, "list_objects", "blobs/", lambda: put(store, late, "b"))
    store.rescan()
    assert ran
    # The listing missed the late blob; the publish's count must survive the recount anyway.
    assert store.stats() == StoreStats(2, 300)
    assert store.usage().blob_bytes == 300
    assert backend.content_store().stats() == StoreStats(2, 300)


def test_rescan_keeps_a_delete_made_while_it_listed(
    backend: ObjectBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = backend.content_store()
    gone = put(store, payload(100, seed=42), upload_id="a")
    put(store, payload(200, seed=43), upload_id="b")
    ran = during_next_listing(monkeypatch, store, "list_objects", "blobs/", lambda: store.delete(gone))
    store.rescan()
    assert ran
    assert store.stats() == StoreStats(1, 200)
    assert backend.content_store().stats() == StoreStats(1, 200)


def test_rescan_keeps_an_upload_part_stored_while_it_listed(
    backend: ObjectBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = backend.content_store()
    part = store.part_size
    data = payload(2 * part, seed=44)
    writer = store.open_write("u", digest_of(data))
    ran = during_next_listing(
        monkeypatch, store, "find_uploads", "uploads/", lambda: writer.append(data[:part])
    )
    store.rescan()
    assert ran
    assert store.usage() == (0, part, part, 0)
    writer.append(data[part:])
    writer.commit()
    assert store.usage() == (2 * part, 0, 0, 0)
    assert get(store, digest_of(data)) == data


def test_rescans_racing_publishes_and_deletes_keep_the_counters_exact(backend: ObjectBackend) -> None:
    """Not deterministic (the tests above are): threads publishing and deleting while another
    rescans over and over, for the interleavings those do not pin down."""
    store = backend.content_store()
    blobs = 8 if backend.name == "s3" else 24  # the serial emulator is slow to list
    done = threading.Event()

    def write(worker: int) -> None:
        for i in range(blobs):
            data = payload(1 + (worker * 97 + i * 31) % 3000, seed=1000 * worker + i)
            digest = put(store, data, f"w{worker}-{i}")
            if i % 3 == 0:
                assert store.delete(digest)

    def rescan() -> int:
        runs = 0
        while not done.is_set():
            store.rescan()
            runs += 1
        return runs

    with ThreadPoolExecutor(5) as pool:
        rescans = pool.submit(rescan)
        for writer in [pool.submit(write, w) for w in range(4)]:
            writer.result()
        done.set()
        assert rescans.result() > 0
    kept = 4 * sum(1 for i in range(blobs) if i % 3)
    assert store.stats() == backend.content_store().stats()
    assert store.stats().blob_count == kept
    assert store.usage()[1:3] == (0, 0)


def test_quota_is_rechecked_at_commit(backend: ObjectBackend) -> None:
    store = backend.content_store(max_store_bytes=100)
    other = backend.content_store(max_store_bytes=100)  # another process on the same storage
    data_a, data_b = payload(60, seed=20), payload(60, seed=21)
    a = store.open_write("a", digest_of(data_a))
    b = other.open_write("b", digest_of(data_b))  # each fits as far as its process knows
    a.append(data_a)
    b.append(data_b)
    a.commit()
    other.rescan()
    with pytest.raises(QuotaExceeded):
        b.commit()
    assert not other.contains(digest_of(data_b))
    assert other.stats() == (1, 60)
    # The upload is kept; once space is freed the same writer can publish it.
    assert b.committed_size == 60 and not b.complete
    store.delete(digest_of(data_a))
    other.rescan()
    b.commit()
    assert get(store, digest_of(data_b)) == data_b


def test_open_writers_reserve_the_rest_of_their_blob(backend: ObjectBackend) -> None:
    store = backend.content_store(max_store_bytes=100)
    data_a, data_b = payload(60, seed=20), payload(60, seed=21)
    a = store.open_write("a", digest_of(data_a))
    assert store.usage() == (0, 0, 60, 100)
    with pytest.raises(QuotaExceeded, match="60 reserved by uploads in progress"):
        store.open_write("b", digest_of(data_b))
    a.append(data_a)
    a.commit()
    assert store.usage() == (60, 0, 0, 100)
    assert store.usage().used_bytes == 60
    # An ended writer reserves nothing any more.
    c = store.open_write("c", digest_of(payload(40, seed=22)))
    assert store.usage().reserved_bytes == 40
    c.abort()
    assert store.usage() == (60, 0, 0, 100)


def test_unfinished_uploads_count_against_the_quota(backend: ObjectBackend) -> None:
    probe = backend.content_store()
    u = unit(probe)
    data = payload(3 * u, seed=23)
    digest = digest_of(data)
    writer = probe.open_write("partial", digest)
    writer.append(data[:u])
    writer.close()
    stored = kept(probe, digest, u)
    assert stored == u and probe.usage() == (0, u, 0, 0)

    # A restart counts what the object store keeps for unfinished uploads.
    quota = 3 * u + u // 2
    store = backend.content_store(max_store_bytes=quota)
    assert store.usage() == (0, u, 0, quota)
    other = digest_of(payload(3 * u, seed=24))
    with pytest.raises(QuotaExceeded, match=f"{u} by unfinished uploads"):
        store.open_write("other", other)
    # Resuming needs only the rest; while it runs the rest is reserved.
    writer = store.open_write("partial", digest)
    assert writer.committed_size == u
    assert store.usage() == (0, u, 2 * u, quota)
    small = payload(u // 2 + 1, seed=25)
    with pytest.raises(QuotaExceeded, match="the blob store is full"):
        store.open_write("small", digest_of(small))
    writer.append(data[u:])
    writer.commit()
    assert store.usage() == (3 * u, 0, 0, quota)
    put(store, small[:-1], upload_id="small")
    assert store.usage().used_bytes == quota


# -- stale uploads -------------------------------------------------------------------


def test_sweep_uploads(blob_store: ContentAddressedStore) -> None:
    step = max(300_000, blob_store.objects.min_part_size)  # enough for a stored part everywhere
    data = payload(max(MiB, 2 * step), seed=22)
    digest = digest_of(data)
    some = kept(blob_store, digest, step)
    assert some > 0
    for upload_id in ("old-1", "old-2"):
        writer = blob_store.open_write(upload_id, digest)
        writer.append(data[:step])
        writer.close()
    held = blob_store.open_write("held", digest)
    held.append(data[:step])

    assert blob_store.sweep_uploads(3600) == 0
    assert blob_store.upload_status("old-1", digest) == (some, False)

    assert blob_store.sweep_uploads(0) == 2
    assert blob_store.upload_status("old-1", digest) == (0, False)
    assert blob_store.upload_status("old-2", digest) == (0, False)
    held.append(data[step:])
    held.commit()
    assert blob_store.sweep_uploads(0) == 0
    assert get(blob_store, digest) == data
    assert no_uploads_left(blob_store)


def test_collect_uploads_frees_what_stale_uploads_count(blob_store: ContentAddressedStore) -> None:
    u = unit(blob_store)
    data = payload(2 * u, seed=26)
    digest = digest_of(data)
    writer = blob_store.open_write("stale", digest)
    writer.append(data[:u])
    writer.close()
    assert blob_store.usage().upload_bytes == u
    assert blob_store.collect_uploads(3600) == Collected(0, 0)

    # A dry run reports and changes nothing.
    assert blob_store.collect_uploads(0, dry_run=True) == Collected(1, u)
    assert blob_store.upload_status("stale", digest) == (u, False)
    assert blob_store.usage().upload_bytes == u

    assert blob_store.collect_uploads(0) == Collected(1, u)
    assert blob_store.upload_status("stale", digest) == (0, False)
    assert blob_store.usage().upload_bytes == 0
    assert no_uploads_left(blob_store)
    assert blob_store.collect_uploads(0) == Collected(0, 0)


def test_collect_quarantined_removes_only_what_is_past_the_grace(blob_store: ContentAddressedStore) -> None:
    kept_digest = put(blob_store, payload(10, seed=27))
    now_ns = time.time_ns()
    old = f"{QUARANTINE_PREFIX}{'a' * 32}-5.{now_ns - 7200 * 10**9}"
    fresh = f"{QUARANTINE_PREFIX}{'b' * 32}-3.{now_ns}"
    blob_store.objects.put(old, b"12345")
    blob_store.objects.put(fresh, b"123")

    assert blob_store.collect_quarantined(3600, dry_run=True) == Collected(1, 5)
    assert blob_store.objects.head(old) is not None
    assert blob_store.collect_quarantined(3600) == Collected(1, 5)
    assert blob_store.objects.head(old) is None
    assert blob_store.objects.head(fresh) is not None
    assert blob_store.collect_quarantined(0) == Collected(1, 3)
    # Stored blobs are never touched.
    assert get(blob_store, kept_digest) == payload(10, seed=27)
    assert blob_store.stats() == (1, 10)


def test_list_blobs_names_every_blob_and_when_it_was_stored(blob_store: ContentAddressedStore) -> None:
    assert list(blob_store.list_blobs()) == []
    digests = {put(blob_store, payload(n, seed=n), upload_id=f"u{n}") for n in (0, 7, 300)}
    found = list(blob_store.list_blobs())
    assert {b.digest for b in found} == digests and len(found) == 3
    # Seconds since the epoch, from the object store (S3: LastModified).
    assert all(abs(b.stored_at - time.time()) < 3600 for b in found)
    assert set(blob_store.iter_digests()) == digests
