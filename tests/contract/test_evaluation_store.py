"""Contract of `EvaluationStore`, the same for every backend in `BACKENDS`."""

from __future__ import annotations

from dataclasses import replace

import pytest

from prebake.core.errors import InvalidArgument
from prebake.server.records import Artifact
from prebake.server.storage import ConditionFailed
from prebake.server.storage.bundle import Storage
from prebake.server.storage.evaluation_store import EvaluationQuery
from tests.contract.samples import START, entry, make_artifact, make_evaluation, make_key
from tests.contract.storage_backends import Backend

ALL = EvaluationQuery()


async def _published(storage: Storage, **key: object) -> Artifact:
    artifact = make_artifact(make_key(**key))
    await storage.artifacts.put(artifact, expect_manifest=None)
    return artifact


async def test_an_evaluation_round_trips_whole(storage: Storage) -> None:
    artifact = await _published(storage)
    evaluation = make_evaluation(artifact)
    await storage.evaluations.add(evaluation, expect_manifest=artifact.manifest_digest)
    page = await storage.evaluations.list_page(EvaluationQuery(artifact_id=artifact.artifact_id), "", 10)
    assert page.items == [evaluation] and page.next_token == ""
    assert (await storage.evaluations.list_page(ALL, "", 10)).items == [evaluation]
    by_model = await storage.evaluations.list_page(EvaluationQuery(model=artifact.key.model), "", 10)
    assert by_model.items == [evaluation]
    assert (await storage.evaluations.list_page(EvaluationQuery(model="other/model"), "", 10)).items == []


async def test_listings_are_newest_first_then_by_id_and_filter(storage: Storage) -> None:
    a = await _published(storage)
    b = await _published(storage, model="other/model")
    tie = [make_evaluation(a, at=START + 5, evaluation_id=f"ev-{i:024x}") for i in (2, 1)]
    older = make_evaluation(a, at=START + 1)
    of_b = make_evaluation(b, at=START + 3)
    for evaluation in (*tie, older, of_b):
        artifact = a if evaluation.artifact_id == a.artifact_id else b
        await storage.evaluations.add(evaluation, expect_manifest=artifact.manifest_digest)
    everything = await storage.evaluations.list_page(ALL, "", 10)
    assert [e.evaluation_id for e in everything.items] == [
        tie[1].evaluation_id,
        tie[0].evaluation_id,
        of_b.evaluation_id,
        older.evaluation_id,
    ]
    of_a = await storage.evaluations.list_page(EvaluationQuery(artifact_id=a.artifact_id), "", 10)
    assert [e.evaluation_id for e in of_a.items] == [
        tie[1].evaluation_id,
        tie[0].evaluation_id,
        older.evaluation_id,
    ]
    by_model = await storage.evaluations.list_page(EvaluationQuery(model="other/model"), "", 10)
    assert by_model.items == [of_b]


async def test_keyset_pages_cover_every_evaluation_once(storage: Storage) -> None:
    artifact = await _published(storage)
    added = [make_evaluation(artifact, at=START + i) for i in range(5)]
    for evaluation in added:
        await storage.evaluations.add(evaluation, expect_manifest=artifact.manifest_digest)
    for query in (
        ALL,
        EvaluationQuery(artifact_id=artifact.artifact_id),
        EvaluationQuery(model=artifact.key.model),
    ):
        seen, token = [], ""
        while True:
            page = await storage.evaluations.list_page(query, token, 2)
            seen += page.items
            assert len(page.items) <= 2
            token = page.next_token
            if not token:
                break
        assert seen == list(reversed(added))
    first = await storage.evaluations.list_page(ALL, "", 2)
    # A token of one query is refused by another, and junk is refused.
    with pytest.raises(InvalidArgument, match="page_token"):
        await storage.evaluations.list_page(EvaluationQuery(model=artifact.key.model), first.next_token, 2)
    with pytest.raises(InvalidArgument, match="page_token"):
        await storage.evaluations.list_page(ALL, "not-a-token", 2)
    with pytest.raises(InvalidArgument):
        await storage.evaluations.list_page(ALL, "", 0)


async def test_add_needs_the_artifact_as_expected(backend: Backend, storage: Storage) -> None:
    artifact = await _published(storage)
    ghost = make_artifact(make_key(model="never/published"))
    with pytest.raises(ConditionFailed):
        await storage.evaluations.add(make_evaluation(ghost), expect_manifest=ghost.manifest_digest)
    with pytest.raises(ConditionFailed):
        await storage.evaluations.add(make_evaluation(artifact), expect_manifest="0" * 32)
    evaluation = make_evaluation(artifact)
    await storage.evaluations.add(evaluation, expect_manifest=artifact.manifest_digest)
    with pytest.raises(ConditionFailed):
        await storage.evaluations.add(evaluation, expect_manifest=artifact.manifest_digest)
    assert (await storage.evaluations.list_page(ALL, "", 10)).items == [evaluation]
    assert backend.evaluation_rows() == {artifact.artifact_id: 1}


async def test_a_deleted_artifact_takes_its_evaluations(backend: Backend, storage: Storage) -> None:
    artifact = await _published(storage)
    kept = await _published(storage, model="other/model")
    for target in (artifact, artifact, kept):
        await storage.evaluations.add(make_evaluation(target), expect_manifest=target.manifest_digest)
    await storage.artifacts.delete(
        artifact.artifact_id, expect_manifest=artifact.manifest_digest, expect_pinned=False
    )
    assert (
        await storage.evaluations.list_page(EvaluationQuery(artifact_id=artifact.artifact_id), "", 10)
    ).items == []
    assert [e.artifact_id for e in (await storage.evaluations.list_page(ALL, "", 10)).items] == [
        kept.artifact_id
    ]
    assert backend.evaluation_rows() == {kept.artifact_id: 1}  # no orphans left in the engine
    # A new publish of the same key starts without evaluations.
    await storage.artifacts.put(artifact, expect_manifest=None)
    assert (
        await storage.evaluations.list_page(EvaluationQuery(artifact_id=artifact.artifact_id), "", 10)
    ).items == []


async def test_a_replaced_artifact_takes_its_evaluations(backend: Backend, storage: Storage) -> None:
    artifact = await _published(storage)
    await storage.evaluations.add(make_evaluation(artifact), expect_manifest=artifact.manifest_digest)
    rebuilt = replace(
        make_artifact(artifact.key, files=(entry("model.neff", "rebuilt"),)), created_at=START + 10
    )
    await storage.artifacts.put(rebuilt, expect_manifest=artifact.manifest_digest)
    assert (await storage.evaluations.list_page(ALL, "", 10)).items == []
    assert backend.evaluation_rows() == {}
    fresh = make_evaluation(rebuilt)
    await storage.evaluations.add(fresh, expect_manifest=rebuilt.manifest_digest)
    assert (await storage.evaluations.list_page(ALL, "", 10)).items == [fresh]


async def test_evaluations_survive_reopening_the_engine(backend: Backend) -> None:
    first = backend.open()
    try:
        artifact = await _published(first)
        evaluation = make_evaluation(artifact)
        await first.evaluations.add(evaluation, expect_manifest=artifact.manifest_digest)
    finally:
        first.close()
    again = backend.open()
    try:
        assert (await again.evaluations.list_page(ALL, "", 10)).items == [evaluation]
    finally:
        again.close()
