"""Contract of `ArtifactIndex`, the same for every backend in `BACKENDS`."""

from __future__ import annotations

import base64
import json
import random
from dataclasses import replace
from typing import Any

import pytest

from prebake.core.errors import InvalidArgument
from prebake.server.nearest import compatible_candidates, nearest
from prebake.server.records import Artifact, Job, JobState, WorkerRecord
from prebake.server.storage import ArtifactQuery, ConditionFailed, JobQuery, JobWrite
from prebake.server.storage.bundle import Storage
from prebake.server.storage.page_tokens import encode
from tests.contract.samples import (
    FILES,
    PRODUCER,
    SIGNATURE,
    START,
    blob,
    entry,
    make_artifact,
    make_job,
    make_key,
)
from tests.contract.storage_backends import Backend

ALL = ArtifactQuery()


def without_files(artifact: Artifact) -> Artifact:
    return replace(artifact, files=())


async def test_put_then_get_round_trips(storage: Storage) -> None:
    key = make_key(options=(("optlevel", "3"), ("fast-math", "on")), ignored_fields=("x",))
    artifact = make_artifact(key)
    await storage.artifacts.put(artifact, expect_manifest=None)
    stored = await storage.artifacts.get(key.digest)
    assert stored == artifact
    assert stored.key == key and stored.producer == PRODUCER
    assert [f.path for f in stored.files] == sorted(f.path for f in FILES)
    assert await storage.artifacts.get("0" * 32) is None


async def test_a_producer_without_log_round_trips(storage: Storage) -> None:
    artifact = replace(make_artifact(), producer=replace(PRODUCER, log=None, note=""))
    await storage.artifacts.put(artifact, expect_manifest=None)
    assert await storage.artifacts.get(artifact.artifact_id) == artifact


async def test_a_signature_is_kept_with_the_artifact_on_every_write(
    backend: Backend, storage: Storage
) -> None:
    signed = replace(make_artifact(), signature=SIGNATURE)
    await storage.artifacts.put(signed, expect_manifest=None)
    assert await storage.artifacts.get(signed.artifact_id) == signed
    other = backend.open()
    try:
        assert await other.artifacts.get(signed.artifact_id) == signed
    finally:
        other.close()
    pinned = await storage.artifacts.set_pinned(signed.artifact_id, True)
    assert pinned is not None and pinned.signature == SIGNATURE
    await storage.artifacts.record_hits({signed.artifact_id: (2, START + 5)})
    stored = await storage.artifacts.get(signed.artifact_id)
    assert stored is not None and stored.signature == SIGNATURE
    # Listings carry neither files nor signatures, on every backend.
    page = await storage.artifacts.list_page(ArtifactQuery(), "", 10)
    assert [(a.artifact_id, a.signature) for a in page.items] == [(signed.artifact_id, None)]
    # A replace writes the new artifact's signature (or none) over the old one, even for the
    # same file list (a re-signed rebuild of a revoked signer's artifact).
    resigned = replace(
        signed, pinned=True, signature=replace(SIGNATURE, key_id="ed25519:" + "cd" * 16), created_at=START + 9
    )
    await storage.artifacts.put(resigned, expect_manifest=signed.manifest_digest)
    assert await storage.artifacts.get(signed.artifact_id) == resigned
    unsigned = replace(make_artifact(files=(entry("other.bin"),), at=START + 10), signature=None)
    await storage.artifacts.put(unsigned, expect_manifest=resigned.manifest_digest)
    assert await storage.artifacts.get(signed.artifact_id) == unsigned


async def test_a_second_instance_on_the_engine_sees_every_write(backend: Backend, storage: Storage) -> None:
    artifact = make_artifact()
    await storage.artifacts.put(artifact, expect_manifest=None)
    other = backend.open()
    try:
        assert await other.artifacts.get(artifact.artifact_id) == artifact
        await other.artifacts.set_pinned(artifact.artifact_id, True)
    finally:
        other.close()
    stored = await storage.artifacts.get(artifact.artifact_id)
    assert stored is not None and stored.pinned


