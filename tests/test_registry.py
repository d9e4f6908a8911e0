"""Behaviour of the SQLite registry: migrations, artifacts, jobs, single flight."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlite_utils import Database

from prebake.core.digests import hash_bytes
from prebake.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from prebake.server.records import (
    Digest,
    ErrorClass,
    FileEntry,
    Job,
    JobState,
    NormalizedKey,
    Producer,
)
from prebake.server.registry import Registry, SchemaTooNew, schema
from prebake.server.registry.registry import manifest_digest, retry_backoff

# --- helpers ---------------------------------------------------------------------------


class Clock:
    """A settable clock; every registry call sees `now`."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def make_key(**overrides: Any) -> NormalizedKey:
    """A NormalizedKey built by hand: canonical JSON of the fields, digest = its xxh3-128."""
    fields: dict[str, Any] = {
        "schema_version": 1,
        "kind": "neuron",
        "model": "meta-llama/Meta-Llama-3-8B",
        "model_revision": "rev-a",
        "instance_type": "ml.inf2.48xlarge",
        "compile_target": "inf2",
        "sequence_length": 8192,
        "batch_size": 8,
        "tensor_parallel_degree": 24,
        "precision": "bf16",
        "toolchain": "neuronx-cc 2.x",
        "options": (("optlevel", "2"),),
        "relevant_fields": ("model", "model_revision", "sequence_length", "batch_size"),
        "ignored_fields": (),
    }
    fields.update(overrides)
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return NormalizedKey(**fields, canonical=canonical, digest=hash_bytes(canonical.encode()))


def blob(name: str, size: int = 100) -> Digest:
    return Digest(hash_bytes(name.encode()), size)


def entry(path: str, content: str | None = None, size: int = 100, executable: bool = False) -> FileEntry:
    return FileEntry(path=path, digest=blob(content or path, size), executable=executable)


FILES = (entry("model.neff", size=4096), entry("config.json", size=12), entry("bin/run.sh", executable=True))
PRODUCER = Producer(
    worker="worker-1",
    toolchain_versions=(("neuronx-cc", "2.15.1"), ("torch", "2.13.0")),
    compile_seconds=812.5,
    log=blob("log-1", 2048),
    note="compiled on inf2",
)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "registry.db"


@pytest.fixture
def reg(db_path: Path, clock: Clock) -> Iterator[Registry]:
    with Registry(db_path, clock=clock) as registry:
        yield registry


def raw(db_path: Path) -> sqlite3.Connection:
    """A second, plain connection for inspecting what is on disk."""
    return sqlite3.connect(db_path)


def table_counts(db_path: Path) -> dict[str, int]:
    with raw(db_path) as conn:
        return {
            table: conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            for table in ("artifacts", "artifact_files", "jobs", "job_events")
        }


def event_sequences(reg: Registry, job_id: str) -> list[int]:
    return [event.sequence for event in reg.job_events(job_id)]


# --- schema and migrations ---------------------------------------------------------------


def test_migrations_apply_once_and_reopen_is_a_noop(db_path: Path, clock: Clock) -> None:
    Registry(db_path, clock=clock).close()
    with raw(db_path) as conn:
        first = conn.execute("SELECT version, description, applied_at FROM schema_migrations").fetchall()
    assert [row[0] for row in first] == [v for v, _, _ in schema.MIGRATIONS]
    assert first[0][2] == clock.now

    clock.advance(3600)
    Registry(db_path, clock=clock).close()
    with raw(db_path) as conn:
        again = conn.execute("SELECT version, description, applied_at FROM schema_migrations").fetchall()
    assert again == first


