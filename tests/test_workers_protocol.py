"""The worker protocol against a real server, with the test playing the worker.

Leasing by capability, long polls, heartbeats and cancellation, fenced completion,
lease expiry, failure classes and release. Real compiles through real workers are in
tests/test_worker.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from prebake.client import Client, errors
from prebake.server.app import BackgroundServer, background_server
from prebake.server.job_lifecycle import lease_number
from prebake.v1 import jobs_pb2, key_pb2, registry_pb2, workers_pb2
from tests.conftest import INDUCTOR, INDUCTOR_KEY, make_artifact_dir


@pytest.fixture
def short_lease(tmp_path: Path) -> Iterator[BackgroundServer]:
    with background_server(tmp_path / "data", lease_seconds=1.0, retry_backoff_seconds=0.1) as srv:
        yield srv


def lease(client: Client, worker: str = "w1", wait: float = 0.0) -> workers_pb2.LeaseJobResponse:
    return client.lease_job(worker, [INDUCTOR], wait_seconds=wait)


def finish(client: Client, tmp_path: Path, leased: workers_pb2.LeaseJobResponse, name: str = "out"):  # type: ignore[no-untyped-def]
    files = client.upload_directory(make_artifact_dir(tmp_path / name, {"model.pt2": 5000}, seed=len(name)))
    producer = registry_pb2.Producer(worker="w1", toolchain_versions={"torch": "2.13.0"})
    return client.complete_job(leased.job.job_id, leased.fencing_token, files, producer)


def test_a_job_is_leased_only_by_a_matching_capability(client: Client) -> None:
    client.lookup(INDUCTOR_KEY)
    wrong_toolchain = workers_pb2.Capability(kind=key_pb2.ARTIFACT_KIND_INDUCTOR, toolchain="torch-9.9.9")
    wrong_target = workers_pb2.Capability(
        kind=key_pb2.ARTIFACT_KIND_INDUCTOR, toolchain="torch-2.13.0", compile_targets=["cpu-avx512"]
    )
    neuron = workers_pb2.Capability(kind=key_pb2.ARTIFACT_KIND_NEURON, toolchain="torch-2.13.0")
    for cap in (wrong_toolchain, wrong_target, neuron):
        assert not client.lease_job("other", [cap]).HasField("job")
    leased = lease(client)
    assert leased.job.state == jobs_pb2.JOB_STATE_LEASED and leased.job.worker == "w1"
    assert lease_number(leased.fencing_token) == 1 and leased.job.attempts == 1
    assert not lease(client, "w2").HasField("job"), "a leased job is not leased twice"


def test_long_poll_wakes_when_a_job_appears(client: Client) -> None:
    result: list[workers_pb2.LeaseJobResponse] = []
    poller = threading.Thread(target=lambda: result.append(lease(client, wait=20)))
    started = time.monotonic()
    poller.start()
    time.sleep(0.3)
    client.lookup(INDUCTOR_KEY)
    poller.join(timeout=20)
    assert result and result[0].HasField("job")
    assert time.monotonic() - started < 5, "the poll returned when the job appeared, not at its timeout"


def test_empty_long_poll_returns_after_its_wait(client: Client) -> None:
    started = time.monotonic()
    assert not lease(client, wait=0.5).HasField("job")
    assert 0.4 < time.monotonic() - started < 5


def test_heartbeat_progress_reaches_watchers_and_completion_publishes(client: Client, tmp_path: Path) -> None:
    job = client.lookup(INDUCTOR_KEY).job
    leased = lease(client)
    events: list[jobs_pb2.JobEvent] = []
    watcher = threading.Thread(target=lambda: events.extend(client.watch_job(job.job_id)))
    watcher.start()
    time.sleep(0.2)
    for progress in (0.25, 0.5, 0.75):
        reply = client.heartbeat(job.job_id, leased.fencing_token, progress, f"compiling {progress:.0%}")
        assert not reply.cancelled
    done = finish(client, tmp_path, leased)
    watcher.join(timeout=20)
    assert done.artifact.artifact_id == job.key.digest
    progresses = [e.job.progress for e in events if e.job.state == jobs_pb2.JOB_STATE_LEASED]
    assert [p for p in progresses if p > 0] == [0.25, 0.5, 0.75]
    assert events[-1].job.state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert client.lookup(INDUCTOR_KEY).status == registry_pb2.LOOKUP_STATUS_HIT


def test_cancel_is_reported_by_the_next_heartbeat_and_completion_is_refused(
    client: Client, tmp_path: Path
) -> None:
    job = client.lookup(INDUCTOR_KEY).job
    leased = lease(client)
    client.cancel_job(job.job_id, "changed my mind")
    assert client.heartbeat(job.job_id, leased.fencing_token, 0.5).cancelled
    with pytest.raises(errors.FailedPrecondition):
        finish(client, tmp_path, leased)
    assert client.lookup(INDUCTOR_KEY, on_miss="report").status == registry_pb2.LOOKUP_STATUS_MISS


def test_expired_lease_goes_to_the_next_worker_and_the_zombie_is_fenced(
    short_lease: BackgroundServer, tmp_path: Path
) -> None:
    with Client(short_lease.address) as client:
        job = client.lookup(INDUCTOR_KEY).job
        zombie = lease(client, "zombie")
        # The zombie stops heartbeating; after the lease expires the job is requeued.
        second = lease(client, "w2", wait=10)
        assert second.job.job_id == job.job_id
        assert lease_number(second.fencing_token) == lease_number(zombie.fencing_token) + 1
        assert second.job.attempts == 2
        with pytest.raises(errors.FailedPrecondition, match="fencing token"):
            client.heartbeat(job.job_id, zombie.fencing_token, 0.9)
        with pytest.raises(errors.FailedPrecondition, match="fencing token"):
            finish(client, tmp_path, zombie, "zombie-out")
        with pytest.raises(errors.FailedPrecondition):
            client.fail_job(job.job_id, zombie.fencing_token, "zombie says it failed", deterministic=True)
        done = finish(client, tmp_path, second, "real-out")
        assert client.get_job(job.job_id).state == jobs_pb2.JOB_STATE_SUCCEEDED
        assert done.artifact.file_count == 1


def test_heartbeats_keep_a_lease_alive(short_lease: BackgroundServer, tmp_path: Path) -> None:
    with Client(short_lease.address) as client:
        client.lookup(INDUCTOR_KEY)
        leased = lease(client)
        for _ in range(8):  # 2.4 s, well past the 1 s lease
            client.heartbeat(leased.job.job_id, leased.fencing_token, 0.1)
            time.sleep(0.3)
        finish(client, tmp_path, leased)
        assert client.get_job(leased.job.job_id).attempts == 1


def test_deterministic_failure_ends_the_job_for_every_waiter(client: Client) -> None:
    job = client.lookup(INDUCTOR_KEY).job
    leased = lease(client)
    log = b"torch._dynamo.exc.Unsupported: data-dependent control flow\n"
    client.upload_blob(log, (hash_of(log), len(log)))
    failed = client.fail_job(
        job.job_id, leased.fencing_token, "export failed: data-dependent control flow", True, digest(log)
    )
    assert failed.state == jobs_pb2.JOB_STATE_FAILED and failed.log.hash == hash_of(log)
    answer = client.lookup(INDUCTOR_KEY)
    assert answer.status == registry_pb2.LOOKUP_STATUS_FAILED and "control flow" in answer.error
    assert not lease(client).HasField("job"), "a deterministic failure is not retried"


def test_transient_failure_requeues_with_backoff(client: Client) -> None:
    job = client.lookup(INDUCTOR_KEY).job
    leased = lease(client)
    requeued = client.fail_job(job.job_id, leased.fencing_token, "worker ran out of memory", False)
    assert requeued.state == jobs_pb2.JOB_STATE_QUEUED and requeued.attempts == 1
    assert "retrying" in requeued.message
    assert not lease(client).HasField("job"), "not leasable again before its backoff"


def test_release_requeues_without_spending_an_attempt(client: Client) -> None:
    job = client.lookup(INDUCTOR_KEY).job
    leased = lease(client)
    released = client.release_job(job.job_id, leased.fencing_token, "worker shutting down")
    assert released.state == jobs_pb2.JOB_STATE_QUEUED and released.attempts == 0
    again = lease(client, "w2")
    assert again.job.job_id == job.job_id and again.job.attempts == 1
    with pytest.raises(errors.FailedPrecondition):
        client.release_job(job.job_id, leased.fencing_token)


@pytest.mark.parametrize(
    ("worker", "caps", "wait", "fragment"),
    [
        ("", [INDUCTOR], 0, "worker_id"),
        ("w", [], 0, "capabilities"),
        ("w", [workers_pb2.Capability(toolchain="torch-2.13.0")], 0, "no kind"),
        ("w", [workers_pb2.Capability(kind=key_pb2.ARTIFACT_KIND_INDUCTOR)], 0, "no toolchain"),
        ("w", [INDUCTOR], 61, "wait_seconds"),
    ],
)
def test_bad_lease_requests_are_invalid_argument(client: Client, worker, caps, wait, fragment) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(errors.InvalidArgument, match=fragment):
        client.lease_job(worker, caps, wait_seconds=wait)


def test_bad_worker_calls_are_invalid_argument(client: Client) -> None:
    client.lookup(INDUCTOR_KEY)
    leased = lease(client)
    with pytest.raises(errors.InvalidArgument, match="progress"):
        client.heartbeat(leased.job.job_id, leased.fencing_token, 1.5)
    with pytest.raises(errors.InvalidArgument, match="job id"):
        client.heartbeat("not-a-job", leased.fencing_token, 0.1)
    with pytest.raises(errors.InvalidArgument, match="path"):
        bad = [registry_pb2.ArtifactFile(path="../escape", digest=digest(b"x"))]
        client.complete_job(leased.job.job_id, leased.fencing_token, bad)
    with pytest.raises(errors.FailedPrecondition, match="not uploaded"):
        ghost = [registry_pb2.ArtifactFile(path="model.pt2", digest=digest(b"never uploaded"))]
        client.complete_job(leased.job.job_id, leased.fencing_token, ghost)
    assert client.get_job(leased.job.job_id).state == jobs_pb2.JOB_STATE_LEASED, "nothing changed"


def hash_of(data: bytes) -> str:
    from prebake.core.digests import hash_bytes

    return hash_bytes(data)


def digest(data: bytes):  # type: ignore[no-untyped-def]
    from prebake.v1 import blobs_pb2

    return blobs_pb2.Digest(hash=hash_of(data), size_bytes=len(data))


def test_worker_publish_reads_outputs_once_and_reuploads_only_what_vanished(
    client: Client, server: BackgroundServer, tmp_path: Path
) -> None:
    from prebake.compiler import publish_outputs
    from prebake.compiler.job_run import JobRun, Lease
    from prebake.compiler.outage import Outage
    from prebake.core.digests import hash_file
    from prebake.server.convert import digest_from_proto

    client.lookup(INDUCTOR_KEY)
    leased = lease(client)
    run = JobRun(Lease(leased.job, leased.fencing_token, 30.0))
    outage = Outage(client.target)
    job_dir = tmp_path / "job"
    make_artifact_dir(job_dir / "out", {"model.pt2": 3 << 20, "meta.json": 300}, seed=5)
    (job_dir / "compile.log").write_text("compiled\n")
    log_digest = publish_outputs.upload_log(client, outage, run, job_dir / "compile.log")
    assert log_digest is not None
    assert (log_digest.hash, log_digest.size_bytes) == hash_file(job_dir / "compile.log")
    files = client.upload_directory(job_dir / "out")
    assert {f.path: (f.digest.hash, f.digest.size_bytes) for f in files} == {
        name: hash_file(job_dir / "out" / name) for name in ("model.pt2", "meta.json")
    }
    # A blob lost before completion: only it is uploaded again, by the manifest's digest.
    lost = next(f.digest for f in files if f.path == "model.pt2")
    state = server.running.state  # type: ignore[union-attr]
    server.call(state.blobs.delete, digest_from_proto(lost))
    received = client.get_stats().bytes_received
    reuploaded = publish_outputs._reupload_missing(
        client, outage, run, job_dir=job_dir, files=files, log_digest=log_digest
    )
    assert reuploaded
    assert client.get_stats().bytes_received - received == lost.size_bytes
    assert client.find_missing_blobs([f.digest for f in files] + [log_digest]) == []
    assert not publish_outputs._reupload_missing(
        client, outage, run, job_dir=job_dir, files=files, log_digest=log_digest
    )
