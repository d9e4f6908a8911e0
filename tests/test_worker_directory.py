"""Toolchains learned from live workers, `ListWorkers`, and no silent waits for a worker.

Real servers on loopback; the Neuron case runs a real `prebake worker` process against
a fake Neuron SDK (package metadata and executables that report neuronx-cc 2.21): the
probe, the capability it advertises and the lease are real, the compile itself fails
because the SDK is not.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from prebake.client import ArtifactKey, Client
from prebake.client.errors import NoCapableWorker
from prebake.client.exitcodes import NO_WORKER
from prebake.server.app import BackgroundServer, background_server
from prebake.v1 import jobs_pb2, key_pb2, registry_pb2, workers_pb2

PREBAKE = [sys.executable, "-m", "prebake.client.cli"]
INDUCTOR_AVX512 = ArtifactKey(
    kind="inductor", model="tiny/llama", instance_type="ml.c7i.4xlarge", sequence_length=64, batch_size=1
)
NEURON_INF2 = ArtifactKey(
    kind="neuron",
    model="meta-llama/Meta-Llama-3-8B",
    instance_type="ml.inf2.48xlarge",
    sequence_length=4096,
    batch_size=4,
    tensor_parallel_degree=24,
    precision="bf16",
)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[BackgroundServer]:
    with background_server(tmp_path / "data", worker_grace_seconds=0.0) as running:
        yield running


@pytest.fixture
def client(server: BackgroundServer) -> Iterator[Client]:
    with Client(server.address) as c:
        yield c


def advertise(
    client: Client, worker_id: str, kind: key_pb2.ArtifactKind.ValueType, toolchain: str, *targets: str
) -> None:
    """A real LeaseJob poll (no wait), which is how the server hears of a worker."""
    cap = workers_pb2.Capability(kind=kind, toolchain=toolchain, compile_targets=list(targets))
    response = client.lease_job(worker_id, [cap], wait_seconds=0)
    assert not response.HasField("job")


def test_list_workers_shows_who_polled_and_what_they_serve(client: Client) -> None:
    assert client.list_workers() == []
    advertise(client, "w-avx2", key_pb2.ARTIFACT_KIND_INDUCTOR, "torch-2.13.0", "cpu-avx2")
    (info,) = client.list_workers()
    assert info.worker_id == "w-avx2" and info.live
    assert [(c.kind, c.toolchain, list(c.compile_targets)) for c in info.capabilities] == [
        (key_pb2.ARTIFACT_KIND_INDUCTOR, "torch-2.13.0", ["cpu-avx2"])
    ]
    assert info.expires_at.ToSeconds() > info.last_seen.ToSeconds()


def test_a_key_without_toolchain_takes_the_newest_a_live_worker_serves(client: Client) -> None:
    before = client.lookup(NEURON_INF2, on_miss="report")
    assert before.key.key.toolchain == "neuronx-cc-2" and before.toolchain_source == "built-in default"
    advertise(client, "w-old", key_pb2.ARTIFACT_KIND_NEURON, "neuronx-cc-2.9", "inf2")
    advertise(client, "w-new", key_pb2.ARTIFACT_KIND_NEURON, "neuronx-cc-2.21", "inf2")
    advertise(client, "w-trn", key_pb2.ARTIFACT_KIND_NEURON, "neuronx-cc-2.30", "trn1")
    time.sleep(1.1)  # the replica's cache of live workers
    after = client.lookup(NEURON_INF2, on_miss="report")
    # 2.21 > 2.9 numerically; the trn1 worker does not serve inf2.
    assert after.key.key.toolchain == "neuronx-cc-2.21"
    assert after.toolchain_source == "newest toolchain of a live worker (w-new)"
    named = client.lookup(dataclasses.replace(NEURON_INF2, toolchain="neuronx-cc-2.9"), on_miss="report")
    assert named.key.key.toolchain == "neuronx-cc-2.9" and named.toolchain_source == "requested"


def test_a_configured_default_wins_over_live_workers(tmp_path: Path) -> None:
    with (
        background_server(tmp_path / "d", default_toolchains="neuron=neuronx-cc-2.15") as server,
        Client(server.address) as client,
    ):
        advertise(client, "w-new", key_pb2.ARTIFACT_KIND_NEURON, "neuronx-cc-2.21", "inf2")
        response = client.lookup(NEURON_INF2, on_miss="report")
        assert response.key.key.toolchain == "neuronx-cc-2.15"
        assert response.toolchain_source == "configured default"


def test_a_miss_no_live_worker_can_take_says_so_and_names_the_job(client: Client) -> None:
    advertise(client, "w-avx2", key_pb2.ARTIFACT_KIND_INDUCTOR, "torch-2.13.0", "cpu-avx2")
    time.sleep(1.1)
    miss = client.lookup(INDUCTOR_AVX512)
    assert miss.status == registry_pb2.LOOKUP_STATUS_MISS and miss.job_created
    assert miss.unserved_reason == (
        "no live worker serves inductor torch-2.13.0 for cpu-avx512; "
        "live inductor workers serve torch-2.13.0 for cpu-avx2"
    )
    # The job says the same to anyone watching it.
    assert client.get_job(miss.job.job_id).message == miss.unserved_reason
    served = client.lookup(
        dataclasses.replace(INDUCTOR_AVX512, instance_type="ml.c6a.4xlarge"), on_miss="report"
    )
    assert served.key.compile_target == "cpu-avx2"
    joined = client.lookup(INDUCTOR_AVX512)
    assert joined.status == registry_pb2.LOOKUP_STATUS_COMPILING and joined.unserved_reason


def test_ensure_without_a_capable_worker_fails_at_once(client: Client, tmp_path: Path) -> None:
    began = time.monotonic()
    with pytest.raises(NoCapableWorker, match=r"no live worker serves inductor .* no worker is live") as info:
        client.ensure(INDUCTOR_AVX512, tmp_path / "dest", timeout=60)
    assert time.monotonic() - began < 5
    assert info.value.job is not None and info.value.job.state == jobs_pb2.JOB_STATE_QUEUED
    assert not (tmp_path / "dest").exists()


def test_ensure_waits_out_the_grace_then_proceeds_once_a_worker_appears(
    client: Client, tmp_path: Path
) -> None:
    with pytest.raises(NoCapableWorker, match=r"waited 1\.5 s"):
        client.ensure(INDUCTOR_AVX512, tmp_path / "dest", timeout=60, worker_grace=1.5)


def test_the_cli_exits_with_no_worker_within_seconds(server: BackgroundServer, tmp_path: Path) -> None:
    with Client(server.address) as c:
        advertise(c, "w-avx2", key_pb2.ARTIFACT_KIND_INDUCTOR, "torch-2.13.0", "cpu-avx2")
    time.sleep(1.1)
    command = [
        *PREBAKE, "--server", server.address, "ensure", "--kind", "inductor", "--model", "tiny/llama",
        "--instance-type", "ml.c7i.4xlarge", "--sequence-length", "64", "--batch-size", "1",
        "--dest", str(tmp_path / "dest"),
    ]  # fmt: skip
    began = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == NO_WORKER, done.stderr
    assert time.monotonic() - began < 15
    assert "no live worker serves inductor torch-2.13.0 for cpu-avx512" in done.stderr
    assert "live inductor workers serve torch-2.13.0 for cpu-avx2" in done.stderr


def fake_neuron_sdk(root: Path, version: str) -> dict[str, str]:
    """Package metadata and executables of a Neuron SDK reporting neuronx-cc `version`."""
    site, bin_dir = root / "site", root / "bin"
    for dist, dist_version in (("neuronx_cc", version), ("optimum_neuron", "0.4.1")):
        info = site / f"{dist}-{dist_version}.dist-info"
        info.mkdir(parents=True)
        name = dist.replace("_", "-")
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {dist_version}\n")
    (site / "optimum").mkdir()
    (site / "optimum" / "__init__.py").write_text("")
    bin_dir.mkdir()
    for exe in ("neuronx-cc", "optimum-cli"):
        script = bin_dir / exe
        script.write_text(
            textwrap.dedent(
                """\
                #!/bin/sh
                echo "ERROR 1 [neuronx-cc]: this is a fake Neuron SDK for tests" >&2
                exit 1
                """
            )
        )
        script.chmod(0o755)
    pythonpath = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": pythonpath, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def test_a_neuron_key_without_toolchain_is_leased_by_a_worker_reporting_2_21(
    server: BackgroundServer, client: Client, tmp_path: Path
) -> None:
    env = fake_neuron_sdk(tmp_path / "sdk", "2.21.18209.0+043b1bf7")
    log_path = tmp_path / "worker.log"
    command = [
        *PREBAKE, "--server", server.address, "worker", "--kind", "neuron", "--worker-id", "neuron-221",
        "--work-dir", str(tmp_path / "work"), "--max-jobs", "1",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while not client.list_workers():
            assert worker.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        (info,) = client.list_workers()
        assert [(c.kind, c.toolchain) for c in info.capabilities] == [
            (key_pb2.ARTIFACT_KIND_NEURON, "neuronx-cc-2.21")
        ]
        time.sleep(1.1)
        miss = client.lookup(NEURON_INF2)  # no toolchain named
        assert miss.key.key.toolchain == "neuronx-cc-2.21", miss
        assert miss.toolchain_source == "newest toolchain of a live worker (neuron-221)"
        assert miss.unserved_reason == ""
        job = client.wait_for_job(miss.job.job_id, timeout=120)
        # Leased by the worker (the compile then fails: the SDK is fake).
        assert job.worker == "neuron-221" and job.attempts >= 1, job
        assert job.state == jobs_pb2.JOB_STATE_FAILED, job
        assert worker.wait(timeout=60) == 0, log_path.read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def test_prebake_workers_lists_them(server: BackgroundServer) -> None:
    with Client(server.address) as c:
        advertise(c, "w-avx2", key_pb2.ARTIFACT_KIND_INDUCTOR, "torch-2.13.0", "cpu-avx2")
    env = {**os.environ, "PREBAKE_SERVER": server.address}
    text = subprocess.run([*PREBAKE, "workers"], env=env, capture_output=True, text=True, check=True).stdout
    assert "w-avx2" in text and "inductor torch-2.13.0 (cpu-avx2)" in text
    done = subprocess.run(
        [*PREBAKE, "workers", "--json"], env=env, capture_output=True, text=True, check=True
    )
    (worker,) = json.loads(done.stdout)["workers"]
    assert worker["worker_id"] == "w-avx2" and worker["live"] is True
    assert worker["capabilities"] == [
        {"kind": "inductor", "toolchain": "torch-2.13.0", "compile_targets": ["cpu-avx2"]}
    ]