def test_connection_uses_wal_normal_sync_and_foreign_keys(reg: Registry, db_path: Path) -> None:
    with raw(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn = reg._conn
    assert conn.execute("PRAGMA synchronous").fetchone()["synchronous"] == 1  # NORMAL
    assert conn.execute("PRAGMA foreign_keys").fetchone()["foreign_keys"] == 1
    assert conn.execute("PRAGMA busy_timeout").fetchone()["timeout"] > 0


def _autocommit_db(path: Path) -> Database:
    return Database(sqlite3.connect(path, isolation_level=None), execute_plugins=False)


def test_later_migrations_apply_in_order_and_only_once(tmp_path: Path) -> None:
    def add_notes(db: Database) -> None:
        db.table("notes").create({"id": int, "text": str}, pk="id")

    v2: list[schema.Migration] = [*schema.MIGRATIONS, (2, "notes", add_notes)]
    v3: list[schema.Migration] = [*v2, (3, "seed", "INSERT INTO notes (id, text) VALUES (1, 'hi');")]
    db = _autocommit_db(tmp_path / "m.db")

    assert schema.migrate(db, 1.0) == [1]
    assert schema.migrate(db, 2.0, v3) == [2, 3]
    assert schema.migrate(db, 3.0, v3) == []
    assert list(db.query("SELECT text FROM notes")) == [{"text": "hi"}]
    assert [row["version"] for row in schema.applied_migrations(db)] == [1, 2, 3]


def test_failing_migration_leaves_previous_version(tmp_path: Path) -> None:
    def broken(db: Database) -> None:
        db.execute("CREATE TABLE half_done (id INTEGER)")
        raise RuntimeError("step failed")

    db = _autocommit_db(tmp_path / "m.db")
    with pytest.raises(RuntimeError, match="step failed"):
        schema.migrate(db, 1.0, [*schema.MIGRATIONS, (2, "broken", broken)])
    assert schema.current_version(db) == 1
    assert "half_done" not in db.table_names()


def test_migration_versions_must_be_contiguous(tmp_path: Path) -> None:
    db = _autocommit_db(tmp_path / "m.db")
    with pytest.raises(ValueError, match="without gaps"):
        schema.migrate(db, 1.0, [*schema.MIGRATIONS, (5, "skips", "SELECT 1")])


def test_database_from_a_newer_prebake_is_refused(db_path: Path, clock: Clock) -> None:
    Registry(db_path, clock=clock).close()
    with raw(db_path) as conn:
        conn.execute("INSERT INTO schema_migrations VALUES (999, 'from the future', 0)")
    with pytest.raises(SchemaTooNew, match=r"schema version 999.*knows versions up to 1") as info:
        Registry(db_path, clock=clock)
    assert isinstance(info.value, FailedPrecondition)
    assert str(db_path) in str(info.value)


# --- publish and read ----------------------------------------------------------------------


def test_publish_then_get_round_trips(reg: Registry, clock: Clock) -> None:
    key = make_key(options=(("optlevel", "3"), ("fast-math", "on")), ignored_fields=("x",))
    artifact, created, completed = reg.publish(key, FILES, PRODUCER)
    assert created and completed == []

    stored = reg.get_artifact(key.digest)
    assert stored == artifact
    assert stored.key == key
    assert stored.files == tuple(sorted(FILES, key=lambda f: f.path))
    assert stored.producer == PRODUCER
    assert stored.artifact_id == key.digest
    assert (stored.file_count, stored.total_size) == (3, 4096 + 12 + 100)
    assert (stored.created_at, stored.last_accessed_at) == (clock.now, clock.now)
    assert not stored.pinned and stored.hit_count == 0
    assert stored.manifest_digest == manifest_digest(FILES)

    listed = reg.get_artifact(key.digest, with_files=False)
    assert listed is not None and listed.files == () and listed.file_count == 3
    assert reg.get_artifact("0" * 32) is None


def test_producer_without_log_round_trips(reg: Registry) -> None:
    key = make_key()
    reg.publish(key, FILES, Producer())
    stored = reg.get_artifact(key.digest)
    assert stored is not None and stored.producer == Producer()


def test_manifest_digest_ignores_order_but_not_content() -> None:
    assert manifest_digest(FILES) == manifest_digest(tuple(reversed(FILES)))
    flipped = (replace(FILES[0], executable=True), *FILES[1:])
    assert manifest_digest(flipped) != manifest_digest(FILES)


def test_republishing_the_same_files_is_idempotent(reg: Registry, clock: Clock) -> None:
    key = make_key()
    first, _, _ = reg.publish(key, FILES, PRODUCER)
    clock.advance(60)
    again, created, completed = reg.publish(key, tuple(reversed(FILES)), Producer(worker="other"))
    assert not created and completed == []
    assert again == first
    assert reg.get_artifact(key.digest) == first


def test_different_file_list_is_refused_and_changes_nothing(reg: Registry, db_path: Path) -> None:
    key = make_key()
    first, _, _ = reg.publish(key, FILES, PRODUCER)
    before = table_counts(db_path)
    job, _ = reg.create_or_join_job(key)

    with pytest.raises(AlreadyExists, match=rf"artifact {key.digest} .*manifest {first.manifest_digest}"):
        reg.publish(key, (*FILES, entry("extra.bin")), PRODUCER)
    assert reg.get_artifact(key.digest) == first
    assert reg.get_job(job.job_id) == job
    assert table_counts(db_path) == {**before, "jobs": 1, "job_events": 1}


def test_replace_swaps_the_files_and_keeps_the_pin(reg: Registry, clock: Clock) -> None:
    key = make_key()
    reg.publish(key, FILES, PRODUCER)
    reg.set_pinned(key.digest, True)
    reg.record_hits({key.digest: (5, clock.now)})
    clock.advance(10)
    new_files = (entry("model.neff", "v2", size=5000),)

    artifact, created, _ = reg.publish(key, new_files, Producer(worker="w2"), replace=True)
    assert created
    assert reg.get_artifact(key.digest) == artifact
    assert artifact.files == new_files and artifact.file_count == 1 and artifact.total_size == 5000
    assert artifact.producer == Producer(worker="w2")
    assert artifact.pinned and artifact.hit_count == 0 and artifact.created_at == clock.now


def test_publish_completes_active_jobs_and_appends_events(reg: Registry, clock: Clock) -> None:
    key = make_key()
    job, _ = reg.create_or_join_job(key)
    leased = reg.lease_job("w1", ["neuron"])
    assert leased is not None and leased.job_id == job.job_id
    clock.advance(5)

    artifact, created, completed = reg.publish(key, FILES, PRODUCER)
    assert created
    assert [j.job_id for j in completed] == [job.job_id]
    done = completed[0]
    assert done.state is JobState.SUCCEEDED and done.artifact_id == artifact.artifact_id
    assert done.finished_at == clock.now and done.lease_expires_at is None
    assert reg.get_job(job.job_id) == done
    assert reg.active_job(key.digest) is None
    events = reg.job_events(job.job_id)
    assert [e.job.state for e in events] == [JobState.QUEUED, JobState.LEASED, JobState.SUCCEEDED]
    assert events[-1].job == done


def test_idempotent_republish_still_completes_a_job_that_raced_it(reg: Registry) -> None:
    key = make_key()
    reg.publish(key, FILES, PRODUCER)
    job, _ = reg.create_or_join_job(key)  # e.g. a lookup that missed just before the publish
    _, created, completed = reg.publish(key, FILES, PRODUCER)
    assert not created
    assert [j.job_id for j in completed] == [job.job_id]
    assert completed[0].state is JobState.SUCCEEDED


def test_failed_publish_stores_nothing(reg: Registry, db_path: Path) -> None:
    key = make_key()
    job, _ = reg.create_or_join_job(key)
    before = table_counts(db_path)
    # The artifact row and the first file go in before the repeated path breaks the
    # primary key: everything must be rolled back, the job included.
    files = (entry("a.bin"), entry("b.bin"), entry("b.bin", "other"))
    with pytest.raises(InvalidArgument, match=r"repeated: b\.bin"):
        reg.publish(key, files, PRODUCER)
    assert table_counts(db_path) == before
    assert reg.get_artifact(key.digest) is None
    assert reg.get_job(job.job_id) == job
    # The connection is usable afterwards.
    assert reg.publish(key, FILES, PRODUCER)[1]


def test_publish_without_files_is_invalid(reg: Registry) -> None:
    with pytest.raises(InvalidArgument, match="at least one file"):
        reg.publish(make_key(), (), PRODUCER)


# --- delete, pin, list, hits, nearest, counts ---------------------------------------------


def test_delete_returns_only_blobs_nothing_else_uses(reg: Registry) -> None:
    shared = entry("shared.bin", "shared")
    job_log = blob("job-log", 77)
    a, b = make_key(batch_size=1), make_key(batch_size=2)
    reg.publish(
        a, (shared, entry("a-only.bin"), entry("a-log-as-file", "job-log", 77)), Producer(log=blob("a-log"))
    )
    reg.publish(b, (shared, entry("b-only.bin")), Producer(log=blob("a-log")))
    job, _ = reg.create_or_join_job(make_key(batch_size=3))
    reg.fail_job(job.job_id, "boom", ErrorClass.DETERMINISTIC, log=job_log)

    freed_a = reg.delete_artifact(a.digest)
    # shared is still used by b, the producer log by b's producer, job-log by the job.
    assert freed_a == [entry("a-only.bin").digest]
    assert reg.get_artifact(a.digest) is None
    assert reg.blob_referenced(shared.digest) and reg.blob_referenced(job_log)

    freed_b = reg.delete_artifact(b.digest)
    assert freed_b == sorted([shared.digest, entry("b-only.bin").digest, blob("a-log")])
    assert not reg.blob_referenced(shared.digest)
    assert reg.blob_referenced(job_log)

    with pytest.raises(NotFound, match=f"artifact {a.digest} not found"):
        reg.delete_artifact(a.digest)


def test_pinned_artifact_is_deleted_only_with_force(reg: Registry) -> None:
    key = make_key()
    reg.publish(key, FILES, PRODUCER)
    pinned = reg.set_pinned(key.digest, True)
    assert pinned.pinned and pinned.files == tuple(sorted(FILES, key=lambda f: f.path))

    with pytest.raises(FailedPrecondition, match=f"artifact {key.digest} is pinned; unpin it or pass force"):
        reg.delete_artifact(key.digest)
    assert reg.get_artifact(key.digest) is not None
    assert len(reg.delete_artifact(key.digest, force=True)) == len(FILES) + 1  # files and the log
    assert reg.get_artifact(key.digest) is None


def test_set_pinned_unknown_artifact(reg: Registry) -> None:
    with pytest.raises(NotFound):
        reg.set_pinned("f" * 32, True)
    key = make_key()
    reg.publish(key, FILES, PRODUCER)
    reg.set_pinned(key.digest, True)
    assert not reg.set_pinned(key.digest, False).pinned


def test_list_artifacts_filters_orders_and_pages(reg: Registry, clock: Clock) -> None:
    keys = []
    for i in range(5):
        clock.advance(1)
        key = make_key(kind="awq" if i % 2 else "neuron", model=f"m{i % 3}", batch_size=i)
        reg.publish(key, FILES, PRODUCER)
        keys.append(key)
    reg.set_pinned(keys[1].digest, True)
    reg.set_pinned(keys[4].digest, True)

    def ids(**kwargs: Any) -> list[str]:
        return [a.artifact_id for a in reg.list_artifacts(**kwargs)]

    newest_first = [k.digest for k in reversed(keys)]
    assert ids() == newest_first
    assert all(a.files == () and a.file_count == 3 for a in reg.list_artifacts())
    assert ids(kind="awq") == [keys[3].digest, keys[1].digest]
    assert ids(model="m1") == [keys[4].digest, keys[1].digest]
    assert ids(kind="neuron", model="m1") == [keys[4].digest]
    assert ids(pinned_only=True) == [keys[4].digest, keys[1].digest]
    assert ids(limit=2) == newest_first[:2]
    assert ids(limit=2, offset=2) == newest_first[2:4]
    assert ids(limit=2, offset=4) == newest_first[4:]
    assert ids(model="nobody") == []
    with pytest.raises(InvalidArgument):
        reg.list_artifacts(limit=-1)


def test_same_created_at_ties_break_on_id(reg: Registry) -> None:
    keys = [make_key(batch_size=i) for i in range(4)]
    for key in keys:
        reg.publish(key, FILES, PRODUCER)
    assert [a.artifact_id for a in reg.list_artifacts()] == sorted(k.digest for k in keys)


def test_record_hits_adds_counts_and_never_moves_access_time_back(reg: Registry, clock: Clock) -> None:
    a, b = make_key(batch_size=1), make_key(batch_size=2)
    reg.publish(a, FILES, PRODUCER)
    reg.publish(b, FILES, PRODUCER)
    start = clock.now

    reg.record_hits({a.digest: (3, start + 10), b.digest: (1, start + 5), "0" * 32: (9, start)})
    reg.record_hits({a.digest: (2, start + 1)})
    reg.record_hits({})
    stored_a, stored_b = reg.get_artifact(a.digest), reg.get_artifact(b.digest)
    assert stored_a is not None and stored_b is not None
    assert (stored_a.hit_count, stored_a.last_accessed_at) == (5, start + 10)
    assert (stored_b.hit_count, stored_b.last_accessed_at) == (1, start + 5)


def test_nearest_orders_by_differing_fields_then_newest(reg: Registry, clock: Clock) -> None:
    wanted = make_key(batch_size=8, sequence_length=8192)

    def publish(**overrides: Any) -> str:
        clock.advance(1)
        key = make_key(**overrides)
        reg.publish(key, FILES, PRODUCER)
        return key.digest

    one_off_old = publish(batch_size=4)
    two_off = publish(batch_size=4, sequence_length=4096)
    three_off = publish(batch_size=4, precision="fp16", options=())
    one_off_new = publish(toolchain="neuronx-cc 3.x")
    publish(model="another/model")  # other model: never near
    publish(kind="awq")  # other kind: never near
    reg.publish(wanted, FILES, PRODUCER)  # the key itself is excluded

    near = [a.artifact_id for a in reg.nearest(wanted)]
    assert near == [one_off_new, one_off_old, two_off, three_off]
    assert [a.artifact_id for a in reg.nearest(wanted, limit=2)] == [one_off_new, one_off_old]
    assert all(a.files == () for a in reg.nearest(wanted))
    # instance_type is not compared (compile_target stands for it).
    assert reg.nearest(make_key(model="nobody")) == []


def test_counts(reg: Registry) -> None:
    assert reg.counts().artifacts == 0
    assert reg.counts().jobs_by_state == {s.value: 0 for s in JobState}
    for i in range(3):
        reg.publish(make_key(batch_size=i), FILES, PRODUCER)
    reg.set_pinned(make_key(batch_size=0).digest, True)
    reg.create_or_join_job(make_key(batch_size=10))
    cancelled, _ = reg.create_or_join_job(make_key(batch_size=11))
    reg.cancel_job(cancelled.job_id)
    reg.create_or_join_job(make_key(batch_size=12))
    reg.lease_job("w", ["neuron"])

    counts = reg.counts()
    assert (counts.artifacts, counts.pinned_artifacts) == (3, 1)
    assert counts.jobs_by_state == {"queued": 1, "leased": 1, "succeeded": 0, "failed": 0, "cancelled": 1}


# --- jobs ----------------------------------------------------------------------------------


def test_create_then_join(reg: Registry, clock: Clock) -> None:
    key = make_key()
    job, created = reg.create_or_join_job(key, model_source="s3://bucket/llama", max_attempts=5)
    assert created
    assert job.job_id.startswith("j-") and len(job.job_id) == 26 and int(job.job_id[2:], 16) >= 0
    assert job.job_id[2:] == job.job_id[2:].lower()
    assert (job.state, job.key, job.model_source, job.max_attempts) == (
        JobState.QUEUED,
        key,
        "s3://bucket/llama",
        5,
    )
    assert (job.created_at, job.updated_at, job.finished_at) == (clock.now, clock.now, None)

    clock.advance(1)
    joined, created_again = reg.create_or_join_job(key, model_source="elsewhere")
    assert not created_again and joined == job
    assert reg.get_job(job.job_id) == job
    assert reg.active_job(key.digest) == job
    assert reg.get_job("j-" + "0" * 24) is None
    assert event_sequences(reg, job.job_id) == [1]


def _single_flight_worker(
    db_path: Path, key: NormalizedKey, barrier: threading.Barrier, out: list[Any]
) -> None:
    try:
        with Registry(db_path) as registry:
            barrier.wait()
            out.append(registry.create_or_join_job(key))
    except BaseException as exc:
        out.append(exc)


def _run_threads(target: Callable[..., None], args: list[tuple[Any, ...]]) -> None:
    threads = [threading.Thread(target=target, args=a) for a in args]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)


