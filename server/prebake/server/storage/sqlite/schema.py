"""Versioned schema migrations for the registry database.

`MIGRATIONS` is an append-only list of `(version, description, step)`; a step is SQL
(one or more statements) or a callable taking a `sqlite_utils.Database`. Versions
start at 1 and increase by one. `migrate` applies the pending steps in order, each in
its own `BEGIN IMMEDIATE` transaction together with its row in `schema_migrations`, so
a crash or a failing step leaves the database at the last fully applied version, and
several processes opening one fresh file at once apply every step exactly once.

Never edit a released migration: the schema of an existing database is the replay of
the steps it recorded, so a change is always a new step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlite_utils import Database

from prebake.core.errors import FailedPrecondition

MigrationStep = str | Callable[[Database], None]
Migration = tuple[int, str, MigrationStep]

# Job states that count as "in flight". The single-flight index and every query for the
# active job spell the predicate exactly like this, so that SQLite can use the index.
ACTIVE_STATES_SQL = "state IN ('queued', 'leased')"

# The columns that store a NormalizedKey, shared by `artifacts` and `jobs`. Tuple
# fields are JSON arrays; the digest is the table's own id column (artifact_id or
# key_digest).
KEY_COLUMNS: dict[str, type] = {
    "key_schema_version": int,
    "kind": str,
    "model": str,
    "model_revision": str,
    "instance_type": str,
    "compile_target": str,
    "sequence_length": int,
    "batch_size": int,
    "tensor_parallel_degree": int,
    "precision": str,
    "toolchain": str,
    "key_options": str,
    "key_relevant_fields": str,
    "key_ignored_fields": str,
    "key_canonical": str,
}


class SchemaTooNew(FailedPrecondition):
    """The database was written by a newer prebake than this one."""


def _create_artifacts(db: Database) -> None:
    columns: dict[str, type] = {
        "artifact_id": str,
        **KEY_COLUMNS,
        "manifest_digest": str,
        "file_count": int,
        "total_size": int,
        "producer": str,
        # The producer's log blob, outside the JSON so that reference checks are indexed.
        "log_hash": str,
        "log_size": int,
        "created_at": float,
        "last_accessed_at": float,
        "pinned": int,
        "hit_count": int,
    }
    nullable = {"log_hash", "log_size"}
    db.table("artifacts").create(
        columns,
        pk="artifact_id",
        not_null=set(columns) - nullable,
        defaults={"pinned": 0, "hit_count": 0},
        strict=True,
    )
    db.table("artifacts").create_index(["kind", "model"], index_name="artifacts_kind_model")
    db.table("artifacts").create_index(["created_at"], index_name="artifacts_created_at")


def _create_artifact_files(db: Database) -> None:
    columns: dict[str, type] = {
        "artifact_id": str,
        "path": str,
        "hash": str,
        "size": int,
        "executable": int,
    }
    db.table("artifact_files").create(
        columns,
        pk=("artifact_id", "path"),
        foreign_keys=[("artifact_id", "artifacts", "artifact_id")],
        not_null=set(columns),
        strict=True,
    )
    # Reference counting of blobs: "does any artifact still use (hash, size)?"
    db.table("artifact_files").create_index(["hash", "size"], index_name="artifact_files_blob")


def _create_jobs(db: Database) -> None:
    columns: dict[str, type] = {
        "job_id": str,
        "key_digest": str,
        **KEY_COLUMNS,
        "state": str,
        "attempts": int,
        "max_attempts": int,
        "progress": float,
        "message": str,
        "error": str,
        "error_class": str,
        "log_hash": str,
        "log_size": int,
        "artifact_id": str,
        "worker": str,
        "lease_expires_at": float,
        "fencing_token": int,
        "not_before": float,
        "model_source": str,
        "created_at": float,
        "updated_at": float,
        "finished_at": float,
    }
    nullable = {"log_hash", "log_size", "lease_expires_at", "finished_at"}
    db.table("jobs").create(columns, pk="job_id", not_null=set(columns) - nullable, strict=True)
    jobs = db.table("jobs")
    jobs.create_index(["state", "created_at"], index_name="jobs_state_created")
    jobs.create_index(["key_digest", "finished_at"], index_name="jobs_key_finished")
    jobs.create_index(["kind", "state"], index_name="jobs_kind_state")


def _create_job_events(db: Database) -> None:
    columns: dict[str, type] = {"job_id": str, "sequence": int, "at": float, "snapshot": str}
    db.table("job_events").create(
        columns,
        pk=("job_id", "sequence"),
        foreign_keys=[("job_id", "jobs", "job_id")],
        not_null=set(columns),
        strict=True,
    )


# Partial indexes are beyond sqlite-utils' index helper.
_PARTIAL_INDEXES_SQL = f"""
-- Single flight: at most one queued-or-leased job per key, whoever inserts it.
CREATE UNIQUE INDEX jobs_one_active_per_key ON jobs(key_digest) WHERE {ACTIVE_STATES_SQL};
-- Expiry scans touch leased jobs only.
CREATE INDEX jobs_lease_expiry ON jobs(lease_expires_at) WHERE state = 'leased';
-- Blob reference checks for logs.
CREATE INDEX jobs_log ON jobs(log_hash, log_size) WHERE log_hash IS NOT NULL;
CREATE INDEX artifacts_log ON artifacts(log_hash, log_size) WHERE log_hash IS NOT NULL;
"""


def _initial_schema(db: Database) -> None:
    _create_artifacts(db)
    _create_artifact_files(db)
    _create_jobs(db)
    _create_job_events(db)
    _run_step(db, _PARTIAL_INDEXES_SQL)


# Revision numbers let the job queue compare-and-set; existing jobs start at their last
# event's sequence, which is what the revision of every later event continues from.
_JOB_REVISIONS_AND_WORKERS_SQL = """
ALTER TABLE jobs ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;
UPDATE jobs SET revision = (SELECT COALESCE(MAX(sequence), 0) FROM job_events
                            WHERE job_events.job_id = jobs.job_id);
