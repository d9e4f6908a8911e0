"""One request id from the client through the server to the worker's log lines for the job.

Real processes: `prebake serve --log-format json` and `prebake worker --log-format json`,
both logging one JSON object per line on stderr, which the test parses.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from prebake.client import Client
from prebake.client.channel import create_channel
from prebake.client.model_revision import revision_of
from prebake.core.request_ids import REQUEST_ID_HEADER, request_scope
from prebake.v1 import jobs_pb2, registry_pb2, registry_pb2_grpc
from tests.processes import PREBAKE, WorkerProcess, free_port, listening, wait_until
from tests.test_worker import COMPILE_TIMEOUT, KEY

pytestmark = pytest.mark.slow

RID = "test-rid-5f0c2a"


def json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a JSON log, parsed; fails the test on a line that is not one object."""
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        entry = json.loads(line)
        assert isinstance(entry, dict), f"{path.name}:{number} is not a JSON object: {line}"
        entries.append(entry)
    return entries


@pytest.fixture
def serve(tmp_path: Path, tiny_model: Path) -> Iterator[tuple[str, Path]]:
    address = f"127.0.0.1:{free_port()}"
    log_path = tmp_path / "serve.log"
    command = [*PREBAKE, "serve", "--listen", address, "--data-dir", str(tmp_path / "data"), "--workers", "0"]
    command += ["--model-source-root", str(tiny_model.parent), "--log-format", "json"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        wait_until(lambda: listening(address, proc), 30, "the server to listen")
        yield address, log_path
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log_path.read_text()


def test_a_request_id_follows_a_compile_from_client_to_server_to_worker(
    serve: tuple[str, Path], tmp_path: Path, tiny_model: Path
) -> None:
    address, serve_log = serve
    key = KEY.to_proto()
    key.model_revision = revision_of(tiny_model)
    request = registry_pb2.LookupRequest(key=key, model_source=str(tiny_model))

    channel = create_channel(address)
    try:
        with request_scope(RID):
            response, call = registry_pb2_grpc.RegistryStub(channel).Lookup.with_call(request)
    finally:
        channel.close()
    assert response.status == registry_pb2.LOOKUP_STATUS_MISS and response.job_created, response
    # Client-visible: the server returns the id in the trailing metadata, and on the job.
    assert dict(call.trailing_metadata())[REQUEST_ID_HEADER] == RID
    assert response.job.request_id == RID
    job_id = response.job.job_id

    # A caller that sends none gets a generated id; the job keeps its creator's.
    with grpc.insecure_channel(address) as bare:
        joined, joined_call = registry_pb2_grpc.RegistryStub(bare).Lookup.with_call(request)
    generated = dict(joined_call.trailing_metadata())[REQUEST_ID_HEADER]
    assert len(generated) == 32 and generated != RID
    assert joined.status == registry_pb2.LOOKUP_STATUS_COMPILING and joined.job.request_id == RID

    worker = WorkerProcess(address, tmp_path, "rid", "--max-jobs", "1", "--log-format", "json")
    try:
        with Client(address) as client:
            job = client.wait_for_job(job_id, timeout=COMPILE_TIMEOUT)
            assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job
            assert client.get_job(job_id).request_id == RID
        assert worker.proc.wait(timeout=60) == 0, worker.log()
    finally:
        worker.close()

    server_lines = json_lines(serve_log)
    lookups = [e for e in server_lines if e.get("method") == "prebake.v1.Registry/Lookup"]
    assert [(e["request_id"], e["code"]) for e in lookups] == [(RID, "OK"), (generated, "OK")]
    for entry in lookups:
        assert entry["logger"] == "prebake.server.rpc" and entry["level"] == "info"
        assert entry["duration_ms"] > 0 and entry["peer"].startswith("ipv4:127.0.0.1:")

    worker_lines = [e for e in json_lines(worker.log_path) if job_id in e["message"]]
    messages = [e["message"] for e in worker_lines]
    assert any("leased" in m for m in messages) and any("succeeded" in m for m in messages), messages
    assert {e.get("request_id") for e in worker_lines} == {RID}
    # The worker's rpcs for the job (heartbeats, uploads, CompleteJob) carry the id too.
    job_rpcs = {e["method"] for e in server_lines if e.get("request_id") == RID}
    assert {
        "prebake.v1.Workers/Heartbeat",
        "prebake.v1.Workers/CompleteJob",
        "prebake.v1.Blobs/Write",
    } <= job_rpcs
    # LeaseJob precedes the job: it has ids of its own.
    assert all(
        e["request_id"] != RID for e in server_lines if e.get("method") == "prebake.v1.Workers/LeaseJob"
    )