def test_single_flight_with_200_registries_on_one_file(db_path: Path) -> None:
    key = make_key()
    barrier = threading.Barrier(200, timeout=60)
    results: list[Any] = []
    _run_threads(_single_flight_worker, [(db_path, key, barrier, results)] * 200)

    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    assert len(results) == 200
    assert sum(created for _, created in results) == 1
    assert len({job.job_id for job, _ in results}) == 1
    with Registry(db_path) as registry:
        assert len(registry.list_jobs(limit=1000)) == 1


def test_200_distinct_keys_make_200_jobs(db_path: Path) -> None:
    barrier = threading.Barrier(200, timeout=60)
    results: list[Any] = []
    _run_threads(
        _single_flight_worker, [(db_path, make_key(batch_size=i), barrier, results) for i in range(200)]
    )

    assert [r for r in results if isinstance(r, BaseException)] == []
    assert all(created for _, created in results)
    assert len({job.job_id for job, _ in results}) == 200
    with Registry(db_path) as registry:
        assert registry.counts().jobs_by_state["queued"] == 200


def _process_worker(db_path: Path, key: NormalizedKey, calls: int) -> list[tuple[str, bool]]:
    with Registry(db_path) as registry:
        return [
            (job.job_id, created) for job, created in (registry.create_or_join_job(key) for _ in range(calls))
        ]


