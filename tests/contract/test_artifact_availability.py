"""Contract of the integrity seam of `ArtifactIndex` (`artifacts_using`, `mark_unavailable`),
the same for every backend in `BACKENDS`."""

from __future__ import annotations

from dataclasses import replace

import pytest

from prebake.server.storage import ArtifactQuery
from prebake.server.storage.bundle import Storage
from tests.contract.samples import FILES, PRODUCER, START, blob, entry, make_artifact, make_job, make_key
from tests.contract.storage_backends import Backend


async def test_artifacts_using_names_every_artifact_of_a_file_or_log(storage: Storage) -> None:
    shared = FILES[0]
    log = blob("producer-log-a")
    first = make_artifact(make_key(batch_size=1), producer=replace(PRODUCER, log=log))
    second = make_artifact(make_key(batch_size=2), files=(shared, entry("other.bin")))
    for artifact in (first, second):
        await storage.artifacts.put(artifact, expect_manifest=None)
    # A job log is no artifact's blob.
    job, _ = await storage.jobs.create_if_absent(make_job(make_key(batch_size=3)))
    job_log = blob("job-log-a", 7)
    await storage.jobs.compare_and_set(replace(job, log=job_log), job.revision)

    assert await storage.artifacts.artifacts_using(shared.digest, 10) == sorted(
        [first.artifact_id, second.artifact_id]
    )
    assert await storage.artifacts.artifacts_using(shared.digest, 1) == [
        min(first.artifact_id, second.artifact_id)
    ]
    assert await storage.artifacts.artifacts_using(log, 10) == [first.artifact_id]
    assert await storage.artifacts.artifacts_using(job_log, 10) == []
    assert await storage.artifacts.artifacts_using(blob("nobody"), 10) == []
    assert await storage.artifacts.artifacts_using(replace(shared.digest, size=1), 10) == []


async def test_artifacts_using_forgets_replaced_and_deleted_artifacts(storage: Storage) -> None:
    artifact = make_artifact()
    await storage.artifacts.put(artifact, expect_manifest=None)
    replaced = make_artifact(files=(entry("v2.bin"),), at=START + 1)
    await storage.artifacts.put(replaced, expect_manifest=artifact.manifest_digest)
    assert await storage.artifacts.artifacts_using(FILES[0].digest, 10) == []
    assert await storage.artifacts.artifacts_using(entry("v2.bin").digest, 10) == [artifact.artifact_id]
    await storage.artifacts.delete(
        replaced.artifact_id, expect_manifest=replaced.manifest_digest, expect_pinned=False
    )
    assert await storage.artifacts.artifacts_using(entry("v2.bin").digest, 10) == []


async def test_mark_unavailable_is_conditional_on_the_manifest(storage: Storage) -> None:
    artifact = make_artifact()
    await storage.artifacts.put(artifact, expect_manifest=None)
    assert (
        await storage.artifacts.mark_unavailable(artifact.artifact_id, "gone", expect_manifest="0" * 32)
        is None
    )
    assert await storage.artifacts.get(artifact.artifact_id) == artifact
    assert (
        await storage.artifacts.mark_unavailable("f" * 32, "gone", expect_manifest=artifact.manifest_digest)
        is None
    )
    assert await storage.artifacts.get("f" * 32) is None

    marked = await storage.artifacts.mark_unavailable(
        artifact.artifact_id, "blob x is corrupt", expect_manifest=artifact.manifest_digest
    )
    assert marked == replace(artifact, unavailable="blob x is corrupt")
    assert await storage.artifacts.get(artifact.artifact_id) == marked
    again = await storage.artifacts.mark_unavailable(
        artifact.artifact_id, "blob y is missing", expect_manifest=artifact.manifest_digest
    )
    assert again is not None and again.unavailable == "blob y is missing"
    # Nothing else about the artifact changes: it is still listed, counted and referenced.
    page = await storage.artifacts.list_page(ArtifactQuery(), "", 10)
    assert [a.artifact_id for a in page.items] == [artifact.artifact_id]
    assert (await storage.artifacts.counts()).artifacts == 1
    assert await storage.artifacts.is_referenced(FILES[0].digest)
    assert await storage.artifacts.artifacts_using(FILES[0].digest, 10) == [artifact.artifact_id]


async def test_a_put_stores_the_new_artifacts_availability(storage: Storage) -> None:
    artifact = make_artifact()
    await storage.artifacts.put(artifact, expect_manifest=None)
    await storage.artifacts.mark_unavailable(
        artifact.artifact_id, "lost", expect_manifest=artifact.manifest_digest
    )
    # Republishing the very same files (the conditional replace of a repair) makes it available.
    fresh = make_artifact(at=START + 5)
    await storage.artifacts.put(fresh, expect_manifest=artifact.manifest_digest)
    stored = await storage.artifacts.get(artifact.artifact_id)
    assert stored == fresh and stored.unavailable == ""


async def test_availability_is_seen_by_another_instance(backend: Backend, storage: Storage) -> None:
    artifact = make_artifact()
    await storage.artifacts.put(artifact, expect_manifest=None)
    other = backend.open()
    try:
        await other.artifacts.mark_unavailable(
            artifact.artifact_id, "corrupt", expect_manifest=artifact.manifest_digest
        )
    finally:
        other.close()
    stored = await storage.artifacts.get(artifact.artifact_id)
    assert stored is not None and stored.unavailable == "corrupt"


async def test_a_reason_is_required(storage: Storage) -> None:
    artifact = make_artifact()
    await storage.artifacts.put(artifact, expect_manifest=None)
    with pytest.raises(ValueError, match="reason"):
        await storage.artifacts.mark_unavailable(
            artifact.artifact_id, "", expect_manifest=artifact.manifest_digest
        )
