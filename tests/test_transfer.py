"""Publish and fetch through a real server: integrity, resume, corruption."""

from __future__ import annotations

import builtins
import dataclasses
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from prebake.client import Client, digest_memo, errors, transfer
from prebake.client.digest_memo import DigestMemo
from prebake.client.transfer import CHUNK
from prebake.core import digests
from prebake.core.digests import hash_bytes, hash_file
from prebake.server.app import BackgroundServer
from prebake.v1 import blobs_pb2, registry_pb2
from tests.conftest import LLAMA3_8B_INF2, make_artifact_dir, tree

MiB = 1 << 20
OTHER_KEY = dataclasses.replace(LLAMA3_8B_INF2, sequence_length=LLAMA3_8B_INF2.sequence_length * 2)
SIZES = {"config.json": 1234, "tokenizer/vocab.txt": 0, "compiled/model.neff": 5 * MiB + 17, "bin/run.sh": 64}


class Interrupt(Exception):
    pass


def interrupt_after(limit: int):  # type: ignore[no-untyped-def]
    def progress(done: int, total: int) -> None:
        if done >= limit:
            raise Interrupt(f"interrupted at {done} of {total}")

    return progress


@pytest.fixture
def published(client: Client, tmp_path: Path) -> tuple[Path, str]:
    src = make_artifact_dir(tmp_path / "src", SIZES, seed=7)
    (src / "bin/run.sh").chmod(0o755)
    response = client.publish(src, LLAMA3_8B_INF2)
    return src, response.artifact.artifact_id


def test_fetch_is_byte_identical_and_keeps_executable_bits(client: Client, tmp_path: Path, published) -> None:
    src, artifact_id = published
    dest = tmp_path / "deploy" / "model"
    result = client.fetch(artifact_id, dest)
    assert tree(dest) == tree(src)
    assert os.access(dest / "bin/run.sh", os.X_OK) and not os.access(dest / "config.json", os.X_OK)
    assert result.bytes_downloaded == sum(SIZES.values()) and result.bytes_resumed == 0
    assert [p.name for p in dest.parent.iterdir()] == ["model"], "no temporary directory left behind"


def test_fetch_into_an_existing_copy_is_a_no_op(client: Client, tmp_path: Path, published) -> None:
    _, artifact_id = published
    dest = tmp_path / "model"
    client.fetch(artifact_id, dest)
    again = client.fetch(artifact_id, dest)
    assert again.already_present and again.bytes_downloaded == 0


def test_fetch_refuses_to_overwrite_other_content(client: Client, tmp_path: Path, published) -> None:
    _, artifact_id = published
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "mine.txt").write_text("keep me")
    with pytest.raises(errors.PrebakeError):
        client.fetch(artifact_id, dest)
    assert (dest / "mine.txt").read_text() == "keep me"


def test_interrupted_fetch_resumes_from_its_offset(
    client: Client, server: BackgroundServer, tmp_path: Path, published
) -> None:
    src, artifact_id = published
    dest = tmp_path / "model"
    total = sum(SIZES.values())
    with pytest.raises(Interrupt):
        client.fetch(artifact_id, dest, progress=interrupt_after(2 * MiB))
    assert not dest.exists(), "an interrupted fetch never leaves a partial destination"
    served_before = client.get_stats().bytes_served
    result = client.fetch(artifact_id, dest)
    served_after = client.get_stats().bytes_served
    assert tree(dest) == tree(src)
    assert result.bytes_resumed >= 2 * MiB - 1234
    assert result.bytes_resumed + result.bytes_downloaded == total
    # The server really sent only the rest.
    assert served_after - served_before == result.bytes_downloaded < total


def test_interrupted_upload_resumes_from_the_committed_size(
    client: Client, server: BackgroundServer, tmp_path: Path
) -> None:
    src = make_artifact_dir(tmp_path / "src", {"big.bin": 6 * MiB + 5}, seed=3)
    with pytest.raises(Interrupt):
        client.publish(src, LLAMA3_8B_INF2, progress=interrupt_after(3 * MiB))
    assert client.lookup(LLAMA3_8B_INF2, on_miss="report").status == registry_pb2.LOOKUP_STATUS_MISS
    received_before = client.get_stats().bytes_received
    assert received_before >= 3 * MiB
    response = client.publish(src, LLAMA3_8B_INF2)
    received = client.get_stats().bytes_received - received_before
    assert response.created
    assert received == 6 * MiB + 5 - received_before, "the second upload sent only the missing bytes"
    dest = tmp_path / "out"
    client.fetch(response.artifact.artifact_id, dest)
    assert hash_file(dest / "big.bin") == hash_file(src / "big.bin")