async def test_repeated_gets_follow_every_change_made_elsewhere(backend: Backend, storage: Storage) -> None:
    # A backend may keep what it read to answer repeated gets cheaply (SQLite does); every
    # change another instance makes must still show on the very next get.
    artifact = make_artifact()
    await storage.artifacts.put(artifact, expect_manifest=None)
    other = backend.open()

    async def same_as_a_fresh_read() -> Artifact | None:
        fresh = backend.open()
        try:
            expected = await fresh.artifacts.get(artifact.artifact_id)
        finally:
            fresh.close()
        for _ in range(2):  # the first get may fill a memo, the second answers from it
            assert await storage.artifacts.get(artifact.artifact_id) == expected
        return expected

    try:
        assert await same_as_a_fresh_read() == artifact
        await other.artifacts.set_pinned(artifact.artifact_id, True)
        assert (await same_as_a_fresh_read()) == replace(artifact, pinned=True)
        await other.artifacts.record_hits({artifact.artifact_id: (3, START + 50)})
        hit = await same_as_a_fresh_read()
        assert hit is not None and hit.hit_count == 3 and hit.last_accessed_at == START + 50
        await other.artifacts.mark_unavailable(
            artifact.artifact_id, "blob lost", expect_manifest=artifact.manifest_digest
        )
        lost = await same_as_a_fresh_read()
        assert lost is not None and lost.unavailable == "blob lost"
        # A replace with the very same files (so the same manifest digest) by another producer.
        again = replace(make_artifact(at=START + 100), producer=replace(PRODUCER, worker="another-worker"))
        assert again.manifest_digest == artifact.manifest_digest
        await other.artifacts.put(again, expect_manifest=artifact.manifest_digest)
        assert await same_as_a_fresh_read() == again
        changed = make_artifact(files=(entry("other.bin", "different"),), at=START + 200)
        await other.artifacts.put(changed, expect_manifest=again.manifest_digest)
        assert await same_as_a_fresh_read() == changed
        await other.artifacts.delete(
            artifact.artifact_id, expect_manifest=changed.manifest_digest, expect_pinned=False
        )
        assert await same_as_a_fresh_read() is None
        await other.artifacts.put(artifact, expect_manifest=None)
        assert await same_as_a_fresh_read() == artifact
    finally:
        other.close()


async def test_the_change_marker_moves_with_every_change_made_anywhere(
    backend: Backend, storage: Storage
) -> None:
    # A lookup's answer is reused while the marker read before it is unchanged
    # (RegistryService.Lookup): a change by this instance or another one must move it,
    # and reads must not. A backend that cannot tell says None, always.
    index = storage.artifacts
    if index.change_marker() is None:
        assert "sqlite" not in backend.name  # SQLite can tell: PRAGMA data_version
        await index.put(make_artifact(), expect_manifest=None)
        assert index.change_marker() is None
        return
    artifact = make_artifact()
    other = backend.open()
    seen = [index.change_marker()]

    async def moved() -> None:
        now = index.change_marker()
        assert now not in seen
        await index.get(artifact.artifact_id)
        await index.list_page(ALL, "", 10)
        assert index.change_marker() == now  # reads move nothing
        seen.append(now)

    try:
        await index.put(artifact, expect_manifest=None)
        await moved()
        await other.artifacts.set_pinned(artifact.artifact_id, True)
        await moved()
        await other.artifacts.record_hits({artifact.artifact_id: (2, START + 10)})
        await moved()
        await index.set_pinned(artifact.artifact_id, False)
        await moved()
        changed = make_artifact(files=(entry("other.bin", "different"),), at=START + 200)
        await other.artifacts.put(changed, expect_manifest=artifact.manifest_digest)
        await moved()
        await other.artifacts.delete(
            artifact.artifact_id, expect_manifest=changed.manifest_digest, expect_pinned=False
        )
        await moved()
        # The seams of one Storage share the engine: their changes move it too.
        job, _ = await other.jobs.create_if_absent(make_job())
        await moved()
        await other.jobs.compare_and_set(replace(job, progress=0.5), job.revision)
        await moved()
        await other.workers.put_worker(WorkerRecord("w-1", (), START, START + 90))
        await moved()
    finally:
        other.close()