CREATE TABLE workers (
    worker_id TEXT PRIMARY KEY,
    capabilities TEXT NOT NULL,
    last_seen REAL NOT NULL,
    expires_at REAL NOT NULL
) STRICT;
CREATE INDEX jobs_queued ON jobs(created_at, job_id) WHERE state = 'queued';
"""

# The producer's signature (record_json.signature_json), NULL for an unsigned artifact.
_ARTIFACT_SIGNATURES_SQL = "ALTER TABLE artifacts ADD COLUMN signature TEXT;"


# Integrity sweep: why an artifact cannot be served ('' = it can); see prebake.server.integrity.
_ARTIFACT_UNAVAILABLE_SQL = "ALTER TABLE artifacts ADD COLUMN unavailable TEXT NOT NULL DEFAULT ''"


# GetStats in O(1): counts kept by triggers in the same transaction as every change, so
# they can never drift from the rows (a full COUNT took 340 ms at 1M artifacts). Jobs are
# never deleted; an artifact's replace is a DELETE and an INSERT, each counted.
_REGISTRY_COUNTS_SQL = """
CREATE TABLE registry_counts (name TEXT PRIMARY KEY, n INTEGER NOT NULL) STRICT;
INSERT INTO registry_counts SELECT 'artifacts', COUNT(*) FROM artifacts;
INSERT INTO registry_counts SELECT 'pinned', COUNT(*) FROM artifacts WHERE pinned != 0;
INSERT INTO registry_counts SELECT 'jobs:' || state, COUNT(*) FROM jobs GROUP BY state;
CREATE TRIGGER artifacts_counted_in AFTER INSERT ON artifacts BEGIN
    UPDATE registry_counts SET n = n + 1 WHERE name = 'artifacts';
    UPDATE registry_counts SET n = n + 1 WHERE name = 'pinned' AND NEW.pinned != 0;
END;
CREATE TRIGGER artifacts_counted_out AFTER DELETE ON artifacts BEGIN
    UPDATE registry_counts SET n = n - 1 WHERE name = 'artifacts';
    UPDATE registry_counts SET n = n - 1 WHERE name = 'pinned' AND OLD.pinned != 0;