def test_single_flight_across_processes(db_path: Path) -> None:
    key = make_key()
    context = multiprocessing.get_context("spawn")
    with context.Pool(4) as pool:
        batches = pool.starmap(_process_worker, [(db_path, key, 25)] * 4)
    results = [r for batch in batches for r in batch]
    assert len(results) == 100
    assert sum(created for _, created in results) == 1
    assert len({job_id for job_id, _ in results}) == 1


def test_the_database_itself_refuses_a_second_active_job(reg: Registry, db_path: Path) -> None:
    job, _ = reg.create_or_join_job(make_key())
    with raw(db_path) as conn:
        copy = "INSERT INTO jobs SELECT 'j-copy', key_digest, {} FROM jobs WHERE job_id = ?"
        columns = [row[1] for row in conn.execute("PRAGMA table_info(jobs)")][2:]
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
            conn.execute(copy.format(", ".join(columns)), (job.job_id,))
        # A finished copy is fine: only active jobs are unique per key.
        conn.execute(copy.format(", ".join(columns).replace("state", "'failed'")), (job.job_id,))


def test_one_registry_shared_by_many_threads(reg: Registry) -> None:
    keys = [make_key(batch_size=i % 10) for i in range(100)]
    results: list[Any] = []

    def work(key: NormalizedKey) -> None:
        job, _ = reg.create_or_join_job(key)
        results.append((job.job_id, reg.get_job(job.job_id) is not None, len(reg.job_events(job.job_id))))

    _run_threads(work, [(key,) for key in keys])
    assert len(results) == 100 and all(found and events == 1 for _, found, events in results)
    assert len({job_id for job_id, _, _ in results}) == 10


