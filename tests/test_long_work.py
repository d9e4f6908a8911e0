"""Long work that talks: progress lines, log output outside a terminal, `prewarm --dry-run`,
`prewarm --host-cache FILE`, and what Ctrl-C says, against real servers (and a real `prebake`
process for Ctrl-C)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from prebake.client import ArtifactKey, Client
from prebake.client.cli import main
from prebake.client.prewarm import PrewarmProgress, prewarm
from prebake.client.progress import Activity, Field, JobProgress, PrewarmDisplay, TransferProgress, fit
from prebake.server.app import BackgroundServer, background_server
from prebake.v1 import jobs_pb2, key_pb2, workers_pb2
from tests.conftest import LLAMA3_8B_INF2
from tests.processes import PREBAKE, wait_until
from tests.test_prewarm import fail_compile, publish_for

# Keys an inductor worker advertising cpu-avx2 can (c6a) and cannot (c7i: cpu-avx512) compile.
INDUCTOR_AVX2 = ArtifactKey(
    kind="inductor",
    model="tiny/llama",
    instance_type="ml.c6a.4xlarge",
    sequence_length=64,
    batch_size=1,
    precision="fp32",
)
INDUCTOR_AVX512 = dataclasses.replace(INDUCTOR_AVX2, instance_type="ml.c7i.4xlarge")
AVX2_WORKER = workers_pb2.Capability(
    kind=key_pb2.ARTIFACT_KIND_INDUCTOR, toolchain="torch-2.13.0", compile_targets=["cpu-avx2"]
)


def key_json(key: ArtifactKey) -> dict[str, object]:
    return {**dataclasses.asdict(key), "options": dict(key.options)}


def write_keys(path: Path, keys: Sequence[ArtifactKey | dict[str, object]]) -> Path:
    path.write_text(json.dumps([key_json(k) if isinstance(k, ArtifactKey) else k for k in keys]))
    return path


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[BackgroundServer]:
    """A server that reports missing workers at once (no start-up grace)."""
    with background_server(tmp_path / "data", worker_grace_seconds=0.0) as running:
        yield running


@pytest.fixture
def cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., tuple[int, str, str]]:
    monkeypatch.delenv("PREBAKE_HOST_CACHE", raising=False)

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


# Progress lines ----------------------------------------------------------------------


def job(state: jobs_pb2.JobState.ValueType, message: str = "", progress: float = 0.0) -> jobs_pb2.Job:
    return jobs_pb2.Job(job_id="j-" + "7" * 24, state=state, message=message, progress=progress)


def test_a_job_line_at_80_columns_keeps_stage_percent_and_elapsed_and_drops_the_id() -> None:
    running = job(jobs_pb2.JOB_STATE_LEASED, "compiling with AOTInductor for cpu-avx512", 0.42)
    line = JobProgress.describe(running, 75.0, width=79)
    assert line == "compiling with AOTInductor for cpu-avx512  42%  1m15s"
    # With room to spare the job id comes last.
    wide = JobProgress.describe(running, 75.0, width=200)
    assert wide == f"compiling with AOTInductor for cpu-avx512  42%  1m15s  job {running.job_id}"
    # A stage too long for the line is shortened; percent and elapsed stay.
    long_stage = job(jobs_pb2.JOB_STATE_LEASED, "compiling with AOTInductor for cpu-avx512 " + "x" * 80, 0.5)
    line = JobProgress.describe(long_stage, 5.0, width=79)
    assert len(line) == 79 and line.startswith("compiling with AOTInductor") and line.endswith("…  50%  5s")
    # Not running: the state comes first, with its message; no percent.
    queued = job(jobs_pb2.JOB_STATE_QUEUED, "no live worker serves inductor torch-2.13.0 for cpu-avx512")
    assert JobProgress.describe(queued, 12.0, width=79) == (
        "queued: no live worker serves inductor torch-2.13.0 for cpu-avx512  12s"
    )


def test_a_transfer_line_at_80_columns_keeps_label_percent_bytes_and_elapsed() -> None:
    display = TransferProgress("download", io.StringIO(), interactive=True)
    line = display.describe(450 << 20, 1 << 30, 12.0, 37.5 * (1 << 20), width=79)
    assert line.startswith("download  43.9%  450.0 MiB / 1.0 GiB  12s  37.5 MiB/s")
    assert len(line) <= 79
    narrow = display.describe(450 << 20, 1 << 30, 12.0, 37.5 * (1 << 20), width=41)
    assert narrow == "download  43.9%  450.0 MiB / 1.0 GiB  12s"  # rate, ETA and bar dropped


def test_fit_drops_the_least_important_field_first() -> None:
    fields = [Field("stage", shrink=True), Field("50%"), Field("detail", drop=1), Field("id", drop=2)]
    assert fit(fields, 100) == "stage  50%  detail  id"
    assert fit(fields, 19) == "stage  50%  detail"
    assert fit(fields, 10) == "stage  50%"
    assert fit(fields, 8) == "st…  50%"  # nothing left to drop: the shrinkable field gives way


def test_a_job_display_outside_a_terminal_writes_a_heartbeat_with_the_elapsed_time() -> None:
    stream = io.StringIO()
    display = JobProgress(stream, interactive=False, heartbeat_seconds=0.05)
    display(jobs_pb2.JobEvent(job=job(jobs_pb2.JOB_STATE_QUEUED)))
    try:
        wait_until(lambda: len(stream.getvalue().splitlines()) >= 2, 10, "a heartbeat line")
    finally:
        display.close()
    lines = stream.getvalue().splitlines()
    assert all(line.startswith("queued  ") and line.endswith(f"job {'j-' + '7' * 24}") for line in lines)


def test_a_prewarm_line_at_80_columns_keeps_counts_and_elapsed_first() -> None:
    snapshot = PrewarmProgress(
        total=120,
        looked_up=120,
        waiting=40,
        compiling=8,
        caching=3,
        counts={"hit": 70, "compiled": 5, "failed": 2},
    )
    display = PrewarmDisplay(io.StringIO(), interactive=False)
    display.close()
    wide = display.describe(snapshot, 3725.0)
    head = "prewarm:  77/120 done  1h02m  43 pending: 40 jobs, 8 compiling; 3 caching"
    assert wide == f"{head}  70 hit, 5 compiled, 2 failed"
    assert display.describe(snapshot, 3725.0, width=79) == head  # the counts go first


def test_a_prewarm_display_outside_a_terminal_writes_a_heartbeat() -> None:
    stream = io.StringIO()
    display = PrewarmDisplay(stream, interactive=False, heartbeat_seconds=0.05)
    display(PrewarmProgress(total=2, looked_up=2, waiting=2, compiling=0, caching=0))
    try:
        wait_until(lambda: len(stream.getvalue().splitlines()) >= 3, 10, "heartbeat lines")
    finally:
        display.close()
    assert all(line.startswith("prewarm:  0/2 done  ") for line in stream.getvalue().splitlines())


# Output outside a terminal -------------------------------------------------------------


def test_prewarm_outside_a_terminal_logs_each_row_as_it_finishes(client: Client, tmp_path: Path) -> None:
    publish_for(client, tmp_path, LLAMA3_8B_INF2)
    first, second = (dataclasses.replace(LLAMA3_8B_INF2, batch_size=b) for b in (2, 4))
    stream = io.StringIO()
    display = PrewarmDisplay(stream, interactive=False)
    waiting = threading.Event()
    errors: list[BaseException] = []

    def progress(snapshot: PrewarmProgress) -> None:
        display(snapshot)
        if snapshot.waiting == 2:
            waiting.set()

    def play_worker() -> None:
        try:
            assert waiting.wait(20)
            jobs = {j.key.key.batch_size: j for j in client.iter_jobs(states=["queued"])}
            publish_for(client, tmp_path, jobs[2].key.key, seed=2)
            # The first compiled row is logged before the second job ends.
            wait_until(lambda: len(row_lines(stream)) == 2, 20, "the first compiled row's line")
            assert "batch=2 " in stream.getvalue() and "batch=4 " not in stream.getvalue()
            publish_for(client, tmp_path, jobs[4].key.key, seed=4)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=play_worker, daemon=True)
    thread.start()
    rows = prewarm(client, [LLAMA3_8B_INF2, first, second], progress=progress, concurrency=3)
    display.close()
    thread.join(30)
    assert not errors, errors
    assert [r.outcome for r in rows] == ["hit", "compiled", "compiled"]
    lines = stream.getvalue().splitlines()
    finished = row_lines(stream)
    assert len(finished) == 3
    assert finished[0].startswith("prewarm:  1/3  hit  neuron:meta-llama/Meta-Llama-3-8B")
    assert finished[1].startswith("prewarm:  2/3  compiled  ") and "batch=2 " in finished[1]
    assert finished[2].startswith("prewarm:  3/3  compiled  ") and "batch=4 " in finished[2]
    assert f"job {rows[1].job_id}" in finished[1]
    # A line when every key is looked up says what is left.
    assert any(line.startswith("prewarm:  1/3 done  ") and "  2 pending" in line for line in lines)


def row_lines(stream: io.StringIO) -> list[str]:
    """The lines that report a finished row ("prewarm:  2/3  compiled  ...")."""
    return [
        line for line in stream.getvalue().splitlines() if re.match(r"prewarm:  \d+/\d+  [a-z_]+  ", line)
    ]


# --dry-run ---------------------------------------------------------------------------


def served(client: Client, key: ArtifactKey) -> None:
    """Wait until the server's view of live workers (cached for a moment) serves `key`."""
    wait_until(
        lambda: not client.lookup(key, on_miss="report").unserved_reason,
        10,
        f"a worker serving {key.describe()}",
    )


