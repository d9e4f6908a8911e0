"""The `ObjectStore` contract, checked for every backend in `blob_backends.OBJECT_BACKENDS`.

Talks to stores only through the protocol (plus the backend's test hooks), so the S3 backend
joins by adding its factory there. A "restart" is a new store instance on the same storage.
"""

from __future__ import annotations

import multiprocessing
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from prebake.server.blobs import ObjectStore
from prebake.server.blobs.objects import (
    InvalidPart,
    InvalidRange,
    NoSuchObject,
    NoSuchUpload,
    PreconditionFailed,
)
from tests.contract.blob_backends import OBJECT_BACKENDS, ObjectBackend

MiB = 1 << 20
SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture(params=OBJECT_BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[ObjectBackend]:
    b: ObjectBackend = request.param(request)
    yield b
    b.cleanup()


@pytest.fixture
def store(backend: ObjectBackend) -> ObjectStore:
    return backend.make()


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def read_all(store: ObjectStore, key: str, **kw: Any) -> bytes:
    reader = store.get(key, **kw)
    try:
        return b"".join(reader)
    finally:
        reader.close()


def part_size(store: ObjectStore) -> int:
    return max(store.min_part_size, 64 * 1024)


# -- whole objects -------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 4097, MiB + 3])
def test_put_head_get(store: ObjectStore, size: int) -> None:
    data = payload(size, seed=size)
    info = store.put("a/b/object", data)
    assert (info.key, info.size) == ("a/b/object", size)
    head = store.head("a/b/object")
    assert head is not None and (head.size, head.etag) == (size, info.etag)
    chunks = list(store.get("a/b/object", chunk_size=4096))
    assert b"".join(chunks) == data
    assert all(0 < len(c) <= 4096 for c in chunks)
    assert store.head("a/b") is None and store.head("a/b/object/x") is None


def test_ranged_get(store: ObjectStore) -> None:
    data = payload(10_000, seed=1)
    store.put("ranged", data)
    assert read_all(store, "ranged", offset=1234) == data[1234:]
    assert read_all(store, "ranged", offset=1234, length=100) == data[1234:1334]
    assert read_all(store, "ranged", length=1) == data[:1]
    assert read_all(store, "ranged", offset=9_990, length=100) == data[9_990:]
    assert read_all(store, "ranged", offset=10_000) == b""
    assert read_all(store, "ranged", offset=3, length=5000, chunk_size=999) == data[3:5003]
    assert read_all(store, "ranged", offset=5, length=0) == b""


def test_get_errors_are_raised_at_the_call(store: ObjectStore) -> None:
    store.put("small", b"0123456789")
    with pytest.raises(InvalidRange):
        store.get("small", offset=11)
    with pytest.raises(NoSuchObject):
        store.get("absent")
    for bad in ({"offset": -1}, {"length": -1}, {"chunk_size": 0}):
        with pytest.raises(ValueError):
            store.get("small", **bad)


@pytest.mark.parametrize(
    "key", ["", "/a", "a/", "a//b", "a/./b", "a/../b", ".hidden/x", "a b", "ü", "x" * 1025]
)
def test_invalid_keys_are_refused(store: ObjectStore, key: str) -> None:
    with pytest.raises(ValueError):
        store.put(key, b"x")
    with pytest.raises(ValueError):
        store.head(key)


def test_put_replaces_atomically_while_readers_read(store: ObjectStore) -> None:
    versions = [payload(2 * MiB, seed=2), payload(3 * MiB + 1, seed=3)]
    store.put("hot", versions[0])
    stop = threading.Event()
    seen: list[bytes] = []
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                seen.append(read_all(store, "hot"))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(20):
            store.put("hot", versions[i % 2])
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert seen and all(s in versions for s in seen)


def test_put_if_absent(store: ObjectStore) -> None:
    store.put("once", b"first", if_absent=True)
    with pytest.raises(PreconditionFailed):
        store.put("once", b"second", if_absent=True)
    assert read_all(store, "once") == b"first"
    store.put("once", b"third")
    assert read_all(store, "once") == b"third"


def test_delete(store: ObjectStore) -> None:
    store.put("gone", b"x")
    store.put("kept", b"y")
    assert store.delete("gone")
    assert not store.delete("gone")
    assert not store.delete("never")
    assert store.head("gone") is None
    assert read_all(store, "kept") == b"y"


def test_list_by_prefix(store: ObjectStore) -> None:
    keys = ["a/1", "a/2", "a/b/3", "ab/4", "b/5", "a-6"]
    for i, key in enumerate(keys):
        store.put(key, b"z" * i)
    assert {o.key: o.size for o in store.list_objects("a/")} == {"a/1": 0, "a/2": 1, "a/b/3": 2}
    assert {o.key for o in store.list_objects("a")} == {"a/1", "a/2", "a/b/3", "ab/4", "a-6"}
    assert {o.key for o in store.list_objects("")} == set(keys)
    assert list(store.list_objects("nothing/")) == []
    # An unfinished multipart upload is not an object.
    upload = store.create_upload("a/pending")
    store.upload_part(upload, 1, b"part")
    assert "a/pending" not in {o.key for o in store.list_objects("a/")}


def test_list_many(store: ObjectStore) -> None:
    # More than one page of S3's listing (1000 keys).
    for i in range(1100):
        store.put(f"many/{i:05d}", b"")
    assert len({o.key for o in store.list_objects("many/")}) == 1100


def test_move(store: ObjectStore) -> None:
    data = payload(5000, seed=4)
    info = store.put("staging/x", data)
    with pytest.raises(PreconditionFailed):
        store.move("staging/x", "final/x", if_etag=info.etag + "-other")
    assert store.head("final/x") is None and read_all(store, "staging/x") == data
    moved = store.move("staging/x", "final/x", if_etag=info.etag)
    assert moved.size == 5000
    assert store.head("staging/x") is None
    assert read_all(store, "final/x") == data
    with pytest.raises(NoSuchObject):
        store.move("staging/x", "final/x")
    # Replacing an existing object.
    store.put("staging/y", b"new")
    store.move("staging/y", "final/x")
    assert read_all(store, "final/x") == b"new"


def test_reader_close(store: ObjectStore) -> None:
    store.put("r", payload(50_000, seed=5))
    reader = store.get("r", chunk_size=1000)
    next(reader)
    reader.close()
    reader.close()
    assert list(reader) == []


# -- multipart uploads ---------------------------------------------------------------


def test_multipart_round_trip(store: ObjectStore) -> None:
    size = part_size(store)
    parts = [payload(size, seed=10 + i) for i in range(3)] + [b"tail"]
    upload = store.create_upload("big/object")
    assert upload.key == "big/object"
    assert store.list_parts(upload) == []
    infos = {n: store.upload_part(upload, n, parts[n - 1]) for n in (3, 1, 4, 2)}  # any order
    assert store.head("big/object") is None, "parts are never visible"
    listed = store.list_parts(upload)
    assert [(p.number, p.size, p.etag) for p in listed] == [
        (n, len(parts[n - 1]), infos[n].etag) for n in (1, 2, 3, 4)
    ]
    # Uploading a part again replaces it.
    parts[1] = payload(size, seed=99)
    infos[2] = store.upload_part(upload, 2, parts[1])
    done = store.complete_upload(upload, [infos[n] for n in (1, 2, 3, 4)])
    assert done.size == 3 * size + 4
    assert read_all(store, "big/object") == b"".join(parts)
    assert store.find_uploads("big/") == []
    with pytest.raises(NoSuchUpload):
        store.list_parts(upload)
    with pytest.raises(NoSuchUpload):
        store.upload_part(upload, 5, b"late")
    assert backend_scratch_is_clean(store)


def backend_scratch_is_clean(store: ObjectStore) -> bool:
    return store.find_uploads("") == []


def test_parts_stored_without_durability_read_back_the_same_after_a_sync(store: ObjectStore) -> None:
    # `durable=False` changes only what a machine crash may lose: listing, syncing and completing
    # see exactly the bytes given, from a view as from bytes.
    upload = store.create_upload("lazy")
    data = b"a" * part_size(store)
    first = store.upload_part(upload, 1, memoryview(data), durable=False)
    second = store.upload_part(upload, 2, b"tail", durable=False)
    store.sync_parts(upload)
    assert [(p.number, p.size) for p in store.list_parts(upload)] == [(1, len(data)), (2, 4)]
    store.complete_upload(upload, [first, second])
    assert read_all(store, "lazy") == data + b"tail"


def test_complete_with_a_subset_drops_the_other_parts(store: ObjectStore) -> None:
    upload = store.create_upload("subset")
    first = store.upload_part(upload, 1, b"a" * part_size(store))
    store.upload_part(upload, 2, b"b" * part_size(store))
    last = store.upload_part(upload, 3, b"c")
    store.complete_upload(upload, [first, last])
    assert read_all(store, "subset") == b"a" * part_size(store) + b"c"


def test_complete_refuses_wrong_parts(store: ObjectStore) -> None:
    size = part_size(store)
    upload = store.create_upload("strict")
    one = store.upload_part(upload, 1, b"1" * size)
    two = store.upload_part(upload, 2, b"2" * size)
    replaced = store.upload_part(upload, 2, b"3" * size)
    assert replaced.etag != two.etag
    with pytest.raises(InvalidPart):
        store.complete_upload(upload, [one, two])  # part 2 was replaced since
    with pytest.raises(InvalidPart):
        store.complete_upload(upload, [replaced, one])  # out of order
    missing = type(one)(number=7, size=size, etag=one.etag, modified=one.modified)
    with pytest.raises(InvalidPart):
        store.complete_upload(upload, [one, missing])
    assert store.head("strict") is None
    if store.min_part_size > 1:
        small = store.upload_part(upload, 1, b"s")
        with pytest.raises(InvalidPart):
            store.complete_upload(upload, [small, replaced])
        one = store.upload_part(upload, 1, b"1" * size)
    store.complete_upload(upload, [one, replaced])
    assert read_all(store, "strict") == b"1" * size + b"3" * size


def test_abort(store: ObjectStore) -> None:
    upload = store.create_upload("aborted")
    store.upload_part(upload, 1, b"x")
    store.abort_upload(upload)
    store.abort_upload(upload)
    assert store.find_uploads("aborted") == []
    assert store.head("aborted") is None
    with pytest.raises(NoSuchUpload):
        store.upload_part(upload, 2, b"y")


def test_part_numbers_are_bounded(store: ObjectStore) -> None:
    upload = store.create_upload("bounds")
    for number in (0, -1, store.max_part_count + 1):
        with pytest.raises(ValueError):
            store.upload_part(upload, number, b"x")
    store.abort_upload(upload)


def test_multipart_upload_survives_a_restart(backend: ObjectBackend) -> None:
    size = part_size(backend.make())
    first = backend.make()
    older = first.create_upload("uploads/one")
    other = first.create_upload("uploads/other")
    first.upload_part(older, 1, b"a" * size)
    first.upload_part(older, 2, b"b" * size)
    del first

    second = backend.make()
    found = second.find_uploads("uploads/one")
    assert [(u.key, u.upload_id) for u in found] == [("uploads/one", older.upload_id)]
    assert {u.upload_id for u in second.find_uploads("uploads/")} == {older.upload_id, other.upload_id}
    parts = second.list_parts(found[0])
    assert [(p.number, p.size) for p in parts] == [(1, size), (2, size)]
    last = second.upload_part(found[0], 3, b"c")
    second.complete_upload(found[0], [*parts, last])
    assert read_all(backend.make(), "uploads/one") == b"a" * size + b"b" * size + b"c"


def test_concurrent_parts_from_many_threads(store: ObjectStore) -> None:
    size = part_size(store)
    data = [payload(size, seed=20 + i) for i in range(8)]
    upload = store.create_upload("threads")
    threads = [
        threading.Thread(target=store.upload_part, args=(upload, i + 1, d)) for i, d in enumerate(data)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.complete_upload(upload, store.list_parts(upload))
    assert read_all(store, "threads") == b"".join(data)


# -- processes: races and crashes ----------------------------------------------------


def _put_repeatedly(make: Callable[[], ObjectStore], key: str, seed: int, rounds: int, barrier: Any) -> None:
    store = make()
    data = payload(MiB + seed, seed)
    barrier.wait(60)
    for _ in range(rounds):
        store.put(key, data)


def test_two_processes_put_one_key(backend: ObjectBackend) -> None:
    barrier = SPAWN.Barrier(2)
    procs = [
        SPAWN.Process(target=_put_repeatedly, args=(backend.make, "race", s, 15, barrier)) for s in (1, 2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    final = read_all(backend.make(), "race")
    assert final in (payload(MiB + 1, 1), payload(MiB + 2, 2))
    assert [o.key for o in backend.make().list_objects("")] == ["race"]
    assert backend.scratch() == []


def _put_forever(make: Callable[[], ObjectStore], key: str, done: Any) -> None:
    store = make()
    versions = [payload(4 * MiB, 30), payload(4 * MiB + 1, 31)]
    i = 0
    while True:
        store.put(key, versions[i % 2])
        i += 1
        done.value = i


def test_killed_put_leaves_no_partial_object(backend: ObjectBackend) -> None:
    done = SPAWN.Value("i", 0, lock=False)  # no lock a SIGKILLed child could die holding
    proc = SPAWN.Process(target=_put_forever, args=(backend.make, "crash/object", done))
    proc.start()
    try:
        while done.value < 3 and proc.is_alive():
            threading.Event().wait(0.01)
    finally:
        proc.kill()  # SIGKILL  # most likely in the middle of a put
        proc.join(30)
    store = backend.make()
    assert read_all(store, "crash/object") in (payload(4 * MiB, 30), payload(4 * MiB + 1, 31))
    assert [o.key for o in store.list_objects("")] == ["crash/object"]


def _upload_parts_forever(make: Callable[[], ObjectStore], key: str, size: int, stored: Any) -> None:
    store = make()
    upload = store.create_upload(key)
    number = 1
    while True:
        store.upload_part(upload, number, payload(size, number))
        stored.value = number
        number += 1


def test_killed_multipart_upload_resumes_in_a_new_store(backend: ObjectBackend) -> None:
    size = part_size(backend.make())
    # No lock: the child is SIGKILLed at any moment, and a lock it held then would never be
    # released, hanging every later read here. One process writes one aligned int.
    stored = SPAWN.Value("i", 0, lock=False)
    proc = SPAWN.Process(target=_upload_parts_forever, args=(backend.make, "uploads/killed", size, stored))
    proc.start()
    try:
        while stored.value < 3 and proc.is_alive():
            threading.Event().wait(0.01)
    finally:
        proc.kill()  # SIGKILL
        proc.join(30)
    assert stored.value >= 3
    store = backend.make()
    assert store.head("uploads/killed") is None
    [upload] = store.find_uploads("uploads/killed")
    parts = store.list_parts(upload)
    # Every part the child saw stored is there, whole; the one it was writing may be there too.
    assert [p.number for p in parts][: stored.value] == list(range(1, stored.value + 1))
    assert all(p.size == size for p in parts)
    last = store.upload_part(upload, len(parts) + 1, b"end")
    store.complete_upload(upload, [*parts, last])
    expected = b"".join(payload(size, n) for n in range(1, len(parts) + 1)) + b"end"
    assert read_all(store, "uploads/killed") == expected
    assert store.find_uploads("") == []
