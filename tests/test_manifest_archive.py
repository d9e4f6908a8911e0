"""The manifest archive: its format, and the `ArchivedArtifactIndex` that keeps it beside the index.

Over the real SQLite index and the real local object store (the same decorator runs over
DynamoDB and S3; the AWS tests in test_ops_aws.py use it there).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

from prebake.core.errors import Unavailable
from prebake.server import convert
from prebake.server.blobs import LocalObjectStore
from prebake.server.job_lifecycle import JobLifecycle
from prebake.server.manifest_archive import (
    FORMAT_VERSION,
    PREFIX,
    UnreadableManifest,
    decode,
    encode,
    manifest_key,
    parse_manifest_key,
)
from prebake.server.records import Artifact, ErrorClass
from prebake.server.storage import ConditionFailed, JobWrite
from prebake.server.storage.archived_index import ArchivedArtifactIndex
from prebake.server.storage.sqlite import open_sqlite
from tests.contract.samples import FILES, NEURON, START, Clock, entry, make_artifact, make_job, make_key

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class Setup:
    def __init__(self, tmp_path: Path) -> None:
        self.storage = open_sqlite(tmp_path / "registry.sqlite3")
        self.objects = LocalObjectStore(tmp_path / "cas")
        self.index = ArchivedArtifactIndex(self.storage.artifacts, self.objects)
        self.clock = Clock()
        self.lifecycle = JobLifecycle(self.index, self.storage.jobs, clock=self.clock)

    def archived(self) -> dict[str, Artifact]:
        """Every archive object, decoded, by key."""
        found = {}
        for info in self.objects.list_objects(PREFIX):
            with self.objects.path(info.key).open("rb") as f:
                found[info.key] = decode(f.read())
        return found


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    s = Setup(tmp_path)
    try:
        yield s
    finally:
        s.storage.close()


# --- the format ------------------------------------------------------------------------


def test_an_archived_manifest_restores_the_artifact_whole() -> None:
    key = make_key(options=(("fast-math", "on"), ("optlevel", "3")), ignored_fields=("batch_size",))
    artifact = replace(make_artifact(key, pinned=True, at=1_754_000_000.123456), hit_count=7)
    restored = decode(encode(artifact))
    # Counters are not archived: a restored artifact starts them afresh.
    assert restored == replace(artifact, hit_count=0, last_accessed_at=artifact.created_at)
    assert convert.timestamp(restored.created_at) == convert.timestamp(artifact.created_at)


def test_the_format_is_the_apis_artifact_message_in_json() -> None:
    artifact = make_artifact()
    document = json.loads(encode(artifact))
    assert document["format"] == FORMAT_VERSION
    assert document["artifact"]["artifact_id"] == artifact.artifact_id
    assert document["artifact"]["key"]["canonical"] == artifact.key.canonical
    assert [f["path"] for f in document["artifact"]["files"]] == [f.path for f in artifact.files]
    assert "hit_count" not in document["artifact"] and "last_accessed_at" not in document["artifact"]


def test_keys_name_the_artifact_and_its_manifest() -> None:
    artifact = make_artifact()
    key = manifest_key(artifact.artifact_id, artifact.manifest_digest)
    assert key == f"manifests/{artifact.artifact_id}/{artifact.manifest_digest}.json"
    assert parse_manifest_key(key) == (artifact.artifact_id, artifact.manifest_digest)
    assert parse_manifest_key("manifests/x/y.json") is None


def _tampered(change: str) -> bytes:
    document = json.loads(encode(make_artifact()))
    if change == "format":
        document["format"] = FORMAT_VERSION + 1
    elif change == "files":
        document["artifact"]["files"][0]["digest"]["size_bytes"] = "1"
    elif change == "id":
        document["artifact"]["artifact_id"] = "0" * 32
    elif change == "key":
        document["artifact"]["key"]["canonical"] += " "
    elif change == "path":
        document["artifact"]["files"][0]["path"] = "../etc/passwd"
    return json.dumps(document).encode()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{not json", "not JSON"),
        (b'{"format": 1}', "not a manifest archive object"),
        (_tampered("format"), "this prebake reads format 1"),
        (_tampered("files"), "does not match its files"),
        (_tampered("id"), "is not its key's digest"),
        (_tampered("key"), "digest is not the canonical text's"),
        (_tampered("path"), "path"),
    ],
)
def test_a_damaged_or_foreign_object_is_refused_with_the_reason(data: bytes, message: str) -> None:
    with pytest.raises(UnreadableManifest, match=message):
        decode(data)


# --- the decorator ---------------------------------------------------------------------


def test_a_publish_archives_the_manifest_before_the_index_holds_it(setup: Setup) -> None:
    stored, created, _ = run(setup.lifecycle.publish(make_key(), FILES, make_artifact().producer))
    assert created
    key = manifest_key(stored.artifact_id, stored.manifest_digest)
    assert setup.archived() == {key: replace(stored, last_accessed_at=stored.created_at)}


def test_a_delete_removes_the_archived_manifest(setup: Setup) -> None:
    stored, _, _ = run(setup.lifecycle.publish(make_key(), FILES, make_artifact().producer))
    run(setup.lifecycle.delete_artifact(stored.artifact_id))
    assert setup.archived() == {}
    assert run(setup.index.get(stored.artifact_id)) is None


def test_a_failed_conditional_create_leaves_no_stray_object(setup: Setup) -> None:
    first = make_artifact()
    run(setup.index.put(first, expect_manifest=None))
    other = make_artifact(files=(entry("other.bin"),), at=START + 5)
    with pytest.raises(ConditionFailed):
        run(setup.index.put(other, expect_manifest=None))
    assert list(setup.archived()) == [manifest_key(first.artifact_id, first.manifest_digest)]


def test_a_failed_write_keeps_an_object_that_the_index_holds(setup: Setup) -> None:
    first = make_artifact()
    run(setup.index.put(first, expect_manifest=None))
    # The same files again, as a racing publisher that lost would write them.
    with pytest.raises(ConditionFailed):
        run(setup.index.put(first, expect_manifest=None))
    assert setup.archived() == {manifest_key(first.artifact_id, first.manifest_digest): first}


def test_a_completion_refused_by_its_job_condition_leaves_no_stray_object(setup: Setup) -> None:
    job = run(setup.storage.jobs.create_if_absent(make_job()))[0]
    stale = JobWrite(replace(job, message="done"), expect_revision=job.revision + 5)
    with pytest.raises(ConditionFailed):
        run(setup.index.put(make_artifact(), expect_manifest=None, complete=stale))
    assert setup.archived() == {}
    assert run(setup.index.get(make_artifact().artifact_id)) is None


def test_a_zombie_workers_late_result_is_not_archived(setup: Setup) -> None:
    job, _ = run(setup.lifecycle.create_or_join(make_key()))
    leased = run(setup.lifecycle.lease("w1", [NEURON]))
    assert leased is not None
    run(setup.lifecycle.fail(job.job_id, "gone", ErrorClass.TRANSIENT))
    with pytest.raises(Exception, match="not leased"):
        run(setup.lifecycle.complete(job.job_id, leased.fencing_token, FILES, make_artifact().producer))
    assert setup.archived() == {}


def test_a_replace_archives_the_new_manifest_and_drops_the_old(setup: Setup) -> None:
    producer = make_artifact().producer
    old, _, _ = run(setup.lifecycle.publish(make_key(), FILES, producer))
    setup.clock.advance(10)
    new, created, _ = run(setup.lifecycle.publish(make_key(), (entry("v2.bin"),), producer, True))
    assert created and new.manifest_digest != old.manifest_digest
    assert list(setup.archived()) == [manifest_key(new.artifact_id, new.manifest_digest)]


def test_a_pin_change_is_archived(setup: Setup) -> None:
    stored, _, _ = run(setup.lifecycle.publish(make_key(), FILES, make_artifact().producer))
    key = manifest_key(stored.artifact_id, stored.manifest_digest)
    run(setup.lifecycle.set_pinned(stored.artifact_id, True))
    assert setup.archived()[key].pinned
    run(setup.lifecycle.set_pinned(stored.artifact_id, False))
    assert not setup.archived()[key].pinned


def test_a_pin_of_an_unknown_artifact_archives_nothing(setup: Setup) -> None:
    assert run(setup.index.set_pinned("0" * 32, True)) is None
    assert setup.archived() == {}


class _BrokenObjects(LocalObjectStore):
    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> Any:
        raise OSError("the disk went away")


def test_an_archive_that_cannot_be_written_publishes_nothing(tmp_path: Path) -> None:
    storage = open_sqlite(tmp_path / "registry.sqlite3")
    try:
        index = ArchivedArtifactIndex(storage.artifacts, _BrokenObjects(tmp_path / "cas"))
        with pytest.raises(Unavailable, match=r"could not archive the manifest.*nothing was published"):
            run(index.put(make_artifact(), expect_manifest=None))
        assert run(storage.artifacts.get(make_artifact().artifact_id)) is None
    finally:
        storage.close()