async def test_conditional_create_refuses_an_existing_id(storage: Storage, backend: Backend) -> None:
    first = make_artifact()
    await storage.artifacts.put(first, expect_manifest=None)
    other = make_artifact(files=(entry("other.bin"),), at=START + 1)
    with pytest.raises(ConditionFailed):
        await storage.artifacts.put(other, expect_manifest=None)
    assert await storage.artifacts.get(first.artifact_id) == first
    assert backend.file_rows() == {first.artifact_id: len(FILES)}


async def test_conditional_replace_needs_the_stored_manifest(storage: Storage, backend: Backend) -> None:
    first = make_artifact()
    new = make_artifact(files=(entry("model.neff", "v2", size=5000),), at=START + 10)
    with pytest.raises(ConditionFailed):  # nothing to replace
        await storage.artifacts.put(new, expect_manifest=first.manifest_digest)
    assert await storage.artifacts.get(first.artifact_id) is None
    await storage.artifacts.put(first, expect_manifest=None)
    with pytest.raises(ConditionFailed):
        await storage.artifacts.put(new, expect_manifest=new.manifest_digest)
    assert await storage.artifacts.get(first.artifact_id) == first

    await storage.artifacts.put(new, expect_manifest=first.manifest_digest)
    assert await storage.artifacts.get(first.artifact_id) == new
    # The old file list is gone whole: no file of the first manifest is left behind.
    assert backend.file_rows() == {new.artifact_id: 1}
    assert not await storage.artifacts.is_referenced(FILES[0].digest)


async def test_repeated_paths_are_invalid_and_store_nothing(storage: Storage, backend: Backend) -> None:
    job, _ = await storage.jobs.create_if_absent(make_job())
    files = (entry("a.bin"), entry("b.bin"), entry("b.bin", "other"))
    artifact = replace(make_artifact(job.key), files=files, file_count=3)
    done = replace(job, state=JobState.SUCCEEDED, artifact_id=job.key.digest, finished_at=START)
    with pytest.raises(InvalidArgument, match=r"repeated: b\.bin"):
        await storage.artifacts.put(artifact, expect_manifest=None, complete=JobWrite(done, job.revision))
    assert await storage.artifacts.get(artifact.artifact_id) is None
    assert backend.file_rows() == {}
    assert await storage.jobs.get(job.job_id) == job
    assert [e.sequence for e in await storage.jobs.events(job.job_id)] == [1]
    # The engine is usable afterwards.
    await storage.artifacts.put(make_artifact(job.key), expect_manifest=None)


async def test_put_with_a_job_write_is_one_atomic_step(storage: Storage, backend: Backend) -> None:
    job, _ = await storage.jobs.create_if_absent(make_job())
    artifact = make_artifact(job.key)
    done = replace(job, state=JobState.SUCCEEDED, artifact_id=artifact.artifact_id, finished_at=START + 1)

    # A stale job revision fails the whole write: no artifact, no files, no job change.
    with pytest.raises(ConditionFailed):
        await storage.artifacts.put(artifact, expect_manifest=None, complete=JobWrite(done, job.revision + 1))
    assert await storage.artifacts.get(artifact.artifact_id) is None
    assert backend.file_rows() == {}
    assert await storage.jobs.get(job.job_id) == job

    # A failed artifact condition fails it too, the job write included.
    await storage.artifacts.put(artifact, expect_manifest=None)
    with pytest.raises(ConditionFailed):
        await storage.artifacts.put(artifact, expect_manifest=None, complete=JobWrite(done, job.revision))
    assert await storage.jobs.get(job.job_id) == job

    replaced = make_artifact(job.key, files=(entry("v2.bin"),), at=START + 2)
    await storage.artifacts.put(
        replaced, expect_manifest=artifact.manifest_digest, complete=JobWrite(done, job.revision)
    )
    stored_job = await storage.jobs.get(job.job_id)
    assert stored_job == replace(done, revision=2)
    assert await storage.artifacts.get(artifact.artifact_id) == replaced
    assert [(e.sequence, e.job) for e in await storage.jobs.events(job.job_id)][-1] == (2, stored_job)
    assert await storage.jobs.active(job.key.digest) is None


