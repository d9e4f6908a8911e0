"""The job and publish rules for artifacts marked unavailable (a blob lost; see
`prebake.server.integrity`), the same for every backend in `BACKENDS`: any publish of the key, and
the rebuild's completion, replace them and make the key available again."""

from __future__ import annotations

import pytest

from prebake.core.errors import AlreadyExists
from prebake.server.job_lifecycle import JobLifecycle
from prebake.server.records import JobState
from tests.contract.samples import FILES, NEURON, PRODUCER, Clock, entry, make_key


async def _unavailable(lifecycle: JobLifecycle, clock: Clock, *, pinned: bool = False) -> str:
    artifact, _, _ = await lifecycle.publish(make_key(), FILES, PRODUCER)
    if pinned:
        await lifecycle.set_pinned(artifact.artifact_id, True)
    marked = await lifecycle.artifacts.mark_unavailable(
        artifact.artifact_id, "blob lost", expect_manifest=artifact.manifest_digest
    )
    assert marked is not None and marked.unavailable == "blob lost"
    clock.advance(10)
    return artifact.artifact_id


async def test_republishing_the_same_files_makes_it_available(lifecycle: JobLifecycle, clock: Clock) -> None:
    artifact_id = await _unavailable(lifecycle, clock)
    stored, created, _ = await lifecycle.publish(make_key(), FILES, PRODUCER)
    assert created and stored.unavailable == "" and stored.created_at == clock.now
    assert await lifecycle.artifacts.get(artifact_id) == stored
    # From then on the same publish is idempotent again.
    _, created, _ = await lifecycle.publish(make_key(), FILES, PRODUCER)
    assert not created


async def test_other_files_replace_an_unavailable_artifact_without_replace(
    lifecycle: JobLifecycle, clock: Clock
) -> None:
    artifact_id = await _unavailable(lifecycle, clock, pinned=True)
    stored, created, _ = await lifecycle.publish(make_key(), (entry("rebuilt.bin"),), PRODUCER)
    assert created and stored.unavailable == "" and stored.pinned  # the pin is kept
    assert await lifecycle.artifacts.get(artifact_id) == stored
    # An available artifact is protected again.
    with pytest.raises(AlreadyExists):
        await lifecycle.publish(make_key(), FILES, PRODUCER)


async def test_the_rebuild_job_replaces_an_unavailable_artifact(
    lifecycle: JobLifecycle, clock: Clock
) -> None:
    artifact_id = await _unavailable(lifecycle, clock, pinned=True)
    job, created = await lifecycle.create_or_join(make_key(), message="rebuilding: blob lost")
    assert created
    leased = await lifecycle.lease("w1", [NEURON])
    assert leased is not None and leased.job_id == job.job_id
    artifact, [done] = await lifecycle.complete(job.job_id, leased.fencing_token, FILES, PRODUCER)
    assert artifact.unavailable == "" and artifact.pinned and artifact.created_at == clock.now
    assert await lifecycle.artifacts.get(artifact_id) == artifact
    assert done.state is JobState.SUCCEEDED and done.artifact_id == artifact_id
