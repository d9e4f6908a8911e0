"""`JobLifecycle` over every backend in `BACKENDS`: the job and publish rules hold the
same whichever engine stores them."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any, cast

import pytest

from prebake.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from prebake.server.job_lifecycle import JobLifecycle, lease_number, manifest_digest, retry_backoff
from prebake.server.records import ErrorClass, Job, JobPurpose, JobState, Producer, WorkerCapability
from prebake.server.storage import JobQueue
from prebake.server.storage.bundle import Storage
from tests.contract.samples import (
    FILES,
    NEURON,
    NEURON_AWQ,
    PRODUCER,
    Clock,
    blob,
    by_path,
    entry,
    make_key,
    make_spec,
)
from tests.contract.storage_backends import Backend


async def sequences(lifecycle: JobLifecycle, job_id: str) -> list[int]:
    return [e.sequence for e in await lifecycle.jobs.events(job_id)]


# --- publish -----------------------------------------------------------------------------


async def test_publish_then_get_round_trips(lifecycle: JobLifecycle, clock: Clock) -> None:
    key = make_key()
    artifact, created, completed = await lifecycle.publish(key, FILES, PRODUCER)
    assert created and completed == []
    stored = await lifecycle.artifacts.get(key.digest)
    assert stored == artifact
    assert stored.files == tuple(sorted(FILES, key=by_path))
    assert (stored.file_count, stored.total_size) == (3, 4096 + 12 + 100)
    assert (stored.created_at, stored.last_accessed_at) == (clock.now, clock.now)
    assert not stored.pinned and stored.hit_count == 0
    assert stored.manifest_digest == manifest_digest(FILES)


def test_manifest_digest_ignores_order_but_not_content() -> None:
    assert manifest_digest(FILES) == manifest_digest(tuple(reversed(FILES)))
    flipped = (replace(FILES[0], executable=True), *FILES[1:])
    assert manifest_digest(flipped) != manifest_digest(FILES)


async def test_republishing_the_same_files_is_idempotent(lifecycle: JobLifecycle, clock: Clock) -> None:
    key = make_key()
    first, _, _ = await lifecycle.publish(key, FILES, PRODUCER)
    clock.advance(60)
    again, created, completed = await lifecycle.publish(key, tuple(reversed(FILES)), Producer(worker="x"))
    assert not created and completed == []
    assert again == first == await lifecycle.artifacts.get(key.digest)


async def test_a_different_file_list_is_refused_and_changes_nothing(
    lifecycle: JobLifecycle, backend: Backend
) -> None:
    key = make_key()
    first, _, _ = await lifecycle.publish(key, FILES, PRODUCER)
    job, _ = await lifecycle.create_or_join(key)
    with pytest.raises(AlreadyExists, match=rf"artifact {key.digest} .*manifest {first.manifest_digest}"):
        await lifecycle.publish(key, (*FILES, entry("extra.bin")), PRODUCER)
    assert await lifecycle.artifacts.get(key.digest) == first
    assert await lifecycle.jobs.get(job.job_id) == job
    assert backend.file_rows() == {key.digest: 3}


async def test_replace_swaps_the_files_and_keeps_the_pin(
    lifecycle: JobLifecycle, clock: Clock, backend: Backend
) -> None:
    key = make_key()
    await lifecycle.publish(key, FILES, PRODUCER)
    await lifecycle.set_pinned(key.digest, True)
    await lifecycle.artifacts.record_hits({key.digest: (5, clock.now)})
    clock.advance(10)
    new_files = (entry("model.neff", "v2", size=5000),)
    # A pinned artifact is replaced only with force; refused, nothing changes.
    before = await lifecycle.artifacts.get(key.digest)
    with pytest.raises(FailedPrecondition, match="is pinned"):
        await lifecycle.publish(key, new_files, Producer(worker="w2"), replace_existing=True)
    assert await lifecycle.artifacts.get(key.digest) == before
    artifact, created, _ = await lifecycle.publish(
        key, new_files, Producer(worker="w2"), replace_existing=True, force=True
    )
    assert created
    assert await lifecycle.artifacts.get(key.digest) == artifact
    assert artifact.files == new_files and (artifact.file_count, artifact.total_size) == (1, 5000)
    assert artifact.producer == Producer(worker="w2")
    assert artifact.pinned and artifact.hit_count == 0 and artifact.created_at == clock.now
    assert backend.file_rows() == {key.digest: 1}


async def test_publish_completes_the_active_job_in_the_same_write(
    lifecycle: JobLifecycle, clock: Clock
) -> None:
    key = make_key()
    job, _ = await lifecycle.create_or_join(key)
    leased = await lifecycle.lease("w1", [NEURON])
    assert leased is not None and leased.job_id == job.job_id
    clock.advance(5)
    artifact, created, completed = await lifecycle.publish(key, FILES, PRODUCER)
    assert created and [j.job_id for j in completed] == [job.job_id]
    done = completed[0]
    assert done.state is JobState.SUCCEEDED and done.artifact_id == artifact.artifact_id
    assert done.finished_at == clock.now and done.lease_expires_at is None
    assert await lifecycle.jobs.get(job.job_id) == done
    assert await lifecycle.jobs.active(key.digest) is None
    events = await lifecycle.jobs.events(job.job_id)
    assert [e.job.state for e in events] == [JobState.QUEUED, JobState.LEASED, JobState.SUCCEEDED]
    assert events[-1].job == done


async def test_idempotent_republish_still_completes_a_job_that_raced_it(lifecycle: JobLifecycle) -> None:
    key = make_key()
    await lifecycle.publish(key, FILES, PRODUCER)
    job, _ = await lifecycle.create_or_join(key)  # a lookup that missed just before the publish
    _, created, completed = await lifecycle.publish(key, FILES, PRODUCER)
    assert not created and [j.job_id for j in completed] == [job.job_id]
    assert completed[0].state is JobState.SUCCEEDED


async def test_a_failed_publish_stores_nothing(lifecycle: JobLifecycle, backend: Backend) -> None:
    key = make_key()
    job, _ = await lifecycle.create_or_join(key)
    with pytest.raises(InvalidArgument, match=r"repeated: b\.bin"):
        await lifecycle.publish(key, (entry("a.bin"), entry("b.bin"), entry("b.bin", "other")), PRODUCER)
    assert await lifecycle.artifacts.get(key.digest) is None
    assert backend.file_rows() == {}
    assert await lifecycle.jobs.get(job.job_id) == job
    assert (await lifecycle.publish(key, FILES, PRODUCER))[1]
    with pytest.raises(InvalidArgument, match="at least one file"):
        await lifecycle.publish(make_key(batch_size=1), (), PRODUCER)


# --- delete and pin --------------------------------------------------------------------------


async def test_delete_returns_only_blobs_nothing_else_uses(lifecycle: JobLifecycle) -> None:
    shared = entry("shared.bin", "shared")
    job_log = blob("job-log", 77)
    a, b = make_key(batch_size=1), make_key(batch_size=2)
    a_files = (shared, entry("a-only.bin"), entry("a-log-as-file", "job-log", 77))
    await lifecycle.publish(a, a_files, Producer(log=blob("a-log")))
    await lifecycle.publish(b, (shared, entry("b-only.bin")), Producer(log=blob("a-log")))
    job, _ = await lifecycle.create_or_join(make_key(batch_size=3))
    await lifecycle.fail(job.job_id, "boom", ErrorClass.DETERMINISTIC, log=job_log)

    # shared is still used by b, the producer log by b's producer, job-log by the job.
    assert await lifecycle.delete_artifact(a.digest) == [entry("a-only.bin").digest]
    assert await lifecycle.artifacts.get(a.digest) is None
    assert await lifecycle.artifacts.is_referenced(shared.digest)
    assert await lifecycle.artifacts.is_referenced(job_log)

    freed = await lifecycle.delete_artifact(b.digest)
    assert freed == sorted([shared.digest, entry("b-only.bin").digest, blob("a-log")])
    assert not await lifecycle.artifacts.is_referenced(shared.digest)
    with pytest.raises(NotFound, match=f"artifact {a.digest} not found"):
        await lifecycle.delete_artifact(a.digest)


async def test_a_pinned_artifact_is_deleted_only_with_force(lifecycle: JobLifecycle) -> None:
    key = make_key()
    await lifecycle.publish(key, FILES, PRODUCER)
    pinned = await lifecycle.set_pinned(key.digest, True)
    assert pinned.pinned and pinned.files == tuple(sorted(FILES, key=by_path))
    with pytest.raises(FailedPrecondition, match=f"artifact {key.digest} is pinned; unpin it or set `force`"):
        await lifecycle.delete_artifact(key.digest)
    assert await lifecycle.artifacts.get(key.digest) == pinned
    assert len(await lifecycle.delete_artifact(key.digest, force=True)) == len(FILES) + 1  # and the log
    assert await lifecycle.artifacts.get(key.digest) is None


async def test_set_pinned_of_an_unknown_artifact(lifecycle: JobLifecycle) -> None:
    with pytest.raises(NotFound):
        await lifecycle.set_pinned("f" * 32, True)
    key = make_key()
    await lifecycle.publish(key, FILES, PRODUCER)
    await lifecycle.set_pinned(key.digest, True)
    assert not (await lifecycle.set_pinned(key.digest, False)).pinned


async def test_hits_are_recorded(lifecycle: JobLifecycle, clock: Clock) -> None:
    key = make_key()
    await lifecycle.publish(key, FILES, PRODUCER)
    await lifecycle.artifacts.record_hits({key.digest: (2, clock.now + 3)})
    await lifecycle.artifacts.record_hits({key.digest: (1, clock.now + 1)})
    stored = await lifecycle.artifacts.get(key.digest)
    assert stored is not None and (stored.hit_count, stored.last_accessed_at) == (3, clock.now + 3)


# --- jobs ------------------------------------------------------------------------------------


async def test_create_then_join(lifecycle: JobLifecycle, clock: Clock) -> None:
    key = make_key()
    job, created = await lifecycle.create_or_join(key, model_source="s3://bucket/llama", max_attempts=5)
    assert created
    assert job.job_id.startswith("j-") and len(job.job_id) == 26 and int(job.job_id[2:], 16) >= 0
    assert job.job_id[2:] == job.job_id[2:].lower()
    assert (job.state, job.key, job.model_source, job.max_attempts, job.revision) == (
        JobState.QUEUED,
        key,
        "s3://bucket/llama",
        5,
        1,
    )
    assert (job.created_at, job.updated_at, job.finished_at) == (clock.now, clock.now, None)
    clock.advance(1)
    joined, created_again = await lifecycle.create_or_join(key, model_source="elsewhere")
    assert not created_again and joined == job == await lifecycle.jobs.active(key.digest)
    assert await sequences(lifecycle, job.job_id) == [1]
    with pytest.raises(InvalidArgument):
        await lifecycle.create_or_join(make_key(batch_size=1), max_attempts=0)


async def test_single_flight_with_200_concurrent_misses(lifecycle: JobLifecycle) -> None:
    key = make_key()
    results = await asyncio.gather(*[lifecycle.create_or_join(key) for _ in range(200)])
    assert sum(created for _, created in results) == 1
    assert len({job.job_id for job, _ in results}) == 1
    assert (await lifecycle.artifacts.counts()).jobs_by_state["queued"] == 1


async def test_200_distinct_keys_make_200_jobs(lifecycle: JobLifecycle) -> None:
    results = await asyncio.gather(*[lifecycle.create_or_join(make_key(batch_size=i)) for i in range(200)])
    assert all(created for _, created in results)
    assert len({job.job_id for job, _ in results}) == 200
    assert (await lifecycle.artifacts.counts()).jobs_by_state["queued"] == 200


async def test_a_finished_job_does_not_block_a_new_one(lifecycle: JobLifecycle) -> None:
    key = make_key()
    first, _ = await lifecycle.create_or_join(key)
    await lifecycle.fail(first.job_id, "compiler rejected shape", ErrorClass.DETERMINISTIC)
    second, created = await lifecycle.create_or_join(key)
    assert created and second.job_id != first.job_id
    await lifecycle.cancel(second.job_id)
    third, created = await lifecycle.create_or_join(key)
    assert created and third.job_id not in {first.job_id, second.job_id}


async def test_cancel(lifecycle: JobLifecycle, clock: Clock) -> None:
    job, _ = await lifecycle.create_or_join(make_key())
    clock.advance(3)
    cancelled = await lifecycle.cancel(job.job_id, "operator said so")
    assert (cancelled.state, cancelled.error) == (JobState.CANCELLED, "operator said so")
    assert cancelled.finished_at == clock.now == cancelled.updated_at
    assert await lifecycle.cancel(job.job_id, "again") == cancelled  # unchanged, no new event
    assert await sequences(lifecycle, job.job_id) == [1, 2]

    other, _ = await lifecycle.create_or_join(make_key(batch_size=1))
    assert (await lifecycle.cancel(other.job_id)).error == "cancelled"

    done, _ = await lifecycle.create_or_join(make_key(batch_size=2))
    await lifecycle.publish(make_key(batch_size=2), FILES, PRODUCER)
    with pytest.raises(FailedPrecondition, match=f"job {done.job_id} already succeeded; nothing to cancel"):
        await lifecycle.cancel(done.job_id)
    failed, _ = await lifecycle.create_or_join(make_key(batch_size=3))
    await lifecycle.fail(failed.job_id, "bad", ErrorClass.DETERMINISTIC)
    with pytest.raises(FailedPrecondition, match="already failed"):
        await lifecycle.cancel(failed.job_id)
    with pytest.raises(NotFound):
        await lifecycle.cancel("j-" + "1" * 24)


async def test_cancelling_a_leased_job_stops_its_worker(lifecycle: JobLifecycle) -> None:
    job, _ = await lifecycle.create_or_join(make_key())
    leased = await lifecycle.lease("w1", [NEURON])
    assert leased is not None
    await lifecycle.cancel(job.job_id)
    with pytest.raises(FailedPrecondition, match="stop working on it"):
        await lifecycle.heartbeat(job.job_id, leased.fencing_token, 0.5, "compiling")
    with pytest.raises(FailedPrecondition):
        await lifecycle.complete(job.job_id, leased.fencing_token, FILES, PRODUCER)
    assert await lifecycle.artifacts.get(job.key.digest) is None


async def test_set_message_changes_active_jobs_only(lifecycle: JobLifecycle) -> None:
    job, _ = await lifecycle.create_or_join(make_key())
    changed = await lifecycle.set_message(job.job_id, "no worker serves neuron for inf2")
    assert changed.message == "no worker serves neuron for inf2" and changed.revision == 2
    assert await lifecycle.set_message(job.job_id, "no worker serves neuron for inf2") == changed
    cancelled = await lifecycle.cancel(job.job_id)
    assert await lifecycle.set_message(job.job_id, "too late") == cancelled


async def test_transient_failure_requeues_with_backoff(lifecycle: JobLifecycle, clock: Clock) -> None:
    key = make_key()
    job, _ = await lifecycle.create_or_join(key, max_attempts=2)
    assert await lifecycle.lease("w1", [NEURON]) is not None  # attempt 1

    requeued = await lifecycle.fail(job.job_id, "worker OOM", ErrorClass.TRANSIENT, log=blob("log-a"))
    assert requeued.state is JobState.QUEUED
    assert requeued.not_before == clock.now + retry_backoff(1) == clock.now + 10
    assert (requeued.error, requeued.error_class, requeued.log) == (
        "worker OOM",
        ErrorClass.TRANSIENT,
        blob("log-a"),
    )
    assert requeued.finished_at is None and requeued.lease_expires_at is None
    assert await lifecycle.jobs.active(key.digest) == requeued

    assert await lifecycle.lease("w2", [NEURON]) is None  # still backing off
    clock.advance(10)
    second = await lifecycle.lease("w2", [NEURON])
    assert second is not None and second.attempts == 2

    final = await lifecycle.fail(job.job_id, "worker OOM again", ErrorClass.TRANSIENT)
    assert final.state is JobState.FAILED  # attempts exhausted
    assert final.finished_at == clock.now and final.log == blob("log-a")
    assert await lifecycle.jobs.active(key.digest) is None


async def test_deterministic_failure_is_final_at_once(lifecycle: JobLifecycle) -> None:
    job, _ = await lifecycle.create_or_join(make_key(), max_attempts=3)
    failed = await lifecycle.fail(job.job_id, "unsupported op", ErrorClass.DETERMINISTIC)
    assert failed.state is JobState.FAILED and failed.error_class is ErrorClass.DETERMINISTIC
    with pytest.raises(FailedPrecondition, match="already failed"):
        await lifecycle.fail(job.job_id, "again", ErrorClass.TRANSIENT)
    with pytest.raises(InvalidArgument):
        await lifecycle.fail(job.job_id, "no class", ErrorClass.NONE)
    with pytest.raises(NotFound):
        await lifecycle.fail("j-" + "2" * 24, "x", ErrorClass.TRANSIENT)


async def test_a_worker_fails_only_under_its_lease(lifecycle: JobLifecycle) -> None:
    job, _ = await lifecycle.create_or_join(make_key(), max_attempts=3)
    leased = await lifecycle.lease("w1", [NEURON])
    assert leased is not None
    with pytest.raises(FailedPrecondition):
        await lifecycle.fail_leased(job.job_id, leased.fencing_token + 1, "zombie", ErrorClass.DETERMINISTIC)
    with pytest.raises(InvalidArgument):
        await lifecycle.fail_leased(job.job_id, leased.fencing_token, "x", ErrorClass.NONE)
    failed = await lifecycle.fail_leased(
        job.job_id, leased.fencing_token, "bad shape", ErrorClass.DETERMINISTIC
    )
    assert failed.state is JobState.FAILED and failed.attempts == 1


def test_backoff_grows_and_is_capped() -> None:
    assert [retry_backoff(a) for a in range(8)] == [5, 10, 20, 40, 80, 160, 300, 300]
    assert retry_backoff(10_000) == 300
    assert retry_backoff(3, base=0.0) == 0.0


async def test_job_events_are_contiguous_snapshots_numbered_by_revision(
    lifecycle: JobLifecycle, clock: Clock
) -> None:
    key = make_key()
    job, _ = await lifecycle.create_or_join(key)
    for _ in range(2):
        clock.advance(1)
        assert await lifecycle.lease("w", [NEURON]) is not None
        clock.advance(1)
        await lifecycle.fail(job.job_id, "flaky", ErrorClass.TRANSIENT)
        clock.advance(60)
    leased = await lifecycle.lease("w", [NEURON])
    assert leased is not None
    await lifecycle.heartbeat(job.job_id, leased.fencing_token, 0.5, "halfway")
    await lifecycle.publish(key, FILES, PRODUCER)

    events = await lifecycle.jobs.events(job.job_id)
    stored = await lifecycle.jobs.get(job.job_id)
    assert stored is not None
    assert [e.sequence for e in events] == list(range(1, stored.revision + 1)) == list(range(1, 9))
    assert [e.job.revision for e in events] == [e.sequence for e in events]
    assert [e.job.state for e in events] == [
        JobState.QUEUED,
        JobState.LEASED,
        JobState.QUEUED,
        JobState.LEASED,
        JobState.QUEUED,
        JobState.LEASED,
        JobState.LEASED,  # progress
        JobState.SUCCEEDED,
    ]
    assert all(e.job.key == key and e.job_id == job.job_id for e in events)
    assert [e.at for e in events] == [e.job.updated_at for e in events]
    assert events[-1].job == stored
    assert [e.sequence for e in await lifecycle.jobs.events(job.job_id, after_sequence=6)] == [7, 8]


# --- the worker protocol ----------------------------------------------------------------------


async def test_lease_matches_kind_toolchain_and_targets_oldest_first(
    lifecycle: JobLifecycle, clock: Clock
) -> None:
    neuron, _ = await lifecycle.create_or_join(make_key())
    clock.advance(1)
    awq_key = make_key(kind="awq", compile_target="", toolchain="llmcompressor 0.14")
    awq, _ = await lifecycle.create_or_join(awq_key)
    clock.advance(1)
    trn, _ = await lifecycle.create_or_join(make_key(compile_target="trn1"))

    assert await lifecycle.lease("cpu", [WorkerCapability("inductor", "neuronx-cc 2.x")]) is None
    assert await lifecycle.lease("old-sdk", [WorkerCapability("neuron", "neuronx-cc 1.x")]) is None
    trn_host = WorkerCapability("neuron", "neuronx-cc 2.x", ("trn1",))
    got = await lifecycle.lease("trn-host", [trn_host], lease_seconds=30)
    assert got is not None and got.job_id == trn.job_id
    assert (got.state, got.worker, got.attempts, lease_number(got.fencing_token)) == (
        JobState.LEASED,
        "trn-host",
        1,
        1,
    )
    assert got.lease_expires_at == clock.now + 30
    first = await lifecycle.lease("any", NEURON_AWQ)
    assert first is not None and first.job_id == neuron.job_id
    second = await lifecycle.lease("any", NEURON_AWQ)
    assert second is not None and second.job_id == awq.job_id
    assert await lifecycle.lease("any", NEURON_AWQ) is None
    with pytest.raises(InvalidArgument):
        await lifecycle.lease("nothing", [])


async def test_concurrent_leases_take_each_job_once(lifecycle: JobLifecycle) -> None:
    jobs = [(await lifecycle.create_or_join(make_key(batch_size=i)))[0] for i in range(10)]
    leases = await asyncio.gather(*[lifecycle.lease(f"w{i}", [NEURON]) for i in range(15)])
    won = [j for j in leases if j is not None]
    assert sorted(j.job_id for j in won) == sorted(j.job_id for j in jobs)
    assert all(lease_number(j.fencing_token) == 1 and j.attempts == 1 for j in won)
    # The low bits are random: one job's token says nothing about another's.
    assert len({j.fencing_token for j in won}) == len(won)


async def test_heartbeat_extends_the_lease_under_the_current_token(
    lifecycle: JobLifecycle, clock: Clock
) -> None:
    job, _ = await lifecycle.create_or_join(make_key())
    leased = await lifecycle.lease("w1", [NEURON], lease_seconds=60)
    assert leased is not None
    clock.advance(30)
    beat = await lifecycle.heartbeat(job.job_id, leased.fencing_token, 0.25, "layer 3", lease_seconds=60)
    assert (beat.progress, beat.message, beat.lease_expires_at) == (0.25, "layer 3", clock.now + 60)
    assert await sequences(lifecycle, job.job_id) == [1, 2, 3]
    with pytest.raises(FailedPrecondition):
        await lifecycle.heartbeat(job.job_id, leased.fencing_token + 1, 0.5, "zombie")
    with pytest.raises(InvalidArgument):
        await lifecycle.heartbeat(job.job_id, leased.fencing_token, 1.5, "too far")
    with pytest.raises(NotFound):
        await lifecycle.heartbeat("j-" + "4" * 24, 1, 0.5, "who")
    assert await lifecycle.jobs.get(job.job_id) == beat


async def test_an_expired_lease_is_requeued_and_fences_the_old_worker(
    lifecycle: JobLifecycle, clock: Clock
) -> None:
    job, _ = await lifecycle.create_or_join(make_key(), max_attempts=2)
    old = await lifecycle.lease("w1", [NEURON], lease_seconds=60)
    assert old is not None
    clock.advance(59)
    assert await lifecycle.expire_leases() == []
    clock.advance(1)
    [expired] = await lifecycle.expire_leases()
    assert expired.state is JobState.QUEUED and "w1 stopped heartbeating" in expired.error
    assert expired.not_before == clock.now + retry_backoff(1)

    assert await lifecycle.lease("w2", [NEURON]) is None  # backing off
    clock.advance(retry_backoff(1))
    new = await lifecycle.lease("w2", [NEURON])
    assert new is not None and lease_number(new.fencing_token) == lease_number(old.fencing_token) + 1
    with pytest.raises(FailedPrecondition):
        await lifecycle.heartbeat(job.job_id, old.fencing_token, 0.9, "I am back")
    with pytest.raises(FailedPrecondition):
        await lifecycle.complete(job.job_id, old.fencing_token, FILES, PRODUCER)
    with pytest.raises(FailedPrecondition):
        await lifecycle.release(job.job_id, old.fencing_token)
    assert await lifecycle.jobs.get(job.job_id) == new
    assert await lifecycle.artifacts.get(job.key.digest) is None
    clock.advance(60)
    [final] = await lifecycle.expire_leases()
    assert final.state is JobState.FAILED and final.error_class is ErrorClass.TRANSIENT  # attempts bounded


async def test_expire_leases_takes_an_explicit_now(lifecycle: JobLifecycle, clock: Clock) -> None:
    await lifecycle.create_or_join(make_key())
    old = await lifecycle.lease("w1", [NEURON], lease_seconds=60, now=clock.now)
    assert old is not None
    assert await lifecycle.expire_leases(now=clock.now + 59.9) == []
    [expired] = await lifecycle.expire_leases(now=clock.now + 60)
    assert expired.updated_at == clock.now + 60


async def test_a_heartbeat_after_the_expiry_scan_keeps_its_lease(
    lifecycle: JobLifecycle, clock: Clock
) -> None:
    job, _ = await lifecycle.create_or_join(make_key())
    leased = await lifecycle.lease("w1", [NEURON], lease_seconds=60)
    assert leased is not None
    clock.advance(61)
    scanned = await lifecycle.jobs.expired_leases(clock.now, 10)
    assert [j.job_id for j in scanned] == [job.job_id]
    # The worker's heartbeat lands between the scan and the expiry's decision.
    await lifecycle.heartbeat(job.job_id, leased.fencing_token, 0.5, "still here")
    assert await lifecycle.expire_leases(now=clock.now) == []
    kept = await lifecycle.jobs.get(job.job_id)
    assert kept is not None and kept.state is JobState.LEASED and kept.fencing_token == leased.fencing_token


async def test_release_gives_the_job_back_without_spending_an_attempt(
    lifecycle: JobLifecycle, clock: Clock
) -> None:
    job, _ = await lifecycle.create_or_join(make_key(), max_attempts=1)
    leased = await lifecycle.lease("w1", [NEURON])
    assert leased is not None and leased.attempts == 1
    released = await lifecycle.release(job.job_id, leased.fencing_token, "shutting down")
    assert (released.state, released.attempts, released.lease_expires_at) == (JobState.QUEUED, 0, None)
    assert released.message == "released by w1: shutting down"
    with pytest.raises(FailedPrecondition):
        await lifecycle.release(job.job_id, leased.fencing_token)
    again = await lifecycle.lease("w2", [NEURON])  # at once: no backoff
    assert again is not None and again.attempts == 1
    assert lease_number(again.fencing_token) == lease_number(leased.fencing_token) + 1


async def test_complete_publishes_and_succeeds_in_one_step(
    lifecycle: JobLifecycle, clock: Clock, backend: Backend
) -> None:
    job, _ = await lifecycle.create_or_join(make_key())
    leased = await lifecycle.lease("w1", [NEURON])
    assert leased is not None
    clock.advance(100)
    artifact, [done] = await lifecycle.complete(job.job_id, leased.fencing_token, FILES, PRODUCER)
    assert artifact == await lifecycle.artifacts.get(job.key.digest)
    assert artifact.files == tuple(sorted(FILES, key=by_path)) and artifact.created_at == clock.now
    assert (done.state, done.artifact_id, done.log, done.revision) == (
        JobState.SUCCEEDED,
        artifact.artifact_id,
        PRODUCER.log,
        3,
    )
    assert done == await lifecycle.jobs.get(job.job_id)
    assert backend.file_rows() == {artifact.artifact_id: len(FILES)}
    # A second completion under the same token: the job is no longer leased.
    with pytest.raises(FailedPrecondition):
        await lifecycle.complete(job.job_id, leased.fencing_token, FILES, PRODUCER)
    with pytest.raises(NotFound):
        await lifecycle.complete("j-" + "5" * 24, 1, FILES, PRODUCER)
    with pytest.raises(InvalidArgument):
        await lifecycle.complete(job.job_id, leased.fencing_token, (), PRODUCER)


async def test_complete_keeps_an_artifact_an_operator_published_meanwhile(lifecycle: JobLifecycle) -> None:
    key = make_key()
    job, _ = await lifecycle.create_or_join(key)
    leased = await lifecycle.lease("w1", [NEURON])
    assert leased is not None
    # Published without completing the job: straight through the index, as another
    # replica's publish racing this worker would land.
    operator, _, _ = await lifecycle.publish(make_key(batch_size=1), FILES, PRODUCER)
    mine = replace(operator, artifact_id=key.digest, key=key, files=(entry("op.bin"),), file_count=1)
    mine = replace(mine, manifest_digest=manifest_digest(mine.files), total_size=100)
    await lifecycle.artifacts.put(mine, expect_manifest=None)
    kept, [done] = await lifecycle.complete(job.job_id, leased.fencing_token, FILES, PRODUCER)
    assert kept == mine == await lifecycle.artifacts.get(key.digest)
    assert done.state is JobState.SUCCEEDED and done.artifact_id == key.digest


async def test_200_concurrent_publishes_of_one_key_make_one_artifact(
    lifecycle: JobLifecycle, backend: Backend
) -> None:
    key = make_key()
    job, _ = await lifecycle.create_or_join(key)
    results = await asyncio.gather(
        *[lifecycle.publish(key, FILES if i % 2 else tuple(reversed(FILES)), PRODUCER) for i in range(200)]
    )
    assert sum(created for _, created, _ in results) == 1
    assert len({artifact for artifact, _, _ in results}) == 1
    completed = [j for _, _, jobs in results for j in jobs]
    assert [j.job_id for j in completed] == [job.job_id]
    assert backend.file_rows() == {key.digest: len(FILES)}
    stored = await lifecycle.jobs.get(job.job_id)
    assert stored is not None and stored.state is JobState.SUCCEEDED
    assert await sequences(lifecycle, job.job_id) == [1, 2]


async def test_200_concurrent_publishes_of_different_lists_keep_one_whole(
    lifecycle: JobLifecycle, backend: Backend
) -> None:
    key = make_key()
    lists = [FILES, (entry("other.bin", size=7),)]
    outcomes = await asyncio.gather(
        *[lifecycle.publish(key, lists[i % 2], PRODUCER) for i in range(200)], return_exceptions=True
    )
    published = [o for o in outcomes if isinstance(o, tuple)]
    refused = [o for o in outcomes if not isinstance(o, tuple)]
    assert sum(created for _, created, _ in published) == 1
    assert all(isinstance(o, AlreadyExists) for o in refused)
    stored = await lifecycle.artifacts.get(key.digest)
    assert stored is not None and {a for a, _, _ in published} == {stored}
    # Every publish of the winning list succeeded, every other one was refused.
    assert len(published) == 100 and len(refused) == 100
    assert backend.file_rows() == {key.digest: stored.file_count}


class GatedJobs:
    """A job queue whose first `parties` compare-and-sets wait for each other: every
    decider has read the same revision before any of them writes."""

    def __init__(self, jobs: JobQueue, parties: int) -> None:
        self._jobs = jobs
        self._barrier = asyncio.Barrier(parties)
        self._waiting = parties

    def __getattr__(self, name: str) -> Any:
        return getattr(self._jobs, name)

    async def compare_and_set(self, job: Job, expect_revision: int) -> Job:
        if self._waiting:
            self._waiting -= 1
            await self._barrier.wait()
        return await self._jobs.compare_and_set(job, expect_revision)


async def test_replicas_expiring_one_lease_at_once_report_it_once(
    storage: Storage, lifecycle: JobLifecycle, clock: Clock
) -> None:
    job, _ = await lifecycle.create_or_join(make_key())
    assert await lifecycle.lease("w1", [NEURON], lease_seconds=60) is not None
    gated = cast(JobQueue, GatedJobs(storage.jobs, 3))
    replicas = [JobLifecycle(storage.artifacts, gated, clock=clock) for _ in range(3)]
    reports = await asyncio.gather(*[r.expire_leases(now=clock.now + 60) for r in replicas])
    assert sorted(len(report) for report in reports) == [0, 0, 1]
    [[expired]] = [report for report in reports if report]
    assert expired == await lifecycle.jobs.get(job.job_id)
    assert await sequences(lifecycle, job.job_id) == [1, 2, 3]


# --- evaluation jobs ---------------------------------------------------------------------------


async def test_an_evaluation_job_is_leased_fenced_and_completed_once(lifecycle: JobLifecycle) -> None:
    key = make_key()
    await lifecycle.publish(key, FILES, PRODUCER)
    job, created = await lifecycle.create_or_join_evaluation(key, make_spec(), request_id="req-ev")
    assert created and job.purpose is JobPurpose.EVALUATE and job.artifact_id == key.digest
    _, joined = await lifecycle.create_or_join_evaluation(key, make_spec())
    assert not joined
    evaluator = replace(NEURON, purposes=(JobPurpose.EVALUATE,))
    assert await lifecycle.lease("compiler", [NEURON]) is None  # compile-only workers never take it
    first = await lifecycle.lease("w1", [evaluator])
    assert first is not None and first.job_id == job.job_id
    await lifecycle.release(job.job_id, first.fencing_token)
    second = await lifecycle.lease("w2", [evaluator])
    assert second is not None
    with pytest.raises(FailedPrecondition, match="not leased under fencing token"):
        await lifecycle.complete_evaluation(job.job_id, first.fencing_token, "ev-stale")
    # A compile's completion is refused for it, whatever the token.
    with pytest.raises(InvalidArgument, match="evaluation job"):
        await lifecycle.complete(job.job_id, second.fencing_token, FILES, PRODUCER)
    done, changed = await lifecycle.complete_evaluation(job.job_id, second.fencing_token, "ev-1")
    assert changed and done.state is JobState.SUCCEEDED and done.evaluation_id == "ev-1"
    again, changed = await lifecycle.complete_evaluation(job.job_id, second.fencing_token, "ev-2")
    assert not changed and again == done
    with pytest.raises(FailedPrecondition):
        await lifecycle.complete_evaluation(job.job_id, first.fencing_token, "ev-3")
    # The key's artifact and compile state are untouched by it.
    assert await lifecycle.jobs.active(key.digest) is None
    assert await lifecycle.jobs.last_finished(key.digest) is None


async def test_a_compile_job_is_not_completed_as_an_evaluation(lifecycle: JobLifecycle) -> None:
    job, _ = await lifecycle.create_or_join(make_key())
    leased = await lifecycle.lease("w1", [NEURON])
    assert leased is not None
    with pytest.raises(InvalidArgument, match="compile job"):
        await lifecycle.complete_evaluation(job.job_id, leased.fencing_token, "ev-1")