def test_corrupted_blob_is_refused_with_data_loss_and_never_served(
    client: Client, server: BackgroundServer, tmp_path: Path, published
) -> None:
    src, artifact_id = published
    neff = hash_file(src / "compiled/model.neff")
    stored = next((server.config.data_dir / "cas" / "blobs").rglob(f"{neff[0]}-{neff[1]}"))
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.chmod(0o644)
    stored.write_bytes(bytes(data))
    dest = tmp_path / "model"
    served_before = client.get_stats().bytes_served
    with pytest.raises(errors.DataLoss):
        client.fetch(artifact_id, dest)
    assert not dest.exists()
    partial = list(tmp_path.glob(".prebake-tmp-*/compiled/model.neff"))
    assert all(p.stat().st_size == 0 for p in partial), "no byte of the corrupt blob reached the client"
    served = client.get_stats().bytes_served - served_before
    assert served <= sum(SIZES.values()) - SIZES["compiled/model.neff"]
    # Quarantined: reported missing, so publishing the same files again repairs it.
    missing = client.find_missing_blobs([(neff[0], neff[1])])
    assert len(missing) == 1
    client.publish(src, LLAMA3_8B_INF2)
    client.fetch(artifact_id, dest)
    assert tree(dest) == tree(src)


# -- each source byte read once (digest-late uploads) and the digest memo -------------


class ReadCounter:
    """Bytes read from files under `root` through `open` in the modules that read sources."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.bytes = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> ReadCounter:
        for module in (transfer, digests):
            monkeypatch.setattr(module, "open", self._open, raising=False)
        return self

    def _open(self, file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = builtins.open(file, mode, *args, **kwargs)  # noqa: SIM115 (closed by the caller)
        if "r" in mode and Path(file).resolve().is_relative_to(self.root):
            return _Counted(f, self)
        return f


class _Counted:
    def __init__(self, inner: Any, counter: ReadCounter) -> None:
        self._inner = inner
        self._counter = counter

    def read(self, n: int = -1) -> bytes:
        data: bytes = self._inner.read(n)
        self._counter.bytes += len(data)
        return data

    def seek(self, *args: Any) -> int:
        return int(self._inner.seek(*args))

    def __enter__(self) -> _Counted:
        return self

    def __exit__(self, *exc: object) -> None:
        self._inner.close()


READ_ONCE_SIZES = {"model.bin": 3 * MiB + 1, "sub/small.txt": 100, "empty": 0, "two.bin": CHUNK + 1}


def _manifest(client: Client, artifact_id: str) -> dict[str, tuple[str, int]]:
    return {f.path: (f.digest.hash, f.digest.size_bytes) for f in client.get_artifact(artifact_id).files}


def _hashed(src: Path) -> dict[str, tuple[str, int]]:
    return {p.relative_to(src).as_posix(): hash_file(p) for p in src.rglob("*") if p.is_file()}


@pytest.fixture
def memo_client(client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Client]:
    """A client of the same server whose digest memo is the test's own (`DigestMemo.default()`)."""
    monkeypatch.setenv(digest_memo.ENV, str(tmp_path / "memo.json"))
    with Client(client.target) as c:
        yield c


