"""`serve`, `init-aws`, `reindex` and `migrate` on S3 and DynamoDB: moto in server mode (the
serial one: one request at a time), reached only through boto3 over HTTP.

Skipped where the S3 or DynamoDB backend is not part of the installation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from prebake.client import Client
from prebake.core.errors import FailedPrecondition
from prebake.server.app import background_server
from prebake.v1 import registry_pb2
from tests.aws_emulator import REGION, Emulator
from tests.conftest import tree
from tests.plugin_cli import PrebakeCli
from tests.processes import ServerProcess
from tests.test_ops import key, populate, snapshot

pytest.importorskip("prebake.server.blobs.s3_objects")
pytest.importorskip("prebake.server.storage.dynamodb")

TABLE_SUFFIXES = ("artifacts", "blob-refs", "jobs", "workers", "evaluations")


@dataclasses.dataclass(frozen=True)
class Aws:
    emulator: Emulator
    bucket: str
    store: str
    registry: str

    def fresh_registry(self, stem: str = "other") -> str:
        return f"dynamodb://{self.emulator.unique_name(stem)}"

    def manifest_keys(self) -> list[str]:
        s3 = boto3.client("s3", endpoint_url=self.emulator.endpoint, region_name=REGION)
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix="p/manifests/")
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@pytest.fixture
def aws(aws_serial: Emulator, prebake: PrebakeCli) -> Aws:
    """A fresh bucket and table set, prepared with `prebake init-aws`."""
    bucket = aws_serial.create_bucket()
    made = Aws(aws_serial, bucket, f"s3://{bucket}/p", f"dynamodb://{aws_serial.unique_name('ops')}")
    ran = prebake("init-aws", "--store", made.store, "--registry", made.registry)
    assert ran.code == 0, ran.err
    return made


@pytest.fixture
def served(aws: Aws, tmp_path: Path) -> Iterator[Client]:
    with (
        background_server(tmp_path / "data", store=aws.store, registry=aws.registry) as server,
        Client(server.address) as client,
    ):
        yield client


def test_init_aws_creates_the_tables_once_and_checks_the_bucket(
    aws_serial: Emulator, prebake: PrebakeCli
) -> None:
    bucket = aws_serial.create_bucket()
    prefix = aws_serial.unique_name("init")
    args = ("init-aws", "--store", f"s3://{bucket}/p", "--registry", f"dynamodb://{prefix}")
    first = prebake(*args)
    assert first.code == 0, first.err
    lines = first.out.splitlines()
    assert lines[0].startswith(f"bucket s3://{bucket}/p/ in region") and lines[0].endswith(": ok")
    assert lines[1:] == [f"table {prefix}-{suffix}: created" for suffix in TABLE_SUFFIXES]
    again = prebake(*args)
    assert again.code == 0, again.err
    assert again.out.splitlines()[1:] == [f"table {prefix}-{suffix}: exists" for suffix in TABLE_SUFFIXES]


def test_init_aws_and_serve_refuse_a_missing_bucket(aws: Aws, prebake: PrebakeCli, tmp_path: Path) -> None:
    missing = f"s3://{aws.emulator.unique_name('nobucket')}/p"
    ran = prebake("init-aws", "--store", missing)
    assert ran.code == 1 and "does not exist" in ran.err
    with (
        pytest.raises(FailedPrecondition, match="does not exist"),
        background_server(tmp_path / "data", store=missing, registry=aws.registry),
    ):
        pass


def test_serve_refuses_missing_tables_and_creates_them_when_asked(aws: Aws, tmp_path: Path) -> None:
    tables = aws.fresh_registry("serve")
    with (
        pytest.raises(FailedPrecondition, match="init-aws"),
        background_server(tmp_path / "data", store=aws.store, registry=tables),
    ):
        pass
    server = ServerProcess(
        tmp_path, "create", ["--store", aws.store, "--registry", tables, "--create-tables"]
    )
    try:
        server.wait_ready()
        with Client(server.address) as client:
            assert client.get_stats().artifacts == 0
        assert f"table {tables.removeprefix('dynamodb://')}-artifacts: created" in server.log()
    finally:
        server.stop()


def test_replicas_on_one_bucket_and_table_set_share_a_data_dir(aws: Aws, tmp_path: Path) -> None:
    data = tmp_path / "shared"
    with (
        background_server(data, store=aws.store, registry=aws.registry) as a,
        background_server(data, store=aws.store, registry=aws.registry) as b,
        Client(a.address) as on_a,
        Client(b.address) as on_b,
    ):
        published = populate(on_a, tmp_path, count=1)[0]
        assert on_b.lookup(key(0), on_miss="report").status == registry_pb2.LOOKUP_STATUS_HIT
        assert not (data / "server.lock").exists()
    assert aws.manifest_keys() == [f"p/manifests/{published.artifact_id}/{published.manifest_digest}.json"]


def test_reindex_restores_every_artifact_into_an_empty_table_set(
    aws: Aws, served: Client, prebake: PrebakeCli, tmp_path: Path
) -> None:
    populate(served, tmp_path)
    before = snapshot(served)
    fresh = aws.fresh_registry("reindexed")
    assert prebake("init-aws", "--registry", fresh).code == 0
    done = prebake("reindex", "--store", aws.store, "--registry", fresh)
    assert done.code == 0, done.err
    assert "reindex: 3 archived artifacts: 3 restored, 0 already present" in done.out
    with (
        background_server(tmp_path / "restored", store=aws.store, registry=fresh) as server,
        Client(server.address) as client,
    ):
        assert snapshot(client) == before
        client.fetch(client.lookup(key(1), on_miss="report").artifact, tmp_path / "dest")
        assert tree(tmp_path / "dest") == tree(tmp_path / "src1")
    again = prebake("reindex", "--store", aws.store, "--registry", fresh)
    assert again.code == 0 and "0 restored, 3 already present" in again.out


def test_migrate_a_local_installation_into_s3_and_dynamodb(
    aws: Aws, prebake: PrebakeCli, tmp_path: Path
) -> None:
    source = tmp_path / "data"
    with background_server(source) as server, Client(server.address) as client:
        populate(client, tmp_path)
        before = snapshot(client)
    with background_server(source) as server, Client(server.address) as client:
        hits = {a.artifact_id: a.hit_count for a in client.iter_artifacts()}
    args = ("migrate", "--from", str(source), "--to-store", aws.store, "--to-registry", aws.registry)
    done = prebake(*args)
    assert done.code == 0, done.err
    assert "artifacts 3 seen: 3 copied, 0 already present" in done.out
    again = prebake(*args)
    assert again.code == 0, again.err
    assert "0 copied (0 bytes)" in again.out and "artifacts 3 seen: 0 copied, 3 already present" in again.out
    with (
        background_server(tmp_path / "replica", store=aws.store, registry=aws.registry) as server,
        Client(server.address) as client,
    ):
        assert snapshot(client) == before
        assert {a.artifact_id: a.hit_count for a in client.iter_artifacts()} == hits
        client.fetch(client.lookup(key(2), on_miss="report").artifact, tmp_path / "dest")
        assert tree(tmp_path / "dest") == tree(tmp_path / "src2")
    assert len(aws.manifest_keys()) == 3
    # A replica on S3 and DynamoDB keeps no registry or blobs of its own.
    assert not (tmp_path / "replica" / "registry.sqlite3").exists()
    assert not (tmp_path / "replica" / "cas").exists()