def test_a_finished_job_does_not_block_a_new_one(reg: Registry) -> None:
    key = make_key()
    first, _ = reg.create_or_join_job(key)
    reg.fail_job(first.job_id, "compiler rejected shape", ErrorClass.DETERMINISTIC)
    second, created = reg.create_or_join_job(key)
    assert created and second.job_id != first.job_id
    reg.cancel_job(second.job_id)
    third, created = reg.create_or_join_job(key)
    assert created and third.job_id not in {first.job_id, second.job_id}


def test_last_finished_job_is_the_most_recent_terminal_one(reg: Registry, clock: Clock) -> None:
    key = make_key()
    assert reg.last_finished_job(key.digest) is None
    first, _ = reg.create_or_join_job(key)
    reg.fail_job(first.job_id, "bad", ErrorClass.DETERMINISTIC)
    clock.advance(10)
    second, _ = reg.create_or_join_job(key)
    cancelled = reg.cancel_job(second.job_id, "no longer needed")
    clock.advance(10)
    reg.create_or_join_job(key)  # active, not finished
    assert reg.last_finished_job(key.digest) == cancelled


def test_list_jobs_filters_and_orders(reg: Registry, clock: Clock) -> None:
    jobs: list[Job] = []
    for i in range(4):
        clock.advance(1)
        jobs.append(reg.create_or_join_job(make_key(kind="awq" if i % 2 else "neuron", batch_size=i))[0])
    reg.cancel_job(jobs[0].job_id)

    def ids(**kwargs: Any) -> list[str]:
        return [j.job_id for j in reg.list_jobs(**kwargs)]

    newest_first = [j.job_id for j in reversed(jobs)]
    assert ids() == newest_first
    assert ids(states=[JobState.QUEUED]) == newest_first[:3]
    assert ids(states=[JobState.CANCELLED, JobState.LEASED]) == [jobs[0].job_id]
    assert ids(kind="awq") == [jobs[3].job_id, jobs[1].job_id]
    assert ids(kind="neuron", states=[JobState.QUEUED]) == [jobs[2].job_id]
    assert ids(limit=1, offset=1) == newest_first[1:2]


