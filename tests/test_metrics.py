"""Prometheus metrics after a scripted session on a real server with a real compile.

The server runs in-process (`BackgroundServer`) with its metrics port on; a `prebake worker`
subprocess compiles a tiny Llama with the inductor backend. `/metrics` is scraped over HTTP, as
Prometheus does, and parsed with prometheus_client's parser.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from prebake.client import Client
from prebake.server.app import BackgroundServer, background_server
from prebake.v1 import jobs_pb2, registry_pb2
from tests.conftest import make_artifact_dir
from tests.processes import WorkerProcess, wait_until
from tests.test_worker import COMPILE_TIMEOUT, KEY

pytestmark = pytest.mark.slow

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(server: BackgroundServer) -> Samples:
    assert server.metrics_address, "the server's metrics port is off"
    with urllib.request.urlopen(f"http://{server.metrics_address}/metrics", timeout=30) as response:
        body, content_type = response.read(), response.headers["Content-Type"]
    assert content_type.startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of `name` whose labels include `labels`."""
    return sum(
        v for (n, have), v in samples.items() if n == name and set(labels.items()) <= set(dict(have).items())
    )


@pytest.fixture
def server(tmp_path: Path, model_source_roots: str) -> Iterator[BackgroundServer]:
    with background_server(
        tmp_path / "data", model_source_roots=model_source_roots, metrics_listen="127.0.0.1:0"
    ) as srv:
        yield srv


def test_a_scripted_session_shows_in_the_metrics(
    server: BackgroundServer, tmp_path: Path, tiny_model: Path, model_source_roots: str
) -> None:
    other = replace(KEY, model="tiny/published")
    files = make_artifact_dir(tmp_path / "art", {"a.bin": 3000, "b.bin": 5000})
    with Client(server.address) as client:
        client.publish(files, other)
        for _ in range(3):
            assert client.lookup(other).status == registry_pb2.LOOKUP_STATUS_HIT
        for batch in (2, 4):
            missed = client.lookup(replace(other, batch_size=batch), on_miss="report")
            assert missed.status == registry_pb2.LOOKUP_STATUS_MISS and not missed.HasField("job")

        created = client.lookup(KEY, model_source=str(tiny_model))
        assert created.status == registry_pb2.LOOKUP_STATUS_MISS and created.job_created
        joined = client.lookup(KEY, model_source=str(tiny_model))
        assert joined.status == registry_pb2.LOOKUP_STATUS_COMPILING
        target = created.key.compile_target

        before = scrape(server)
        assert value(before, "prebake_queue_depth", kind="inductor", compile_target=target) == 1
        assert value(before, "prebake_leases_active") == 0
        assert value(before, "prebake_jobs", state="queued") == 1

        worker = WorkerProcess(server.address, tmp_path, "m", "--max-jobs", "1")
        try:
            # Compiling (leased, progress reported): the compile goes on for seconds more.
            wait_until(
                lambda: (
                    (j := client.get_job(created.job.job_id)).state == jobs_pb2.JOB_STATE_LEASED
                    and j.progress > 0
                ),
                90,
                "the compile to start",
            )
            during = scrape(server)
            assert value(during, "prebake_leases_active") == 1
            assert value(during, "prebake_jobs", state="leased") == 1
            assert value(during, "prebake_queue_depth", kind="inductor", compile_target=target) == 0
            assert total(during, "prebake_workers_live", kind="inductor", compile_target=target) == 1
            job = client.wait_for_job(created.job.job_id, timeout=COMPILE_TIMEOUT)
            assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job
            assert worker.proc.wait(timeout=60) == 0, worker.log()
        finally:
            worker.close()

        hit = client.lookup(KEY, model_source=str(tiny_model))
        assert hit.status == registry_pb2.LOOKUP_STATUS_HIT
        fetched = client.fetch(hit.artifact, tmp_path / "dest")
        unique = {(f.digest.hash, f.digest.size_bytes) for f in hit.artifact.files}
        fetched_bytes = sum(size for _, size in unique)
        assert fetched_bytes > 0 and fetched.artifact_id == hit.artifact.artifact_id

    after = scrape(server)
    assert value(after, "prebake_lookups_total", result="hit", reason="exact") == 4
    assert value(after, "prebake_lookups_total", result="miss", reason="report_only") == 2
    assert value(after, "prebake_lookups_total", result="miss", reason="enqueued") == 1
    assert value(after, "prebake_lookups_total", result="compiling", reason="joined") == 1
    assert total(after, "prebake_lookups_total") == 8
    assert value(after, "prebake_lifetime_lookups_total") == 8
    assert value(after, "prebake_lifetime_hits_total") == 4
    assert value(after, "prebake_lifetime_hit_ratio") == pytest.approx(0.5)
    lookup_rpcs = value(
        after, "prebake_rpc_duration_seconds_count", method="prebake.v1.Registry/Lookup", code="OK"
    )
    assert lookup_rpcs == 8
    assert (
        value(after, "prebake_rpc_duration_seconds_count", method="prebake.v1.Workers/CompleteJob", code="OK")
        == 1
    )
    # Every rpc is observed once: the histogram's +Inf bucket equals its count.
    assert (
        value(
            after,
            "prebake_rpc_duration_seconds_bucket",
            method="prebake.v1.Registry/Lookup",
            code="OK",
            le="+Inf",
        )
        == 8
    )
    assert value(after, "prebake_job_duration_seconds_count", kind="inductor", outcome="succeeded") == 1
    assert value(after, "prebake_job_duration_seconds_sum", kind="inductor", outcome="succeeded") > 0
    # Bytes out: the fetch of the compiled artifact, each distinct blob once.
    assert value(after, "prebake_blob_read_bytes_total") == fetched_bytes
    # Bytes in: the published files and the worker's outputs and log.
    assert value(after, "prebake_blob_written_bytes_total") >= 8000 + fetched_bytes
    assert value(after, "prebake_artifacts") == 2
    assert value(after, "prebake_jobs", state="succeeded") == 1
    assert value(after, "prebake_queue_depth", kind="inductor", compile_target=target) == 0
    assert value(after, "prebake_leases_active") == 0
    assert value(after, "prebake_store_blob_bytes") >= 8000 + fetched_bytes
    assert value(after, "prebake_store_quota_bytes") == 0


