"""Compile workers end to end: real `prebake worker` processes, a real server, real compiles.

Every worker runs as a subprocess (`python -m prebake.client.cli worker`), so that a test
can SIGKILL it like a lost host. Compiles use a tiny random Llama (hidden 64, 2 layers),
the inductor backend and an AVX2 instance type (this host's CPU is AVX2-only).
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest

from prebake.client import ArtifactKey, Client, CompileFailed, FailedPrecondition
from prebake.compiler.probe import BackendStatus, WorkerSetupError, select_backends
from prebake.compiler.reports import MAX_ERROR_CHARS, failure_report
from prebake.compiler.work_dir import sweep_work_dir
from prebake.compiler.worker import Worker, WorkerConfig
from prebake.server.app import BackgroundServer, background_server
from prebake.server.config import ServerConfig
from prebake.v1 import jobs_pb2, registry_pb2
from tests.processes import PREBAKE, WorkerProcess, alive, listening, wait_until

KEY = ArtifactKey(
    kind="inductor",
    model="tiny/llama",
    instance_type="ml.c6a.4xlarge",
    sequence_length=32,
    batch_size=1,
    precision="fp32",
)
KEY_ARGS = [
    "--kind", "inductor", "--model", "tiny/llama", "--instance-type", "ml.c6a.4xlarge",
    "--sequence-length", "32", "--batch-size", "1", "--precision", "fp32",
]  # fmt: skip
# Short leases so that a lost worker's job comes back within seconds; heartbeats go out
# every lease/3 s.
LEASE_SECONDS = 3.0
COMPILE_TIMEOUT = 150.0

pytestmark = pytest.mark.slow


# Fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture
def model_dir(tiny_model: Path) -> Path:
    return tiny_model


@pytest.fixture
def server(tmp_path: Path, model_source_roots: str) -> Iterator[BackgroundServer]:
    with background_server(
        tmp_path / "data",
        lease_seconds=LEASE_SECONDS,
        retry_backoff_seconds=0.2,
        model_source_roots=model_source_roots,
    ) as srv:
        yield srv


@pytest.fixture
def client(server: BackgroundServer) -> Iterator[Client]:
    with Client(server.address, timeout=30.0) as c:
        yield c


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    """Collects the test's workers and makes sure none outlives it."""
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.close()


def start_worker(
    started: list[WorkerProcess], address: str, tmp_path: Path, name: str, *args: str, **kw: Any
) -> WorkerProcess:
    worker = WorkerProcess(address, tmp_path, name, *args, **kw)
    started.append(worker)
    return worker


def job_of(client: Client, job_id: str) -> jobs_pb2.Job:
    return client.get_job(job_id)


def compiling(client: Client, job_id: str, worker: WorkerProcess) -> jobs_pb2.Job | None:
    """The job once `worker` holds it and has reported progress from the compile."""
    job = client.get_job(job_id)
    assert job.state in (jobs_pb2.JOB_STATE_QUEUED, jobs_pb2.JOB_STATE_LEASED), job
    leased = job.state == jobs_pb2.JOB_STATE_LEASED and job.worker == worker.worker_id
    return job if leased and job.progress > 0 else None


def enqueue(client: Client, model_dir: Path, key: ArtifactKey = KEY) -> str:
    response = client.lookup(key, model_source=str(model_dir))
    assert response.status == registry_pb2.LOOKUP_STATUS_MISS, response
    return response.job.job_id


def eager_logits(model_dir: Path, input_ids: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids, use_cache=False).logits


# Tests ----------------------------------------------------------------------------------------


