"""The `BlobStore` contract, checked for every backend.

The shared suite talks to stores only through the `BlobStore`/`BlobWriter` protocols and
the `Backend` hooks, so a new backend joins by adding one factory to `BACKENDS`. Tests of
one backend's on-disk details are in a separate section at the end.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
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
from prebake.server.blobs import BlobReader, BlobStore, BlobWriter, LocalBlobStore, StoreStats, UploadStatus
from prebake.server.records import Digest

MiB = 1 << 20

# -- backends ------------------------------------------------------------------------


@dataclass
class Backend:
    """A store under test plus the test-only hooks the shared suite needs."""

    store: BlobStore
    # Damage a stored blob's bytes in place, so that it no longer matches its digest.
    corrupt: Callable[[Digest], None]
    # Another store instance over the same (initially empty) storage, accepting the
    # constructor's limits as keyword arguments. Must be picklable: child processes call it.
    reopen: Callable[..., BlobStore]
    cleanup: Callable[[], None] = lambda: None


def _corrupt_local_file(root: Path, digest: Digest) -> None:
    path = root / "blobs" / digest.hash[:2] / f"{digest.hash}-{digest.size}"
    data = bytearray(path.read_bytes())
    if data:
        data[len(data) // 2] ^= 0xFF
    else:
        data.append(0)
    path.write_bytes(bytes(data))


def local_backend(tmp_path: Path) -> Backend:
    root = tmp_path / "store"
    return Backend(
        store=LocalBlobStore(root),
        corrupt=functools.partial(_corrupt_local_file, root),
        reopen=functools.partial(LocalBlobStore, root),
    )


BACKENDS: list[Any] = [pytest.param(local_backend, id="local")]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    b: Backend = request.param(tmp_path)
    yield b
    b.cleanup()


@pytest.fixture
def blob_store(backend: Backend) -> BlobStore:
    return backend.store


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


MISSING = digest_of(b"never stored anywhere")


# -- round trips and reads -----------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096 + 7])
def test_round_trip_with_small_chunks(blob_store: BlobStore, size: int) -> None:
    data = payload(size, seed=size)
    digest = put(blob_store, data, chunk=1000)
    assert blob_store.contains(digest)
    blob_store.verify(digest)
    chunks = list(blob_store.read(digest, chunk_size=4096))
    assert b"".join(chunks) == data
    assert all(0 < len(c) <= 4096 for c in chunks)


@pytest.mark.parametrize("size", [MiB - 1, MiB, MiB + 1, 5 * MiB + 3])
def test_round_trip_default_chunks(blob_store: BlobStore, size: int) -> None:
    data = payload(size, seed=size)
    digest = put(blob_store, data, chunk=4 * MiB)
    chunks = list(blob_store.read(digest))
    assert b"".join(chunks) == data
    assert all(0 < len(c) <= MiB for c in chunks)
    blob_store.verify(digest)


def test_zero_size_blob(blob_store: BlobStore) -> None:
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


def test_read_offset_and_limit(blob_store: BlobStore) -> None:
    data = payload(10_000, seed=1)
    digest = put(blob_store, data)
    assert get(blob_store, digest, offset=1234) == data[1234:]
    assert get(blob_store, digest, offset=1234, limit=100) == data[1234:1334]
    assert get(blob_store, digest, limit=1) == data[:1]
    assert get(blob_store, digest, offset=9_990, limit=100) == data[9_990:]
    assert get(blob_store, digest, offset=10_000) == b""
    assert get(blob_store, digest, offset=3, limit=5000, chunk_size=999) == data[3:5003]


def test_read_errors_are_raised_at_the_call(blob_store: BlobStore) -> None:
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


def test_reader_can_be_closed_early_and_survives_delete(blob_store: BlobStore) -> None:
    data = payload(50_000, seed=2)
    digest = put(blob_store, data)
    reader: BlobReader = blob_store.read(digest, chunk_size=1000)
    reader.close()
    reader.close()
    assert list(reader) == []

    reader = blob_store.read(digest, chunk_size=1000)
    first = next(reader)
    assert blob_store.delete(digest)
    assert first + b"".join(reader) == data


def test_find_missing_keeps_request_order_without_duplicates(blob_store: BlobStore) -> None:
    present = put(blob_store, b"present")
    a, b = digest_of(b"a"), digest_of(b"b")
    assert blob_store.find_missing([a, present, b, a, present, b, a]) == [a, b]
    assert blob_store.find_missing([present]) == []
    assert blob_store.find_missing(iter([])) == []


# -- bad uploads ---------------------------------------------------------------------


def test_wrong_hash_stores_nothing(blob_store: BlobStore) -> None:
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
def test_more_bytes_than_declared(blob_store: BlobStore, pieces: list[int]) -> None:
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


def test_commit_of_incomplete_upload_keeps_it(blob_store: BlobStore) -> None:
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
def test_malformed_upload_id(blob_store: BlobStore, upload_id: str) -> None:
    digest = digest_of(b"x")
    with pytest.raises(InvalidArgument, match="upload id"):
        blob_store.open_write(upload_id, digest)
    with pytest.raises(InvalidArgument, match="upload id"):
        blob_store.upload_status(upload_id, digest)


@pytest.mark.parametrize("upload_id", ["a", "a" * 128, "A.b_c-9", "..", "-x-", "a--b"])
def test_well_formed_upload_ids(blob_store: BlobStore, upload_id: str) -> None:
    data = payload(100, seed=6)
    digest = put(blob_store, data, upload_id=upload_id)
    assert get(blob_store, digest) == data


# -- writer lifecycle and resume -----------------------------------------------------


def test_interrupted_write_resumes_from_committed_size(blob_store: BlobStore) -> None:
    data = payload(3 * MiB + 17, seed=7)
    digest = digest_of(data)
    half = len(data) // 2
    assert blob_store.upload_status("resume", digest) == (0, False)

    writer = blob_store.open_write("resume", digest)
    writer.append(data[:half])
    writer.close()
    assert blob_store.upload_status("resume", digest) == UploadStatus(half, False)
    assert not blob_store.contains(digest)

    writer = blob_store.open_write("resume", digest)
    assert (writer.committed_size, writer.complete) == (half, False)
    writer.append(data[half:])
    writer.commit()
    assert writer.committed_size == len(data)
    assert blob_store.upload_status("resume", digest) == (len(data), True)
    blob_store.verify(digest)
    assert get(blob_store, digest) == data


def test_resume_over_several_sessions(blob_store: BlobStore) -> None:
    data = payload(10_000, seed=8)
    digest = digest_of(data)
    for start in range(0, 10_000, 3000):
        writer = blob_store.open_write("many", digest)
        assert writer.committed_size == start
        writer.append(data[start : start + 3000])
        if writer.committed_size < len(data):
            writer.close()
    writer.commit()
    assert get(blob_store, digest) == data


def test_other_upload_id_starts_from_zero(blob_store: BlobStore) -> None:
    data = payload(4000, seed=9)
    digest = digest_of(data)
    first = blob_store.open_write("first", digest)
    first.append(data[:1000])
    first.close()

    second = blob_store.open_write("second", digest)
    assert second.committed_size == 0
    assert blob_store.upload_status("second", digest) == (0, False)
    assert blob_store.upload_status("first", digest) == (1000, False)
    second.append(data)
    second.commit()

    # Once the blob is stored, every upload of it is complete.
    assert blob_store.upload_status("first", digest) == (4000, True)
    again = blob_store.open_write("first", digest)
    assert (again.complete, again.committed_size) == (True, 4000)


def test_writer_for_stored_blob_is_complete_and_inert(blob_store: BlobStore) -> None:
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


def test_writer_end_states(blob_store: BlobStore) -> None:
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
    assert blob_store.upload_status("ends", digest) == (100, False)

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


def test_unfinished_upload_is_never_visible(backend: Backend) -> None:
    store = backend.store
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
    fresh = backend.reopen()
    assert not fresh.contains(digest)
    assert fresh.stats() == (0, 0)


# -- concurrency ---------------------------------------------------------------------


def test_same_upload_id_is_busy_while_held(blob_store: BlobStore) -> None:
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
    assert resumed.committed_size == 400
    resumed.append(data[400:])
    resumed.commit()
    assert get(blob_store, digest) == data


def test_same_upload_id_from_many_threads_admits_one(blob_store: BlobStore) -> None:
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


def test_concurrent_writers_of_one_blob_all_succeed(blob_store: BlobStore) -> None:
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


def _write_in_child(
    reopen: Callable[[], BlobStore], upload_id: str, seed: int, size: int, barrier: Any
) -> None:
    store = reopen()
    data = payload(size, seed)
    writer = store.open_write(upload_id, digest_of(data))
    barrier.wait(60)
    for pos in range(0, len(data), 100_000):
        writer.append(data[pos : pos + 100_000])
    writer.commit()


def _expect_busy_in_child(reopen: Callable[[], BlobStore], upload_id: str, digest: Digest) -> None:
    try:
        reopen().open_write(upload_id, digest)
    except Busy:
        return
    raise SystemExit(3)


def _run_children(*targets: tuple[Callable[..., None], tuple[Any, ...]]) -> None:
    for proc in [multiprocessing.get_context("spawn").Process(target=t, args=a) for t, a in targets]:
        proc.start()
        proc.join(120)
        assert proc.exitcode == 0


def test_two_processes_write_one_blob(backend: Backend) -> None:
    ctx = multiprocessing.get_context("spawn")
    size, seed = 4 * MiB + 1, 14
    barrier = ctx.Barrier(2)
    procs = [
        ctx.Process(target=_write_in_child, args=(backend.reopen, f"proc-{i}", seed, size, barrier))
        for i in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    data = payload(size, seed)
    digest = digest_of(data)
    fresh = backend.reopen()
    fresh.verify(digest)
    assert get(fresh, digest) == data
    assert fresh.stats() == (1, size)


def test_upload_id_is_busy_across_processes(backend: Backend) -> None:
    digest = digest_of(b"held by the parent")
    holder = backend.store.open_write("cross", digest)
    try:
        _run_children((_expect_busy_in_child, (backend.reopen, "cross", digest)))
    finally:
        holder.close()


# -- corruption, deletion, stats -----------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 70_000])
def test_corrupt_blob_is_quarantined(backend: Backend, size: int) -> None:
    store = backend.store
    data = payload(size, seed=15)
    digest = put(store, data)
    backend.corrupt(digest)
    with pytest.raises(DataLoss, match=rf"blob {digest} is corrupt on disk .*quarantined"):
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


def test_delete(blob_store: BlobStore) -> None:
    digest = put(blob_store, b"to be deleted")
    keep = put(blob_store, b"to be kept")
    assert blob_store.delete(digest)
    assert not blob_store.delete(digest)
    assert not blob_store.contains(digest)
    assert not blob_store.delete(MISSING)
    assert blob_store.contains(keep)
    assert list(blob_store.iter_digests()) == [keep]


def test_stats_and_iter_digests(backend: Backend) -> None:
    store = backend.store
    assert store.stats() == StoreStats(0, 0)
    sizes = [0, 10, 1000, 123_457]
    digests = {put(store, payload(n, seed=n), upload_id=f"s{n}") for n in sizes}
    put(store, payload(1000, seed=1000), upload_id="duplicate")  # stored once
    assert store.stats() == (len(sizes), sum(sizes))
    assert set(store.iter_digests()) == digests
    store.delete(digest_of(payload(10, seed=10)))
    assert store.stats() == (len(sizes) - 1, sum(sizes) - 10)
    assert backend.reopen().stats() == store.stats()


# -- quotas --------------------------------------------------------------------------


def test_max_blob_bytes(backend: Backend) -> None:
    store = backend.reopen(max_blob_bytes=10)
    big = payload(11, seed=16)
    with pytest.raises(QuotaExceeded, match="at most 10 bytes"):
        store.open_write("big", digest_of(big))
    assert not store.contains(digest_of(big))
    assert store.upload_status("big", digest_of(big)) == (0, False)
    assert store.stats() == (0, 0)
    put(store, big[:10])


def test_max_store_bytes(backend: Backend) -> None:
    store = backend.reopen(max_store_bytes=100)
    first = put(store, payload(60, seed=17), upload_id="a")
    too_big = digest_of(payload(50, seed=18))
    with pytest.raises(QuotaExceeded, match="quota"):
        store.open_write("b", too_big)
    assert not store.contains(too_big)
    assert store.upload_status("b", too_big) == (0, False)
    put(store, payload(40, seed=19), upload_id="c")
    assert store.stats() == (2, 100)
    # A blob that is already stored needs no space.
    assert store.open_write("d", first).complete
    store.delete(first)
    put(store, payload(50, seed=18), upload_id="b")


def test_quota_is_rechecked_at_commit(backend: Backend) -> None:
    store = backend.reopen(max_store_bytes=100)
    data_a, data_b = payload(60, seed=20), payload(60, seed=21)
    a = store.open_write("a", digest_of(data_a))
    b = store.open_write("b", digest_of(data_b))  # both fit on their own
    a.append(data_a)
    b.append(data_b)
    a.commit()
    with pytest.raises(QuotaExceeded):
        b.commit()
    assert not store.contains(digest_of(data_b))
    assert store.stats() == (1, 60)
    # The upload is kept; once space is freed the same writer can publish it.
    assert store.upload_status("b", digest_of(data_b)) == (60, False)
    store.delete(digest_of(data_a))
    b.commit()
    assert get(store, digest_of(data_b)) == data_b


# -- stale uploads -------------------------------------------------------------------


def test_sweep_uploads(blob_store: BlobStore) -> None:
    data = payload(3000, seed=22)
    digest = digest_of(data)
    for upload_id in ("old-1", "old-2"):
        writer = blob_store.open_write(upload_id, digest)
        writer.append(data[:1000])
        writer.close()
    held = blob_store.open_write("held", digest)
    held.append(data[:500])

    assert blob_store.sweep_uploads(3600) == 0
    assert blob_store.upload_status("old-1", digest) == (1000, False)

    assert blob_store.sweep_uploads(0) == 2
    assert blob_store.upload_status("old-1", digest) == (0, False)
    assert blob_store.upload_status("old-2", digest) == (0, False)
    held.append(data[500:])
    held.commit()
    assert blob_store.sweep_uploads(0) == 0
    assert get(blob_store, digest) == data


# -- local filesystem only -----------------------------------------------------------


def _local(tmp_path: Path, **limits: int) -> tuple[LocalBlobStore, Path]:
    root = tmp_path / "local"
    return LocalBlobStore(root, **limits), root


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_local_layout(tmp_path: Path) -> None:
    store, root = _local(tmp_path)
    data = payload(5000, seed=23)
    digest = digest_of(data)
    writer = store.open_write("lay-out", digest)
    writer.append(data[:100])
    assert _files(root) == [f"uploads/lay-out--{digest.hash}-{digest.size}.part"]
    writer.append(data[100:])
    writer.commit()
    assert _files(root) == [f"blobs/{digest.hash[:2]}/{digest.hash}-{digest.size}"]
    assert (root / "quarantine").is_dir()


def test_local_stray_upload_file_is_never_a_blob(tmp_path: Path) -> None:
    store, root = _local(tmp_path)
    data = payload(4000, seed=24)
    digest = digest_of(data)
    # What a process killed just before publishing leaves behind: every byte, not renamed.
    (root / "uploads" / f"dead--{digest.hash}-{digest.size}.part").write_bytes(data)
    (root / "uploads" / "junk.tmp").write_bytes(b"junk")
    for s in (store, LocalBlobStore(root)):
        assert not s.contains(digest)
        assert s.find_missing([digest]) == [digest]
        assert s.stats() == (0, 0)
        assert list(s.iter_digests()) == []
    # ... and the upload can still be finished by resuming it.
    assert store.upload_status("dead", digest) == (4000, False)
    writer = store.open_write("dead", digest)
    assert writer.committed_size == 4000
    writer.commit()
    assert store.contains(digest)


def test_local_ignores_foreign_files_under_blobs(tmp_path: Path) -> None:
    store, root = _local(tmp_path)
    digest = put(store, b"real")
    (root / "blobs" / "zz").mkdir()
    (root / "blobs" / "zz" / f"{digest.hash}-{digest.size}").write_bytes(b"real")  # wrong shard
    (root / "blobs" / digest.hash[:2] / "notes.txt").write_text("hello")
    (root / "blobs" / "README").write_text("hello")
    (root / "blobs" / digest.hash[:2] / f"{digest.hash}-0{digest.size}").write_bytes(b"real")
    fresh = LocalBlobStore(root)
    assert list(fresh.iter_digests()) == [digest]
    assert fresh.stats() == (1, 4)


def test_local_quarantine_keeps_the_bad_bytes(tmp_path: Path) -> None:
    store, root = _local(tmp_path)
    data = payload(1000, seed=25)
    digest = put(store, data)
    blob = root / "blobs" / digest.hash[:2] / f"{digest.hash}-{digest.size}"
    bad = b"X" + data[1:]
    blob.write_bytes(bad)
    with pytest.raises(DataLoss, match=rf"read {hash_bytes(bad)}/1000\); quarantined"):
        store.verify(digest)
    assert not blob.exists()
    [kept] = (root / "quarantine").iterdir()
    assert kept.name.startswith(f"{digest.hash}-{digest.size}.")
    assert kept.name.rsplit(".", 1)[1].isdigit()
    assert kept.read_bytes() == bad


def test_local_read_refuses_wrong_length(tmp_path: Path) -> None:
    store, root = _local(tmp_path)
    digest = put(store, payload(1000, seed=26))
    blob = root / "blobs" / digest.hash[:2] / f"{digest.hash}-{digest.size}"
    os.truncate(blob, 600)
    with pytest.raises(DataLoss, match="600 bytes instead of 1000"):
        store.read(digest)
    assert not store.contains(digest)
    assert store.stats() == (0, 0)


def test_local_truncation_during_read_is_data_loss(tmp_path: Path) -> None:
    store, root = _local(tmp_path)
    digest = put(store, payload(10_000, seed=27))
    reader = store.read(digest, chunk_size=4000)
    next(reader)
    os.truncate(root / "blobs" / digest.hash[:2] / f"{digest.hash}-{digest.size}", 5000)
    next(reader)  # bytes 4000..5000
    with pytest.raises(DataLoss, match="ends after 5000 bytes"):
        next(reader)
    assert not store.contains(digest)


def test_local_overlong_partial_is_discarded(tmp_path: Path) -> None:
    store, root = _local(tmp_path)
    data = payload(100, seed=28)
    digest = digest_of(data)
    (root / "uploads" / f"long--{digest.hash}-{digest.size}.part").write_bytes(data + b"extra")
    assert store.upload_status("long", digest) == (0, False)
    writer = store.open_write("long", digest)
    assert writer.committed_size == 0
    writer.append(data)
    writer.commit()
    assert get(store, digest) == data


def test_local_damaged_partial_fails_the_commit(tmp_path: Path) -> None:
    store, root = _local(tmp_path)
    data = payload(100, seed=29)
    digest = digest_of(data)
    (root / "uploads" / f"bad--{digest.hash}-{digest.size}.part").write_bytes(b"Z" * 50)
    writer = store.open_write("bad", digest)
    assert writer.committed_size == 50
    writer.append(data[50:])
    with pytest.raises(UploadDigestMismatch):
        writer.commit()
    assert _files(root) == []


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_local_reader_closes_its_file(tmp_path: Path) -> None:
    store, _ = _local(tmp_path)
    digest = put(store, payload(10_000, seed=30))
    before = _open_fds()
    exhausted = store.read(digest, chunk_size=3000)
    assert len(list(exhausted)) == 4
    assert _open_fds() == before
    unstarted = store.read(digest)
    assert _open_fds() == before + 1
    unstarted.close()
    halfway = store.read(digest, chunk_size=3000)
    next(halfway)
    halfway.close()
    assert _open_fds() == before
    with pytest.raises(OutOfRange):
        store.read(digest, offset=10_001)
    assert _open_fds() == before


def test_local_sweep_goes_by_age(tmp_path: Path) -> None:
    store, root = _local(tmp_path)
    data = payload(300, seed=31)
    digest = digest_of(data)
    for upload_id in ("old", "new", "held"):
        writer = store.open_write(upload_id, digest)
        writer.append(data[:100])
        writer.close()
    held = store.open_write("held", digest)
    two_hours_ago = time.time() - 7200
    for upload_id in ("old", "held"):
        os.utime(root / "uploads" / f"{upload_id}--{digest.hash}-{digest.size}.part", (two_hours_ago,) * 2)
    assert store.sweep_uploads(3600) == 1
    assert store.upload_status("old", digest) == (0, False)
    assert store.upload_status("new", digest) == (100, False)
    assert store.upload_status("held", digest) == (100, False)
    held.close()


def test_local_rejects_negative_limits(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        LocalBlobStore(tmp_path / "x", max_store_bytes=-1)
