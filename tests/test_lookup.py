"""Lookup against a real server: hit, miss, single flight, negative cache."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from prebake.client import Client, errors
from prebake.client.render import lookup_text
from prebake.server.app import BackgroundServer
from prebake.server.records import ErrorClass, JobState
from prebake.v1 import jobs_pb2, registry_pb2
from tests.conftest import LLAMA3_8B_INF2, make_artifact_dir

HIT = registry_pb2.LOOKUP_STATUS_HIT
MISS = registry_pb2.LOOKUP_STATUS_MISS
COMPILING = registry_pb2.LOOKUP_STATUS_COMPILING
FAILED = registry_pb2.LOOKUP_STATUS_FAILED


def all_jobs(client: Client) -> list[jobs_pb2.Job]:
    jobs: list[jobs_pb2.Job] = []
    token = ""
    while True:
        page = client.list_jobs(page_size=1000, page_token=token)
        jobs.extend(page.jobs)
        token = page.next_page_token
        if not token:
            return jobs


def test_miss_enqueues_a_job_and_a_second_lookup_joins_it(client: Client) -> None:
    first = client.lookup(LLAMA3_8B_INF2)
    assert first.status == MISS
    assert first.job_created and first.job.state == jobs_pb2.JOB_STATE_QUEUED
    assert first.key.digest == first.job.key.digest and len(first.key.digest) == 32
    second = client.lookup(LLAMA3_8B_INF2)
    assert second.status == COMPILING
    assert not second.job_created and second.job.job_id == first.job.job_id


def test_report_only_miss_creates_nothing(client: Client) -> None:
    response = client.lookup(LLAMA3_8B_INF2, on_miss="report")
    assert response.status == MISS and not response.job.job_id
    # An ordinary answer to what was asked: `error` is for problems (see LookupResponse.error).
    assert response.error == ""
    assert all_jobs(client) == []


def test_publish_then_lookup_hits_with_the_manifest(client: Client, tmp_path: Path) -> None:
    job = client.lookup(LLAMA3_8B_INF2).job
    src = make_artifact_dir(tmp_path / "art", {"config.json": 100, "compiled/model.neff": 300_000})
    published = client.publish(src, LLAMA3_8B_INF2)
    assert published.created and list(published.completed_job_ids) == [job.job_id]
    hit = client.lookup(LLAMA3_8B_INF2)
    assert hit.status == HIT and hit.matched_policy == "exact"
    assert hit.artifact.artifact_id == hit.key.digest
    assert sorted(f.path for f in hit.artifact.files) == ["compiled/model.neff", "config.json"]
    assert hit.artifact.total_size_bytes == 300_100
    assert client.get_job(job.job_id).state == jobs_pb2.JOB_STATE_SUCCEEDED


def test_aliases_and_defaults_hit_the_same_artifact(client: Client, tmp_path: Path) -> None:
    client.publish(make_artifact_dir(tmp_path / "a", {"w": 10}), LLAMA3_8B_INF2)
    alias = dataclasses.replace(LLAMA3_8B_INF2, precision="bfloat16", instance_type="inf2.48xlarge")
    assert client.lookup(alias).status == HIT


def test_200_concurrent_lookups_of_one_missing_key_create_exactly_one_job(client: Client) -> None:
    with ThreadPoolExecutor(max_workers=64) as pool:
        responses = list(pool.map(lambda _: client.lookup(LLAMA3_8B_INF2), range(200)))
    assert sum(r.job_created for r in responses) == 1
    assert {r.job.job_id for r in responses} == {responses[0].job.job_id}
    assert {r.status for r in responses} == {MISS, COMPILING}
    assert len(all_jobs(client)) == 1


def test_200_distinct_keys_create_one_job_each(client: Client) -> None:
    keys = [dataclasses.replace(LLAMA3_8B_INF2, sequence_length=128 * (i + 1)) for i in range(200)]
    with ThreadPoolExecutor(max_workers=64) as pool:
        # Every key looked up twice, concurrently, in interleaved order.
        responses = list(pool.map(client.lookup, keys + keys[::-1]))
    assert sum(r.job_created for r in responses) == 200
    jobs = all_jobs(client)
    assert len(jobs) == 200
    assert len({j.key.digest for j in jobs}) == 200
    # Small pages walk the same jobs exactly once, newest first.
    paged: list[str] = []
    token = ""
    while True:
        page = client.list_jobs(page_size=7, page_token=token)
        paged.extend(j.job_id for j in page.jobs)
        token = page.next_page_token
        if not token:
            break
    assert paged == [j.job_id for j in jobs]
    assert [j.job_id for j in client.iter_jobs(limit=50)] == paged[:50]


def test_deterministic_failure_is_cached_and_force_retries(client: Client, server: BackgroundServer) -> None:
    job = client.lookup(LLAMA3_8B_INF2).job
    lifecycle = server.running.state.lifecycle  # type: ignore[union-attr]
    server.call(lifecycle.fail, job.job_id, "neuronx-cc: unsupported operator", ErrorClass.DETERMINISTIC)
    failed = client.lookup(LLAMA3_8B_INF2)
    assert failed.status == FAILED
    assert "unsupported operator" in failed.error and failed.job.job_id == job.job_id
    retried = client.lookup(LLAMA3_8B_INF2, force=True)
    assert retried.status == MISS and retried.job_created and retried.job.job_id != job.job_id


def test_transient_failure_is_not_cached(client: Client, server: BackgroundServer) -> None:
    job = client.lookup(LLAMA3_8B_INF2).job
    lifecycle = server.running.state.lifecycle  # type: ignore[union-attr]
    requeued = server.call(lifecycle.fail, job.job_id, "worker lost", ErrorClass.TRANSIENT)
    assert requeued.state == JobState.QUEUED  # type: ignore[attr-defined]
    again = client.lookup(LLAMA3_8B_INF2)
    assert again.status == COMPILING and again.job.job_id == job.job_id


def test_miss_lists_nearest_artifacts_with_differences(client: Client, tmp_path: Path) -> None:
    client.publish(
        make_artifact_dir(tmp_path / "a", {"w": 10}), dataclasses.replace(LLAMA3_8B_INF2, batch_size=4)
    )
    miss = client.lookup(LLAMA3_8B_INF2, on_miss="report")
    assert miss.status == MISS and len(miss.nearest) == 1
    diffs = {(d.field, d.artifact_value, d.requested_value) for d in miss.nearest[0].differences}
    assert diffs == {("batch_size", "4", "8")}


def test_a_near_miss_names_the_policies_that_would_make_it_a_hit(client: Client, tmp_path: Path) -> None:
    near = {
        "longer": dataclasses.replace(LLAMA3_8B_INF2, sequence_length=16384),
        "trn1": dataclasses.replace(LLAMA3_8B_INF2, instance_type="ml.trn1.32xlarge", sequence_length=16384),
        "batch": dataclasses.replace(LLAMA3_8B_INF2, batch_size=4),
    }
    ids = {
        name: client.publish(make_artifact_dir(tmp_path / name, {"w": 10}), key).artifact.artifact_id
        for name, key in near.items()
    }
    miss = client.lookup(LLAMA3_8B_INF2, on_miss="report")
    policies = {n.artifact_id: list(n.would_hit_with) for n in miss.nearest}
    assert policies == {
        ids["longer"]: [registry_pb2.COMPATIBILITY_POLICY_LONGER_SEQUENCE],
        ids["trn1"]: [
            registry_pb2.COMPATIBILITY_POLICY_LONGER_SEQUENCE,
            registry_pb2.COMPATIBILITY_POLICY_NEURONCORE_V2_FAMILY,
        ],
        ids["batch"]: [],
    }
    hints = sorted(
        line.strip() for line in lookup_text(miss, explain=True).splitlines() if "a hit with" in line
    )
    assert hints == [
        "a hit with --allow longer_sequence",
        "a hit with --allow longer_sequence --allow neuroncore_v2_family",
    ]
    # What the near miss names is what the lookup then needs.
    hit = client.lookup(LLAMA3_8B_INF2, on_miss="report", allow=["longer_sequence"])
    assert hit.status == HIT and hit.artifact.artifact_id == ids["longer"]


def test_stats_count_hits_and_misses(client: Client, tmp_path: Path) -> None:
    client.lookup(LLAMA3_8B_INF2)
    client.publish(make_artifact_dir(tmp_path / "a", {"w": 10}), LLAMA3_8B_INF2)
    client.lookup(LLAMA3_8B_INF2)
    stats = client.get_stats()
    assert (stats.lookups, stats.hits, stats.misses) == (2, 1, 1)
    assert stats.artifacts == 1 and stats.blobs == 1 and stats.blob_bytes == 10
    assert stats.jobs_by_state["succeeded"] == 1 and stats.queue_depth == 0


def test_a_local_model_source_sets_the_revision_so_new_weights_miss(client: Client, tmp_path: Path) -> None:
    from prebake.client.model_revision import revision_of

    weights = make_artifact_dir(tmp_path / "ckpt", {"config.json": 50, "model.safetensors": 4096}, seed=1)
    first = client.lookup(LLAMA3_8B_INF2, model_source=str(weights))
    assert first.key.key.model_revision == revision_of(weights)
    assert first.job.model_source == str(weights)
    client.publish(make_artifact_dir(tmp_path / "compiled", {"model.neff": 10}), first.job.key.key)
    assert client.lookup(LLAMA3_8B_INF2, model_source=str(weights)).status == HIT
    (weights / "model.safetensors").write_bytes(b"retrained")
    retrained = client.lookup(LLAMA3_8B_INF2, model_source=str(weights))
    assert retrained.status == MISS and retrained.key.digest != first.key.digest
    # An explicit revision wins over the directory's digest.
    pinned = dataclasses.replace(LLAMA3_8B_INF2, model_revision="abc123")
    assert client.lookup(pinned, model_source=str(weights)).key.key.model_revision == "abc123"


def test_get_artifact_by_key_reads_without_counting_a_lookup(client: Client, tmp_path: Path) -> None:
    with pytest.raises(errors.NotFound, match="no artifact for this key"):
        client.get_artifact(key=LLAMA3_8B_INF2)
    published = client.publish(make_artifact_dir(tmp_path / "a", {"w": 10}), LLAMA3_8B_INF2).artifact
    before = client.get_stats()
    assert client.get_artifact(key=LLAMA3_8B_INF2).artifact_id == published.artifact_id
    # The JumpStart id of the same model names the same key.
    jumpstart = dataclasses.replace(LLAMA3_8B_INF2, model="meta-textgeneration-llama-3-8b")
    assert client.get_artifact(key=jumpstart).artifact_id == published.artifact_id
    after = client.get_stats()
    assert (after.lookups, after.hits, after.misses) == (before.lookups, before.hits, before.misses)
    [listed] = client.iter_artifacts()
    assert listed.hit_count == 0
    # Only an exact key: a near one is not found (Lookup's policies do not apply).
    with pytest.raises(errors.NotFound):
        client.get_artifact(key=dataclasses.replace(LLAMA3_8B_INF2, batch_size=4))
    with pytest.raises(errors.InvalidArgument, match="not both"):
        client.get_artifact(published.artifact_id, key=LLAMA3_8B_INF2)
    with pytest.raises(errors.InvalidArgument):
        client.get_artifact(key=dataclasses.replace(LLAMA3_8B_INF2, sequence_length=-5))
    assert all_jobs(client) == []