def test_the_client_and_the_worker_process_stay_free_of_toolchains() -> None:
    code = (
        "import sys, prebake.client, prebake.client.cli;"
        "heavy = lambda: sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'));"
        "bad = heavy() + sorted(m for m in sys.modules if m.startswith('prebake.compiler'));"
        "import prebake.compiler.worker, prebake.compiler.embedded;"
        "print(','.join(bad + heavy()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_a_compile_completes_across_server_restarts_and_the_artifact_loads_and_runs(
    model_dir: Path, tmp_path: Path, workers: list[WorkerProcess], model_source_roots: str
) -> None:
    import torch

    from prebake.compiler.inductor import load_and_run

    # A fixed port, so that a restarted server is where the worker looks for it; a lease
    # long enough to outlast a restart, so that the job stays the worker's throughout.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    config = ServerConfig(
        listen=address, data_dir=tmp_path / "data", lease_seconds=20.0, model_source_roots=model_source_roots
    )

    srv = BackgroundServer(config).start()
    worker = start_worker(workers, address, tmp_path, "a", "--max-jobs", "1")
    worker.wait_ready()
    srv.stop(grace=0)  # while the worker long-polls for a job
    time.sleep(3)  # several reconnect attempts
    assert worker.log().count("cannot reach the prebake server") == 1  # once per outage, not per retry

    srv = BackgroundServer(config).start()
    try:
        with Client(address) as c:
            job_id = enqueue(c, model_dir)
            wait_until(lambda: compiling(c, job_id, worker), 60, "the compile to start")
    finally:
        srv.stop(grace=0)  # while the worker compiles
    time.sleep(5)  # longer than the client's own retries of one heartbeat

    with BackgroundServer(config) as srv, Client(address) as client:
        result = client.ensure(KEY, tmp_path / "dest", model_source=str(model_dir), timeout=COMPILE_TIMEOUT)
        assert result.job_id == job_id and result.status == "COMPILING"
        assert worker.proc.wait(timeout=30) == 0, worker.log()  # --max-jobs 1: done after one
        assert not list(worker.work_dir.iterdir()), "the worker left files behind"
        log = worker.log()
        assert "reconnected" in log and log.count("cannot reach the prebake server") <= 2, log

        job = client.get_job(job_id)
        assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED and job.attempts == 1, job  # one lease throughout
        artifact = client.get_artifact(result.artifact_id)
        producer = artifact.producer
        assert producer.worker == worker.worker_id
        assert producer.toolchain_versions["torch"] == torch.__version__.split("+")[0]
        assert producer.compile_seconds > 0
        assert job.log == producer.log
        assert b"done" in b"".join(client.read_blob(producer.log))

    input_ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(7))
    logits = load_and_run(tmp_path / "dest", input_ids)
    torch.testing.assert_close(logits, eager_logits(model_dir, input_ids), atol=1e-4, rtol=1e-4)