END;
CREATE TRIGGER artifacts_pin_counted AFTER UPDATE OF pinned ON artifacts
WHEN (OLD.pinned != 0) != (NEW.pinned != 0) BEGIN
    UPDATE registry_counts SET n = n + CASE WHEN NEW.pinned != 0 THEN 1 ELSE -1 END
    WHERE name = 'pinned';
END;
CREATE TRIGGER jobs_counted_in AFTER INSERT ON jobs BEGIN
    INSERT INTO registry_counts (name, n) VALUES ('jobs:' || NEW.state, 1)
    ON CONFLICT (name) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER jobs_counted_out AFTER DELETE ON jobs BEGIN
    UPDATE registry_counts SET n = n - 1 WHERE name = 'jobs:' || OLD.state;
END;
CREATE TRIGGER jobs_state_counted AFTER UPDATE OF state ON jobs
WHEN OLD.state != NEW.state BEGIN
    UPDATE registry_counts SET n = n - 1 WHERE name = 'jobs:' || OLD.state;
    INSERT INTO registry_counts (name, n) VALUES ('jobs:' || NEW.state, 1)
    ON CONFLICT (name) DO UPDATE SET n = n + 1;
END;
"""


# Lifetime totals (`ArtifactIndex.record_lookups`, batched like hit counts) beside the
# trigger-kept counts, and the x-request-id of the lookup that created each job.
_LOOKUP_TOTALS_AND_REQUEST_IDS_SQL = """
INSERT INTO registry_counts (name, n) VALUES ('lifetime_lookups', 0), ('lifetime_hits', 0);
ALTER TABLE jobs ADD COLUMN request_id TEXT NOT NULL DEFAULT '';
"""


# Reads in index order instead of sorting: a keyset page ("newest first, then by id") and a
# model's or kind's newest artifacts (near misses, compatibility, filtered listings) cost the
# same at 1M artifacts as at 1k. They replace the single-column indexes they start with.
# The model's index also holds the key columns near misses compare (nearest.DISTANCE_FIELDS),
# so ranking a model's newest rows reads the index alone.
_NEWEST_FIRST_INDEXES_SQL = """
CREATE INDEX artifacts_newest ON artifacts(created_at DESC, artifact_id);
CREATE INDEX artifacts_model_newest ON artifacts(
    kind, model, created_at DESC, artifact_id,
    model_revision, compile_target, sequence_length, batch_size, tensor_parallel_degree,
    precision, toolchain, key_options
);
CREATE INDEX artifacts_kind_newest ON artifacts(kind, created_at DESC, artifact_id);
DROP INDEX artifacts_created_at;
DROP INDEX artifacts_kind_model;
"""


# Evaluations of artifacts (storage.evaluation_store), each one JSON text (record_json), with
# the columns its listings order and filter by. The trigger deletes them with their artifact in
# the same transaction: a delete, a replace (a DELETE and an INSERT) and an eviction alike.
_EVALUATIONS_SQL = """
CREATE TABLE evaluations (
    evaluation_id TEXT PRIMARY KEY,
    artifact_id TEXT NOT NULL REFERENCES artifacts(artifact_id),
    model TEXT NOT NULL,
    created_at REAL NOT NULL,
    body TEXT NOT NULL
) STRICT;
CREATE INDEX evaluations_newest ON evaluations(created_at DESC, evaluation_id);
CREATE INDEX evaluations_artifact_newest ON evaluations(artifact_id, created_at DESC, evaluation_id);
CREATE INDEX evaluations_model_newest ON evaluations(model, created_at DESC, evaluation_id);
CREATE TRIGGER artifacts_take_evaluations BEFORE DELETE ON artifacts BEGIN
    DELETE FROM evaluations WHERE artifact_id = OLD.artifact_id;