async def test_delete_is_conditional_on_manifest_and_pin(storage: Storage, backend: Backend) -> None:
    artifact = make_artifact()
    await storage.artifacts.put(artifact, expect_manifest=None)
    for manifest, pinned in [("0" * 32, False), (artifact.manifest_digest, True)]:
        with pytest.raises(ConditionFailed):
            await storage.artifacts.delete(
                artifact.artifact_id, expect_manifest=manifest, expect_pinned=pinned
            )
    assert await storage.artifacts.get(artifact.artifact_id) == artifact

    await storage.artifacts.delete(
        artifact.artifact_id, expect_manifest=artifact.manifest_digest, expect_pinned=False
    )
    assert await storage.artifacts.get(artifact.artifact_id) is None
    assert backend.file_rows() == {}
    with pytest.raises(ConditionFailed):  # gone
        await storage.artifacts.delete(
            artifact.artifact_id, expect_manifest=artifact.manifest_digest, expect_pinned=False
        )


async def test_set_pinned(storage: Storage) -> None:
    assert await storage.artifacts.set_pinned("f" * 32, True) is None
    artifact = make_artifact()
    await storage.artifacts.put(artifact, expect_manifest=None)
    pinned = await storage.artifacts.set_pinned(artifact.artifact_id, True)
    assert pinned == replace(artifact, pinned=True)
    assert await storage.artifacts.get(artifact.artifact_id) == pinned
    assert await storage.artifacts.set_pinned(artifact.artifact_id, False) == artifact


async def test_record_hits_adds_counts_and_never_moves_access_time_back(storage: Storage) -> None:
    a, b = make_artifact(make_key(batch_size=1)), make_artifact(make_key(batch_size=2))
    for artifact in (a, b):
        await storage.artifacts.put(artifact, expect_manifest=None)
    await storage.artifacts.record_hits({a.artifact_id: (3, START + 10), b.artifact_id: (1, START + 5)})
    await storage.artifacts.record_hits({a.artifact_id: (2, START + 1), "0" * 32: (9, START)})
    await storage.artifacts.record_hits({})
    stored_a, stored_b = (
        await storage.artifacts.get(a.artifact_id),
        await storage.artifacts.get(b.artifact_id),
    )
    assert stored_a == replace(a, hit_count=5, last_accessed_at=START + 10)
    assert stored_b == replace(b, hit_count=1, last_accessed_at=START + 5)
    assert await storage.artifacts.get("0" * 32) is None


async def _publish_five(storage: Storage) -> list[Artifact]:
    artifacts = []
    for i in range(5):
        key = make_key(kind="awq" if i % 2 else "neuron", model=f"m{i % 3}", batch_size=i)
        artifact = make_artifact(key, at=START + i, pinned=i in (1, 4))
        await storage.artifacts.put(artifact, expect_manifest=None)
        artifacts.append(artifact)
    return artifacts


async def test_list_page_filters_newest_first_without_files(storage: Storage) -> None:
    artifacts = await _publish_five(storage)

    async def ids(query: ArtifactQuery = ALL, limit: int = 100) -> list[str]:
        page = await storage.artifacts.list_page(query, "", limit)
        assert all(a.files == () and a.file_count == len(FILES) for a in page.items)
        return [a.artifact_id for a in page.items]

    newest_first = [a.artifact_id for a in reversed(artifacts)]
    assert await ids() == newest_first
    assert await ids(ArtifactQuery(kind="awq")) == [artifacts[3].artifact_id, artifacts[1].artifact_id]
    assert await ids(ArtifactQuery(model="m1")) == [artifacts[4].artifact_id, artifacts[1].artifact_id]
    assert await ids(ArtifactQuery(kind="neuron", model="m1")) == [artifacts[4].artifact_id]
    assert await ids(ArtifactQuery(pinned_only=True)) == [artifacts[4].artifact_id, artifacts[1].artifact_id]
    assert await ids(ArtifactQuery(model="nobody")) == []
    page = await storage.artifacts.list_page(ArtifactQuery(), "", 100)
    assert page.next_token == ""
    assert page.items == [without_files(a) for a in reversed(artifacts)]
    for limit in (0, -1):
        with pytest.raises(InvalidArgument):
            await storage.artifacts.list_page(ArtifactQuery(), "", limit)


