"""Three `prebake serve` replicas on one bucket and one table set, with real worker processes.

Everything runs against the **serial** moto server (one request at a time, so its conditional
writes are atomic: a lost race here is a bug in prebake, not in the emulator). Replicas keep no
state of their own: whatever one of them does, the others see through S3 and DynamoDB.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest

from prebake.client import ArtifactKey, Client, FailedPrecondition
from prebake.core import digests
from prebake.v1 import jobs_pb2, registry_pb2
from tests.aws_emulator import Emulator
from tests.conftest import make_artifact_dir, tree
from tests.processes import PREBAKE, ServerProcess, WorkerProcess, alive, wait_until

pytest.importorskip("prebake.server.storage.dynamodb")
pytest.importorskip("prebake.server.blobs.s3_objects")

pytestmark = pytest.mark.slow

LEASE_SECONDS = 3.0
COMPILE_TIMEOUT = 180.0
MiB = 1 << 20


@dataclass
class Fleet:
    emulator: Emulator
    bucket: str
    store: str
    registry: str
    replicas: list[ServerProcess]
    tmp: Path

    @property
    def addresses(self) -> list[str]:
        return [r.address for r in self.replicas]

    def client(self, i: int, **kw: Any) -> Client:
        return Client(self.replicas[i].address, timeout=30.0, **kw)

    def replica(self, tmp: Path, name: str, registry: str = "") -> ServerProcess:
        """Another replica on the fleet's bucket (and its table set, or `registry`), started."""
        args = ["--store", self.store, "--registry", registry or self.registry, "--data-dir", str(tmp / name)]
        return ServerProcess(tmp, name, args, self.emulator.env).wait_ready()

    def prebake(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*PREBAKE, *args],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, **self.emulator.env},
            check=False,
        )


def neuron_key(n: int) -> ArtifactKey:
    """Keys no worker here can compile (no Neuron SDK): their jobs stay queued."""
    return ArtifactKey(
        kind="neuron",
        model="meta-llama/Meta-Llama-3-8B",
        instance_type="ml.inf2.48xlarge",
        sequence_length=1024 * (n + 1),
        batch_size=1,
        tensor_parallel_degree=24,
        precision="bf16",
    )


