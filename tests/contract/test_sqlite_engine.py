"""What only the SQLite backend promises: its file, its migrations, its locking.

The seam contracts are in the other suites of this folder; these tests open the file
with plain `sqlite3` to check what the engine itself holds and how it behaves when
another connection or process holds its write lock.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlite_utils import Database as SqliteUtilsDatabase

from prebake.core.errors import FailedPrecondition, Unavailable
from prebake.server.job_lifecycle import JobLifecycle, lease_number
from prebake.server.records import JobPurpose, JobState, WorkerRecord
from prebake.server.storage import ArtifactQuery
from prebake.server.storage.sqlite import SchemaTooNew, open_sqlite, rows, schema
from prebake.server.storage.sqlite.connection import Database
from prebake.server.storage.sqlite.job_queue import _SNAPSHOT_EXCLUDES
from tests.contract.samples import (
    FILES,
    NEURON,
    PRODUCER,
    SIGNATURE,
    START,
    make_artifact,
    make_evaluation_job,
    make_job,
    make_key,
)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "registry.sqlite3"


def raw(path: Path) -> closing[sqlite3.Connection]:
    """A second, plain connection (autocommit) for what is on disk."""
    return closing(sqlite3.connect(path, isolation_level=None))


def _autocommit_db(path: Path) -> SqliteUtilsDatabase:
    return SqliteUtilsDatabase(sqlite3.connect(path, isolation_level=None), execute_plugins=False)


# --- the file ----------------------------------------------------------------------------


def test_connections_use_wal_normal_sync_foreign_keys_and_a_busy_timeout(db_path: Path) -> None:
    db = Database(db_path, START, busy_timeout_ms=1234)
    try:
        pragmas = ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")

        def read_pragmas(c: sqlite3.Connection) -> list[Any]:
            return [next(iter(c.execute(f"PRAGMA {name}").fetchone().values())) for name in pragmas]

        assert db.write_sync(read_pragmas) == ["wal", 1, 1, 1234]  # synchronous 1: NORMAL
        with db.read() as c:
            assert read_pragmas(c) == ["wal", 1, 1, 1234]
            with pytest.raises(sqlite3.OperationalError, match="readonly"):
                c.execute("DELETE FROM artifacts")
    finally:
        db.close()


def test_the_database_itself_refuses_a_second_active_job(db_path: Path) -> None:
    async def create() -> str:
        storage = open_sqlite(db_path)
        try:
            job, _ = await storage.jobs.create_if_absent(make_job())
            return job.job_id
        finally:
            storage.close()

    job_id = asyncio.run(create())
    with raw(db_path) as conn:
        copy = "INSERT INTO jobs SELECT 'j-copy', key_digest, {} FROM jobs WHERE job_id = ?"
        columns = [row[1] for row in conn.execute("PRAGMA table_info(jobs)")][2:]
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
            conn.execute(copy.format(", ".join(columns)), (job_id,))
        # A finished copy is fine: only active jobs are unique per key.
        conn.execute(copy.format(", ".join(columns).replace("state", "'failed'")), (job_id,))


async def test_every_call_after_close_is_unavailable(db_path: Path) -> None:
    storage = open_sqlite(db_path)
    assert await storage.artifacts.get("0" * 32) is None  # this thread has a read connection now
    storage.close()
    storage.close()  # idempotent
    calls = [
        storage.artifacts.get("0" * 32),
        storage.artifacts.list_page(ArtifactQuery(), "", 1),
        storage.jobs.get("j-" + "0" * 24),
        storage.workers.workers(START),
        storage.artifacts.put(make_artifact(), expect_manifest=None),
        storage.jobs.create_if_absent(make_job()),
    ]
    for call in calls:
        with pytest.raises(Unavailable, match="closed"):
            await call


# --- migrations ----------------------------------------------------------------------------


def _applied(path: Path) -> list[tuple[int, str, float]]:
    with raw(path) as conn:
        return list(conn.execute("SELECT version, description, applied_at FROM schema_migrations"))


def test_migrations_apply_once_and_reopening_is_a_noop(db_path: Path) -> None:
    Database(db_path, START).close()
    first = _applied(db_path)
    assert [row[0] for row in first] == [v for v, _, _ in schema.MIGRATIONS] == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert {row[2] for row in first} == {START}
    Database(db_path, START + 3600).close()
    assert _applied(db_path) == first


def test_processes_opening_one_fresh_file_at_once_apply_each_migration_once(db_path: Path) -> None:
    barrier = threading.Barrier(8, timeout=60)
    errors: list[BaseException] = []

    def open_it() -> None:
        try:
            barrier.wait()
            Database(db_path, START).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert [row[0] for row in _applied(db_path)] == [v for v, _, _ in schema.MIGRATIONS]


def test_later_migrations_apply_in_order_and_only_once(tmp_path: Path) -> None:
    def add_notes(db: SqliteUtilsDatabase) -> None:
        db.table("notes").create({"id": int, "text": str}, pk="id")

    n = len(schema.MIGRATIONS)
    more: list[schema.Migration] = [
        *schema.MIGRATIONS,
        (n + 1, "notes", add_notes),
        (n + 2, "seed", "INSERT INTO notes (id, text) VALUES (1, 'hi');"),
    ]
    db = _autocommit_db(tmp_path / "m.db")
    assert schema.migrate(db, 1.0, schema.MIGRATIONS[:1]) == [1]
    assert schema.migrate(db, 2.0, more) == list(range(2, n + 3))
    assert schema.migrate(db, 3.0, more) == []
    assert list(db.query("SELECT text FROM notes")) == [{"text": "hi"}]
    assert [row["version"] for row in schema.applied_migrations(db)] == list(range(1, n + 3))


def test_a_failing_migration_leaves_the_previous_version(tmp_path: Path) -> None:
    def broken(db: SqliteUtilsDatabase) -> None:
        db.execute("CREATE TABLE half_done (id INTEGER)")
        raise RuntimeError("step failed")

    db = _autocommit_db(tmp_path / "m.db")
    with pytest.raises(RuntimeError, match="step failed"):
        schema.migrate(db, 1.0, [*schema.MIGRATIONS, (len(schema.MIGRATIONS) + 1, "broken", broken)])
    assert schema.current_version(db) == len(schema.MIGRATIONS)
    assert "half_done" not in db.table_names()


def test_migration_versions_must_be_contiguous(tmp_path: Path) -> None:
    db = _autocommit_db(tmp_path / "m.db")
    with pytest.raises(ValueError, match="without gaps"):
        schema.migrate(db, 1.0, [*schema.MIGRATIONS, (len(schema.MIGRATIONS) + 2, "skips", "SELECT 1")])
    assert "schema_migrations" not in db.table_names()


def test_a_database_from_a_newer_prebake_is_refused(db_path: Path) -> None:
    Database(db_path, START).close()
    with raw(db_path) as conn:
        conn.execute("INSERT INTO schema_migrations VALUES (999, 'from the future', 0)")
    with pytest.raises(
        SchemaTooNew, match=rf"schema version 999.*knows versions up to {len(schema.MIGRATIONS)}"
    ) as info:
        open_sqlite(db_path)
    assert isinstance(info.value, FailedPrecondition)
    assert str(db_path) in str(info.value)


async def test_a_version_1_database_gains_job_revisions_and_workers(db_path: Path) -> None:
    # A file as the version-1 registry left it: a job with three events (snapshots of
    # every column but the key's), an artifact, no revisions, no workers table.
    db_path.parent.mkdir(parents=True)
    v1 = _autocommit_db(db_path)
    assert schema.migrate(v1, START, schema.MIGRATIONS[:1]) == [1]
    job = make_job(max_attempts=4)
    history = [
        replace(job, updated_at=START + 1),
        replace(job, state=JobState.LEASED, worker="w1", attempts=1, fencing_token=1, updated_at=START + 2),
        replace(job, state=JobState.QUEUED, worker="w1", attempts=1, fencing_token=1, updated_at=START + 3),
    ]
    for sequence, version in enumerate(history, start=1):
        row = rows.job_row(version)
        del row["revision"], row["request_id"]  # added by migrations 2 and 6
        for added in ("purpose", "evaluation", "evaluation_id", "flight"):  # by migration 9
            del row[added]
        if sequence == 1:
            v1.table("jobs").insert(row)
        else:
            v1.table("jobs").update(job.job_id, row)
        snapshot = {name: value for name, value in row.items() if name not in _SNAPSHOT_EXCLUDES}
        v1.execute(
            "INSERT INTO job_events (job_id, sequence, at, snapshot) VALUES (?, ?, ?, ?)",
            [job.job_id, sequence, version.updated_at, json.dumps(snapshot)],
        )
    artifact = make_artifact(make_key(batch_size=1))
    v1_row = rows.artifact_row(artifact)
    del v1_row["signature"], v1_row["unavailable"]  # added by migrations 3 and 4
    v1.table("artifacts").insert(v1_row)
    for f in artifact.files:
        v1.table("artifact_files").insert(
            {
                "artifact_id": artifact.artifact_id,
                "path": f.path,
                "hash": f.digest.hash,
                "size": f.digest.size,
                "executable": int(f.executable),
            }
        )
    v1.conn.close()

    storage = open_sqlite(db_path)
    try:
        assert [row[0] for row in _applied(db_path)] == [v for v, _, _ in schema.MIGRATIONS]
        stored = await storage.jobs.get(job.job_id)
        assert stored is not None and (stored.revision, stored.state, stored.worker) == (
            3,
            JobState.QUEUED,
            "w1",
        )
        events = await storage.jobs.events(job.job_id)
        assert [(e.sequence, e.job.revision, e.job.state) for e in events] == [
            (1, 1, JobState.QUEUED),
            (2, 2, JobState.LEASED),
            (3, 3, JobState.QUEUED),
        ]
        assert events[-1].job == stored
        assert await storage.artifacts.get(artifact.artifact_id) == artifact
        # Migration 5 seeds the kept counts from the rows already there.
        counts = await storage.artifacts.counts()
        assert (counts.artifacts, counts.pinned_artifacts) == (1, 0)
        # Migration 6: lifetime totals start at zero; old jobs have no request id.
        assert (counts.lifetime_lookups, counts.lifetime_hits) == (0, 0)
        assert stored.request_id == ""
        assert counts.jobs_by_state == {**{s.value: 0 for s in JobState}, "queued": 1}

        # The lifecycle carries on where the old registry stopped: events continue at 4.
        lifecycle = JobLifecycle(storage.artifacts, storage.jobs, clock=lambda: START + 100)
        leased = await lifecycle.lease("w2", [NEURON], now=START + 100)
        assert leased is not None and (leased.revision, leased.attempts) == (4, 2)
        # A token from before random low bits (a plain count, 1) is still below the next one.
        assert leased.fencing_token > 1 and lease_number(leased.fencing_token) == 1
        assert [e.sequence for e in await storage.jobs.events(job.job_id)] == [1, 2, 3, 4]
        record = WorkerRecord("w2", (NEURON,), START + 100, START + 130)
        await storage.workers.put_worker(record)
        assert await storage.workers.workers(START + 100) == [record]
    finally:
        storage.close()


async def test_a_version_8_database_gains_evaluation_jobs_and_its_jobs_read_as_compiles(
    db_path: Path,
) -> None:
    db_path.parent.mkdir(parents=True)
    v8 = _autocommit_db(db_path)
    assert schema.migrate(v8, START, schema.MIGRATIONS[:8]) == list(range(1, 9))
    job = make_job(request_id="req-old")
    row = rows.job_row(replace(job, revision=1))
    for added in ("purpose", "evaluation", "evaluation_id", "flight"):
        del row[added]
    v8.table("jobs").insert(row)
    v8.conn.close()

    storage = open_sqlite(db_path)
    try:
        assert [v for v, _, _ in _applied(db_path)][-1] == 9
        stored = await storage.jobs.get(job.job_id)
        assert stored == replace(job, revision=1)
        assert stored.purpose is JobPurpose.COMPILE and stored.flight == job.key.digest
        assert await storage.jobs.active(job.key.digest) == stored
        # Single flight still holds for the old compile job; an evaluation of the key does not join it.
        joined, created = await storage.jobs.create_if_absent(make_job(job.key, at=START + 1))
        assert not created and joined == stored
        evaluation, created = await storage.jobs.create_if_absent(make_evaluation_job(job.key, at=START + 2))
        assert created and evaluation.purpose is JobPurpose.EVALUATE
    finally:
        storage.close()


async def test_a_version_2_database_gains_signatures_and_its_artifacts_read_unsigned(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    v2 = _autocommit_db(db_path)
    assert schema.migrate(v2, START, schema.MIGRATIONS[:2]) == [1, 2]
    artifact = make_artifact()
    row = rows.artifact_row(artifact)
    del row["signature"], row["unavailable"]  # added by migrations 3 and 4
    v2.table("artifacts").insert(row)
    v2.table("artifact_files").insert_all(
        {
            "artifact_id": artifact.artifact_id,
            "path": f.path,
            "hash": f.digest.hash,
            "size": f.digest.size,
            "executable": int(f.executable),
        }
        for f in artifact.files
    )
    v2.conn.close()
    storage = open_sqlite(db_path)
    try:
        assert [row[0] for row in _applied(db_path)] == [v for v, _, _ in schema.MIGRATIONS]
        stored = await storage.artifacts.get(artifact.artifact_id)
        assert stored == artifact and stored.signature is None
        signed = replace(make_artifact(make_key(batch_size=2)), signature=SIGNATURE)
        await storage.artifacts.put(signed, expect_manifest=None)
        assert await storage.artifacts.get(signed.artifact_id) == signed
    finally:
        storage.close()


# --- locking ---------------------------------------------------------------------------------


@contextmanager
def write_lock_held_by_another_process(path: Path) -> Iterator[None]:
    """A child process that takes the write lock (BEGIN IMMEDIATE) and keeps it until
    its stdin closes; entered once it holds the lock."""
    script = (
        "import sqlite3, sys\n"
        f"conn = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
        "conn.execute('BEGIN IMMEDIATE')\n"
        "conn.execute('UPDATE artifacts SET hit_count = 99')\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"
        "conn.execute('ROLLBACK')\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "locked\n"
        yield
    finally:
        assert child.stdin is not None
        child.stdin.close()
        assert child.wait(60) == 0


async def test_lookups_are_answered_while_another_connection_holds_the_write_lock(db_path: Path) -> None:
    # 200 ms: a read that had to wait for the lock would fail as Unavailable here
    # rather than merely be slow.
    storage = open_sqlite(db_path, busy_timeout_ms=200)
    try:
        artifact = make_artifact()
        await storage.artifacts.put(artifact, expect_manifest=None)
        job, _ = await storage.jobs.create_if_absent(make_job(make_key(batch_size=2)))
        with raw(db_path) as writer:
            writer.execute("BEGIN IMMEDIATE")
            writer.execute("UPDATE artifacts SET hit_count = 99")
            writer.execute("DELETE FROM artifact_files")
            for _ in range(20):
                # The committed snapshot, not the writer's uncommitted changes.
                assert await storage.artifacts.get(artifact.artifact_id) == artifact
            assert await storage.jobs.get(job.job_id) == job
            assert await storage.jobs.active(job.key.digest) == job
            assert [
                a.artifact_id for a in (await storage.artifacts.list_page(ArtifactQuery(), "", 5)).items
            ] == [artifact.artifact_id]
            assert await storage.artifacts.is_referenced(FILES[0].digest)
            writer.execute("ROLLBACK")
    finally:
        storage.close()


async def test_a_write_while_another_process_holds_the_lock_is_unavailable(db_path: Path) -> None:
    storage = open_sqlite(db_path, busy_timeout_ms=200)
    lifecycle = JobLifecycle(storage.artifacts, storage.jobs, clock=lambda: START)
    try:
        first = make_artifact()
        await storage.artifacts.put(first, expect_manifest=None)
        key = make_key(batch_size=3)
        with write_lock_held_by_another_process(db_path):
            attempts = [
                storage.artifacts.put(make_artifact(key), expect_manifest=None),
                lifecycle.publish(key, FILES, PRODUCER),
                lifecycle.create_or_join(key),
                lifecycle.set_pinned(first.artifact_id, True),
                storage.artifacts.record_hits({first.artifact_id: (1, START)}),
                storage.workers.put_worker(WorkerRecord("w", (NEURON,), START, START + 30)),
            ]
            for attempt in attempts:
                with pytest.raises(Unavailable, match="busy") as info:
                    await attempt
                assert not isinstance(info.value, sqlite3.Error)
            with pytest.raises(Unavailable):  # opening needs the lock to check migrations
                open_sqlite(db_path, busy_timeout_ms=200)
            # Reads still answer meanwhile.
            assert await storage.artifacts.get(first.artifact_id) == first
        # Nothing was changed, and the same storage writes again once the lock is free.
        assert await storage.artifacts.get(key.digest) is None
        assert await storage.jobs.active(key.digest) is None
        assert await storage.artifacts.get(first.artifact_id) == first
        assert await storage.workers.workers(START) == []
        assert (await lifecycle.publish(key, FILES, PRODUCER))[1]
    finally:
        storage.close()
