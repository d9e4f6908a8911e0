"""The contract across processes: several processes on one backend race for one lease
or one publish, and a process killed mid-write leaves whole state behind.

Each race releases its processes through one barrier, so that they decide on the same
stored state at once; each check is on what the engine holds afterwards.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from typing import Any

import pytest

from prebake.core.errors import FailedPrecondition
from prebake.server.job_lifecycle import JobLifecycle, lease_number, manifest_digest, retry_backoff
from prebake.server.records import Artifact, Job, JobState
from prebake.server.storage import ArtifactQuery, JobQuery
from prebake.server.storage.bundle import Storage
from tests.contract.agents import CONTEXT, TIMEOUT, AgentPool, Call, crash_loop, together
from tests.contract.samples import FILES, NEURON, PRODUCER, Clock, entry, make_key
from tests.contract.storage_backends import Backend


async def test_two_processes_race_for_one_job_and_fencing_refuses_the_loser(
    backend: Backend, agent_pool: AgentPool, lifecycle: JobLifecycle, clock: Clock
) -> None:
    job, _ = await lifecycle.create_or_join(make_key(), max_attempts=3)
    with agent_pool.use(backend, 2) as pair:
        leases = [
            outcome
            for [outcome] in together(
                pair, [[("lease", (f"worker-{n}", [NEURON]), {"now": clock.now})] for n in range(2)]
            )
        ]
        [won] = [n for n, lease in enumerate(leases) if lease is not None]
        winner, other = pair[won], pair[1 - won]
        first: Job = leases[won]
        assert (first.job_id, first.worker) == (job.job_id, f"worker-{won}")
        assert lease_number(first.fencing_token) == 1
        assert await lifecycle.jobs.get(job.job_id) == first

        # The winner stops heartbeating; once its lease has expired and the backoff
        # passed, the other process takes the job under a new token.
        [expired] = await lifecycle.expire_leases(now=clock.now + 60)
        assert expired.state is JobState.QUEUED
        later = clock.now + 60 + retry_backoff(1)
        second: Job = other.call("lease", "worker-late", [NEURON], now=later)
        assert (second.job_id, lease_number(second.fencing_token), second.attempts) == (job.job_id, 2, 2)

        # The first holder comes back: every call under its old token is refused, and
        # nothing of its result is stored.
        events = await lifecycle.jobs.events(job.job_id)
        stale: list[tuple[str, tuple[Any, ...]]] = [
            ("complete", (FILES, PRODUCER)),
            ("heartbeat", (0.9, "back")),
            ("release", ()),
        ]
        for name, args in stale:
            with pytest.raises(FailedPrecondition, match="stop working on it"):
                winner.call(name, job.job_id, first.fencing_token, *args)
        assert await lifecycle.artifacts.get(job.key.digest) is None
        assert backend.file_rows() == {}
        assert await lifecycle.jobs.get(job.job_id) == second
        assert await lifecycle.jobs.events(job.job_id) == events

        # Both complete at once: only the current holder's result is stored.
        [[refused], [(artifact, [done])]] = together(
            [winner, other],
            [
                [("complete", (job.job_id, first.fencing_token, (entry("mine.bin"),), PRODUCER), {})],
                [("complete", (job.job_id, second.fencing_token, FILES, PRODUCER), {})],
            ],
        )
    assert isinstance(refused, FailedPrecondition)
    assert artifact == await lifecycle.artifacts.get(job.key.digest)
    assert artifact.manifest_digest == manifest_digest(FILES)
    assert (done.state, done.worker) == (JobState.SUCCEEDED, "worker-late")
    assert done.fencing_token == second.fencing_token
    assert backend.file_rows() == {job.key.digest: len(FILES)}


async def test_processes_leasing_many_jobs_take_each_exactly_once(
    backend: Backend, agent_pool: AgentPool, lifecycle: JobLifecycle
) -> None:
    jobs = [(await lifecycle.create_or_join(make_key(batch_size=i)))[0] for i in range(20)]
    with agent_pool.use(backend, 3) as three:
        calls: list[list[Call]] = [
            [("lease", (f"w{n}-{i}", [NEURON]), {}) for i in range(10)] for n in range(3)
        ]
        outcomes = [o for per_agent in together(three, calls) for o in per_agent]
    assert not [o for o in outcomes if isinstance(o, BaseException)]
    won = [o for o in outcomes if o is not None]
    assert sorted(j.job_id for j in won) == sorted(j.job_id for j in jobs)
    assert all(lease_number(j.fencing_token) == 1 and j.attempts == 1 for j in won)
    for job in won:
        assert await lifecycle.jobs.get(job.job_id) == job


async def test_single_flight_across_processes(
    backend: Backend, agent_pool: AgentPool, lifecycle: JobLifecycle
) -> None:
    key = make_key()
    with agent_pool.use(backend, 4) as four:
        outcomes = [
            o for per_agent in together(four, [[("create_or_join", (key,), {})] * 25] * 4) for o in per_agent
        ]
    assert len(outcomes) == 100
    assert sum(created for _, created in outcomes) == 1
    assert len({job.job_id for job, _ in outcomes}) == 1
    assert len((await lifecycle.jobs.list_page(JobQuery(), "", 10)).items) == 1


async def test_concurrent_publishes_of_one_key_across_processes(
    backend: Backend, agent_pool: AgentPool, lifecycle: JobLifecycle
) -> None:
    key = make_key()
    job, _ = await lifecycle.create_or_join(key)
    with agent_pool.use(backend, 4) as four:
        calls: list[list[Call]] = [[("publish", (key, FILES, PRODUCER), {})] * 50] * 4
        outcomes = [o for per_agent in together(four, calls) for o in per_agent]
    assert not [o for o in outcomes if isinstance(o, BaseException)]
    assert sum(created for _, created, _ in outcomes) == 1
    stored = await lifecycle.artifacts.get(key.digest)
    assert stored is not None and {artifact for artifact, _, _ in outcomes} == {stored}
    assert [j.job_id for _, _, completed in outcomes for j in completed] == [job.job_id]
    assert backend.file_rows() == {key.digest: len(FILES)}


async def _all_artifacts(storage: Storage) -> list[Artifact]:
    found: list[Artifact] = []
    token = ""
    while True:
        page = await storage.artifacts.list_page(ArtifactQuery(), token, 50)
        for listed in page.items:
            artifact = await storage.artifacts.get(listed.artifact_id)
            assert artifact is not None
            found.append(artifact)
        if not (token := page.next_token):
            return found


async def _all_jobs(storage: Storage) -> list[Job]:
    found: list[Job] = []
    token = ""
    while True:
        page = await storage.jobs.list_page(JobQuery(), token, 50)
        found += page.items
        if not (token := page.next_token):
            return found


async def _check_whole(backend: Backend) -> None:
    storage = backend.open()  # a fresh open recovers whatever the killed process left
    try:
        artifacts = await _all_artifacts(storage)
        assert artifacts
        for artifact in artifacts:
            assert len(artifact.files) == artifact.file_count
            assert artifact.total_size == sum(f.digest.size for f in artifact.files)
            assert artifact.manifest_digest == manifest_digest(artifact.files)
        assert backend.file_rows() == {a.artifact_id: a.file_count for a in artifacts}
        [replaced] = [a for a in artifacts if a.key.model == "replaced"]
        assert replaced.file_count in (len(FILES), 7)

        jobs = await _all_jobs(storage)
        assert jobs
        active = Counter(job.key.digest for job in jobs if job.state.active)
        assert set(active.values()) <= {1}
        for job in jobs:
            events = await storage.jobs.events(job.job_id)
            assert [e.sequence for e in events] == list(range(1, job.revision + 1))
            assert events[-1].job == job
            if job.state is JobState.LEASED:
                assert job.lease_expires_at is not None and job.worker == "crasher"
            if job.state is JobState.SUCCEEDED:
                assert await storage.artifacts.get(job.artifact_id) is not None
        # And the engine takes writes again.
        lifecycle = JobLifecycle(storage.artifacts, storage.jobs)
        assert (await lifecycle.publish(make_key(model="after-crash"), FILES, PRODUCER))[1]
        await storage.artifacts.delete(
            make_key(model="after-crash").digest, expect_manifest=manifest_digest(FILES), expect_pinned=False
        )
    finally:
        storage.close()


@pytest.mark.parametrize("rounds", [(9, 31)])
async def test_a_process_killed_mid_writes_leaves_old_or_new_state(
    backend: Backend, rounds: tuple[int, ...]
) -> None:
    for steps in rounds:
        parent, child = CONTEXT.Pipe()
        process = CONTEXT.Process(target=crash_loop, args=(backend, child), daemon=True)
        process.start()
        child.close()
        done = -1
        while done < steps:
            assert parent.poll(TIMEOUT), "the writing process stopped reporting"
            done = parent.recv()
        # It is writing its next step now: kill it without warning.
        assert process.pid is not None
        os.kill(process.pid, signal.SIGKILL)
        process.join(TIMEOUT)
        parent.close()
        assert process.exitcode == -signal.SIGKILL
        await _check_whole(backend)
