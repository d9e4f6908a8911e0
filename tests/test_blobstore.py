"""The blob store on local disk: layout, stamps, quarantine, leftovers of older versions and crashes.

The behaviour every backend shares is in tests/contract/ (test_content_store.py,
test_object_store.py); this file checks what only the local filesystem backend does.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from prebake.core.digests import hash_bytes
from prebake.core.errors import DataLoss, OutOfRange, UploadDigestMismatch
from prebake.server.blobs import ContentAddressedStore, LocalObjectStore, local_objects
from prebake.server.blobs.local_stamps import StampedVerification
from prebake.server.records import Digest
from tests.contract.blob_backends import _settle_local

MiB = 1 << 20


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def digest_of(data: bytes) -> Digest:
    return Digest(hash_bytes(data), len(data))


def _local(tmp_path: Path, **limits: int) -> tuple[ContentAddressedStore, Path]:
    root = tmp_path / "local"
    return ContentAddressedStore(LocalObjectStore(root), **limits), root


def put(store: ContentAddressedStore, data: bytes, upload_id: str = "up-1") -> Digest:
    digest = digest_of(data)
    writer = store.open_write(upload_id, digest)
    writer.append(data)
    writer.commit()
    return digest


def get(store: ContentAddressedStore, digest: Digest, **kw: int) -> bytes:
    with store.read(digest, **kw) as reader:
        return b"".join(reader)


def blob_path(root: Path, digest: Digest) -> Path:
    return root / "blobs" / digest.hash[:2] / f"{digest.hash}-{digest.size}"


def _files(root: Path, *, bookkeeping: bool = False) -> list[str]:
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and (bookkeeping or not p.relative_to(root).parts[0].startswith("."))
    )


def test_local_layout(tmp_path: Path) -> None:
    store, root = _local(tmp_path, part_size=4096)
    data = payload(5000, seed=23)
    digest = digest_of(data)
    writer = store.open_write("lay-out", digest)
    writer.append(data[:100])
    writer.close()
    [upload] = [p for p in (root / ".multipart").iterdir()]
    # Part 1 is written in place: its bytes at the start of `data`, a marker naming where (hex
    # offset and size), synced (no boot-id suffix) since close acknowledged the partial upload.
    assert sorted(p.name for p in upload.iterdir()) == ["data", "inline-00001-0-64", "key", "lock"]
    assert (upload / "data").read_bytes() == data[:100]
    assert (upload / "key").read_text() == f"uploads/lay-out--{digest.hash}-{digest.size}"
    building = os.stat(upload / "data").st_ino
    writer = store.open_write("lay-out", digest)
    writer.append(data[100:])
    writer.commit()
    blob = f"blobs/{digest.hash[:2]}/{digest.hash}-{digest.size}"
    assert os.stat(root / blob).st_ino == building, "parts in order become the blob without a copy"
    # The blob, and the stamp that vouches for the bytes the upload hashed on their way in.
    assert _files(root, bookkeeping=True) == [f".stamps/{blob}", blob]
    hashed = store.hashed_bytes
    store.verify(digest)
    assert store.hashed_bytes == hashed, "a blob the upload hashed must not be hashed again"
    assert list((root / ".multipart").iterdir()) == [] and list((root / ".tmp").iterdir()) == []


def test_blobs_of_earlier_versions_are_still_served(tmp_path: Path) -> None:
    root = tmp_path / "local"
    data = payload(3000, seed=1)
    digest = digest_of(data)
    # The layout of blobs/ is unchanged from the single-layer store, so old data dirs keep working.
    blob_path(root, digest).parent.mkdir(parents=True)
    blob_path(root, digest).write_bytes(data)
    (root / "uploads").mkdir()
    (root / "uploads" / f"old--{digest.hash}-{digest.size}.part").write_bytes(data[:10])
    store = ContentAddressedStore(LocalObjectStore(root))
    assert store.stats() == (1, 3000)
    assert get(store, digest) == data
    # Partial uploads of the old layout are stray objects under uploads/: never blobs, swept when old.
    assert store.upload_status("old", digest) == (3000, True)
    assert store.sweep_uploads(0) == 1
    assert _files(root) == [f"blobs/{digest.hash[:2]}/{digest.hash}-{digest.size}"]


def test_local_stray_upload_files_are_never_blobs(tmp_path: Path) -> None:
    store, root = _local(tmp_path)
    data = payload(4000, seed=24)
    digest = digest_of(data)
    # A process killed after assembling an upload but before publishing it leaves this behind.
    staged = root / "uploads" / f"dead--{digest.hash}-{digest.size}"
    staged.parent.mkdir()
    staged.write_bytes(data)
    (root / ".tmp" / ".junk.tmp").write_bytes(b"junk")
    for s in (store, ContentAddressedStore(LocalObjectStore(root))):
        assert not s.contains(digest)
        assert s.find_missing([digest]) == [digest]
        assert s.stats() == (0, 0)
        assert list(s.iter_digests()) == []
    # ... and the upload is finished by committing it: verified first, then published.
    assert store.upload_status("dead", digest) == (4000, False)
    writer = store.open_write("dead", digest)
    assert writer.committed_size == 4000
    writer.commit()
    assert store.hashed_bytes == 4000
    assert store.contains(digest)
    assert not staged.exists()


def test_a_damaged_assembled_upload_fails_its_commit(tmp_path: Path) -> None:
    store, root = _local(tmp_path)
    data = payload(100, seed=29)
    digest = digest_of(data)
    staged = root / "uploads" / f"bad--{digest.hash}-{digest.size}"
    staged.parent.mkdir()
    staged.write_bytes(b"Z" * 100)
    writer = store.open_write("bad", digest)
    assert writer.committed_size == 100
    with pytest.raises(UploadDigestMismatch):
        writer.commit()
    assert _files(root) == []


def test_local_ignores_foreign_files_under_blobs(tmp_path: Path) -> None:
    store, root = _local(tmp_path)
    digest = put(store, b"real")
    (root / "blobs" / "zz").mkdir()
    (root / "blobs" / "zz" / f"{digest.hash}-{digest.size}").write_bytes(b"real")  # wrong shard
    (root / "blobs" / digest.hash[:2] / "notes.txt").write_text("hello")
    (root / "blobs" / "README").write_text("hello")
    (root / "blobs" / digest.hash[:2] / f"{digest.hash}-0{digest.size}").write_bytes(b"real")
    fresh = ContentAddressedStore(LocalObjectStore(root))
    assert list(fresh.iter_digests()) == [digest]
    assert fresh.stats() == (1, 4)


def test_local_quarantine_keeps_the_bad_bytes(tmp_path: Path) -> None:
    store, root = _local(tmp_path)
    data = payload(1000, seed=25)
    digest = put(store, data)
    blob = blob_path(root, digest)
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
    os.truncate(blob_path(root, digest), 600)
    with pytest.raises(DataLoss, match="600 bytes instead of 1000"):
        store.read(digest)
    assert not store.contains(digest)
    assert store.stats() == (0, 0)


def test_local_truncation_during_read_is_data_loss(tmp_path: Path) -> None:
    store, root = _local(tmp_path)
    digest = put(store, payload(10_000, seed=27))
    reader = store.read(digest, chunk_size=4000)
    next(reader)
    os.truncate(blob_path(root, digest), 5000)
    next(reader)  # bytes 4000..5000
    with pytest.raises(DataLoss, match="ends after 5000 bytes"):
        next(reader)
    assert not store.contains(digest)


def test_local_reader_survives_delete(tmp_path: Path) -> None:
    store, _ = _local(tmp_path)
    data = payload(50_000, seed=2)
    digest = put(store, data)
    reader = store.read(digest, chunk_size=1000)
    first = next(reader)
    assert store.delete(digest)
    assert first + b"".join(reader) == data  # the open file pins it


def test_stamps_follow_the_file(tmp_path: Path) -> None:
    store, root = _local(tmp_path)
    data = payload(200_000, seed=3)
    digest = put(store, data)
    key = f"blobs/{digest.hash[:2]}/{digest.hash}-{digest.size}"
    stamps = store.objects.read_verification
    _settle_local(root, key)
    store.verify(digest)
    assert (root / ".stamps" / key).is_file()
    hashed = store.hashed_bytes
    get(store, digest, limit=1)
    assert store.hashed_bytes == hashed
    # A rewrite with the very same bytes is still a change: hashed again, then trusted again.
    blob_path(root, digest).write_bytes(data)
    get(store, digest, limit=1)
    assert store.hashed_bytes == hashed + len(data)
    # A deleted blob's stamp goes with it.
    assert store.delete(digest)
    assert not (root / ".stamps" / key).exists()
    assert stamps.verified(key, lambda: False) is False


def test_a_stamp_is_not_trusted_within_the_clock_tick_of_the_last_change(tmp_path: Path) -> None:
    store, root = _local(tmp_path)
    digest = put(store, payload(1000, seed=4))
    key = f"blobs/{digest.hash[:2]}/{digest.hash}-{digest.size}"
    stamps = StampedVerification(root / ".stamps", LocalObjectStore(root).path, lambda st: "")
    path = blob_path(root, digest)
    stamp = root / ".stamps" / key
    store.verify(digest)
    # Forge a stamp whose time equals the file's last change: a change in that tick would not have
    # altered the recorded identity, so the stamp must not vouch.
    st = os.stat(path)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}")
    os.utime(stamp, ns=(st.st_ctime_ns, st.st_ctime_ns))
    assert not stamps.is_current(key)
    os.utime(stamp, ns=(st.st_ctime_ns + 1, st.st_ctime_ns + 1))
    assert stamps.is_current(key)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_local_reader_closes_its_file(tmp_path: Path) -> None:
    store, _ = _local(tmp_path)
    digest = put(store, payload(10_000, seed=30))
    get(store, digest)
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
    for upload in (root / ".multipart").iterdir():
        if (upload / "key").read_text().split("/")[1].split("--")[0] in ("old", "held"):
            for f in upload.iterdir():
                os.utime(f, (two_hours_ago,) * 2)
    assert store.sweep_uploads(3600) == 1
    assert store.upload_status("old", digest) == (0, False)
    assert store.upload_status("new", digest) == (100, False)
    assert store.upload_status("held", digest) == (100, False)
    held.close()


def test_leftovers_of_killed_processes_are_removed_when_old(tmp_path: Path) -> None:
    root = tmp_path / "local"
    LocalObjectStore(root)
    old, young = root / ".tmp" / ".old.tmp", root / ".tmp" / ".young.tmp"
    half_built = root / ".multipart" / ".0123"
    for p in (old, young):
        p.write_bytes(b"x")
    half_built.mkdir()
    for p in (old, half_built):
        os.utime(p, (time.time() - 3 * 86400,) * 2)
    LocalObjectStore(root)
    assert not old.exists() and not half_built.exists()
    assert young.exists(), "may belong to a write still running in another process"


def test_local_rejects_negative_limits(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        _local(tmp_path, max_store_bytes=-1)
    with pytest.raises(ValueError):
        _local(tmp_path, part_size=0)


def test_collect_uploads_counts_and_removes_stale_temp_files(tmp_path: Path) -> None:
    store, root = _local(tmp_path)
    stale = root / ".tmp" / ".interrupted-write.tmp"
    stale.write_bytes(b"x" * 1234)
    half_built = root / ".multipart" / ".half-built"
    half_built.mkdir()
    (half_built / "part-1").write_bytes(b"y" * 100)
    fresh = root / ".tmp" / ".running-write.tmp"
    fresh.write_bytes(b"z" * 10)
    old = time.time() - 7200
    for path in (stale, half_built):
        os.utime(path, (old, old))

    assert store.collect_uploads(3600, dry_run=True) == (2, 1334)
    assert stale.exists() and half_built.exists()
    assert store.collect_uploads(3600) == (2, 1334)
    assert not stale.exists() and not half_built.exists()
    assert fresh.exists()  # may belong to a write still running in another process


class _Killed(BaseException):
    """Stands for a SIGKILL at a point: nothing after it runs (no handler catches it)."""


def test_parts_left_beside_an_assembled_upload_by_a_crash_are_removed_by_its_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Local disk assembles the parts into the session's object, then removes the parts: a
    # crash in between leaves both. (tests/test_crash_consistency.py kills a real server there.)
    data = payload(5 * 1024 + 300, seed=7)
    digest = digest_of(data)
    store, root = _local(tmp_path, part_size=1024)

    def crash(self: LocalObjectStore, directory: Path) -> None:
        raise _Killed

    writer = store.open_write("up-1", digest)
    writer.append(data)
    with monkeypatch.context() as patch:
        patch.setattr(LocalObjectStore, "_discard", crash)
        with pytest.raises(_Killed):
            writer.commit()
    session = f"uploads/up-1--{digest.hash}-{digest.size}"
    assert [u.key for u in store.objects.find_uploads("uploads/")] == [session]
    assert store.objects.head(session) is not None  # assembled, and its parts still there

    restarted = ContentAddressedStore(LocalObjectStore(root), part_size=1024)
    assert restarted.upload_status("up-1", digest) == (digest.size, False)
    resumed = restarted.open_write("up-1", digest)
    assert resumed.committed_size == digest.size
    # The assembled object is what the resume finishes; the parts it was made of are no use.
    assert restarted.objects.find_uploads("uploads/") == []
    assert restarted.usage().upload_bytes == digest.size
    resumed.commit()
    assert get(restarted, digest) == data
    assert _files(root) == [blob_path(root, digest).relative_to(root).as_posix()]
    assert not [p for p in (root / ".multipart").iterdir() if not p.name.startswith(".")]
    assert restarted.usage().upload_bytes == 0


def _upload_dir(root: Path) -> Path:
    [upload] = [p for p in (root / ".multipart").iterdir() if not p.name.startswith(".")]
    return upload


def test_parts_not_synced_before_a_machine_crash_are_not_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = LocalObjectStore(tmp_path / "objects")
    upload = objects.create_upload("blobs/x")
    objects.upload_part(upload, 1, b"a" * 100, durable=False)
    objects.sync_parts(upload)
    objects.upload_part(upload, 2, b"b" * 50, durable=False)
    assert [(p.number, p.size) for p in objects.list_parts(upload)] == [(1, 100), (2, 50)]
    # The machine restarts: part 2's bytes may never have reached the disk, part 1's did.
    monkeypatch.setattr(local_objects, "BOOT_ID", "f" * 32)
    assert [(p.number, p.size) for p in objects.list_parts(upload)] == [(1, 100)]
    # The writer resumes with part 2, in place again, and the object is exactly what was sent.
    objects.upload_part(upload, 2, b"c" * 70, durable=False)
    info = objects.complete_upload(upload, objects.list_parts(upload))
    assert b"".join(objects.get("blobs/x")) == b"a" * 100 + b"c" * 70
    assert info.size == 170


def test_parts_out_of_order_or_replaced_are_files_of_their_own_and_assemble_by_copy(tmp_path: Path) -> None:
    objects = LocalObjectStore(tmp_path / "objects")
    upload = objects.create_upload("blobs/y")
    one = objects.upload_part(upload, 1, b"1" * 10)
    objects.upload_part(upload, 2, b"2" * 10)
    objects.upload_part(upload, 4, b"4" * 10)  # not next: a file of its own
    two = objects.upload_part(upload, 2, b"Z" * 20)  # replaces an in-place part
    names = sorted(p.name for p in _upload_dir(tmp_path / "objects").iterdir())
    assert names == ["data", "inline-00001-0-a", "key", "lock", "part-00002", "part-00004"]
    listed = objects.list_parts(upload)
    assert [(p.number, p.size) for p in listed] == [(1, 10), (2, 20), (4, 10)]
    assert listed[:2] == [one, two]
    objects.complete_upload(upload, listed)
    assert b"".join(objects.get("blobs/y")) == b"1" * 10 + b"Z" * 20 + b"4" * 10
    assert list((tmp_path / "objects" / ".multipart").iterdir()) == []


def test_completing_fewer_parts_than_were_written_in_place_cuts_the_object(tmp_path: Path) -> None:
    objects = LocalObjectStore(tmp_path / "objects")
    upload = objects.create_upload("blobs/z")
    parts = [objects.upload_part(upload, n, bytes([48 + n]) * 8) for n in (1, 2, 3)]
    building = os.stat(_upload_dir(tmp_path / "objects") / "data").st_ino
    objects.complete_upload(upload, parts[:2])
    assert b"".join(objects.get("blobs/z")) == b"1" * 8 + b"2" * 8
    assert os.stat(objects.path("blobs/z")).st_ino == building