async def test_list_pages_are_keyset_and_deterministic(storage: Storage) -> None:
    # Ties on created_at break on id; seven artifacts, three of them created at once.
    keys = [make_key(batch_size=i) for i in range(7)]
    for i, key in enumerate(keys):
        await storage.artifacts.put(make_artifact(key, at=START + min(i, 3)), expect_manifest=None)
    expected = [k.digest for k in keys[6:2:-1]]
    expected = sorted(expected)  # the four created at START + 3
    expected += [keys[2].digest, keys[1].digest, keys[0].digest]

    async def walk(limit: int) -> tuple[list[str], list[str]]:
        seen: list[str] = []
        tokens: list[str] = []
        token = ""
        while True:
            page = await storage.artifacts.list_page(ArtifactQuery(), token, limit)
            seen += [a.artifact_id for a in page.items]
            if not page.next_token:
                return seen, tokens
            token = page.next_token
            tokens.append(token)

    for limit in (1, 2, 3, 7, 8):
        seen, tokens = await walk(limit)
        assert seen == expected
        assert (await walk(limit))[1] == tokens  # the same pages, the same tokens

    # A page token names a position, not an offset: an artifact inserted before the
    # position shifts nothing on the next page.
    first = await storage.artifacts.list_page(ArtifactQuery(), "", 2)
    await storage.artifacts.put(make_artifact(make_key(batch_size=99), at=START + 50), expect_manifest=None)
    second = await storage.artifacts.list_page(ArtifactQuery(), first.next_token, 2)
    assert [a.artifact_id for a in second.items] == expected[2:4]


def _forged(position: list[object], tag: str = "artifacts") -> str:
    text = json.dumps([tag, *position])
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


async def test_page_tokens_not_issued_for_the_list_are_refused(storage: Storage) -> None:
    for i in range(3):
        await storage.artifacts.put(make_artifact(make_key(batch_size=i), at=START + i), expect_manifest=None)
        await storage.jobs.create_if_absent(make_job(make_key(batch_size=i), at=START + i))
    artifact_token = (await storage.artifacts.list_page(ArtifactQuery(), "", 1)).next_token
    job_token = (await storage.jobs.list_page(JobQuery(), "", 1)).next_token
    assert artifact_token and job_token

    refused = [
        "not a token",
        "!!!!",
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
        base64.urlsafe_b64encode(b"{}").decode(),
        job_token,  # another list's
        artifact_token + "A" * 600,  # huge
        "A" * 100_000,
        _forged([START, "x" * 32, "extra"]),
        _forged([START, "x" * 32]),  # the old tag, without the query
        _forged(["1000000", "x" * 32]),
        _forged([True, "x" * 32]),
        _forged([2.0**70, "x" * 32]),
        _forged([START, 5]),
        encode("artifacts", [float("nan"), "x"]),
    ]
    for token in refused:
        with pytest.raises(InvalidArgument, match="page_token"):
            await storage.artifacts.list_page(ArtifactQuery(), token, 1)
    for token in [artifact_token, "A" * 100_000, "garbage"]:
        with pytest.raises(InvalidArgument, match="page_token"):
            await storage.jobs.list_page(JobQuery(), token, 1)