def advertise(client: Client, capability: workers_pb2.Capability) -> None:
    """A real LeaseJob poll (no wait), which is how the server hears of a worker."""
    assert not client.lease_job("w-avx2", [capability], wait_seconds=0).HasField("job")


def test_dry_run_shows_each_class_and_enqueues_nothing(
    live_server: BackgroundServer, cli: Callable[..., tuple[int, str, str]], tmp_path: Path
) -> None:
    with Client(live_server.address) as client:
        publish_for(client, tmp_path, LLAMA3_8B_INF2)
        advertise(client, AVX2_WORKER)
        served(client, INDUCTOR_AVX2)
        invalid = {**key_json(LLAMA3_8B_INF2), "tensor_parallel_degree": 32}
        matrix = write_keys(tmp_path / "m.json", [LLAMA3_8B_INF2, INDUCTOR_AVX2, INDUCTOR_AVX512, invalid])
        server = ["--server", live_server.address]

        code, out, _ = cli("prewarm", str(matrix), "--dry-run", "-q", *server)
        assert code == 1  # invalid and no_worker rows
        lines = out.strip().splitlines()
        assert [line.split()[7] for line in lines[1:5]] == ["hit", "would_compile", "no_worker", "invalid"]
        assert "no live worker serves inductor torch-2.13.0 for cpu-avx512" in lines[3]
        assert "live inductor workers serve torch-2.13.0 for cpu-avx2" in lines[3]
        assert "tensor_parallel_degree=32 does not fit" in lines[4]
        assert lines[-1] == "4 keys: 1 hit, 1 would_compile, 1 no_worker, 1 invalid"

        code, out, _ = cli("prewarm", str(matrix), "--dry-run", "--json", *server)
        data = json.loads(out)
        assert code == 1 and data["dry_run"] is True and data["exit_code"] == 1
        assert [r["outcome"] for r in data["rows"]] == ["hit", "would_compile", "no_worker", "invalid"]
        assert data["rows"][2]["detail"].startswith("no live worker serves inductor")
        assert data["rows"][0]["artifact_id"] == data["rows"][0]["key_digest"]
        assert data["rows"][1]["job_id"] is None

        # Nothing was enqueued: the server has no job at all.
        assert list(client.iter_jobs()) == []

        # Only what would compile (and what hits): exit 0.
        fine = write_keys(tmp_path / "fine.json", [LLAMA3_8B_INF2, INDUCTOR_AVX2])
        assert cli("prewarm", str(fine), "--dry-run", "-q", *server)[0] == 0
        assert list(client.iter_jobs()) == []