def test_cancel_semantics(reg: Registry, clock: Clock) -> None:
    job, _ = reg.create_or_join_job(make_key())
    clock.advance(3)
    cancelled = reg.cancel_job(job.job_id, "operator said so")
    assert cancelled.state is JobState.CANCELLED
    assert cancelled.error == "operator said so"
    assert cancelled.finished_at == clock.now == cancelled.updated_at
    assert reg.cancel_job(job.job_id, "again") == cancelled  # unchanged, no new event
    assert event_sequences(reg, job.job_id) == [1, 2]

    other, _ = reg.create_or_join_job(make_key(batch_size=1))
    assert reg.cancel_job(other.job_id).error == "cancelled"

    done, _ = reg.create_or_join_job(make_key(batch_size=2))
    reg.publish(make_key(batch_size=2), FILES, PRODUCER)
    with pytest.raises(FailedPrecondition, match=f"job {done.job_id} already succeeded; nothing to cancel"):
        reg.cancel_job(done.job_id)
    failed, _ = reg.create_or_join_job(make_key(batch_size=3))
    reg.fail_job(failed.job_id, "bad", ErrorClass.DETERMINISTIC)
    with pytest.raises(FailedPrecondition, match="already failed"):
        reg.cancel_job(failed.job_id)
    with pytest.raises(NotFound):
        reg.cancel_job("j-" + "1" * 24)