async def test_a_page_token_of_one_query_is_refused_by_another(storage: Storage) -> None:
    for i in range(4):
        key = make_key(kind="awq" if i % 2 else "neuron", batch_size=i)
        await storage.artifacts.put(make_artifact(key, at=START + i), expect_manifest=None)
        await storage.jobs.create_if_absent(make_job(key, at=START + i))
    neuron = ArtifactQuery(kind="neuron")
    token = (await storage.artifacts.list_page(neuron, "", 1)).next_token
    assert token
    for other in [ALL, ArtifactQuery(kind="awq"), ArtifactQuery(kind="neuron", pinned_only=True)]:
        with pytest.raises(InvalidArgument, match="page_token"):
            await storage.artifacts.list_page(other, token, 1)
    assert len((await storage.artifacts.list_page(neuron, token, 1)).items) == 1

    queued = JobQuery(states=(JobState.QUEUED, JobState.LEASED))
    job_token = (await storage.jobs.list_page(queued, "", 1)).next_token
    for other_jobs in [
        JobQuery(),
        JobQuery(states=(JobState.QUEUED,)),
        JobQuery(states=queued.states, kind="awq"),
    ]:
        with pytest.raises(InvalidArgument, match="page_token"):
            await storage.jobs.list_page(other_jobs, job_token, 1)
    # The same filters in another order are the same query.
    same = JobQuery(states=(JobState.LEASED, JobState.QUEUED, JobState.QUEUED))
    assert len((await storage.jobs.list_page(same, job_token, 10)).items) == 3


async def test_of_model_lists_one_kind_and_model_newest_first(storage: Storage) -> None:
    artifacts = await _publish_five(storage)
    found = await storage.artifacts.of_model("neuron", "m1", 10)
    assert found == [without_files(artifacts[4])]
    found = await storage.artifacts.of_model("awq", "m1", 10)
    assert found == [without_files(artifacts[1])]
    many = [make_artifact(make_key(batch_size=10 + i), at=START + 10 + i) for i in range(3)]
    for artifact in many:
        await storage.artifacts.put(artifact, expect_manifest=None)
    newest = await storage.artifacts.of_model("neuron", "meta-llama/Meta-Llama-3-8B", 2)
    assert newest == [without_files(a) for a in many[:0:-1]]
    assert await storage.artifacts.of_model("neuron", "nobody", 10) == []


async def test_is_referenced_sees_files_producer_logs_and_job_logs(storage: Storage) -> None:
    log, job_log = blob("producer-log"), blob("job-log", 77)
    artifact = make_artifact(producer=replace(PRODUCER, log=log))
    await storage.artifacts.put(artifact, expect_manifest=None)
    job, _ = await storage.jobs.create_if_absent(make_job(make_key(batch_size=3)))
    await storage.jobs.compare_and_set(replace(job, log=job_log), job.revision)

    for digest in (FILES[0].digest, log, job_log):
        assert await storage.artifacts.is_referenced(digest)
    assert not await storage.artifacts.is_referenced(blob("nobody"))
    # Same hash, other size: another blob.
    assert not await storage.artifacts.is_referenced(replace(FILES[0].digest, size=1))
    await storage.artifacts.delete(
        artifact.artifact_id, expect_manifest=artifact.manifest_digest, expect_pinned=False
    )
    assert not await storage.artifacts.is_referenced(FILES[0].digest)
    assert not await storage.artifacts.is_referenced(log)
    assert await storage.artifacts.is_referenced(job_log)


async def test_counts(storage: Storage) -> None:
    empty = await storage.artifacts.counts()
    assert (empty.artifacts, empty.pinned_artifacts) == (0, 0)
    assert empty.jobs_by_state == {s.value: 0 for s in JobState}
    await _publish_five(storage)
    await storage.jobs.create_if_absent(make_job(make_key(batch_size=10)))
    other, _ = await storage.jobs.create_if_absent(make_job(make_key(batch_size=11)))
    await storage.jobs.compare_and_set(replace(other, state=JobState.CANCELLED, finished_at=START), 1)
    counts = await storage.artifacts.counts()
    assert (counts.artifacts, counts.pinned_artifacts) == (5, 2)
    assert counts.jobs_by_state == {**{s.value: 0 for s in JobState}, "queued": 1, "cancelled": 1}


