"""Integrity sweep and self-repair against a real server, with the test playing the worker.

A blob corrupted or deleted behind the server's back is found by `prebake verify` or the
periodic sweep, quarantined, its artifact stops hitting and its compile is re-enqueued; the
rebuild (lease, upload, complete) makes it hit again. A Read that finds a blob missing marks
the artifact at once, and `ensure` follows the rebuild instead of failing. A small Read of a
verified blob hashes nothing.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from prebake.client import Client, errors
from prebake.server.app import BackgroundServer, background_server
from prebake.server.blobs import ContentAddressedStore, LocalObjectStore
from prebake.server.blobs.cas import blob_key
from prebake.server.config import load_server_config
from prebake.server.integrity import SweepStopped, Throttle
from prebake.server.records import Digest
from prebake.server.storage.dynamodb import create_tables
from prebake.v1 import jobs_pb2, registry_pb2, workers_pb2
from tests.aws_emulator import Emulator
from tests.conftest import INDUCTOR_KEY, LLAMA3_8B_INF2, make_artifact_dir
from tests.contract.blob_backends import _settle_local
from tests.plugin_cli import PrebakeCli
from tests.test_workers_protocol import finish, lease

PUBLISHED_KEY = LLAMA3_8B_INF2
HIT = registry_pb2.LOOKUP_STATUS_HIT
COMPILING = registry_pb2.LOOKUP_STATUS_COMPILING


def store_of(server: BackgroundServer) -> ContentAddressedStore:
    assert server.running is not None
    blobs = server.running.state.blobs
    assert isinstance(blobs, ContentAddressedStore)
    return blobs


def compiled(client: Client, tmp_path: Path) -> tuple[registry_pb2.Artifact, Digest]:
    """The artifact of INDUCTOR_KEY, built through a job the test plays the worker for."""
    assert client.lookup(INDUCTOR_KEY).job_created
    finish(client, tmp_path, lease(client))
    hit = client.lookup(INDUCTOR_KEY)
    assert hit.status == HIT
    [file] = hit.artifact.files
    return hit.artifact, Digest(file.digest.hash, file.digest.size_bytes)


def corrupt(server: BackgroundServer, digest: Digest) -> None:
    """Flip a byte of the stored blob, bypassing the server (a raw write of its object)."""
    objects = store_of(server).objects
    key = blob_key(digest)
    data = bytearray(b"".join(objects.get(key)))
    data[len(data) // 2] ^= 0xFF
    if isinstance(objects, LocalObjectStore):
        objects.path(key).write_bytes(bytes(data))  # in place, as bit rot or a stray write would
    else:
        objects.put(key, bytes(data))


def delete(server: BackgroundServer, digest: Digest) -> None:
    objects = store_of(server).objects
    if isinstance(objects, LocalObjectStore):
        os.unlink(objects.path(blob_key(digest)))
    else:
        assert objects.delete(blob_key(digest))


def rebuild(client: Client, tmp_path: Path, wait: float = 0.0) -> workers_pb2.CompleteJobResponse:
    leased = lease(client, wait=wait)
    assert leased.HasField("job"), "the rebuild was enqueued"
    done: workers_pb2.CompleteJobResponse = finish(client, tmp_path, leased)  # the first compile's output
    return done


def verify(prebake: PrebakeCli, address: str, *args: str) -> tuple[int, dict[str, Any]]:
    ran = prebake("--server", address, "verify", "--json", "--quiet", *args)
    return ran.code, json.loads(ran.out)


@pytest.fixture(params=["local", "s3"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BackgroundServer]:
    overrides: dict[str, Any] = {}
    if request.param == "s3":
        emulator: Emulator = request.getfixturevalue("aws_threaded")
        overrides["store"] = f"s3://{emulator.create_bucket()}/prebake"
    with background_server(tmp_path / "data", **overrides) as srv:
        yield srv


def test_a_corrupt_blob_is_found_by_verify_quarantined_and_rebuilt(
    served: BackgroundServer, tmp_path: Path, prebake: PrebakeCli
) -> None:
    with Client(served.address, timeout=30.0) as client:
        artifact, digest = compiled(client, tmp_path)
        code, report = verify(prebake, served.address)
        assert code == 0 and report["damaged"] == [] and report["blobs_checked"] == report["blobs_total"] >= 1

        corrupt(served, digest)
        # A dry run reports, changes nothing.
        code, report = verify(prebake, served.address, "--dry-run")
        assert code == 1
        [found] = report["damaged"]
        assert found["problem"] == "corrupt" and found["artifact_ids"] == [artifact.artifact_id]
        assert found["job_ids"] == []
        assert client.lookup(INDUCTOR_KEY).status == HIT
        assert store_of(served).list_quarantined() == []

        code, report = verify(prebake, served.address)
        assert code == 1
        [found] = report["damaged"]
        assert found["digest"] == {"hash": digest.hash, "size_bytes": digest.size}
        assert found["problem"] == "corrupt" and "quarantined" in found["detail"]
        assert found["artifact_ids"] == [artifact.artifact_id]
        [job_id] = found["job_ids"]
        # Quarantined, not deleted: the bad bytes are kept for inspection.
        [kept] = store_of(served).list_quarantined()
        assert kept.digest == digest
        assert "corrupt" in client.get_artifact(artifact.artifact_id).unavailable
        # The artifact no longer hits; the next lookup joins the rebuild.
        after = client.lookup(INDUCTOR_KEY)
        assert after.status == COMPILING and after.job.job_id == job_id
        assert "rebuilding" in after.job.message
        assert not after.job_created

        done = rebuild(client, tmp_path)
        assert done.artifact.manifest_digest == artifact.manifest_digest
        assert client.get_job(job_id).state == jobs_pb2.JOB_STATE_SUCCEEDED
        again = client.lookup(INDUCTOR_KEY)
        assert again.status == HIT and again.artifact.manifest_digest == artifact.manifest_digest
        assert again.artifact.unavailable == ""
        code, report = verify(prebake, served.address)
        assert code == 0 and report["damaged"] == []


@pytest.mark.parametrize("where", ["local", "aws"])
def test_the_periodic_sweep_finds_a_deleted_blob(
    request: pytest.FixtureRequest, tmp_path: Path, where: str
) -> None:
    overrides: dict[str, Any] = {"integrity_sweep_seconds": 0.2}
    if where == "aws":  # S3 blobs and the DynamoDB registry
        emulator: Emulator = request.getfixturevalue("aws_threaded")
        prefix = emulator.unique_name("integrity")
        create_tables(prefix)
        overrides.update(store=f"s3://{emulator.create_bucket()}/prebake", registry=f"dynamodb://{prefix}")
    with (
        background_server(tmp_path / "data", **overrides) as srv,
        Client(srv.address, timeout=30.0) as client,
    ):
        artifact, digest = compiled(client, tmp_path)
        delete(srv, digest)
        deadline = time.monotonic() + 60
        while (looked := client.lookup(INDUCTOR_KEY)).status == HIT:
            assert time.monotonic() < deadline, "the sweep never found the deleted blob"
            time.sleep(0.1)
        # The sweep marks the artifact, then enqueues its rebuild; a lookup in between
        # enqueues the compile itself. Either way exactly one job rebuilds the key.
        if looked.job_created:
            assert looked.status == registry_pb2.LOOKUP_STATUS_MISS
        else:
            assert looked.status == COMPILING and "missing" in looked.job.message
        rebuild(client, tmp_path)
        assert client.lookup(INDUCTOR_KEY).status == HIT
        assert client.get_artifact(artifact.artifact_id).manifest_digest == artifact.manifest_digest


def test_a_read_of_a_missing_blob_makes_ensure_follow_the_rebuild(
    server: BackgroundServer, tmp_path: Path
) -> None:
    with Client(server.address, timeout=30.0) as client:
        artifact, digest = compiled(client, tmp_path)
        delete(server, digest)
        # The test's worker waits for the rebuild the failing Read enqueues.
        worker = threading.Thread(target=rebuild, args=(client, tmp_path, 30.0))
        worker.start()
        try:
            result = client.ensure(INDUCTOR_KEY, tmp_path / "dest", timeout=60)
        finally:
            worker.join(60)
        assert result.job_id is not None and result.artifact_id == artifact.artifact_id
        assert (tmp_path / "dest" / "model.pt2").stat().st_size == 5000
        assert client.lookup(INDUCTOR_KEY).status == HIT


def test_a_read_of_a_missing_blob_marks_its_artifact_at_once(
    server: BackgroundServer, tmp_path: Path
) -> None:
    with Client(server.address, timeout=30.0) as client:
        _, digest = compiled(client, tmp_path)
        delete(server, digest)
        with pytest.raises(errors.NotFound, match="not stored"):
            b"".join(client.read_blob((digest.hash, digest.size)))
        looked = client.lookup(INDUCTOR_KEY)
        # The sweep marks the artifact, then enqueues its rebuild; a lookup in between
        # enqueues the compile itself. Either way exactly one job rebuilds the key.
        if looked.job_created:
            assert looked.status == registry_pb2.LOOKUP_STATUS_MISS
        else:
            assert looked.status == COMPILING and "missing" in looked.job.message


def test_a_small_read_of_a_verified_blob_hashes_nothing(
    server: BackgroundServer, client: Client, tmp_path: Path
) -> None:
    _, digest = compiled(client, tmp_path)
    store = store_of(server)
    assert isinstance(store.objects, LocalObjectStore)
    _settle_local(store.objects.root, blob_key(digest))
    assert b"".join(
        client.read_blob((digest.hash, digest.size), offset=10, limit=1)
    )  # verifies once, stamps it
    hashed = store.hashed_bytes
    for offset in range(5):
        assert len(b"".join(client.read_blob((digest.hash, digest.size), offset=offset, limit=1))) == 1
    assert store.hashed_bytes == hashed, "a 1-byte Read must not hash the blob"
    # A change behind the server's back is noticed by the stamp: hashed once more, then refused.
    corrupt(server, digest)
    with pytest.raises(errors.DataLoss, match="corrupt"):
        b"".join(client.read_blob((digest.hash, digest.size), limit=1))
    assert store.hashed_bytes == hashed + digest.size


def test_sweep_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="integrity_sweep"):
        load_server_config({"integrity_sweep_seconds": -1}, {})
    config = load_server_config({"integrity_sweep_seconds": 0, "integrity_sweep_bytes_per_second": 0}, {})
    assert config.integrity_sweep_seconds == 0


def test_verify_limit_rate_and_bad_arguments(
    server: BackgroundServer, client: Client, tmp_path: Path, prebake: PrebakeCli
) -> None:
    compiled(client, tmp_path)
    client.publish(make_artifact_dir(tmp_path / "other", {"a.bin": 300, "b.bin": 400}), PUBLISHED_KEY)
    code, report = verify(prebake, server.address, "--limit", "1", "--rate", "1M")
    assert code == 0 and report["blobs_total"] == report["blobs_checked"] == 1
    code, report = verify(prebake, server.address)
    assert code == 0 and report["blobs_total"] == 3
    with pytest.raises(errors.InvalidArgument, match="must not be negative"):
        list(client.verify_blobs(bytes_per_second=-1))
    assert prebake("--server", server.address, "verify", "--limit", "-1").code == 2


def test_a_stopped_throttle_ends_the_hashing() -> None:
    stop = threading.Event()
    throttle = Throttle(0, stop)
    throttle(1 << 20)  # unlimited: returns at once
    stop.set()
    with pytest.raises(SweepStopped):
        throttle(1)
    with pytest.raises(SweepStopped):
        Throttle(1, stop)(1 << 30)  # a stop ends a long wait at once
