"""`prebake reindex`, `prebake migrate` and `prebake init-aws` on local backends: real servers on
data directories, the real command line (in process), no AWS.

The same commands against S3 and DynamoDB are in test_ops_aws.py.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

from prebake.client import ArtifactKey, Client
from prebake.core.errors import FailedPrecondition
from prebake.server import backends
from prebake.server.app import background_server
from prebake.server.blobs.cas import blob_key
from prebake.server.config import ServerConfig
from prebake.server.records import Digest
from prebake.v1 import registry_pb2
from tests.conftest import LLAMA3_8B_INF2, make_artifact_dir, tree
from tests.plugin_cli import PrebakeCli

Snapshot = dict[str, tuple[object, ...]]


def key(n: int) -> ArtifactKey:
    return dataclasses.replace(LLAMA3_8B_INF2, sequence_length=1024 * (n + 1))


def snapshot(client: Client) -> Snapshot:
    """Every artifact as reindex and migrate must keep it (counters aside)."""
    found: Snapshot = {}
    for listed in client.iter_artifacts():
        a = client.get_artifact(listed.artifact_id)
        found[a.artifact_id] = (
            a.key.SerializeToString(deterministic=True),
            tuple((f.path, f.digest.hash, f.digest.size_bytes, f.executable) for f in a.files),
            a.created_at.ToNanoseconds(),
            a.pinned,
            a.producer.SerializeToString(deterministic=True),
            a.manifest_digest,
        )
    return found


def populate(client: Client, tmp: Path, count: int = 3) -> list[registry_pb2.Artifact]:
    """`count` artifacts (the first pinned, the second hit twice), and one more deleted again."""
    published = []
    for n in range(count + 1):
        source = make_artifact_dir(tmp / f"src{n}", {"model.neff": 4096 + n, f"cfg/{n}.json": 100}, seed=n)
        published.append(client.publish(source, key(n)).artifact)
    client.pin_artifact(published[0].artifact_id)
    for _ in range(2):
        assert client.lookup(key(1), on_miss="report").status == registry_pb2.LOOKUP_STATUS_HIT
    client.delete_artifact(published[count].artifact_id)
    return published[:count]


def forget_registry(data_dir: Path) -> None:
    for path in data_dir.glob("registry.sqlite3*"):
        path.unlink()


# --- reindex -------------------------------------------------------------------------------


def test_reindex_restores_a_lost_registry_with_the_same_ids_files_times_and_pins(
    tmp_path: Path, prebake: PrebakeCli
) -> None:
    data = tmp_path / "data"
    with background_server(data) as server, Client(server.address) as client:
        populate(client, tmp_path)
        before = snapshot(client)
        refused = prebake("reindex", "--data-dir", str(data))
        assert refused.code == 1 and "is in use by another prebake server" in refused.err
    assert len(before) == 3 and sum(1 for s in before.values() if s[3]) == 1
    forget_registry(data)
    done = prebake("reindex", "--data-dir", str(data))
    assert done.code == 0, done.err
    assert "reindex: 3 archived artifacts: 3 restored, 0 already present" in done.out
    with background_server(data) as server, Client(server.address) as client:
        assert snapshot(client) == before
        hit = client.lookup(key(2), on_miss="report")
        assert hit.status == registry_pb2.LOOKUP_STATUS_HIT
        client.fetch(hit.artifact, tmp_path / "dest")
        assert tree(tmp_path / "dest") == tree(tmp_path / "src2")
    again = prebake("reindex", "--data-dir", str(data))
    assert again.code == 0, again.err
    assert "3 archived artifacts: 0 restored, 3 already present" in again.out


def test_reindex_reports_artifacts_with_missing_blobs_and_unreadable_manifests(
    tmp_path: Path, prebake: PrebakeCli
) -> None:
    data = tmp_path / "data"
    with background_server(data) as server, Client(server.address) as client:
        kept, broken = populate(client, tmp_path, count=2)
        client.pin_artifact(kept.artifact_id, False)
    lost = broken.files[0].digest
    (data / "cas" / blob_key(Digest(lost.hash, lost.size_bytes))).unlink()
    garbage = data / "cas" / "manifests" / ("0" * 32) / ("1" * 32 + ".json")
    garbage.parent.mkdir(parents=True)
    garbage.write_text("{}")
    forget_registry(data)
    done = prebake("reindex", "--data-dir", str(data))
    assert done.code == 1
    assert f"not restored: artifact {broken.artifact_id}: 1 blob(s) missing from the store" in done.out
    assert f"unreadable: manifests/{'0' * 32}/{'1' * 32}.json: not a manifest archive object" in done.out
    assert "1 restored" in done.out
    with background_server(data) as server, Client(server.address) as client:
        assert set(snapshot(client)) == {kept.artifact_id}


# --- migrate -------------------------------------------------------------------------------


def test_migrate_copies_a_local_installation_and_copies_nothing_the_second_time(
    tmp_path: Path, prebake: PrebakeCli
) -> None:
    source, target = tmp_path / "data", tmp_path / "new"
    with background_server(source) as server, Client(server.address) as client:
        populate(client, tmp_path)
        before = snapshot(client)
        refused = prebake("migrate", "--from", str(source), "--to-data-dir", str(target))
        assert refused.code == 1 and "is in use by another prebake server" in refused.err
    with background_server(source) as server, Client(server.address) as client:
        hits = {a.artifact_id: a.hit_count for a in client.iter_artifacts()}
        blobs = client.get_stats()
    assert sorted(hits.values()) == [0, 0, 2]
    done = prebake("migrate", "--from", str(source), "--to-data-dir", str(target))
    assert done.code == 0, done.err
    assert "artifacts 3 seen: 3 copied, 0 already present" in done.out
    assert "0 already present, 0 failed" in done.out
    with background_server(target) as server, Client(server.address) as client:
        assert snapshot(client) == before
        assert {a.artifact_id: a.hit_count for a in client.iter_artifacts()} == hits
        assert client.get_stats().blobs == blobs.blobs
        hit = client.lookup(key(0), on_miss="report")
        client.fetch(hit.artifact, tmp_path / "dest")
        assert tree(tmp_path / "dest") == tree(tmp_path / "src0")
    again = prebake("migrate", "--from", str(source), "--to-data-dir", str(target))
    assert again.code == 0, again.err
    assert "0 copied (0 bytes)" in again.out and "artifacts 3 seen: 0 copied, 3 already present" in again.out
    # The copies' manifests were archived at the destination: its registry can be rebuilt too.
    forget_registry(target)
    rebuilt = prebake("reindex", "--data-dir", str(target))
    assert rebuilt.code == 0 and "3 restored" in rebuilt.out


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        ([], 2, "name the destination"),
        (["--to-store", "s3://bucket/p"], 2, "the destination's registry would be on local disk"),
        (["--to-registry", "dynamodb://t"], 2, "the destination's blobs would be on local disk"),
        (["--to-store", "file:///x", "--to-registry", "dynamodb://t"], 2, "is not an s3:// URL"),
        (["--to-data-dir", "{tmp}/new"], 1, "is not a prebake data directory"),
    ],
)
def test_migrate_refuses_unclear_or_impossible_runs(
    tmp_path: Path, prebake: PrebakeCli, args: list[str], code: int, message: str
) -> None:
    ran = prebake("migrate", "--from", str(tmp_path / "nothing"), *(a.format(tmp=tmp_path) for a in args))
    assert ran.code == code and message in ran.err, ran.err
    assert not (tmp_path / "new").exists()


def test_migrate_into_its_own_data_dir_is_refused(tmp_path: Path, prebake: PrebakeCli) -> None:
    data = tmp_path / "data"
    with background_server(data) as server, Client(server.address) as client:
        populate(client, tmp_path, count=1)
    ran = prebake("migrate", "--from", str(data), "--to-data-dir", str(data))
    assert ran.code == 1 and "the source itself" in ran.err


# --- init-aws and the AWS extra --------------------------------------------------------------


def test_init_aws_needs_something_to_prepare(prebake: PrebakeCli) -> None:
    ran = prebake("init-aws")
    assert ran.code == 2 and "name what to prepare" in ran.err


def test_a_missing_aws_extra_is_reported_with_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(sys.modules):
        if name.partition(".")[0] in ("boto3", "botocore") or name.startswith(
            ("prebake.server.blobs.s3_objects", "prebake.server.storage.dynamodb")
        ):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "boto3", None)
    monkeypatch.setitem(sys.modules, "botocore", None)
    config = ServerConfig(data_dir=Path("unused"), store="s3://bucket/p", registry="dynamodb://t")
    for open_it, module in (
        (backends.open_object_store, "prebake.server.blobs.s3_objects"),
        (backends.open_registry, "prebake.server.storage.dynamodb"),
    ):
        present = importlib.util.find_spec(module) is not None
        expected = (
            "needs the AWS extra: pip install 'prebake[aws]'" if present else "is not part of this prebake"
        )
        with pytest.raises(FailedPrecondition, match=expected.replace("[", r"\[").replace("]", r"\]")):
            open_it(config)


def test_local_backends_keep_state_in_the_data_dir_unless_both_are_remote() -> None:
    local = ServerConfig()
    assert backends.keeps_local_state(local)
    assert backends.keeps_local_state(dataclasses.replace(local, store="s3://bucket/p"))
    assert backends.keeps_local_state(dataclasses.replace(local, registry="dynamodb://t"))
    assert not backends.keeps_local_state(
        dataclasses.replace(local, store="s3://bucket/p", registry="dynamodb://t")
    )


@pytest.mark.parametrize("command", ["init-aws", "reindex", "migrate"])
def test_the_operations_commands_are_plugins_with_help(prebake: PrebakeCli, command: str) -> None:
    ran = prebake(command, "--help")
    assert ran.code == 0
    assert ran.out.startswith(f"usage: prebake {command}") and "examples:" in ran.out
    assert "not installed here" not in prebake("--help").out.split(command, 1)[1].splitlines()[0]
