"""The `prebake` command end to end: a real `prebake serve` process and the real CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from prebake.v1 import registry_pb2
from tests.conftest import make_artifact_dir, tree

PREBAKE = [sys.executable, "-m", "prebake.client.cli"]
KEY = [
    "--kind", "neuron", "--model", "meta-llama/Meta-Llama-3-8B", "--instance-type", "ml.inf2.48xlarge",
    "--sequence-length", "8192", "--batch-size", "8", "--tp", "24", "--precision", "bf16",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(address: str, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            socket.create_connection((host, int(port)), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("server did not start listening")


def start_serve(cwd: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*PREBAKE, "serve", *args], cwd=cwd, text=True, stderr=subprocess.PIPE, env={**os.environ}
    )


def stop(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=30)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    address = f"127.0.0.1:{free_port()}"
    proc = start_serve(tmp_path, "--listen", address, "--data-dir", str(tmp_path / "data"))
    wait_listening(address, proc)
    yield address
    assert stop(proc) == 0


def cli(address: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PREBAKE_SERVER": address}
    return subprocess.run(
        [*PREBAKE, *args], env=env, text=True, capture_output=True, cwd=cwd, timeout=120, check=False
    )


def test_serve_with_no_configuration_in_a_fresh_directory(tmp_path: Path) -> None:
    proc = start_serve(tmp_path)
    try:
        wait_listening("127.0.0.1:50051", proc)
        assert (tmp_path / "prebake-data").is_dir()
        with grpc.insecure_channel("127.0.0.1:50051") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert {"prebake.v1.Registry", "prebake.v1.Blobs", "prebake.v1.Jobs", "prebake.v1.Admin"} <= services
        assert "grpc.health.v1.Health" in services
    finally:
        assert stop(proc) == 0


def test_reflection_describes_every_rpc(served: str) -> None:
    with grpc.insecure_channel(served) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        lookup = db.FindFileContainingSymbol("prebake.v1.Registry")
        assert lookup.name == "prebake/v1/registry.proto"
        methods = {m.name for s in lookup.service for m in s.method}
        assert methods == {m.name for m in registry_pb2.DESCRIPTOR.services_by_name["Registry"].methods}


def test_deployer_flow_with_exit_codes_and_json(served: str, tmp_path: Path) -> None:
    bad = cli(served, "lookup", *KEY[:-4], "--tp", "32", "--precision", "bf16")
    assert bad.returncode == 10 and "24 NeuronCores" in bad.stderr  # invalid input

    miss = cli(served, "lookup", *KEY, "--json")
    assert miss.returncode == 3, miss.stderr
    body = json.loads(miss.stdout)
    assert (
        body["status"] == "MISS"
        and body["job_id"]
        and len(body["key_digest"]) == 32
        and body["error"] is None
    )

    joined = cli(served, "lookup", *KEY, "--json")
    assert joined.returncode == 4 and json.loads(joined.stdout)["job_id"] == body["job_id"]

    src = make_artifact_dir(tmp_path / "compiled", {"model.neff": 3_000_000, "config.json": 10})
    published = cli(served, "publish", str(src), *KEY)
    assert published.returncode == 0, published.stderr

    hit = cli(served, "lookup", *KEY, "--json")
    assert hit.returncode == 0 and json.loads(hit.stdout)["status"] == "HIT"

    dest = tmp_path / "deploy" / "llama"
    ensured = cli(served, "ensure", *KEY, "--dest", str(dest))
    assert ensured.returncode == 0, ensured.stderr
    assert tree(dest) == tree(src)

    fetched = cli(served, "fetch", *KEY, "--dest", str(tmp_path / "second"))
    assert fetched.returncode == 0 and tree(tmp_path / "second") == tree(src)

    listing = cli(served, "ls", "--json")
    assert listing.returncode == 0
    artifact_id = body["key_digest"]
    assert artifact_id in listing.stdout

    shown = cli(served, "show", artifact_id)
    assert shown.returncode == 0 and "model.neff" in shown.stdout

    assert cli(served, "pin", artifact_id).returncode == 0
    assert cli(served, "rm", artifact_id).returncode == 1
    assert cli(served, "rm", artifact_id, "--force").returncode == 0
    assert cli(served, "show", artifact_id).returncode == 6

    jobs = cli(served, "jobs", "--json")
    assert jobs.returncode == 0 and body["job_id"] in jobs.stdout
    stats = cli(served, "stats", "--json")
    assert stats.returncode == 0 and json.loads(stats.stdout)


def test_no_enqueue_miss_and_fetch_miss(served: str, tmp_path: Path) -> None:
    miss = cli(served, "lookup", *KEY, "--no-enqueue", "--json")
    assert miss.returncode == 3 and json.loads(miss.stdout)["job_id"] is None
    fetch = cli(served, "fetch", *KEY, "--dest", str(tmp_path / "d"))
    assert fetch.returncode == 3 and not (tmp_path / "d").exists()
    jobs = cli(served, "jobs", "--json")
    assert json.loads(jobs.stdout).get("jobs", []) == []


def test_unreachable_server_exits_7(tmp_path: Path) -> None:
    result = cli(f"127.0.0.1:{free_port()}", "lookup", *KEY)
    assert result.returncode == 7 and "127.0.0.1" in result.stderr


def test_miss_explanations_name_the_differing_fields(served: str, tmp_path: Path) -> None:
    for batch, seq in (("4", "8192"), ("8", "4096")):
        changed = [*KEY]
        changed[changed.index("--batch-size") + 1] = batch
        changed[changed.index("--sequence-length") + 1] = seq
        src = make_artifact_dir(tmp_path / f"b{batch}", {"model.neff": 10}, seed=int(batch))
        assert cli(served, "publish", str(src), *changed).returncode == 0
    short = cli(served, "lookup", *KEY, "--no-enqueue")
    assert short.returncode == 3
    assert "nearest" in short.stdout
    assert "(you asked 8)" in short.stdout or "(you asked 8192)" in short.stdout
    assert "1 more near artifact; --explain shows them" in short.stdout
    explained = cli(served, "lookup", *KEY, "--no-enqueue", "--explain")
    assert explained.returncode == 3
    out = explained.stdout
    assert "FIELD" in out and "YOU ASKED" in out and '"v":1' in out
    table_rows = {tuple(line.split()) for line in out.splitlines()}
    assert ("batch_size", "4", "8") in table_rows and ("sequence_length", "4096", "8192") in table_rows