@pytest.fixture(scope="module")
def fleet(moto_serial: Emulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in moto_serial.env.items():
            mp.setenv(name, value)
        bucket = moto_serial.create_bucket("prebake-fleet")
        store, registry = f"s3://{bucket}/prebake", f"dynamodb://{moto_serial.unique_name('fleet')}"
        made = subprocess.run(
            [*PREBAKE, "init-aws", "--store", store, "--registry", registry],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert made.returncode == 0, made.stderr
        env = {
            "PREBAKE_LEASE_SECONDS": str(LEASE_SECONDS),
            "PREBAKE_RETRY_BACKOFF_SECONDS": "0.2",
            # The session's temporary directories hold the tiny model some tests compile.
            "PREBAKE_MODEL_SOURCE_ROOTS": str(tmp_path_factory.getbasetemp()),
        }
        args = ["--store", store, "--registry", registry]
        replicas = [ServerProcess(tmp, name, [*args, "--data-dir", str(tmp / name)], env) for name in "ABC"]
        try:
            for r in replicas:
                r.wait_ready()
            yield Fleet(moto_serial, bucket, store, registry, replicas, tmp)
        finally:
            for r in replicas:
                with contextlib.suppress(Exception):
                    r.stop()


def test_a_publish_through_one_replica_is_a_byte_identical_hit_on_the_others(
    fleet: Fleet, tmp_path: Path
) -> None:
    source = make_artifact_dir(tmp_path / "src", {"model.neff": 3 * MiB + 17, "config/a.json": 900}, seed=1)
    key = neuron_key(100)
    with fleet.client(0) as a:
        published = a.publish(source, key)
    assert published.created
    for i in (1, 2):
        for direct in (True, False):
            with fleet.client(i, direct_download=direct) as other:
                hit = other.lookup(key, on_miss="report")
                assert hit.status == registry_pb2.LOOKUP_STATUS_HIT, hit
                assert hit.artifact.artifact_id == published.artifact.artifact_id
                # Presigned URLs come only to clients that ask for them.
                assert all(bool(f.download_url) == direct for f in hit.artifact.files)
                dest = tmp_path / f"dest-{i}-{direct}"
                fetched = other.fetch(hit.artifact, dest)
                assert tree(dest) == tree(source)
                # Presigned: every byte came straight from S3; else every byte via the replica.
                assert fetched.bytes_direct == (fetched.total_bytes if direct else 0)


def test_forty_concurrent_misses_over_three_replicas_create_one_job(fleet: Fleet) -> None:
    key = neuron_key(200)
    clients = [fleet.client(i) for i in range(3)]
    barrier = threading.Barrier(40)

    def miss(n: int) -> registry_pb2.LookupResponse:
        barrier.wait()
        return clients[n % 3].lookup(key)

    try:
        with ThreadPoolExecutor(40) as pool:
            answers = list(pool.map(miss, range(40)))
    finally:
        for c in clients:
            c.close()
    job_ids = {r.job.job_id for r in answers}
    assert len(job_ids) == 1, job_ids
    assert sum(r.job_created for r in answers) == 1
    waiting = {registry_pb2.LOOKUP_STATUS_MISS, registry_pb2.LOOKUP_STATUS_COMPILING}
    assert {r.status for r in answers} <= waiting
    with fleet.client(2) as c:
        digest = answers[0].key.digest
        assert [j.job_id for j in c.iter_jobs() if j.key.digest == digest] == list(job_ids)


def _parts(fleet: Fleet) -> list[tuple[int, int, str]]:
    """(number, size, etag) of the parts of the store's one unfinished multipart upload."""
    s3 = boto3.client("s3", endpoint_url=fleet.emulator.endpoint)
    uploads = s3.list_multipart_uploads(Bucket=fleet.bucket, Prefix="prebake/uploads/").get("Uploads", [])
    assert len(uploads) == 1, uploads
    found = s3.list_parts(Bucket=fleet.bucket, Key=uploads[0]["Key"], UploadId=uploads[0]["UploadId"])
    return [(p["PartNumber"], p["Size"], p["ETag"]) for p in found.get("Parts", [])]


class _Stop(Exception):
    pass


def test_an_upload_cut_by_a_killed_replica_resumes_through_another_without_resending_parts(
    fleet: Fleet, tmp_path: Path
) -> None:
    size = 256 * MiB
    path = tmp_path / "big.bin"
    with open(path, "wb") as out:
        for i in range(size // (16 * MiB)):
            out.write(hashlib.sha256(str(i).encode()).digest() * (16 * MiB // 32))
    digest = digests.hash_file(path)
    victim = fleet.replica(tmp_path, "victim")

    def kill_midway(done: int, total: int) -> None:
        if done >= total // 2:
            os.kill(victim.proc.pid, signal.SIGKILL)
            raise _Stop

    with Client(victim.address, timeout=30.0, retries=0) as c, pytest.raises(_Stop):
        c.upload_blob(path, digest, progress=kill_midway)
    victim.proc.wait(timeout=10)
    before = _parts(fleet)
    committed = sum(p[1] for p in before)
    assert 0 < committed < size

    with fleet.client(1) as b:
        received_before = b.get_stats().bytes_received
        result = b.upload_blob(path, digest)
        assert result.bytes_resumed == committed
        assert result.bytes_sent == size - committed
        # Replica B was sent only the rest: the committed parts were not sent again.
        assert b.get_stats().bytes_received - received_before == size - committed
        assert b.find_missing_blobs([digest]) == []
        assert b"".join(b.read_blob(digest, offset=size - 10)) == path.read_bytes()[-10:]


def test_a_killed_worker_loses_its_job_to_a_worker_on_another_replica(
    fleet: Fleet, tmp_path: Path, tiny_model: Path
) -> None:
    from prebake.server.storage.dynamodb import open_dynamodb

    key = ArtifactKey(
        kind="inductor",
        model="tiny/llama",
        instance_type="ml.c6a.4xlarge",
        sequence_length=32,
        batch_size=1,
        precision="fp32",
    )
    a, b, c = fleet.addresses
    with Client(c, timeout=30.0) as watcher:
        response = watcher.lookup(key, model_source=str(tiny_model))
        assert response.status == registry_pb2.LOOKUP_STATUS_MISS, response
        job_id = response.job.job_id
        first = WorkerProcess(b, tmp_path, "on-b")
        second: WorkerProcess | None = None
        try:

            def compiling() -> bool:
                job = watcher.get_job(job_id)
                leased = job.state == jobs_pb2.JOB_STATE_LEASED and job.worker == first.worker_id
                return leased and job.progress > 0

            wait_until(compiling, 90, "the worker on replica B to compile")
            tables = fleet.registry.removeprefix("dynamodb://")
            storage = open_dynamodb(tables)
            try:
                zombie_token = asyncio.run(storage.jobs.get(job_id)).fencing_token  # type: ignore[union-attr]
            finally:
                storage.close()
            killed = first.kill_host()
            wait_until(lambda: not any(alive(pid) for pid in killed), 10, "the killed compile to die")

            second = WorkerProcess(a, tmp_path, "on-a", "--max-jobs", "1")
            job = watcher.wait_for_job(job_id, timeout=COMPILE_TIMEOUT)  # watched through replica C
            assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, (job, second.log())
            assert job.worker == second.worker_id and job.attempts == 2
        finally:
            first.close()
            if second is not None:
                second.close()
        with Client(a, timeout=30.0) as on_a:
            artifact = on_a.get_artifact(job.artifact_id)
            with pytest.raises(FailedPrecondition):
                late = registry_pb2.Producer(worker=first.worker_id)
                on_a.complete_job(job_id, zombie_token, artifact.files, late)
        with Client(b, timeout=30.0) as on_b:
            hit = on_b.lookup(key, on_miss="report", model_source=str(tiny_model))
            assert hit.status == registry_pb2.LOOKUP_STATUS_HIT, hit
            assert hit.artifact.artifact_id == job.artifact_id
            assert on_b.get_artifact(job.artifact_id).producer.worker == second.worker_id


def test_reindex_restores_every_artifact_into_an_empty_table_set(fleet: Fleet, tmp_path: Path) -> None:
    source = make_artifact_dir(tmp_path / "src", {"weights.bin": 2 * MiB, "tok.json": 300}, seed=7)
    with fleet.client(0) as a:
        a.publish(source, neuron_key(300))
        before = {x.artifact_id: x for x in a.iter_artifacts()}
        full = {i: a.get_artifact(i) for i in before}
    fresh = f"dynamodb://{fleet.emulator.unique_name('reindexed')}"
    made = fleet.prebake("init-aws", "--store", fleet.store, "--registry", fresh)
    assert made.returncode == 0, made.stderr
    done = fleet.prebake("reindex", "--store", fleet.store, "--registry", fresh)
    assert done.returncode == 0, done.stderr
    restored = fleet.replica(tmp_path, "restored", registry=fresh)
    try:
        with Client(restored.address, timeout=30.0) as r:
            after = {x.artifact_id for x in r.iter_artifacts()}
            assert after == set(before)
            for artifact_id, original in full.items():
                again = r.get_artifact(artifact_id)
                assert [(f.path, f.digest, f.executable) for f in again.files] == [
                    (f.path, f.digest, f.executable) for f in original.files
                ]
                assert again.key == original.key and again.created_at == original.created_at
            dest = tmp_path / "dest"
            r.fetch(r.lookup(neuron_key(300), on_miss="report").artifact, dest)
            assert tree(dest) == tree(source)
        # A second reindex finds everything present and restores nothing.
        second = fleet.prebake("reindex", "--store", fleet.store, "--registry", fresh)
        assert second.returncode == 0, second.stderr
    finally:
        restored.stop()