async def test_counts_follow_every_kind_of_change(storage: Storage) -> None:
    # Random publishes, replaces, pins, unpins and deletes, and job creations and state
    # changes; after each, the counts equal what a recount of the model says.
    rng = random.Random(7)
    keys = [make_key(batch_size=i) for i in range(6)]
    stored: dict[str, Artifact] = {}
    jobs: dict[str, Job] = {}
    for step in range(80):
        key = rng.choice(keys)
        current = stored.get(key.digest)
        action = rng.choice(["publish", "pin", "delete", "job", "advance"])
        if action == "publish":
            pinned = current.pinned if current else rng.random() < 0.5
            files = FILES[: rng.randint(1, len(FILES))]
            fresh = make_artifact(key, files=files, at=START + step, pinned=pinned)
            expect = current.manifest_digest if current else None
            if current is None or current.manifest_digest != fresh.manifest_digest:
                await storage.artifacts.put(fresh, expect_manifest=expect)
                stored[key.digest] = fresh
        elif action == "pin" and current is not None:
            updated = await storage.artifacts.set_pinned(key.digest, not current.pinned)
            assert updated is not None
            stored[key.digest] = replace(current, pinned=updated.pinned)
        elif action == "delete" and current is not None:
            await storage.artifacts.delete(
                key.digest, expect_manifest=current.manifest_digest, expect_pinned=current.pinned
            )
            del stored[key.digest]
        elif action == "job":
            job, created = await storage.jobs.create_if_absent(make_job(key, at=START + step))
            if created:
                jobs[job.job_id] = job
        elif action == "advance" and jobs:
            job = jobs[rng.choice(sorted(jobs))]
            following = {
                JobState.QUEUED: [JobState.LEASED, JobState.CANCELLED],
                JobState.LEASED: [JobState.QUEUED, JobState.SUCCEEDED, JobState.FAILED],
            }.get(job.state)
            if following:
                state = rng.choice(following)
                done = (
                    START + step
                    if state in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)
                    else None
                )
                jobs[job.job_id] = await storage.jobs.compare_and_set(
                    replace(job, state=state, finished_at=done), job.revision
                )
        counts = await storage.artifacts.counts()
        expected_states = {s.value: 0 for s in JobState}
        for job in jobs.values():
            expected_states[job.state.value] += 1
        assert (counts.artifacts, counts.pinned_artifacts) == (
            len(stored),
            sum(a.pinned for a in stored.values()),
        ), f"after step {step} ({action})"
        assert counts.jobs_by_state == expected_states, f"after step {step} ({action})"


async def test_nearest_orders_by_differing_fields_then_newest(storage: Storage) -> None:
    wanted = make_key(batch_size=8, sequence_length=8192)
    at = START

    async def put(**overrides: Any) -> str:
        nonlocal at
        at += 1
        key = make_key(**overrides)
        await storage.artifacts.put(make_artifact(key, at=at), expect_manifest=None)
        return key.digest

    one_off_old = await put(batch_size=4)
    two_off = await put(batch_size=4, sequence_length=4096)
    three_off = await put(batch_size=4, precision="fp16", options=())
    one_off_new = await put(toolchain="neuronx-cc 3.x")
    await put(model="another/model")  # other model: never near
    await put(kind="awq")  # other kind: never near
    await put(batch_size=8, sequence_length=8192)  # the key itself is excluded

    near = await nearest(storage.artifacts, wanted)
    assert [a.artifact_id for a in near] == [one_off_new, one_off_old, two_off, three_off]
    assert [a.artifact_id for a in await nearest(storage.artifacts, wanted, limit=2)] == [
        one_off_new,
        one_off_old,
    ]
    assert all(a.files == () for a in near)
    # instance_type is not compared (compile_target stands for it).
    assert await nearest(storage.artifacts, make_key(model="nobody")) == []