def test_dry_run_shows_jobs_in_flight_and_cached_failures_and_creates_no_job(
    live_server: BackgroundServer, cli: Callable[..., tuple[int, str, str]], tmp_path: Path
) -> None:
    with Client(live_server.address) as client:
        failing = dataclasses.replace(LLAMA3_8B_INF2, batch_size=2)
        fail_compile(client, failing, "neuronx-cc: out of memory")  # leases as a neuron worker
        in_flight = client.lookup(LLAMA3_8B_INF2).job
        served(client, LLAMA3_8B_INF2)
        before = sorted(j.job_id for j in client.iter_jobs())
        fresh = dataclasses.replace(LLAMA3_8B_INF2, batch_size=16)
        matrix = write_keys(tmp_path / "m.json", [LLAMA3_8B_INF2, failing, fresh])

        code, out, _ = cli("prewarm", str(matrix), "--dry-run", "--json", "--server", live_server.address)
        rows = json.loads(out)["rows"]
        assert code == 5  # a cached compile failure
        assert [r["outcome"] for r in rows] == ["in_flight", "failed", "would_compile"]
        assert rows[0]["job_id"] == in_flight.job_id
        assert "neuronx-cc: out of memory" in rows[1]["detail"]
        # --force shows the failed key as it would be retried.
        code, out, _ = cli(
            "prewarm", str(matrix), "--dry-run", "--json", "--force", "--server", live_server.address
        )
        assert [r["outcome"] for r in json.loads(out)["rows"]] == [
            "in_flight",
            "would_compile",
            "would_compile",
        ]
        assert code == 0
        assert sorted(j.job_id for j in client.iter_jobs()) == before