def test_a_killed_worker_loses_its_job_to_another_and_cannot_publish_late(
    server: BackgroundServer, client: Client, model_dir: Path, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    job_id = enqueue(client, model_dir)
    shared = tmp_path / "work"
    first = start_worker(workers, client.target, tmp_path, "first", work_dir=shared)
    wait_until(lambda: compiling(client, job_id, first), 60, "the first worker to compile")
    jobs = cast(Any, server.running).state.storage.jobs
    zombie_token = cast(Any, server.call(jobs.get, job_id)).fencing_token
    killed = first.kill_host()
    assert killed
    wait_until(lambda: not any(alive(pid) for pid in killed), 10, "the killed compile to die")

    second = start_worker(workers, client.target, tmp_path, "second", "--max-jobs", "1", work_dir=shared)
    job = client.wait_for_job(job_id, timeout=COMPILE_TIMEOUT)
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job
    assert job.worker == second.worker_id and job.attempts == 2
    assert second.proc.wait(timeout=30) == 0, second.log()
    # The second worker swept the directory the killed one left behind, and its own.
    assert not list(shared.iterdir())

    artifact = client.get_artifact(job.artifact_id)
    with pytest.raises(FailedPrecondition):
        client.complete_job(
            job_id, zombie_token, artifact.files, registry_pb2.Producer(worker=first.worker_id)
        )
    assert client.get_artifact(job.artifact_id).producer.worker == second.worker_id


def test_cancelling_a_job_stops_its_compile(
    client: Client, model_dir: Path, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    job_id = enqueue(client, model_dir)
    worker = start_worker(workers, client.target, tmp_path, "a")
    wait_until(lambda: compiling(client, job_id, worker), 60, "the compile to start")
    compile_pids = worker.compile_processes()
    assert compile_pids

    client.cancel_job(job_id, reason="not needed after all")
    wait_until(lambda: not any(alive(p) for p in compile_pids), 10, "the compile to be killed")
    time.sleep(2 * LEASE_SECONDS / 3)  # a heartbeat or two later: nothing was reported
    job = client.get_job(job_id)
    assert job.state == jobs_pb2.JOB_STATE_CANCELLED and job.attempts == 1
    assert job.error == "not needed after all"
    assert worker.proc.poll() is None and not worker.compile_processes()
    assert "cancelled" in worker.log()
    assert worker.stop() == 0


def test_a_deterministic_failure_reaches_every_waiter_and_is_not_retried(
    client: Client, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    bad_model = tmp_path / "not-a-causal-lm"
    bad_model.mkdir()
    (bad_model / "config.json").write_text('{"model_type": "no-such-architecture"}')
    key = replace(KEY, model="tiny/unsupported")
    job_id = enqueue(client, bad_model, key)

    errors: list[BaseException] = []

    def wait() -> None:
        try:
            dest = tmp_path / f"dest-{threading.get_ident()}"
            client.ensure(key, dest, model_source=str(bad_model), timeout=COMPILE_TIMEOUT)
        except BaseException as exc:
            errors.append(exc)

    waiters = [threading.Thread(target=wait) for _ in range(2)]
    for thread in waiters:
        thread.start()
    start_worker(workers, client.target, tmp_path, "a")
    for thread in waiters:
        thread.join(timeout=COMPILE_TIMEOUT)
    assert len(errors) == 2 and all(isinstance(e, CompileFailed) for e in errors), errors
    assert all("no-such-architecture" in str(e) for e in errors), errors

    job = client.get_job(job_id)
    assert job.state == jobs_pb2.JOB_STATE_FAILED
    assert job.error_class == jobs_pb2.ERROR_CLASS_DETERMINISTIC
    assert job.attempts == 1 and job.log.size_bytes > 0
    later = client.lookup(key, model_source=str(bad_model))
    assert later.status == registry_pb2.LOOKUP_STATUS_FAILED and "no-such-architecture" in later.error


def test_a_worker_never_leases_a_job_for_a_toolchain_it_lacks(
    client: Client, model_dir: Path, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    future_job = enqueue(client, model_dir, replace(KEY, toolchain="torch-9.9.9"))
    worker = start_worker(workers, client.target, tmp_path, "a", "--drain-seconds", "0")
    worker.wait_ready()
    time.sleep(2.5)  # the server re-checks a long poll every second
    assert client.get_job(future_job).state == jobs_pb2.JOB_STATE_QUEUED

    job_id = enqueue(client, model_dir)
    wait_until(lambda: compiling(client, job_id, worker), 60, "the runnable job to be leased")
    future = client.get_job(future_job)
    assert future.state == jobs_pb2.JOB_STATE_QUEUED and future.attempts == 0 and not future.worker
    assert worker.stop() == 0


def test_sigterm_releases_the_running_job_and_exits_0(
    client: Client, model_dir: Path, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    job_id = enqueue(client, model_dir)
    worker = start_worker(workers, client.target, tmp_path, "a", "--drain-seconds", "0")
    wait_until(lambda: compiling(client, job_id, worker), 60, "the compile to start")
    compile_pids = worker.compile_processes()

    assert worker.stop() == 0, worker.log()
    job = client.get_job(job_id)
    assert job.state == jobs_pb2.JOB_STATE_QUEUED, job
    assert job.attempts == 0 and "released" in job.message
    assert not any(alive(p) for p in compile_pids)
    assert not list(worker.work_dir.iterdir())


def test_serve_runs_an_embedded_worker_and_releases_its_job_on_shutdown(
    model_dir: Path, tmp_path: Path
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    data_dir = tmp_path / "data"
    serve_log = tmp_path / "serve.log"
    with open(serve_log, "wb") as log:
        command = [*PREBAKE, "serve", "--listen", address, "--data-dir", str(data_dir), "--workers", "1"]
        command += ["--model-source-root", str(model_dir.parent)]  # the embedded default reads only there
        serve = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        wait_until(lambda: listening(address, serve), 30, "the server to listen")
        dest = tmp_path / "dest"
        done = subprocess.run(
            [*PREBAKE, "--server", address, "ensure", *KEY_ARGS, "--model-source", str(model_dir),
             "--dest", str(dest), "--quiet"],
            capture_output=True, text=True, timeout=COMPILE_TIMEOUT, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr + serve_log.read_text()
        assert (dest / "model.pt2").is_file() and (dest / "prebake-inductor.json").is_file()

        # Another compile, interrupted by stopping the server: released, not lost.
        with Client(address) as c:
            job_id = enqueue(c, model_dir, replace(KEY, batch_size=2))

            def embedded_compiling() -> bool:
                job = c.get_job(job_id)
                return (
                    job.state == jobs_pb2.JOB_STATE_LEASED and "embedded" in job.worker and job.progress > 0
                )

            wait_until(embedded_compiling, 60, "the embedded worker to compile")
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 0, serve_log.read_text()
    text = serve_log.read_text()
    assert "embedded workers: serving inductor" in text
    assert "embedded workers: not serving neuron" in text
    with background_server(data_dir) as srv, Client(srv.address) as c:
        job = c.get_job(job_id)
        assert job.state == jobs_pb2.JOB_STATE_QUEUED and job.attempts == 0, job
        assert "released" in job.message
    assert not list((data_dir / "work").iterdir())


# The worker's parts, without compiling ---------------------------------------------------------


def inductor_status() -> BackendStatus:
    return BackendStatus("inductor", True, toolchain="torch-2.13.0", compile_targets=("cpu-avx2",))


def test_a_job_without_a_model_source_fails_deterministically(client: Client, tmp_path: Path) -> None:
    response = client.lookup(KEY)  # no model_source
    config = WorkerConfig(server=client.target, work_dir=tmp_path / "work", max_jobs=1, worker_id="unit")
    worker = Worker(config, backends={"inductor": inductor_status()})
    assert worker.run() == 1
    job = client.get_job(response.job.job_id)
    assert job.state == jobs_pb2.JOB_STATE_FAILED
    assert job.error_class == jobs_pb2.ERROR_CLASS_DETERMINISTIC and job.attempts == 1
    assert "pass --model-source" in job.error


def test_a_worker_refuses_kinds_it_cannot_serve() -> None:
    probed = {
        "inductor": inductor_status(),
        "neuron": BackendStatus("neuron", False, reason="Neuron SDK not installed"),
    }
    with pytest.raises(WorkerSetupError, match="Neuron SDK not installed"):
        Worker(WorkerConfig(server="127.0.0.1:1", kinds=("neuron",)), backends=probed)
    with pytest.raises(WorkerSetupError, match="no awq backend"):
        Worker(WorkerConfig(server="127.0.0.1:1", kinds=("awq",)), backends=probed)
    assert [b.kind for b in select_backends(probed, ())] == ["inductor"]


def test_sweeping_removes_only_the_directories_of_dead_workers(tmp_path: Path) -> None:
    for name in ("worker-1-1", "worker-2-1"):
        (tmp_path / name / "job").mkdir(parents=True)
        (tmp_path / f"{name}.lock").touch()
    live = os.open(tmp_path / "worker-2-1.lock", os.O_RDWR)
    try:
        fcntl.flock(live, fcntl.LOCK_EX)  # as a running worker holds it
        assert sweep_work_dir(tmp_path) == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == ["worker-2-1", "worker-2-1.lock"]
    finally:
        os.close(live)


def test_failure_reports_lead_with_the_backend_error_and_stay_within_the_limit(tmp_path: Path) -> None:
    (tmp_path / "compile.log").write_text("x" * 100 + "\n" + "noise line\n" * 10_000 + "the last line\n")
    (tmp_path / "result.json").write_text('{"ok": false, "deterministic": true, "error": "bad config"}')
    report = failure_report("inductor", 3, tmp_path)
    assert report.startswith("bad config\n") and report.endswith("the last line")
    assert len(report) <= MAX_ERROR_CHARS
    (tmp_path / "result.json").unlink()  # a crash writes no result
    assert failure_report("inductor", -9, tmp_path).startswith("the inductor compile was killed by SIGKILL")
