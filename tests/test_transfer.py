"""Publish and fetch through a real server: integrity, resume, corruption."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from prebake.client import Client, errors
from prebake.core.digests import hash_file
from prebake.server.app import BackgroundServer
from prebake.v1 import registry_pb2
from tests.conftest import LLAMA3_8B_INF2, make_artifact_dir, tree

MiB = 1 << 20
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