async def test_nearest_ranks_as_rank_nearest_ranks_the_newest_of_the_model(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A backend may rank in its engine (SQLite does, in SQL): the result must be exactly the
    # reference ranking over of_model, ties and the scan limit included.
    import prebake.server.nearest as nearest_module

    scan_limit = 25
    monkeypatch.setattr(nearest_module, "SCAN_LIMIT", scan_limit)
    rng = random.Random(7)
    choices: dict[str, list[Any]] = {
        "model_revision": ["rev-a", "rev-b"],
        "compile_target": ["inf2", "trn1"],
        "sequence_length": [2048, 8192],
        "batch_size": [1, 8],
        "tensor_parallel_degree": [8, 24],
        "precision": ["bf16", "fp16"],
        "toolchain": ["neuronx-cc 2.x", "neuronx-cc 3.x"],
        "options": [(), (("optlevel", "2"),), (("optlevel", "3"),)],
    }
    stored = set()
    for i in range(60):
        key = make_key(**{name: rng.choice(values) for name, values in choices.items()})
        if key.digest in stored:
            continue
        stored.add(key.digest)
        # Every third artifact shares a creation time with another: ties go to the smaller id.
        await storage.artifacts.put(make_artifact(key, at=START + i - i % 3), expect_manifest=None)
    for _ in range(10):
        wanted = make_key(**{name: rng.choice(values) for name, values in choices.items()})
        candidates = await storage.artifacts.of_model(wanted.kind, wanted.model, scan_limit)
        for limit in (1, 5, 100):
            expected = nearest_module.rank_nearest(candidates, wanted, limit)
            assert await storage.artifacts.nearest(wanted, limit) == expected


async def test_compatible_candidates_differ_only_in_longer_sequence_and_allowed_target(
    storage: Storage,
) -> None:
    wanted = make_key(sequence_length=4096)
    longer = make_key(sequence_length=8192)
    longest = make_key(sequence_length=16384)
    other_target = make_key(sequence_length=8192, compile_target="trn1")
    shorter = make_key(sequence_length=2048)
    other_batch = make_key(sequence_length=8192, batch_size=1)
    for i, key in enumerate([longest, longer, other_target, shorter, other_batch]):
        await storage.artifacts.put(make_artifact(key, at=START + i), expect_manifest=None)
    found = await compatible_candidates(storage.artifacts, wanted, ["inf2"])
    assert [a.artifact_id for a in found] == [longer.digest, longest.digest]
    both = await compatible_candidates(storage.artifacts, wanted, ["inf2", "trn1"])
    assert {a.artifact_id for a in both} == {longer.digest, longest.digest, other_target.digest}
    assert await compatible_candidates(storage.artifacts, wanted, []) == []


async def test_least_recently_used_lists_unpinned_by_last_access(storage: Storage) -> None:
    old, middle, new, pinned = (make_artifact(make_key(batch_size=b), at=START + b) for b in (1, 2, 3, 4))
    for artifact in (new, pinned, old, middle):
        await storage.artifacts.put(artifact, expect_manifest=None)
    await storage.artifacts.set_pinned(pinned.artifact_id, True)
    assert [a.artifact_id for a in await storage.artifacts.least_recently_used(10)] == [
        old.artifact_id,
        middle.artifact_id,
        new.artifact_id,
    ]
    # A hit moves an artifact to the end; files are not read.
    await storage.artifacts.record_hits({old.artifact_id: (1, START + 50)})
    found = await storage.artifacts.least_recently_used(2)
    assert [a.artifact_id for a in found] == [middle.artifact_id, new.artifact_id]
    assert all(a.files == () and not a.pinned for a in found)
    assert found[0].last_accessed_at == middle.last_accessed_at
    # Equal access times: by id, so the order is deterministic on every engine.
    tied = [make_artifact(make_key(batch_size=20 + i), at=START + 100) for i in range(3)]
    for artifact in tied:
        await storage.artifacts.put(artifact, expect_manifest=None)
    await storage.artifacts.record_hits({a.artifact_id: (1, START + 200) for a in (old, middle, new)})
    assert [a.artifact_id for a in await storage.artifacts.least_recently_used(3)] == sorted(
        a.artifact_id for a in tied
    )
    assert await storage.artifacts.least_recently_used(0) == []