# --host-cache FILE -------------------------------------------------------------------


def test_host_cache_followed_by_the_matrix_reads_it_as_the_matrix(
    server: BackgroundServer,
    client: Client,
    cli: Callable[..., tuple[int, str, str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    publish_for(client, tmp_path, LLAMA3_8B_INF2)
    matrix = write_keys(tmp_path / "m.json", [LLAMA3_8B_INF2])
    default = tmp_path / "default-cache"
    monkeypatch.setenv("PREBAKE_HOST_CACHE", str(default))
    addr = ["--server", server.address]

    code, out, _ = cli("prewarm", "--host-cache", str(matrix), "--json", "-q", *addr)
    data = json.loads(out)
    assert code == 0 and data["host_cache"] == str(default)
    assert data["rows"][0]["outcome"] == "hit" and data["rows"][0]["cached"]

    # The other spellings keep their meaning: DIR given with "=", or before or after FILE.
    for argv, where in [
        (["--host-cache=" + str(tmp_path / "a"), str(matrix)], tmp_path / "a"),
        (["--host-cache", str(tmp_path / "b"), str(matrix)], tmp_path / "b"),
        ([str(matrix), "--host-cache", str(tmp_path / "c")], tmp_path / "c"),
        ([str(matrix), "--host-cache"], default),
    ]:
        code, out, _ = cli("prewarm", *argv, "--json", "-q", *addr)
        assert code == 0 and json.loads(out)["host_cache"] == str(where), argv

    # A directory and no FILE: a usage error naming what happened.
    (tmp_path / "d").mkdir()
    code, out, err = cli("prewarm", "--host-cache", str(tmp_path / "d"), *addr)
    assert code == 2 and out == ""
    assert f"a matrix FILE is required (--host-cache took {tmp_path / 'd'} as its DIR)" in err


# Ctrl-C ------------------------------------------------------------------------------


@pytest.fixture
def waiting_server(tmp_path: Path) -> Iterator[BackgroundServer]:
    """A server in its start-up grace for an hour: a job no worker takes is waited for."""
    with background_server(tmp_path / "data", worker_grace_seconds=3600.0) as running:
        yield running


def test_ctrl_c_while_waiting_for_a_job_says_the_job_keeps_running(
    waiting_server: BackgroundServer, tmp_path: Path
) -> None:
    key = [
        "--kind", "inductor", "--model", "tiny/llama", "--instance-type", "ml.c6a.4xlarge",
        "--sequence-length", "64", "--batch-size", "1", "--precision", "fp32",
    ]  # fmt: skip
    command = [*PREBAKE, "ensure", *key, "--dest", str(tmp_path / "dest"), "--server", waiting_server.address]
    proc = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ},
    )
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()  # the job display's first line: the wait has begun
        assert first.startswith("queued") and " job j-" in first, first
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    job_id = first.rsplit("job ", 1)[1].strip()
    assert proc.returncode == 130, rest
    assert (
        f"error: interrupted while waiting for job {job_id}: the job keeps running on the server; "
        "run the command again to wait again"
    ) in rest
    assert "partial transfer" not in rest
    with Client(waiting_server.address) as client:
        assert client.get_job(job_id).state == jobs_pb2.JOB_STATE_QUEUED


def test_the_ctrl_c_message_follows_what_was_interrupted() -> None:
    activity = Activity()
    assert activity.interrupted() == "interrupted"
    queued = job(jobs_pb2.JOB_STATE_QUEUED)
    activity.job_event(jobs_pb2.JobEvent(job=queued))
    assert activity.interrupted().startswith(
        f"interrupted while waiting for job {queued.job_id}: the job keeps"
    )
    activity.job_event(jobs_pb2.JobEvent(job=job(jobs_pb2.JOB_STATE_SUCCEEDED)))
    activity.transferring("download")
    assert activity.interrupted() == (
        "interrupted during the download (a partial transfer is kept; run the command again to resume)"
    )
    activity.transferring("")
    assert activity.interrupted() == "interrupted"
    activity.waiting_for(3)  # prewarm
    assert activity.interrupted() == (
        "interrupted while waiting for 3 jobs: they keep running on the server; "
        "run the command again to wait again"
    )