def test_publish_reads_each_source_file_once(
    memo_client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = memo_client
    src = make_artifact_dir(tmp_path / "src", READ_ONCE_SIZES, seed=11)
    counter = ReadCounter(src).install(monkeypatch)
    response = client.publish(src, LLAMA3_8B_INF2)
    assert counter.bytes == sum(READ_ONCE_SIZES.values())
    assert _manifest(client, response.artifact.artifact_id) == _hashed(src)
    # Freshly written files are not remembered: their times are too recent to rely on.
    assert len(DigestMemo.default()) == 0


def test_republishing_unchanged_files_reads_and_sends_nothing(
    memo_client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(digest_memo, "RACY_SECONDS", 0.0)
    client = memo_client
    src = make_artifact_dir(tmp_path / "src", READ_ONCE_SIZES, seed=12)
    first = client.publish(src, LLAMA3_8B_INF2)
    received = client.get_stats().bytes_received
    counter = ReadCounter(src).install(monkeypatch)
    again = client.publish(src, OTHER_KEY)
    assert counter.bytes == 0
    assert client.get_stats().bytes_received == received
    assert _manifest(client, again.artifact.artifact_id) == _manifest(client, first.artifact.artifact_id)


def test_a_file_changed_in_place_with_its_times_restored_is_read_again(
    memo_client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(digest_memo, "RACY_SECONDS", 0.0)
    client = memo_client
    src = make_artifact_dir(tmp_path / "src", READ_ONCE_SIZES, seed=13)
    client.publish(src, LLAMA3_8B_INF2)
    path = src / "model.bin"
    before = os.stat(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with open(path, "r+b") as f:  # in place: same inode, same size
        f.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )
    response = client.publish(src, OTHER_KEY)
    assert _manifest(client, response.artifact.artifact_id) == _hashed(src)


def test_interrupted_digest_late_upload_resumes(client: Client, tmp_path: Path) -> None:
    path = make_artifact_dir(tmp_path / "src", {"big.bin": 6 * MiB + 5}, seed=14) / "big.bin"
    with pytest.raises(Interrupt):
        client.upload_file(path, progress=interrupt_after(3 * MiB))
    received_before = client.get_stats().bytes_received
    assert received_before >= 3 * MiB
    result = client.upload_file(path)
    assert (result.digest.hash, result.digest.size_bytes) == hash_file(path)
    assert result.bytes_resumed == received_before
    assert client.get_stats().bytes_received == 6 * MiB + 5
    # Again: the server holds the blob; uploaded digest-late it is dropped as a duplicate.
    assert client.upload_file(path).digest == result.digest
    assert client.find_missing_blobs([result.digest]) == []


def _late(
    upload_id: str, data: bytes, stated: blobs_pb2.Digest | None, *, offset: int = 0, size: int = 0
) -> list[blobs_pb2.WriteRequest]:
    """A digest-late Write stream of a blob of `size` bytes (default: `data`'s): the size first,
    `data` from `offset`, and the digest `stated` at finish (None: no finish)."""
    pending = blobs_pb2.Digest(size_bytes=size or offset + len(data))
    messages = [blobs_pb2.WriteRequest(upload_id=upload_id, digest=pending, offset=offset, data=data)]
    if stated is not None:
        messages.append(blobs_pb2.WriteRequest(offset=offset + len(data), finish_write=True, digest=stated))
    return messages


def test_digest_late_writes_over_the_wire(client: Client) -> None:
    data = random.Random(15).randbytes(2 * MiB + 3)
    digest = blobs_pb2.Digest(hash=hash_bytes(data), size_bytes=len(data))
    pending = blobs_pb2.Digest(size_bytes=len(data))
    wrong = blobs_pb2.Digest(hash=hash_bytes(b"other"), size_bytes=len(data))

    # One message cannot both open a digest-late upload and state its digest.
    with pytest.raises(errors.InvalidArgument, match="finish_write"):
        client.write_blob(
            [blobs_pb2.WriteRequest(upload_id="w0", digest=pending, data=data, finish_write=True)]
        )
    # Another size at finish; then a wrong hash: refused, nothing stored.
    with pytest.raises(errors.InvalidArgument, match="size_bytes"):
        client.write_blob(_late("w1", data, blobs_pb2.Digest(hash=digest.hash, size_bytes=len(data) + 1)))
    with pytest.raises(errors.InvalidArgument, match="nothing was stored"):
        client.write_blob(_late("w2", data, wrong))
    assert client.find_missing_blobs([digest, wrong]) == [digest, wrong]

    # Interrupted (no finish), resumed by upload id and size, then finished.
    response = client.write_blob(_late("w3", data[:MiB], None, size=len(data)))
    assert (response.committed_size, response.complete) == (MiB, False)
    status = client.query_write_status(pending, upload_id="w3")
    assert (status.committed_size, status.complete) == (MiB, False)
    assert client.query_write_status(digest, upload_id="w3").committed_size == 0  # apart from digest-first
    response = client.write_blob(_late("w3", data[MiB:], digest, offset=MiB))
    assert (response.committed_size, response.complete) == (len(data), True)
    assert client.query_write_status(digest, upload_id="w3").complete
    status = client.query_write_status(pending, upload_id="w3")
    assert (status.committed_size, status.complete) == (0, False)
    assert b"".join(client.read_blob(digest)) == data

    # A duplicate of the stored blob is dropped, and answered complete.
    blobs = client.get_stats().blobs
    response = client.write_blob(_late("w4", data, digest))
    assert response.complete
    assert client.get_stats().blobs == blobs


def test_digest_memo_is_only_a_memo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    memo_path = tmp_path / "memo.json"
    file = tmp_path / "f.bin"
    file.write_bytes(b"content")
    st = os.stat(file)
    h = hash_bytes(b"content")
    # Too recent to rely on: a change in the same timestamp tick would keep the times.
    memo = DigestMemo(memo_path)
    memo.record(file, st, h, time.time_ns())
    assert len(memo) == 0
    # Old enough: recorded, saved, found again under the same identity only.
    memo.record(file, st, h, time.time_ns() + int(digest_memo.RACY_SECONDS * 2e9))
    memo.save()
    assert DigestMemo(memo_path).get(file, st) == h
    file.write_bytes(b"CONTENT")
    assert DigestMemo(memo_path).get(file, os.stat(file)) is None
    # Bounded, least recently used first out.
    monkeypatch.setattr(digest_memo, "MAX_ENTRIES", 2)
    memo = DigestMemo(memo_path)
    for name in ("a", "b", "c"):
        (tmp_path / name).write_bytes(name.encode())
        memo.record(tmp_path / name, os.stat(tmp_path / name), h, time.time_ns() + 10**10)
    assert len(memo) == 2 and memo.get(tmp_path / "a", os.stat(tmp_path / "a")) is None
    # Anything unexpected in the file reads as empty; `off` disables it.
    memo_path.write_text('{"version": 1, "entries": [["k", "not a hash"], 3]}')
    assert len(DigestMemo(memo_path)) == 0
    memo_path.write_text("not json")
    assert len(DigestMemo(memo_path)) == 0
    monkeypatch.setenv(digest_memo.ENV, "off")
    assert DigestMemo.default().path is None
