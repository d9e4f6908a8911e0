"""The storage backends every contract suite runs against.

`BACKENDS` is the parameter list of the suites: a name and a factory that, given the
requesting test, returns a `Backend` over a fresh, empty engine. Adding a backend is
one entry here (and its `Backend` class); the suites themselves know no engine.

A `Backend` is a picklable description of where the engine is, so that child processes
(`tests.contract.agents`) open their own `Storage` on the same engine, plus the few
engine-specific inspections the suites need to check what no seam method reveals
(orphan rows left behind by a torn write).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import boto3
import pytest

from prebake.server.backends import archived
from prebake.server.blobs import LocalObjectStore
from prebake.server.storage.bundle import Storage
from prebake.server.storage.dynamodb import TableNames, create_tables, open_dynamodb
from prebake.server.storage.dynamodb.items import decode_files
from prebake.server.storage.sqlite import open_sqlite
from tests.aws_emulator import REGION, Emulator


class Backend(Protocol):
    """One engine under test. Instances must be picklable (they travel to child processes)."""

    @property
    def name(self) -> str: ...

    def open(self) -> Storage:
        """A new `Storage` on this engine (callable in any process, any number of times)."""
        ...

    def file_rows(self) -> dict[str, int]:
        """Stored file records per artifact id, read from the engine itself, bypassing
        the seams: ids without an artifact row show up here too (orphans)."""
        ...

    def evaluation_rows(self) -> dict[str, int]:
        """Stored evaluation records per artifact id, read from the engine itself, counted
        whether or not they still count (orphans show up here)."""
        ...


@dataclass(frozen=True)
class SqliteBackend:
    path: Path

    @property
    def name(self) -> str:
        return "sqlite"

    def open(self) -> Storage:
        return open_sqlite(self.path)

    def file_rows(self) -> dict[str, int]:
        with closing(sqlite3.connect(self.path)) as conn:
            found = conn.execute("SELECT artifact_id, COUNT(*) FROM artifact_files GROUP BY artifact_id")
            return {str(artifact_id): int(n) for artifact_id, n in found}

    def evaluation_rows(self) -> dict[str, int]:
        with closing(sqlite3.connect(self.path)) as conn:
            found = conn.execute("SELECT artifact_id, COUNT(*) FROM evaluations GROUP BY artifact_id")
            return {str(artifact_id): int(n) for artifact_id, n in found}


@dataclass(frozen=True)
class ArchivedSqliteBackend(SqliteBackend):
    """SQLite behind the manifest archive (`storage.archived_index`), as every server runs it:
    the decorator must keep the index's whole contract."""

    objects: Path

    @property
    def name(self) -> str:
        return "sqlite+archive"

    def open(self) -> Storage:
        return archived(open_sqlite(self.path), LocalObjectStore(self.objects))


def _sqlite(request: pytest.FixtureRequest) -> Backend:
    tmp_path: Path = request.getfixturevalue("tmp_path")
    return SqliteBackend(tmp_path / "registry" / "registry.sqlite3")


@dataclass(frozen=True)
class DynamoBackend:
    """Tables of a fresh prefix on the serial emulator (its conditional writes are atomic)."""

    emulator: Emulator
    prefix: str

    @property
    def name(self) -> str:
        return "dynamodb"

    def open(self) -> Storage:
        # Child processes may have started before any AWS fixture: point them at the emulator.
        self.emulator.apply()
        return open_dynamodb(self.prefix)

    def _client(self) -> Any:
        return boto3.client("dynamodb", endpoint_url=self.emulator.endpoint, region_name=REGION)

    def file_rows(self) -> dict[str, int]:
        rows: dict[str, int] = {}
        client = self._client()
        pages = client.get_paginator("scan").paginate(
            TableName=TableNames(self.prefix).artifacts, ConsistentRead=True
        )
        for page in pages:
            for item in page["Items"]:
                rows[item["artifact_id"]["S"]] = len(decode_files(item["files"]["B"]))
        return rows

    def evaluation_rows(self) -> dict[str, int]:
        rows: dict[str, int] = {}
        pages = (
            self._client()
            .get_paginator("scan")
            .paginate(TableName=TableNames(self.prefix).evaluations, ConsistentRead=True)
        )
        for page in pages:
            for item in page["Items"]:
                artifact_id = item["artifact_id"]["S"]
                rows[artifact_id] = rows.get(artifact_id, 0) + 1
        return rows

    def drop(self) -> None:
        client = self._client()
        names = TableNames(self.prefix)
        for name in (names.artifacts, names.blob_refs, names.jobs, names.workers, names.evaluations):
            client.delete_table(TableName=name)


def _dynamodb(request: pytest.FixtureRequest) -> Backend:
    emulator: Emulator = request.getfixturevalue("aws_serial")
    backend = DynamoBackend(emulator, emulator.unique_name("prebake-test"))
    create_tables(backend.prefix)
    request.addfinalizer(backend.drop)
    return backend


def _archived_sqlite(request: pytest.FixtureRequest) -> Backend:
    tmp_path: Path = request.getfixturevalue("tmp_path")
    return ArchivedSqliteBackend(tmp_path / "registry" / "registry.sqlite3", tmp_path / "objects")


BACKENDS: dict[str, Callable[[pytest.FixtureRequest], Backend]] = {
    "dynamodb": _dynamodb,
    "sqlite": _sqlite,
    "sqlite+archive": _archived_sqlite,
}