def test_cancelling_a_leased_job_stops_its_worker(reg: Registry) -> None:
    job, _ = reg.create_or_join_job(make_key())
    leased = reg.lease_job("w1", ["neuron"])
    assert leased is not None
    reg.cancel_job(job.job_id)
    with pytest.raises(FailedPrecondition, match="stop working on it"):
        reg.heartbeat(job.job_id, leased.fencing_token, 0.5, "compiling")


def test_transient_failure_requeues_with_backoff(reg: Registry, clock: Clock) -> None:
    key = make_key()
    job, _ = reg.create_or_join_job(key, max_attempts=2)
    assert reg.lease_job("w1", ["neuron"]) is not None  # attempt 1

    requeued = reg.fail_job(job.job_id, "worker OOM", ErrorClass.TRANSIENT, log=blob("log-a"))
    assert requeued.state is JobState.QUEUED
    assert requeued.not_before == clock.now + retry_backoff(1) == clock.now + 10
    assert (requeued.error, requeued.error_class, requeued.log) == (
        "worker OOM",
        ErrorClass.TRANSIENT,
        blob("log-a"),
    )
    assert requeued.finished_at is None and requeued.lease_expires_at is None
    assert reg.active_job(key.digest) == requeued

    assert reg.lease_job("w2", ["neuron"]) is None  # still backing off
    clock.advance(10)
    second = reg.lease_job("w2", ["neuron"])
    assert second is not None and second.attempts == 2

    final = reg.fail_job(job.job_id, "worker OOM again", ErrorClass.TRANSIENT)
    assert final.state is JobState.FAILED  # attempts exhausted
    assert final.finished_at == clock.now and final.log == blob("log-a")
    assert reg.active_job(key.digest) is None


def test_deterministic_failure_is_final_at_once(reg: Registry) -> None:
    job, _ = reg.create_or_join_job(make_key(), max_attempts=3)
    failed = reg.fail_job(job.job_id, "unsupported op", ErrorClass.DETERMINISTIC)
    assert failed.state is JobState.FAILED and failed.error_class is ErrorClass.DETERMINISTIC
    with pytest.raises(FailedPrecondition, match="already failed"):
        reg.fail_job(job.job_id, "again", ErrorClass.TRANSIENT)
    with pytest.raises(InvalidArgument):
        reg.fail_job(job.job_id, "no class", ErrorClass.NONE)
    with pytest.raises(NotFound):
        reg.fail_job("j-" + "2" * 24, "x", ErrorClass.TRANSIENT)


def test_backoff_grows_and_is_capped() -> None:
    assert [retry_backoff(a) for a in range(8)] == [5, 10, 20, 40, 80, 160, 300, 300]
    assert retry_backoff(10_000) == 300