END;
"""


# Evaluation jobs in the compile queue: a job's purpose (old jobs are compile jobs), what an
# evaluation job runs (record_json.evaluation_spec_json, '' for compiles) and the evaluation it
# stored. Single flight moves from the key digest to the job's flight (`Job.flight`: the key
# digest for compiles, key and spec for evaluations), so an evaluation neither blocks nor joins
# a compile of its key. `ACTIVE_COMPILE_SQL` is what reads of "the key's active job" match.
_EVALUATION_JOBS_SQL = f"""
ALTER TABLE jobs ADD COLUMN purpose TEXT NOT NULL DEFAULT 'compile';
ALTER TABLE jobs ADD COLUMN evaluation TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN evaluation_id TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN flight TEXT NOT NULL DEFAULT '';
UPDATE jobs SET flight = key_digest;
DROP INDEX jobs_one_active_per_key;
CREATE UNIQUE INDEX jobs_one_active_per_flight ON jobs(flight) WHERE {ACTIVE_STATES_SQL};
CREATE INDEX jobs_active_compile ON jobs(key_digest) WHERE purpose = 'compile' AND {ACTIVE_STATES_SQL};
"""


MIGRATIONS: list[Migration] = [
    (1, "artifacts, artifact files, jobs, job events", _initial_schema),
    (2, "job revisions for compare-and-set; worker directory", _JOB_REVISIONS_AND_WORKERS_SQL),
    (3, "artifact signatures", _ARTIFACT_SIGNATURES_SQL),
    (4, "artifacts marked unavailable by the integrity sweep", _ARTIFACT_UNAVAILABLE_SQL),
    (5, "registry counts kept by triggers", _REGISTRY_COUNTS_SQL),
    (
        6,
        "lifetime lookup and hit totals; the request id that created a job",
        _LOOKUP_TOTALS_AND_REQUEST_IDS_SQL,
    ),
    (7, "artifact indexes in newest-first order", _NEWEST_FIRST_INDEXES_SQL),
    (8, "evaluations of artifacts, deleted with them", _EVALUATIONS_SQL),
    (9, "evaluation jobs: job purposes and specs; single flight per job flight", _EVALUATION_JOBS_SQL),
]

_BOOTSTRAP_SQL = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    description TEXT NOT NULL,
    applied_at REAL NOT NULL
) STRICT
"""


def latest_version(migrations: Sequence[Migration] = MIGRATIONS) -> int:
    return migrations[-1][0] if migrations else 0


def current_version(db: Database) -> int:
    """The highest applied version; 0 for a database without `schema_migrations`."""
    if "schema_migrations" not in db.table_names():
        return 0
    row = db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
    return int(row[0] or 0)


def _check_sequence(migrations: Sequence[Migration]) -> None:
    versions = [version for version, _, _ in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"migration versions must be 1, 2, 3, ... without gaps; got {versions}")


def _run_step(db: Database, step: MigrationStep) -> None:
    if isinstance(step, str):
        # Inside a transaction sqlite-utils runs the statements one by one instead of
        # through sqlite3's executescript, which would commit first.
        db.executescript(step)
    else:
        step(db)


def _apply_next(db: Database, migrations: Sequence[Migration], now: float, where: str) -> int | None:
    """Apply the first pending migration in one transaction; return its version, or None."""
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute(_BOOTSTRAP_SQL)
        version = current_version(db)
        latest = latest_version(migrations)
        if version > latest:
            raise SchemaTooNew(
                f"registry database {where} has schema version {version}, but this prebake "
                f"knows versions up to {latest}; run a newer prebake, or use another data directory"
            )
        if version == latest:
            db.execute("COMMIT")
            return None
        number, description, step = migrations[version]
        _run_step(db, step)
        db.execute(
            "INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
            [number, description, now],
        )
        db.execute("COMMIT")
        return number
    except BaseException:
        db.rollback()
        raise


def migrate(
    db: Database,
    now: float,
    migrations: Sequence[Migration] = MIGRATIONS,
    where: str = "",
) -> list[int]:
    """Bring the database up to the latest version; return the versions applied now.

    The connection must be in driver autocommit mode (`isolation_level=None`). Raises
    `SchemaTooNew` when the database records a version newer than `migrations` knows;
    a failing step raises its own error and leaves the previous version in place.
    """
    _check_sequence(migrations)
    applied: list[int] = []
    while (version := _apply_next(db, migrations, now, where or "(in memory)")) is not None:
        applied.append(version)
    return applied


def applied_migrations(db: Database) -> list[dict[str, Any]]:
    """Rows of `schema_migrations`, oldest first (for operators and tests)."""
    return list(db.query("SELECT version, description, applied_at FROM schema_migrations ORDER BY version"))
