"""Job lifecycle through a real server: watch, cancel, ensure waiting on a job."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from prebake.client import Client, errors
from prebake.v1 import jobs_pb2
from tests.conftest import LLAMA3_8B_INF2, make_artifact_dir, tree


def test_watchers_see_the_job_finish_when_an_artifact_is_published(client: Client, tmp_path: Path) -> None:
    job = client.lookup(LLAMA3_8B_INF2).job
    seen: list[list[jobs_pb2.JobEvent]] = [[], [], []]

    def watch(into: list[jobs_pb2.JobEvent]) -> None:
        into.extend(client.watch_job(job.job_id))

    threads = [threading.Thread(target=watch, args=(events,)) for events in seen]
    for t in threads:
        t.start()
    time.sleep(0.3)
    client.publish(make_artifact_dir(tmp_path / "a", {"w": 100}), LLAMA3_8B_INF2)
    for t in threads:
        t.join(timeout=20)
        assert not t.is_alive()
    for events in seen:
        assert events[0].job.state == jobs_pb2.JOB_STATE_QUEUED
        assert events[-1].job.state == jobs_pb2.JOB_STATE_SUCCEEDED
        assert events[-1].job.artifact_id == job.key.digest
        sequences = [e.sequence for e in events]
        assert sequences == sorted(set(sequences))


def test_watching_a_finished_job_returns_its_final_state_and_ends(client: Client) -> None:
    job = client.lookup(LLAMA3_8B_INF2).job
    client.cancel_job(job.job_id, reason="not needed")
    events = list(client.watch_job(job.job_id))
    assert len(events) == 1 and events[0].job.state == jobs_pb2.JOB_STATE_CANCELLED
    assert events[0].job.error == "not needed"


def test_cancel_semantics(client: Client, tmp_path: Path) -> None:
    job = client.lookup(LLAMA3_8B_INF2).job
    cancelled = client.cancel_job(job.job_id)
    assert cancelled.state == jobs_pb2.JOB_STATE_CANCELLED
    assert client.cancel_job(job.job_id).state == jobs_pb2.JOB_STATE_CANCELLED  # idempotent
    # A cancelled job no longer blocks the key: the next miss creates a new one.
    again = client.lookup(LLAMA3_8B_INF2)
    assert again.job_created and again.job.job_id != job.job_id
    client.publish(make_artifact_dir(tmp_path / "a", {"w": 1}), LLAMA3_8B_INF2)
    with pytest.raises(errors.FailedPrecondition, match="already succeeded"):
        client.cancel_job(again.job.job_id)


def test_ensure_waits_for_the_job_and_fetches_the_result(client: Client, tmp_path: Path) -> None:
    src = make_artifact_dir(tmp_path / "compiled", {"model.neff": 200_000, "config.json": 50})
    dest = tmp_path / "deploy"
    result: dict[str, object] = {}

    def deployer() -> None:
        result["value"] = client.ensure(LLAMA3_8B_INF2, dest, timeout=30)

    thread = threading.Thread(target=deployer)
    thread.start()
    deadline = time.monotonic() + 10
    while not client.list_jobs().jobs and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not dest.exists()
    client.publish(src, LLAMA3_8B_INF2)
    thread.join(timeout=30)
    ensured = result["value"]
    assert ensured.status == "MISS"  # type: ignore[attr-defined]
    assert tree(dest) == tree(src)


def test_ensure_raises_when_the_job_is_cancelled(client: Client, tmp_path: Path) -> None:
    errors_seen: list[BaseException] = []

    def deployer() -> None:
        try:
            client.ensure(LLAMA3_8B_INF2, tmp_path / "deploy", timeout=30)
        except errors.PrebakeError as exc:
            errors_seen.append(exc)

    thread = threading.Thread(target=deployer)
    thread.start()
    deadline = time.monotonic() + 10
    while not client.list_jobs().jobs and time.monotonic() < deadline:
        time.sleep(0.05)
    client.cancel_job(client.list_jobs().jobs[0].job_id, reason="operator said no")
    thread.join(timeout=30)
    assert len(errors_seen) == 1 and "operator said no" in str(errors_seen[0])
    assert not (tmp_path / "deploy").exists()


def test_ensure_times_out_with_deadline_exceeded(client: Client, tmp_path: Path) -> None:
    with pytest.raises(errors.DeadlineExceeded):
        client.ensure(LLAMA3_8B_INF2, tmp_path / "deploy", timeout=1.0)
