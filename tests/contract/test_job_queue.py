"""Contract of `JobQueue`, the same for every backend in `BACKENDS`."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from prebake.core.errors import InvalidArgument
from prebake.server.records import ErrorClass, Job, JobPurpose, JobState, WorkerCapability
from prebake.server.storage import ConditionFailed, JobQuery
from prebake.server.storage.bundle import Storage
from tests.contract.samples import (
    NEURON,
    NEURON_AWQ,
    START,
    blob,
    make_evaluation_job,
    make_job,
    make_key,
    make_spec,
)
from tests.contract.storage_backends import Backend

ALL = JobQuery()


def leased(job: Job, worker: str = "w1", expires: float = START + 60) -> Job:
    return replace(
        job,
        state=JobState.LEASED,
        worker=worker,
        attempts=job.attempts + 1,
        fencing_token=job.fencing_token + 1,
        lease_expires_at=expires,
    )


async def test_create_if_absent_stores_revision_one_with_its_event(storage: Storage) -> None:
    new = make_job(model_source="s3://bucket/llama", max_attempts=5)
    job, created = await storage.jobs.create_if_absent(new)
    assert created and job == replace(new, revision=1)
    assert await storage.jobs.get(new.job_id) == job
    assert await storage.jobs.active(new.key.digest) == job
    [event] = await storage.jobs.events(job.job_id)
    assert (event.job_id, event.sequence, event.at, event.job) == (job.job_id, 1, job.updated_at, job)
    assert await storage.jobs.get("j-" + "0" * 24) is None
    assert await storage.jobs.active(make_key(batch_size=1).digest) is None


async def test_create_if_absent_joins_the_active_job_of_the_key(storage: Storage) -> None:
    first, _ = await storage.jobs.create_if_absent(make_job())
    joined, created = await storage.jobs.create_if_absent(make_job(model_source="elsewhere", at=START + 1))
    assert not created and joined == first
    assert len((await storage.jobs.list_page(JobQuery(), "", 10)).items) == 1
    # A finished job does not count: the key may have a new one.
    await storage.jobs.compare_and_set(replace(first, state=JobState.FAILED, finished_at=START), 1)
    second, created = await storage.jobs.create_if_absent(make_job(at=START + 2))
    assert created and second.job_id != first.job_id


async def test_create_if_absent_refuses_a_finished_job(storage: Storage) -> None:
    for state in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED):
        with pytest.raises(InvalidArgument):
            await storage.jobs.create_if_absent(make_job(state=state))
    assert (await storage.jobs.list_page(JobQuery(), "", 10)).items == []


async def test_single_flight_under_concurrent_creates(backend: Backend, storage: Storage) -> None:
    key = make_key()
    other = backend.open()
    try:
        results = await asyncio.gather(
            *[(storage if i % 2 else other).jobs.create_if_absent(make_job(key)) for i in range(100)]
        )
    finally:
        other.close()
    assert sum(created for _, created in results) == 1
    assert len({job.job_id for job, _ in results}) == 1


async def test_compare_and_set_bumps_the_revision_and_appends_an_event(storage: Storage) -> None:
    job, _ = await storage.jobs.create_if_absent(make_job())
    changed = replace(leased(job), progress=0.5, message="leased by w1", updated_at=START + 1, log=blob("l"))
    stored = await storage.jobs.compare_and_set(changed, job.revision)
    assert stored == replace(changed, revision=2)
    assert await storage.jobs.get(job.job_id) == stored
    events = await storage.jobs.events(job.job_id)
    assert [(e.sequence, e.at, e.job) for e in events] == [(1, START, job), (2, START + 1, stored)]


async def test_compare_and_set_on_a_stale_revision_changes_nothing(storage: Storage) -> None:
    job, _ = await storage.jobs.create_if_absent(make_job())
    first = await storage.jobs.compare_and_set(leased(job, "w1"), job.revision)
    with pytest.raises(ConditionFailed):
        await storage.jobs.compare_and_set(leased(job, "w2"), job.revision)
    with pytest.raises(ConditionFailed):
        await storage.jobs.compare_and_set(leased(job, "w2"), job.revision + 5)
    with pytest.raises(ConditionFailed):  # unknown job
        await storage.jobs.compare_and_set(make_job(), 1)
    assert await storage.jobs.get(job.job_id) == first
    assert [e.sequence for e in await storage.jobs.events(job.job_id)] == [1, 2]


async def test_concurrent_compare_and_sets_of_one_revision_have_one_winner(
    backend: Backend, storage: Storage
) -> None:
    job, _ = await storage.jobs.create_if_absent(make_job())
    other = backend.open()
    try:
        outcomes = await asyncio.gather(
            *[
                (storage if i % 2 else other).jobs.compare_and_set(leased(job, f"w{i}"), job.revision)
                for i in range(50)
            ],
            return_exceptions=True,
        )
    finally:
        other.close()
    winners = [o for o in outcomes if isinstance(o, Job)]
    assert len(winners) == 1
    assert all(isinstance(o, ConditionFailed) for o in outcomes if not isinstance(o, Job))
    assert await storage.jobs.get(job.job_id) == winners[0]
    assert [e.sequence for e in await storage.jobs.events(job.job_id)] == [1, 2]


async def test_events_after_a_sequence_and_of_unknown_jobs(storage: Storage) -> None:
    job, _ = await storage.jobs.create_if_absent(make_job())
    current = job
    for i in range(4):
        current = await storage.jobs.compare_and_set(
            replace(current, progress=i / 4, updated_at=START + i + 1), current.revision
        )
    events = await storage.jobs.events(job.job_id)
    assert [e.sequence for e in events] == [1, 2, 3, 4, 5]
    assert [e.job.revision for e in events] == [1, 2, 3, 4, 5]
    assert all(e.job.key == job.key for e in events)
    assert events[-1].job == current
    assert [e.sequence for e in await storage.jobs.events(job.job_id, after_sequence=3)] == [4, 5]
    assert await storage.jobs.events(job.job_id, after_sequence=5) == []
    assert await storage.jobs.events("j-" + "3" * 24) == []


async def test_last_finished_is_the_most_recent_terminal_job(storage: Storage) -> None:
    key = make_key()
    assert await storage.jobs.last_finished(key.digest) is None
    first, _ = await storage.jobs.create_if_absent(make_job(key))
    await storage.jobs.compare_and_set(replace(first, state=JobState.FAILED, finished_at=START + 1), 1)
    second, _ = await storage.jobs.create_if_absent(make_job(key, at=START + 2))
    cancelled = await storage.jobs.compare_and_set(
        replace(second, state=JobState.CANCELLED, finished_at=START + 3), 1
    )
    await storage.jobs.create_if_absent(make_job(key, at=START + 4))  # active, not finished
    assert await storage.jobs.last_finished(key.digest) == cancelled
    assert await storage.jobs.last_finished(make_key(batch_size=1).digest) is None


async def test_list_page_filters_and_orders(storage: Storage) -> None:
    jobs: list[Job] = []
    for i in range(4):
        key = make_key(kind="awq" if i % 2 else "neuron", batch_size=i)
        jobs.append((await storage.jobs.create_if_absent(make_job(key, at=START + i)))[0])
    jobs[0] = await storage.jobs.compare_and_set(replace(jobs[0], state=JobState.CANCELLED), 1)

    async def ids(query: JobQuery = ALL, limit: int = 100, token: str = "") -> list[str]:
        return [j.job_id for j in (await storage.jobs.list_page(query, token, limit)).items]

    newest_first = [j.job_id for j in reversed(jobs)]
    assert await ids() == newest_first
    assert (await storage.jobs.list_page(JobQuery(), "", 100)).items == list(reversed(jobs))
    assert await ids(JobQuery(states=(JobState.QUEUED,))) == newest_first[:3]
    assert await ids(JobQuery(states=(JobState.CANCELLED, JobState.LEASED))) == [jobs[0].job_id]
    assert await ids(JobQuery(kind="awq")) == [jobs[3].job_id, jobs[1].job_id]
    assert await ids(JobQuery(kind="neuron", states=(JobState.QUEUED,))) == [jobs[2].job_id]
    first = await storage.jobs.list_page(JobQuery(), "", 3)
    assert [j.job_id for j in first.items] == newest_first[:3] and first.next_token
    last = await storage.jobs.list_page(JobQuery(), first.next_token, 3)
    assert [j.job_id for j in last.items] == newest_first[3:] and last.next_token == ""
    with pytest.raises(InvalidArgument):
        await storage.jobs.list_page(JobQuery(), "", 0)


async def test_list_page_ties_on_created_at_break_on_id(storage: Storage) -> None:
    for i in range(5):
        await storage.jobs.create_if_absent(make_job(make_key(batch_size=i)))
    everything = [j.job_id for j in (await storage.jobs.list_page(JobQuery(), "", 10)).items]
    assert everything == sorted(everything)
    seen: list[str] = []
    token = ""
    while True:
        page = await storage.jobs.list_page(JobQuery(), token, 2)
        seen += [j.job_id for j in page.items]
        if not (token := page.next_token):
            break
    assert seen == everything


async def test_leasable_matches_kind_toolchain_and_targets_oldest_first(storage: Storage) -> None:
    neuron, _ = await storage.jobs.create_if_absent(make_job(make_key(), at=START))
    awq_key = make_key(kind="awq", compile_target="", toolchain="llmcompressor 0.14")
    awq, _ = await storage.jobs.create_if_absent(make_job(awq_key, at=START + 1))
    trn, _ = await storage.jobs.create_if_absent(make_job(make_key(compile_target="trn1"), at=START + 2))
    later, _ = await storage.jobs.create_if_absent(
        make_job(make_key(batch_size=1), at=START + 3, not_before=START + 100)
    )

    async def ids(*caps: WorkerCapability, now: float = START + 10, limit: int = 10) -> list[str]:
        return [j.job_id for j in await storage.jobs.leasable(caps, now, limit)]

    assert await ids() == []
    assert await ids(WorkerCapability("inductor", "neuronx-cc 2.x")) == []
    assert await ids(WorkerCapability("neuron", "neuronx-cc 1.x")) == []
    assert await ids(WorkerCapability("neuron", "neuronx-cc 2.x", ("trn1",))) == [trn.job_id]
    assert await ids(WorkerCapability("neuron", "neuronx-cc 2.x", ("inf2", "trn1"))) == [
        neuron.job_id,
        trn.job_id,
    ]
    assert await ids(NEURON) == [neuron.job_id, trn.job_id]
    assert await ids(*NEURON_AWQ) == [neuron.job_id, awq.job_id, trn.job_id]
    assert await ids(*NEURON_AWQ, limit=2) == [neuron.job_id, awq.job_id]
    # Backoff: leasable once not_before has come, and not a moment earlier.
    assert await ids(NEURON, now=START + 99.5) == [neuron.job_id, trn.job_id]
    assert await ids(NEURON, now=START + 100) == [neuron.job_id, trn.job_id, later.job_id]
    # Leased and finished jobs are not leasable.
    await storage.jobs.compare_and_set(leased(neuron), neuron.revision)
    await storage.jobs.compare_and_set(replace(trn, state=JobState.CANCELLED, finished_at=START), 1)
    assert await ids(*NEURON_AWQ, now=START + 100) == [awq.job_id, later.job_id]


async def test_expired_leases_at_or_before_now_soonest_first(storage: Storage) -> None:
    jobs = []
    for i, expires in enumerate([START + 30, START + 10, START + 20]):
        job, _ = await storage.jobs.create_if_absent(make_job(make_key(batch_size=i)))
        jobs.append(await storage.jobs.compare_and_set(leased(job, expires=expires), job.revision))
    await storage.jobs.create_if_absent(make_job(make_key(batch_size=9)))  # queued: never expires

    async def ids(now: float, limit: int = 10) -> list[str]:
        return [j.job_id for j in await storage.jobs.expired_leases(now, limit)]

    assert await ids(START + 9.9) == []
    assert await ids(START + 10) == [jobs[1].job_id]
    assert await ids(START + 100) == [jobs[1].job_id, jobs[2].job_id, jobs[0].job_id]
    assert await ids(START + 100, limit=1) == [jobs[1].job_id]
    requeued = replace(
        jobs[1], state=JobState.QUEUED, lease_expires_at=None, error_class=ErrorClass.TRANSIENT
    )
    await storage.jobs.compare_and_set(requeued, jobs[1].revision)
    assert await ids(START + 100) == [jobs[2].job_id, jobs[0].job_id]


# --- evaluation jobs -------------------------------------------------------------------


EVALUATE = JobPurpose.EVALUATE


async def test_an_evaluation_job_round_trips_with_its_spec(storage: Storage) -> None:
    new = make_evaluation_job(request_id="req-ev")
    job, created = await storage.jobs.create_if_absent(new)
    assert created and job == replace(new, revision=1)
    assert job.purpose is EVALUATE and job.evaluation == make_spec()
    done = await storage.jobs.compare_and_set(
        replace(leased(job), state=JobState.SUCCEEDED, evaluation_id="ev-1", finished_at=START + 1), 1
    )
    assert await storage.jobs.get(job.job_id) == done and done.evaluation_id == "ev-1"
    # The events carry the purpose and spec too (read back from the job).
    assert [e.job for e in await storage.jobs.events(job.job_id)] == [job, done]


async def test_a_compile_and_evaluations_of_one_key_coexist(storage: Storage) -> None:
    key = make_key()
    compile_job, _ = await storage.jobs.create_if_absent(make_job(key))
    evaluation, created = await storage.jobs.create_if_absent(make_evaluation_job(key, at=START + 1))
    assert created and evaluation.job_id != compile_job.job_id
    # An identical evaluation joins; a different one is a job of its own.
    joined, created = await storage.jobs.create_if_absent(make_evaluation_job(key, at=START + 2))
    assert not created and joined == evaluation
    other, created = await storage.jobs.create_if_absent(
        make_evaluation_job(key, at=START + 3, spec=make_spec(requests=8))
    )
    assert created and other.job_id not in (evaluation.job_id, compile_job.job_id)
    # A compile still joins the compile job; "the key's active job" is the compile job.
    rejoined, created = await storage.jobs.create_if_absent(make_job(key, at=START + 4))
    assert not created and rejoined == compile_job
    assert await storage.jobs.active(key.digest) == compile_job
    assert await storage.jobs.active_evaluation(key.digest, make_spec().digest) == evaluation
    assert await storage.jobs.active_evaluation(key.digest, make_spec(requests=8).digest) == other
    assert await storage.jobs.active_evaluation(key.digest, make_spec(requests=9).digest) is None
    await storage.jobs.compare_and_set(replace(evaluation, state=JobState.CANCELLED, finished_at=START), 1)
    assert await storage.jobs.active_evaluation(key.digest, make_spec().digest) is None


async def test_an_evaluation_alone_is_not_the_keys_active_or_last_finished_job(storage: Storage) -> None:
    key = make_key()
    evaluation, _ = await storage.jobs.create_if_absent(make_evaluation_job(key))
    assert await storage.jobs.active(key.digest) is None
    compile_job, created = await storage.jobs.create_if_absent(make_job(key, at=START + 1))
    assert created
    failed = await storage.jobs.compare_and_set(
        replace(compile_job, state=JobState.FAILED, finished_at=START + 2), 1
    )
    await storage.jobs.compare_and_set(replace(evaluation, state=JobState.FAILED, finished_at=START + 3), 1)
    assert await storage.jobs.last_finished(key.digest) == failed


async def test_leasable_matches_purposes(storage: Storage) -> None:
    compile_job, _ = await storage.jobs.create_if_absent(make_job(at=START))
    evaluation, _ = await storage.jobs.create_if_absent(make_evaluation_job(at=START + 1))

    async def ids(*caps: WorkerCapability) -> list[str]:
        return [j.job_id for j in await storage.jobs.leasable(caps, START + 10, 10)]

    both = (JobPurpose.COMPILE, EVALUATE)
    # A capability without purposes given serves compiles only (workers from before).
    assert await ids(NEURON) == [compile_job.job_id]
    assert await ids(replace(NEURON, purposes=(EVALUATE,))) == [evaluation.job_id]
    assert await ids(replace(NEURON, purposes=both)) == [compile_job.job_id, evaluation.job_id]
    assert await ids(replace(NEURON, purposes=())) == []
