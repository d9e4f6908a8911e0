"""Contract of the lifetime lookup totals and the job's request id, the same for every backend.

`ArtifactIndex.record_lookups` adds batches (the AccessTracker flushes them) to totals that
`counts` reports and that outlive the process; `Job.request_id` is stored with the job and
never changed by a compare-and-set; `JobQueue.queued_counts` counts queued jobs only.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from prebake.server.records import JobState
from prebake.server.state import AccessTracker
from prebake.server.storage.bundle import Storage
from tests.contract.samples import START, make_artifact, make_job, make_key
from tests.contract.storage_backends import Backend


async def test_lookup_totals_add_up_and_survive_reopening(storage: Storage, backend: Backend) -> None:
    before = await storage.artifacts.counts()
    assert (before.lifetime_lookups, before.lifetime_hits) == (0, 0)
    await storage.artifacts.record_lookups(10, 7)
    await storage.artifacts.record_lookups(5, 0)
    await storage.artifacts.record_lookups(0, 0)  # an empty batch writes nothing and fails nothing
    # Concurrent batches (two replicas flushing at once) lose no increment.
    await asyncio.gather(*(storage.artifacts.record_lookups(1, 1) for _ in range(8)))
    counts = await storage.artifacts.counts()
    assert (counts.lifetime_lookups, counts.lifetime_hits) == (23, 15)
    # The totals are no artifacts or jobs.
    assert counts.artifacts == 0 and sum(counts.jobs_by_state.values()) == 0
    other = backend.open()
    try:
        again = await other.artifacts.counts()
    finally:
        other.close()
    assert (again.lifetime_lookups, again.lifetime_hits) == (23, 15)


async def test_the_access_tracker_flushes_lookups_and_hits_in_one_batch(storage: Storage) -> None:
    artifact = make_artifact()
    await storage.artifacts.put(artifact, expect_manifest=None)
    tracker = AccessTracker(storage.artifacts, clock=lambda: START + 5)
    for _ in range(4):
        tracker.lookup()
    tracker.hit(artifact.artifact_id)
    tracker.hit(artifact.artifact_id)
    # Nothing is written before the flush.
    assert (await storage.artifacts.counts()).lifetime_lookups == 0
    await tracker.flush()
    counts = await storage.artifacts.counts()
    assert (counts.lifetime_lookups, counts.lifetime_hits) == (4, 2)
    stored = await storage.artifacts.get(artifact.artifact_id)
    assert stored is not None and stored.hit_count == 2
    assert (tracker.pending_lookups, tracker.pending_hits) == (0, 0)
    await tracker.flush()  # nothing pending: nothing added
    assert (await storage.artifacts.counts()).lifetime_lookups == 4


async def test_a_job_keeps_the_request_id_that_created_it(storage: Storage) -> None:
    new = make_job(request_id="req-0123abcd")
    job, created = await storage.jobs.create_if_absent(new)
    assert created and job.request_id == "req-0123abcd"
    assert (await storage.jobs.get(job.job_id)) == job
    # A joiner gets the creator's job, request id included.
    joined, created_again = await storage.jobs.create_if_absent(make_job(request_id="someone-else"))
    assert not created_again and joined.request_id == "req-0123abcd"
    changed = await storage.jobs.compare_and_set(
        replace(job, progress=0.5, updated_at=START + 1), job.revision
    )
    assert changed.request_id == "req-0123abcd"
    events = await storage.jobs.events(job.job_id)
    assert [e.job.request_id for e in events] == ["req-0123abcd", "req-0123abcd"]
    # A job created without one has none.
    plain, _ = await storage.jobs.create_if_absent(make_job(key=make_key(batch_size=1)))
    assert (await storage.jobs.get(plain.job_id)).request_id == ""  # type: ignore[union-attr]


async def test_queued_counts_count_queued_jobs_by_kind_and_target(storage: Storage) -> None:
    assert await storage.jobs.queued_counts() == {}
    for batch in (1, 2, 4):
        await storage.jobs.create_if_absent(make_job(key=make_key(batch_size=batch)))
    await storage.jobs.create_if_absent(make_job(key=make_key(compile_target="trn1")))
    leased_job, _ = await storage.jobs.create_if_absent(make_job(key=make_key(batch_size=16)))
    await storage.jobs.compare_and_set(
        replace(leased_job, state=JobState.LEASED, worker="w", lease_expires_at=START + 60),
        leased_job.revision,
    )
    awq, _ = await storage.jobs.create_if_absent(make_job(key=make_key(kind="awq", compile_target="")))
    assert await storage.jobs.queued_counts() == {
        ("neuron", "inf2"): 3,
        ("neuron", "trn1"): 1,
        ("awq", ""): 1,
    }
    await storage.jobs.compare_and_set(
        replace(awq, state=JobState.CANCELLED, finished_at=START + 1), awq.revision
    )
    assert await storage.jobs.queued_counts() == {("neuron", "inf2"): 3, ("neuron", "trn1"): 1}