def test_job_events_are_contiguous_snapshots(reg: Registry, clock: Clock) -> None:
    key = make_key()
    job, _ = reg.create_or_join_job(key)
    for _ in range(2):
        clock.advance(1)
        assert reg.lease_job("w", ["neuron"]) is not None
        clock.advance(1)
        reg.fail_job(job.job_id, "flaky", ErrorClass.TRANSIENT)
        clock.advance(60)
    leased = reg.lease_job("w", ["neuron"])
    assert leased is not None
    reg.heartbeat(job.job_id, leased.fencing_token, 0.5, "halfway")
    reg.publish(key, FILES, PRODUCER)

    events = reg.job_events(job.job_id)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert [e.job.state for e in events] == [
        JobState.QUEUED,
        JobState.LEASED,
        JobState.QUEUED,
        JobState.LEASED,
        JobState.QUEUED,
        JobState.LEASED,
        JobState.LEASED,  # progress
        JobState.SUCCEEDED,
    ]
    assert all(e.job.key == key and e.job_id == job.job_id for e in events)
    assert [e.at for e in events] == [e.job.updated_at for e in events]
    assert events[-1].job == reg.get_job(job.job_id)
    assert [e.sequence for e in reg.job_events(job.job_id, after_sequence=6)] == [7, 8]
    with pytest.raises(NotFound):
        reg.job_events("j-" + "3" * 24)


# --- worker protocol -------------------------------------------------------------------------


def test_lease_matches_capabilities_oldest_first(reg: Registry, clock: Clock) -> None:
    neuron, _ = reg.create_or_join_job(make_key())
    clock.advance(1)
    awq, _ = reg.create_or_join_job(make_key(kind="awq", compile_target="", toolchain="llmcompressor 0.14"))
    clock.advance(1)
    trn, _ = reg.create_or_join_job(make_key(compile_target="trn1"))

    assert reg.lease_job("cpu", ["inductor"]) is None
    assert reg.lease_job("old-sdk", ["neuron"], toolchains=["neuronx-cc 1.x"]) is None
    got = reg.lease_job("trn-host", ["neuron"], compile_targets=["trn1"], lease_seconds=30)
    assert got is not None and got.job_id == trn.job_id
    assert (got.state, got.worker, got.attempts, got.fencing_token) == (JobState.LEASED, "trn-host", 1, 1)
    assert got.lease_expires_at == clock.now + 30
    first = reg.lease_job("any", ["neuron", "awq"])
    assert first is not None and first.job_id == neuron.job_id
    second = reg.lease_job("any", ["neuron", "awq"])
    assert second is not None and second.job_id == awq.job_id
    assert reg.lease_job("any", ["neuron", "awq"]) is None
    with pytest.raises(InvalidArgument):
        reg.lease_job("nothing", [])


def test_heartbeat_extends_the_lease_under_the_current_token(reg: Registry, clock: Clock) -> None:
    job, _ = reg.create_or_join_job(make_key())
    leased = reg.lease_job("w1", ["neuron"], lease_seconds=60)
    assert leased is not None
    clock.advance(30)
    beat = reg.heartbeat(job.job_id, leased.fencing_token, 0.25, "compiling layer 3", lease_seconds=60)
    assert (beat.progress, beat.message, beat.lease_expires_at) == (0.25, "compiling layer 3", clock.now + 60)
    clock.advance(30)
    reg.heartbeat(job.job_id, leased.fencing_token, 0.25, "compiling layer 3")  # no change, no event
    assert event_sequences(reg, job.job_id) == [1, 2, 3]
    with pytest.raises(FailedPrecondition):
        reg.heartbeat(job.job_id, leased.fencing_token + 1, 0.5, "zombie")
    with pytest.raises(InvalidArgument):
        reg.heartbeat(job.job_id, leased.fencing_token, 1.5, "too far")


def test_expired_lease_goes_back_to_the_queue_and_fences_the_old_worker(reg: Registry, clock: Clock) -> None:
    job, _ = reg.create_or_join_job(make_key(), max_attempts=2)
    old = reg.lease_job("w1", ["neuron"], lease_seconds=60)
    assert old is not None
    clock.advance(59)
    assert reg.expire_leases() == []
    clock.advance(1)
    [expired] = reg.expire_leases()
    assert expired.state is JobState.QUEUED and "w1 stopped heartbeating" in expired.error

    clock.advance(retry_backoff(1))
    new = reg.lease_job("w2", ["neuron"])
    assert new is not None and new.fencing_token == old.fencing_token + 1
    with pytest.raises(FailedPrecondition):
        reg.heartbeat(job.job_id, old.fencing_token, 0.9, "I am back")
    clock.advance(60)
    [final] = reg.expire_leases()
    assert final.state is JobState.FAILED and final.error_class is ErrorClass.TRANSIENT