def test_lifetime_totals_survive_a_restart_and_counters_since_start_up_do_not(tmp_path: Path) -> None:
    files = make_artifact_dir(tmp_path / "art", {"a.bin": 100})
    with (
        background_server(tmp_path / "data", metrics_listen="127.0.0.1:0") as srv,
        Client(srv.address) as client,
    ):
        client.publish(files, KEY)
        for _ in range(3):
            assert client.lookup(KEY).status == registry_pb2.LOOKUP_STATUS_HIT
        assert (
            client.lookup(replace(KEY, batch_size=2), on_miss="report").status
            == registry_pb2.LOOKUP_STATUS_MISS
        )
    with (
        background_server(tmp_path / "data", metrics_listen="127.0.0.1:0") as srv,
        Client(srv.address) as client,
    ):
        assert client.lookup(KEY).status == registry_pb2.LOOKUP_STATUS_HIT
        samples = scrape(srv)
        assert value(samples, "prebake_lifetime_lookups_total") == 5
        assert value(samples, "prebake_lifetime_hits_total") == 4
        assert value(samples, "prebake_lifetime_hit_ratio") == pytest.approx(0.8)
        assert total(samples, "prebake_lookups_total") == 1
        # Hits per artifact: the first run's, persisted; this run's hit is in the next batch.
        [artifact] = client.iter_artifacts()
        assert artifact.hit_count == 3


# Run in a fresh interpreter: multiprocess mode is process-wide state of prometheus_client.
_MULTIPROCESS_SCRIPT = """
import subprocess, sys
from pathlib import Path
from prometheus_client.parser import text_string_to_metric_families
from prebake.server import metrics

directory, data_dir = Path(sys.argv[1]), Path(sys.argv[2])
metrics.enable_multiprocess(directory)
# Another server process (started after the switch, so it inherits it) counts 3 hits, 1 rpc.
child = (
    "from prebake.server.metrics import ServerMetrics; m = ServerMetrics();"
    "[m.lookup('hit', 'exact') for _ in range(3)]; m.rpc('prebake.v1.Registry/Lookup', 'OK', 0.001)"
)
subprocess.run([sys.executable, "-c", child], check=True)

from prebake.server.app import background_server
with background_server(data_dir) as srv:
    state = srv.running.state
    state.metrics.lookup("hit", "exact")
    state.metrics.lookup("miss", "enqueued")
    body, _ = srv.call(metrics.scrape, state)
samples = {
    (s.name, tuple(sorted(s.labels.items()))): s.value
    for family in text_string_to_metric_families(body.decode())
    for s in family.samples
}
print(samples[("prebake_lookups_total", (("reason", "exact"), ("result", "hit")))])
print(samples[("prebake_lookups_total", (("reason", "enqueued"), ("result", "miss")))])
lookup_ok = (("code", "OK"), ("method", "prebake.v1.Registry/Lookup"))
print(samples[("prebake_rpc_duration_seconds_count", lookup_ok)])
print(sum(1 for name, _ in samples if name == "prebake_artifacts"))
"""


def test_multiprocess_mode_sums_every_server_process(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _MULTIPROCESS_SCRIPT, str(tmp_path / "prom"), str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    hits, misses, lookup_rpcs, artifact_gauges = done.stdout.split()
    # 3 hits from the other process + 1 here; the rpc of the other process counted too.
    assert (float(hits), float(misses), float(lookup_rpcs)) == (4.0, 1.0, 1.0)
    # The storage gauges appear once, not once per process.
    assert int(artifact_gauges) == 1
