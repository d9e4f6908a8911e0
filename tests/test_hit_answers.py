"""A repeated hit, or a repeated join of a compile in flight, is answered from the server's
memo of whole answers (`Answers` in prebake.server.lookup_memo) only while nothing it
depends on has changed: every change made since, through this server or by another process
on the same registry file, shows on the very next lookup, and every reused answer is
counted as the hit or the miss it is."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

from prebake.client import ArtifactKey, Client
from prebake.server.app import background_server
from prebake.server.backends import REGISTRY_FILE
from prebake.server.storage.sqlite.artifact_index import SqliteArtifactIndex
from prebake.server.storage.sqlite.connection import Database
from prebake.v1 import jobs_pb2, key_pb2, registry_pb2, workers_pb2
from tests.conftest import LLAMA3_8B_INF2, make_artifact_dir

HIT = registry_pb2.LOOKUP_STATUS_HIT
MISS = registry_pb2.LOOKUP_STATUS_MISS
COMPILING = registry_pb2.LOOKUP_STATUS_COMPILING
NEURON_INF2 = workers_pb2.Capability(
    kind=key_pb2.ARTIFACT_KIND_NEURON, toolchain="neuronx-cc-2", compile_targets=["inf2"]
)


def another_process(tmp_path: Path) -> SqliteArtifactIndex:
    """The registry file as another serving process opens it (a connection of its own)."""
    return SqliteArtifactIndex(Database(tmp_path / "data" / REGISTRY_FILE, time.time()))


def repeated(client: Client) -> registry_pb2.LookupResponse:
    """The lookup twice, the second answered from the memo if nothing changed; both alike."""
    first = client.lookup(LLAMA3_8B_INF2, on_miss="report")
    second = client.lookup(LLAMA3_8B_INF2, on_miss="report")
    assert second == first
    return second


def test_a_repeated_hit_shows_every_change_made_since(client: Client, tmp_path: Path) -> None:
    client.publish(make_artifact_dir(tmp_path / "a", {"model.neff": 1000}), LLAMA3_8B_INF2)
    hit = repeated(client)
    assert hit.status == HIT and not hit.artifact.pinned
    artifact_id = hit.artifact.artifact_id

    client.pin_artifact(artifact_id)
    assert repeated(client).artifact.pinned

    other = another_process(tmp_path)
    asyncio.run(other.set_pinned(artifact_id, False))
    assert not repeated(client).artifact.pinned
    asyncio.run(other.record_hits({artifact_id: (1000, time.time())}))
    assert repeated(client).artifact.hit_count >= 1000

    replaced = make_artifact_dir(tmp_path / "b", {"model.neff": 2000, "config.json": 10}, seed=1)
    client.publish(replaced, LLAMA3_8B_INF2, replace=True)
    assert sorted(f.path for f in repeated(client).artifact.files) == ["config.json", "model.neff"]

    stored = asyncio.run(other.get(artifact_id))
    assert stored is not None
    asyncio.run(other.mark_unavailable(artifact_id, "blob lost", expect_manifest=stored.manifest_digest))
    assert repeated(client).status == MISS  # an unavailable artifact never hits


def test_a_deleted_artifact_stops_hitting_at_once(client: Client, tmp_path: Path) -> None:
    client.publish(make_artifact_dir(tmp_path / "a", {"model.neff": 1000}), LLAMA3_8B_INF2)
    artifact_id = repeated(client).artifact.artifact_id
    client.delete_artifact(artifact_id)
    assert repeated(client).status == MISS


def test_reused_answers_are_counted_as_hits(client: Client, tmp_path: Path) -> None:
    client.publish(make_artifact_dir(tmp_path / "a", {"model.neff": 1000}), LLAMA3_8B_INF2)
    before = client.get_stats()
    for _ in range(5):
        assert client.lookup(LLAMA3_8B_INF2).status == HIT
    after = client.get_stats()
    assert (after.lookups - before.lookups, after.hits - before.hits) == (5, 5)


def test_an_answer_that_took_a_live_workers_toolchain_ends_with_that_worker(tmp_path: Path) -> None:
    # The key names no toolchain: it resolves to the newest a live worker serves, and to the
    # built-in default once that worker has gone quiet. Going quiet writes nothing (hit
    # counts are not flushed here either), so the registry's change marker stays put: the
    # memo itself must notice.
    key = dataclasses.replace(LLAMA3_8B_INF2, toolchain="")
    capability = workers_pb2.Capability(
        kind=key_pb2.ARTIFACT_KIND_NEURON, toolchain="neuronx-cc-2.21", compile_targets=["inf2"]
    )
    settings = {"worker_grace_seconds": 0.0, "worker_ttl_seconds": 1.5, "access_flush_seconds": 3600.0}
    with background_server(tmp_path / "data", **settings) as running, Client(running.address) as client:
        client.lease_job("w-new", [capability], wait_seconds=0)
        time.sleep(1.1)  # the server's cache of live workers
        client.publish(make_artifact_dir(tmp_path / "a", {"model.neff": 1000}), key)
        first = client.lookup(key, on_miss="report")
        assert first.status == HIT and first.key.key.toolchain == "neuronx-cc-2.21"
        assert first.toolchain_source == "newest toolchain of a live worker (w-new)"
        assert client.lookup(key, on_miss="report") == first
        time.sleep(1.5 + 1.1)  # the worker's time to live, then the cache's
        after = client.lookup(key, on_miss="report")
        assert after.status == MISS and after.toolchain_source == "built-in default"


def joined_twice(client: Client, key: ArtifactKey = LLAMA3_8B_INF2) -> registry_pb2.LookupResponse:
    first = client.lookup(key)
    second = client.lookup(key)
    assert first.status == second.status == COMPILING and second == first
    return second


def test_a_repeated_join_shows_every_change_of_the_job_at_once(client: Client) -> None:
    created = client.lookup(LLAMA3_8B_INF2)
    assert created.job_created
    before = client.get_stats()
    queued = joined_twice(client)
    assert queued.job.state == jobs_pb2.JOB_STATE_QUEUED and not queued.job_created
    after = client.get_stats()
    assert (after.lookups - before.lookups, after.misses - before.misses) == (2, 2)

    lease = client.lease_job("w-1", [NEURON_INF2], wait_seconds=0)
    assert lease.job.job_id == created.job.job_id
    leased = joined_twice(client)
    assert leased.job.state == jobs_pb2.JOB_STATE_LEASED and leased.job.worker == "w-1"
    assert leased.unserved_reason == ""
    client.heartbeat(lease.job.job_id, lease.fencing_token, 0.5, "compiling layer 3")
    progressed = joined_twice(client)
    assert (progressed.job.progress, progressed.job.message) == (0.5, "compiling layer 3")
    client.cancel_job(lease.job.job_id)
    assert client.lookup(LLAMA3_8B_INF2, on_miss="report").status == MISS


def test_a_joins_unserved_reason_follows_the_live_workers_without_a_write(tmp_path: Path) -> None:
    # A worker going quiet writes nothing (hit counts are not flushed here either): the memo
    # must notice that the workers it answered with are no longer the live ones. The key
    # names its toolchain, so that its normalisation depends on no live worker.
    key = dataclasses.replace(LLAMA3_8B_INF2, toolchain="neuronx-cc-2")
    settings = {"worker_grace_seconds": 0.0, "worker_ttl_seconds": 1.5, "access_flush_seconds": 3600.0}
    with background_server(tmp_path / "data", **settings) as running, Client(running.address) as client:
        client.lease_job("w-1", [NEURON_INF2], wait_seconds=0)
        time.sleep(1.1)  # the server's cache of live workers
        assert client.lookup(key).job_created
        served = joined_twice(client, key)
        assert served.unserved_reason == "" and served.toolchain_source == "requested"
        time.sleep(1.5 + 1.1)  # the worker's time to live, then the cache's
        after = client.lookup(key)
        assert after.status == COMPILING and "no worker is live" in after.unserved_reason
