"""The registry: artifact manifests and compile jobs in one SQLite database.

Rows map to the domain records of `prebake.server.records`; nothing here knows about
gRPC or blob bytes. Times are UNIX seconds from the injected clock.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from sqlite_utils import Database

from prebake.core.digests import hash_bytes
from prebake.server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from prebake.server.records import (
    Artifact,
    Digest,
    ErrorClass,
    FileEntry,
    Job,
    JobEvent,
    JobState,
    NormalizedKey,
    Producer,
    RegistryCounts,
)
from prebake.server.registry.schema import ACTIVE_STATES_SQL, KEY_COLUMNS, migrate

Row = dict[str, Any]

# Long enough to ride out another process's short write transaction (and a start-up
# migration), short enough that a wedged writer surfaces as an error, not a hang.
BUSY_TIMEOUT_MS = 10_000
BACKOFF_BASE_SECONDS = 5.0
BACKOFF_MAX_SECONDS = 300.0
DEFAULT_LEASE_SECONDS = 60.0

# Fields whose difference `nearest` counts, as (key attribute, column).
_NEAREST_FIELDS = (
    ("model_revision", "model_revision"),
    ("compile_target", "compile_target"),
    ("sequence_length", "sequence_length"),
    ("batch_size", "batch_size"),
    ("tensor_parallel_degree", "tensor_parallel_degree"),
    ("precision", "precision"),
    ("toolchain", "toolchain"),
    ("options", "key_options"),
)


# --- encoding ------------------------------------------------------------------------


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def manifest_digest(files: Sequence[FileEntry]) -> str:
    """xxh3-128 of the canonical file list: `[[path, hash, size, executable], ...]` by path.

    Compact JSON, UTF-8, no whitespace; the order of `files` does not matter.
    """
    entries = [[f.path, f.digest.hash, f.digest.size, f.executable] for f in sorted(files, key=_path)]
    return hash_bytes(_json(entries).encode("utf-8"))


def _path(entry: FileEntry) -> str:
    return entry.path


def _key_row(key: NormalizedKey) -> Row:
    row: Row = {
        "key_schema_version": key.schema_version,
        "kind": key.kind,
        "model": key.model,
        "model_revision": key.model_revision,
        "instance_type": key.instance_type,
        "compile_target": key.compile_target,
        "sequence_length": key.sequence_length,
        "batch_size": key.batch_size,
        "tensor_parallel_degree": key.tensor_parallel_degree,
        "precision": key.precision,
        "toolchain": key.toolchain,
        "key_options": _json([list(pair) for pair in key.options]),
        "key_relevant_fields": _json(list(key.relevant_fields)),
        "key_ignored_fields": _json(list(key.ignored_fields)),
        "key_canonical": key.canonical,
    }
    assert row.keys() == KEY_COLUMNS.keys()
    return row


def _key_from_row(row: Mapping[str, Any], digest: str) -> NormalizedKey:
    return NormalizedKey(
        schema_version=row["key_schema_version"],
        kind=row["kind"],
        model=row["model"],
        model_revision=row["model_revision"],
        instance_type=row["instance_type"],
        compile_target=row["compile_target"],
        sequence_length=row["sequence_length"],
        batch_size=row["batch_size"],
        tensor_parallel_degree=row["tensor_parallel_degree"],
        precision=row["precision"],
        toolchain=row["toolchain"],
        options=tuple((str(name), str(value)) for name, value in json.loads(row["key_options"])),
        relevant_fields=tuple(json.loads(row["key_relevant_fields"])),
        ignored_fields=tuple(json.loads(row["key_ignored_fields"])),
        canonical=row["key_canonical"],
        digest=digest,
    )


def _digest_or_none(hash_: str | None, size: int | None) -> Digest | None:
    return None if hash_ is None or size is None else Digest(hash_, size)


def _producer_json(producer: Producer) -> str:
    log = producer.log
    return _json(
        {
            "worker": producer.worker,
            "toolchain_versions": [list(pair) for pair in producer.toolchain_versions],
            "compile_seconds": producer.compile_seconds,
            "log": None if log is None else [log.hash, log.size],
            "note": producer.note,
        }
    )


def _producer_from_json(text: str) -> Producer:
    data = json.loads(text)
    log = data["log"]
    return Producer(
        worker=data["worker"],
        toolchain_versions=tuple((str(k), str(v)) for k, v in data["toolchain_versions"]),
        compile_seconds=float(data["compile_seconds"]),
        log=None if log is None else Digest(log[0], log[1]),
        note=data["note"],
    )


def _file_from_row(row: Mapping[str, Any]) -> FileEntry:
    return FileEntry(
        path=row["path"], digest=Digest(row["hash"], row["size"]), executable=bool(row["executable"])
    )


def _artifact_from_row(row: Mapping[str, Any], files: tuple[FileEntry, ...] = ()) -> Artifact:
    return Artifact(
        artifact_id=row["artifact_id"],
        key=_key_from_row(row, row["artifact_id"]),
        files=files,
        file_count=row["file_count"],
        total_size=row["total_size"],
        producer=_producer_from_json(row["producer"]),
        created_at=row["created_at"],
        last_accessed_at=row["last_accessed_at"],
        pinned=bool(row["pinned"]),
        manifest_digest=row["manifest_digest"],
        hit_count=row["hit_count"],
    )


def _job_from_row(row: Mapping[str, Any]) -> Job:
    return Job(
        job_id=row["job_id"],
        key=_key_from_row(row, row["key_digest"]),
        state=JobState(row["state"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        progress=row["progress"],
        message=row["message"],
        error=row["error"],
        error_class=ErrorClass(row["error_class"]),
        log=_digest_or_none(row["log_hash"], row["log_size"]),
        artifact_id=row["artifact_id"],
        worker=row["worker"],
        lease_expires_at=row["lease_expires_at"],
        fencing_token=row["fencing_token"],
        not_before=row["not_before"],
        model_source=row["model_source"],
        finished_at=row["finished_at"],
    )


def _log_columns(log: Digest | None) -> Row:
    return {"log_hash": None if log is None else log.hash, "log_size": None if log is None else log.size}


def new_job_id() -> str:
    """`j-` and 24 lowercase hex digits (96 random bits)."""
    return "j-" + secrets.token_hex(12)


def retry_backoff(attempts: int, base: float = BACKOFF_BASE_SECONDS) -> float:
    """Seconds a transiently failed job waits before it may be leased again."""
    return min(2.0 ** min(attempts, 16) * base, BACKOFF_MAX_SECONDS)


def _dict_row(cursor: sqlite3.Cursor, values: tuple[Any, ...]) -> Row:
    return {column[0]: value for column, value in zip(cursor.description, values, strict=True)}


def _check_page(limit: int, offset: int) -> None:
    if limit < 0 or offset < 0:
        raise InvalidArgument(f"limit ({limit}) and offset ({offset}) must not be negative")


def _placeholders_named(prefix: str, values: Sequence[Any]) -> str:
    return ", ".join(f":{prefix}{i}" for i in range(len(values)))


def _placeholders(values: Sequence[Any]) -> str:
    return ", ".join("?" for _ in values)


# --- connection ------------------------------------------------------------------------


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: the driver opens no implicit transactions, so every
    # transaction is an explicit BEGIN ... COMMIT below.
    conn = sqlite3.connect(
        str(path), check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise FailedPrecondition(f"registry database {path} cannot use WAL journaling (got {mode!r})")
        # In WAL mode NORMAL loses at most the last transactions on power loss, never
        # consistency, and saves an fsync per commit.
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        conn.close()
        raise
    return conn


class Registry:
    """Artifact manifests and compile jobs, stored in one SQLite file.

    Thread-safe by serialisation: one connection guarded by one lock, so reads and
    writes from any thread run one at a time. Meant to be one per process (the server
    routes every write through it, because several SQLite writers waiting on a busy
    timeout are served unfairly); other processes may still open the same file, and
    SQLite's locking (WAL, busy timeout, `BEGIN IMMEDIATE` for writes) keeps them
    correct, including the single-flight guarantee of `create_or_join_job`.

    Every public method is one short transaction. A method that raises has changed
    nothing: its transaction is rolled back. Domain errors are those of
    `prebake.server.errors`; `sqlite3.OperationalError` means the database is busy or
    broken (retryable as UNAVAILABLE).
    """

    def __init__(
        self, path: Path, clock: Callable[[], float] = time.time, backoff_base: float = BACKOFF_BASE_SECONDS
    ) -> None:
        """Open (creating if needed) the database at `path` and apply pending migrations.

        `backoff_base` scales the wait before a transiently failed job is retried
        (`retry_backoff`).

        Raises `SchemaTooNew` (a `FailedPrecondition`) for a database written by a newer
        prebake.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._clock = clock
        self._backoff_base = backoff_base
        self._lock = threading.Lock()
        self._conn = _connect(path)
        try:
            migrate(Database(self._conn, execute_plugins=False), clock(), where=str(path))
        except BaseException:
            self._conn.close()
            raise
        # Set after migrating: sqlite-utils expects plain tuple rows.
        self._conn.row_factory = _dict_row

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[sqlite3.Connection]:
        # BEGIN IMMEDIATE takes the write lock up front: a deferred transaction that
        # reads and then writes fails with SQLITE_BUSY (no waiting) when another
        # connection committed in between.
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    def _read(self) -> AbstractContextManager[sqlite3.Connection]:
        return self._transaction(write=False)

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        return self._transaction(write=True)

    # --- artifacts -----------------------------------------------------------------

    def get_artifact(self, artifact_id: str, with_files: bool = True) -> Artifact | None:
        """The artifact, with its files sorted by path (or none); None if unknown."""
        with self._read() as c:
            row = _artifact_row(c, artifact_id)
            if row is None:
                return None
            files = _files(c, artifact_id) if with_files else ()
        return _artifact_from_row(row, files)

    def publish(
        self, key: NormalizedKey, files: Sequence[FileEntry], producer: Producer, replace: bool = False
    ) -> tuple[Artifact, bool, list[Job]]:
        """Store the manifest as the artifact for `key`; return (artifact, created, completed jobs).

        Publishing the same file list again changes nothing and returns created=False.
        A different file list raises `AlreadyExists` unless `replace`, which swaps the
        files in (keeping the pin, resetting hits and times). Every active job for the
        key succeeds with the artifact in the same transaction, also on an idempotent
        re-publish (so a job that raced an earlier publish does not stay in flight).
        The caller has checked that every blob is present. A repeated path raises
        `InvalidArgument`.
        """
        now = self._clock()
        with self._write() as c:
            return _publish(c, key, files, producer, replace=replace, now=now)

    def delete_artifact(self, artifact_id: str, force: bool = False) -> list[Digest]:
        """Delete the artifact; return its blobs that nothing references any more, sorted.

        "Its blobs" are its files and its producer's log; "references" are the files
        of the remaining artifacts, their producers' logs and job logs. The caller
        deletes those blobs. Raises `NotFound`, or `FailedPrecondition` when the
        artifact is pinned and not `force`.
        """
        with self._write() as c:
            row = _artifact_row(c, artifact_id)
            if row is None:
                raise NotFound(f"artifact {artifact_id} not found")
            if row["pinned"] and not force:
                raise FailedPrecondition(f"artifact {artifact_id} is pinned; unpin it or pass force")
            orphans = set(_files_used_only_by(c, artifact_id))
            _delete_artifact_rows(c, artifact_id)
            log = _digest_or_none(row["log_hash"], row["log_size"])
            if log is not None and not _referenced(c, log):
                orphans.add(log)
        return sorted(orphans)

    def set_pinned(self, artifact_id: str, pinned: bool) -> Artifact:
        """Pin or unpin; return the artifact with its files. Raises `NotFound`."""
        with self._write() as c:
            row = c.execute(
                "UPDATE artifacts SET pinned = ? WHERE artifact_id = ? RETURNING *",
                (int(pinned), artifact_id),
            ).fetchone()
            if row is None:
                raise NotFound(f"artifact {artifact_id} not found")
            files = _files(c, artifact_id)
        return _artifact_from_row(row, files)

    def list_artifacts(
        self, kind: str = "", model: str = "", pinned_only: bool = False, limit: int = 100, offset: int = 0
    ) -> list[Artifact]:
        """Artifacts newest first (created_at DESC, then artifact_id), without files.

        Empty `kind`/`model` match everything.
        """
        _check_page(limit, offset)
        where: list[str] = ["1"]
        params: list[Any] = []
        if kind:
            where.append("kind = ?")
            params.append(kind)
        if model:
            where.append("model = ?")
            params.append(model)
        if pinned_only:
            where.append("pinned = 1")
        sql = (
            f"SELECT * FROM artifacts WHERE {' AND '.join(where)} "
            "ORDER BY created_at DESC, artifact_id LIMIT ? OFFSET ?"
        )
        with self._read() as c:
            rows = c.execute(sql, (*params, limit, offset)).fetchall()
        return [_artifact_from_row(row) for row in rows]

    def record_hits(self, hits: Mapping[str, tuple[int, float]]) -> None:
        """Add hit counts and advance last-access times in one transaction.

        `hits` maps artifact id to (hits to add, time of the latest access). Unknown ids
        are ignored (the artifact may have been deleted since the hit); an access time
        never moves backwards.
        """
        if not hits:
            return
        params = [(count, at, artifact_id) for artifact_id, (count, at) in hits.items()]
        with self._write() as c:
            c.executemany(
                "UPDATE artifacts SET hit_count = hit_count + ?, "
                "last_accessed_at = MAX(last_accessed_at, ?) WHERE artifact_id = ?",
                params,
            )

    def nearest(self, key: NormalizedKey, limit: int = 5) -> list[Artifact]:
        """Artifacts of the same kind and model other than `key`'s, closest first, without files.

        Distance is the number of differing fields among model_revision,
        compile_target, sequence_length, batch_size, tensor_parallel_degree, precision,
        toolchain and options; ties go to the newest.
        """
        _check_page(limit, 0)
        key_row = _key_row(key)
        distance = " + ".join(f"({column} != :{column})" for _, column in _NEAREST_FIELDS)
        sql = (
            f"SELECT *, {distance} AS distance FROM artifacts "
            "WHERE kind = :kind AND model = :model AND artifact_id != :digest "
            "ORDER BY distance, created_at DESC, artifact_id LIMIT :limit"
        )
        with self._read() as c:
            rows = c.execute(sql, {**key_row, "digest": key.digest, "limit": limit}).fetchall()
        return [_artifact_from_row(row) for row in rows]

    def compatible_candidates(
        self, key: NormalizedKey, compile_targets: Sequence[str], limit: int = 50
    ) -> list[Artifact]:
        """Artifacts that differ from `key` at most in sequence length (not shorter) and
        compile target (one of `compile_targets`): the candidates a compatibility policy
        may choose from (`prebake.server.compat`). Without files; smallest sequence
        length first.
        """
        _check_page(limit, 0)
        if not compile_targets:
            return []
        same = ("kind", "model", "model_revision", "batch_size", "tensor_parallel_degree", "precision")
        where = " AND ".join(f"{column} = :{column}" for column in (*same, "toolchain", "key_options"))
        sql = (
            f"SELECT * FROM artifacts WHERE {where} AND sequence_length >= :sequence_length "
            f"AND compile_target IN ({_placeholders_named('target', compile_targets)}) "
            "ORDER BY sequence_length, created_at, artifact_id LIMIT :limit"
        )
        params = {
            **_key_row(key),
            **{f"target{i}": target for i, target in enumerate(compile_targets)},
            "limit": limit,
        }
        with self._read() as c:
            rows = c.execute(sql, params).fetchall()
        return [_artifact_from_row(row) for row in rows]

    def blob_referenced(self, digest: Digest) -> bool:
        """Whether any artifact file, artifact producer log or job log names `digest`."""
        with self._read() as c:
            return _referenced(c, digest)

    def counts(self) -> RegistryCounts:
        """Artifact totals and jobs per state (every state present, zeros included)."""
        with self._read() as c:
            totals = c.execute(
                "SELECT COUNT(*) AS artifacts, COALESCE(SUM(pinned), 0) AS pinned FROM artifacts"
            ).fetchone()
            states = c.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        by_state = {state.value: 0 for state in JobState}
        by_state.update({row["state"]: row["n"] for row in states})
        return RegistryCounts(
            artifacts=totals["artifacts"], pinned_artifacts=totals["pinned"], jobs_by_state=by_state
        )

    # --- jobs ----------------------------------------------------------------------

    def create_or_join_job(
        self, key: NormalizedKey, model_source: str = "", max_attempts: int = 3
    ) -> tuple[Job, bool]:
        """Return (the active job for the key, whether this call created it).

        Single flight is enforced by a partial unique index on the active jobs' key
        digest, so it holds for any number of registries and processes on the file.
        A joiner gets the existing job unchanged (its model_source and max_attempts win).
        """
        if max_attempts < 1:
            raise InvalidArgument(f"max_attempts must be at least 1, got {max_attempts}")
        now = self._clock()
        row: Row = {
            "job_id": new_job_id(),
            "key_digest": key.digest,
            **_key_row(key),
            "state": JobState.QUEUED.value,
            "attempts": 0,
            "max_attempts": max_attempts,
            "progress": 0.0,
            "message": "waiting for a worker",
            "error": "",
            "error_class": ErrorClass.NONE.value,
            "log_hash": None,
            "log_size": None,
            "artifact_id": "",
            "worker": "",
            "lease_expires_at": None,
            "fencing_token": 0,
            "not_before": 0.0,
            "model_source": model_source,
            "created_at": now,
            "updated_at": now,
            "finished_at": None,
        }
        sql = f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join(':' + c for c in row)}) RETURNING *"
        with self._write() as c:
            try:
                inserted = c.execute(sql, row).fetchone()
            except sqlite3.IntegrityError:
                existing = _active_job_row(c, key.digest)
                if existing is None:
                    raise
                return _job_from_row(existing), False
            return _append_event(c, inserted, now), True

    def get_job(self, job_id: str) -> Job | None:
        with self._read() as c:
            row = _job_row(c, job_id)
        return None if row is None else _job_from_row(row)

    def active_job(self, key_digest: str) -> Job | None:
        """The queued or leased job for the key, if any."""
        with self._read() as c:
            row = _active_job_row(c, key_digest)
        return None if row is None else _job_from_row(row)

    def last_finished_job(self, key_digest: str) -> Job | None:
        """The key's most recently finished (succeeded, failed or cancelled) job, if any."""
        with self._read() as c:
            row = c.execute(
                "SELECT * FROM jobs WHERE key_digest = ? AND finished_at IS NOT NULL "
                "ORDER BY finished_at DESC, created_at DESC LIMIT 1",
                (key_digest,),
            ).fetchone()
        return None if row is None else _job_from_row(row)

    def list_jobs(
        self, states: Sequence[JobState] = (), kind: str = "", limit: int = 100, offset: int = 0
    ) -> list[Job]:
        """Jobs newest first (created_at DESC, then job_id); empty filters match everything."""
        _check_page(limit, offset)
        where: list[str] = ["1"]
        params: list[Any] = []
        if states:
            where.append(f"state IN ({_placeholders(states)})")
            params.extend(JobState(state).value for state in states)
        if kind:
            where.append("kind = ?")
            params.append(kind)
        sql = (
            f"SELECT * FROM jobs WHERE {' AND '.join(where)} "
            "ORDER BY created_at DESC, job_id LIMIT ? OFFSET ?"
        )
        with self._read() as c:
            rows = c.execute(sql, (*params, limit, offset)).fetchall()
        return [_job_from_row(row) for row in rows]

    def cancel_job(self, job_id: str, reason: str = "") -> Job:
        """Cancel a queued or leased job; a cancelled job is returned unchanged.

        Raises `NotFound`, or `FailedPrecondition` for a job that already succeeded or
        failed. A worker holding the lease learns at its next heartbeat.
        """
        now = self._clock()
        with self._write() as c:
            row = _job_row_or_raise(c, job_id)
            state = JobState(row["state"])
            if state is JobState.CANCELLED:
                return _job_from_row(row)
            if not state.active:
                raise FailedPrecondition(f"job {job_id} already {state.value}; nothing to cancel")
            changes: Row = {
                "state": JobState.CANCELLED.value,
                "error": reason or "cancelled",
                "error_class": ErrorClass.NONE.value,
                "message": "cancelled",
                "lease_expires_at": None,
                "finished_at": now,
            }
            return _append_event(c, _update_job(c, job_id, changes, now), now)

    def fail_job(self, job_id: str, error: str, error_class: ErrorClass, log: Digest | None = None) -> Job:
        """Record a failed attempt of an active job.

        DETERMINISTIC, or no attempts left: the job FAILS (terminal). TRANSIENT with
        attempts left: back to QUEUED, not leasable for `retry_backoff(attempts)`
        seconds. The error (and the log, when given) is kept either way. Raises
        `NotFound`, `FailedPrecondition` for a finished job, `InvalidArgument` for
        ErrorClass.NONE.
        """
        if error_class is ErrorClass.NONE:
            raise InvalidArgument("a failure needs an error class: transient or deterministic")
        now = self._clock()
        with self._write() as c:
            row = _job_row_or_raise(c, job_id)
            state = JobState(row["state"])
            if not state.active:
                raise FailedPrecondition(f"job {job_id} already {state.value}; it cannot fail again")
            return _fail(c, row, error, error_class, log=log, now=now, backoff_base=self._backoff_base)

    def job_events(self, job_id: str, after_sequence: int = 0) -> list[JobEvent]:
        """The job's events with sequence > `after_sequence`, in order. Raises `NotFound`."""
        with self._read() as c:
            job = _job_row_or_raise(c, job_id)
            rows = c.execute(
                "SELECT sequence, at, snapshot FROM job_events WHERE job_id = ? AND sequence > ? "
                "ORDER BY sequence",
                (job_id, after_sequence),
            ).fetchall()
        key_columns = {name: job[name] for name in ("key_digest", *KEY_COLUMNS)}
        return [
            JobEvent(
                job_id=job_id,
                sequence=row["sequence"],
                at=row["at"],
                job=_job_from_row({**json.loads(row["snapshot"]), **key_columns}),
            )
            for row in rows
        ]

    # --- worker protocol -------------------------------------------------------------

    def lease_job(
        self,
        worker: str,
        kinds: Sequence[str],
        toolchains: Sequence[str] = (),
        compile_targets: Sequence[str] = (),
        now: float | None = None,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
    ) -> Job | None:
        """Claim the oldest runnable queued job this worker can run; None if there is none.

        A job matches when its kind is in `kinds` and, where given (non-empty), its
        toolchain and compile target are in `toolchains` and `compile_targets`.
        Claiming counts an attempt, bumps the fencing token and starts a lease.
        """
        if not kinds:
            raise InvalidArgument("a worker must advertise at least one kind")
        now = self._clock() if now is None else now
        where = [f"state = 'queued' AND not_before <= ? AND kind IN ({_placeholders(kinds)})"]
        params: list[Any] = [now, *kinds]
        for column, allowed in (("toolchain", toolchains), ("compile_target", compile_targets)):
            if allowed:
                where.append(f"{column} IN ({_placeholders(allowed)})")
                params.extend(allowed)
        sql = (
            "UPDATE jobs SET state = 'leased', worker = ?, attempts = attempts + 1, "
            "fencing_token = fencing_token + 1, lease_expires_at = ?, progress = 0.0, "
            "message = ?, updated_at = ? "
            f"WHERE job_id = (SELECT job_id FROM jobs WHERE {' AND '.join(where)} "
            "ORDER BY created_at, job_id LIMIT 1) RETURNING *"
        )
        head = [worker, now + lease_seconds, f"leased by {worker}", now]
        with self._write() as c:
            row = c.execute(sql, (*head, *params)).fetchone()
            return None if row is None else _append_event(c, row, now)

    def heartbeat(
        self,
        job_id: str,
        fencing_token: int,
        progress: float,
        message: str,
        now: float | None = None,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
    ) -> Job:
        """Extend the lease and record progress (0.0-1.0); return the job.

        Raises `NotFound`, or `FailedPrecondition` when the job is no longer leased
        under `fencing_token` (cancelled, expired and re-leased, finished): the worker
        must stop. An event is appended only when progress or message changed.
        """
        if not 0.0 <= progress <= 1.0:
            raise InvalidArgument(f"progress must be between 0.0 and 1.0, got {progress}")
        now = self._clock() if now is None else now
        with self._write() as c:
            row = _leased_row_or_raise(c, job_id, fencing_token)
            changed = (row["progress"], row["message"]) != (progress, message)
            changes: Row = {"progress": progress, "message": message, "lease_expires_at": now + lease_seconds}
            updated = _update_job(c, job_id, changes, now)
            return _append_event(c, updated, now) if changed else _job_from_row(updated)

    def complete_job(
        self, job_id: str, fencing_token: int, files: Sequence[FileEntry], producer: Producer
    ) -> tuple[Artifact, list[Job]]:
        """A worker's result: publish `files` as the artifact for the job's key.

        One transaction: the lease is checked under `fencing_token` (a worker that lost
        its lease, or a zombie, gets `FailedPrecondition` and nothing is stored), then
        the artifact is published exactly as `publish` does, which completes this job
        and any other active job of the key. An artifact that an operator published
        for the key meanwhile is kept (`replace` is never implied). The caller has
        checked that every blob is present.
        """
        now = self._clock()
        with self._write() as c:
            row = _leased_row_or_raise(c, job_id, fencing_token)
            key = _key_from_row(row, row["key_digest"])
            existing = _artifact_row(c, key.digest)
            if existing is not None:
                completed = _complete_active_jobs(c, key.digest, now)
                return _artifact_from_row(existing, _files(c, key.digest)), completed
            artifact, _, completed = _publish(c, key, files, producer, replace=False, now=now)
            if producer.log is not None:
                _update_job(c, job_id, _log_columns(producer.log), now)
            return artifact, completed

    def fail_leased_job(
        self, job_id: str, fencing_token: int, error: str, error_class: ErrorClass, log: Digest | None = None
    ) -> Job:
        """`fail_job` for a worker: only under a current lease (else `FailedPrecondition`)."""
        if error_class is ErrorClass.NONE:
            raise InvalidArgument("a failure needs an error class: transient or deterministic")
        now = self._clock()
        with self._write() as c:
            row = _leased_row_or_raise(c, job_id, fencing_token)
            return _fail(c, row, error, error_class, log=log, now=now, backoff_base=self._backoff_base)

    def release_job(self, job_id: str, fencing_token: int, reason: str = "") -> Job:
        """Give a leased job back to the queue without spending an attempt.

        For a worker shutting down gracefully: the job is runnable again at once.
        Raises `FailedPrecondition` when the lease is no longer the caller's.
        """
        now = self._clock()
        with self._write() as c:
            row = _leased_row_or_raise(c, job_id, fencing_token)
            changes: Row = {
                "state": JobState.QUEUED.value,
                "attempts": max(0, row["attempts"] - 1),
                "lease_expires_at": None,
                "progress": 0.0,
                "message": f"released by {row['worker']}" + (f": {reason}" if reason else ""),
            }
            return _append_event(c, _update_job(c, job_id, changes, now), now)

    def expire_leases(self, now: float | None = None) -> list[Job]:
        """Treat every lease past its expiry as a transient failure; return the jobs changed."""
        now = self._clock() if now is None else now
        with self._write() as c:
            rows = c.execute(
                "SELECT * FROM jobs WHERE state = 'leased' AND lease_expires_at <= ? "
                "ORDER BY lease_expires_at",
                (now,),
            ).fetchall()
            return [_expire(c, row, now, self._backoff_base) for row in rows]


# --- statements shared by the methods (all run inside the caller's transaction) ----------


def _artifact_row(c: sqlite3.Connection, artifact_id: str) -> Row | None:
    row: Row | None = c.execute("SELECT * FROM artifacts WHERE artifact_id = ?", (artifact_id,)).fetchone()
    return row


def _files(c: sqlite3.Connection, artifact_id: str) -> tuple[FileEntry, ...]:
    rows = c.execute(
        "SELECT path, hash, size, executable FROM artifact_files WHERE artifact_id = ? ORDER BY path",
        (artifact_id,),
    ).fetchall()
    return tuple(_file_from_row(row) for row in rows)


def _insert_artifact(
    c: sqlite3.Connection,
    key: NormalizedKey,
    files: tuple[FileEntry, ...],
    manifest: str,
    producer: Producer,
    *,
    pinned: bool,
    now: float,
) -> Row:
    row: Row = {
        "artifact_id": key.digest,
        **_key_row(key),
        "manifest_digest": manifest,
        "file_count": len(files),
        "total_size": sum(f.digest.size for f in files),
        "producer": _producer_json(producer),
        **_log_columns(producer.log),
        "created_at": now,
        "last_accessed_at": now,
        "pinned": int(pinned),
        "hit_count": 0,
    }
    c.execute(f"INSERT INTO artifacts ({', '.join(row)}) VALUES ({', '.join(':' + k for k in row)})", row)
    try:
        c.executemany(
            "INSERT INTO artifact_files (artifact_id, path, hash, size, executable) VALUES (?, ?, ?, ?, ?)",
            [(key.digest, f.path, f.digest.hash, f.digest.size, int(f.executable)) for f in files],
        )
    except sqlite3.IntegrityError as exc:
        repeated = sorted(path for path, n in Counter(f.path for f in files).items() if n > 1)
        if not repeated:
            raise
        raise InvalidArgument(f"file paths must be unique; repeated: {', '.join(repeated)}") from exc
    return row


def _delete_artifact_rows(c: sqlite3.Connection, artifact_id: str) -> None:
    c.execute("DELETE FROM artifact_files WHERE artifact_id = ?", (artifact_id,))
    c.execute("DELETE FROM artifacts WHERE artifact_id = ?", (artifact_id,))


def _files_used_only_by(c: sqlite3.Connection, artifact_id: str) -> list[Digest]:
    """Blobs of the artifact's files that no other artifact, producer log or job log names."""
    rows = c.execute(
        """
        SELECT DISTINCT f.hash, f.size FROM artifact_files AS f
        WHERE f.artifact_id = :id
          AND NOT EXISTS (SELECT 1 FROM artifact_files AS g
                          WHERE g.hash = f.hash AND g.size = f.size AND g.artifact_id != :id)
          AND NOT EXISTS (SELECT 1 FROM artifacts AS a
                          WHERE a.log_hash = f.hash AND a.log_size = f.size AND a.artifact_id != :id)
          AND NOT EXISTS (SELECT 1 FROM jobs AS j WHERE j.log_hash = f.hash AND j.log_size = f.size)
        """,
        {"id": artifact_id},
    ).fetchall()
    return [Digest(row["hash"], row["size"]) for row in rows]


def _referenced(c: sqlite3.Connection, digest: Digest) -> bool:
    row = c.execute(
        """
        SELECT EXISTS (SELECT 1 FROM artifact_files WHERE hash = :h AND size = :s)
            OR EXISTS (SELECT 1 FROM artifacts WHERE log_hash = :h AND log_size = :s)
            OR EXISTS (SELECT 1 FROM jobs WHERE log_hash = :h AND log_size = :s) AS used
        """,
        {"h": digest.hash, "s": digest.size},
    ).fetchone()
    return bool(row["used"])


def _job_row(c: sqlite3.Connection, job_id: str) -> Row | None:
    row: Row | None = c.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    return row


def _job_row_or_raise(c: sqlite3.Connection, job_id: str) -> Row:
    row = _job_row(c, job_id)
    if row is None:
        raise NotFound(f"job {job_id} not found")
    return row


def _active_job_row(c: sqlite3.Connection, key_digest: str) -> Row | None:
    row: Row | None = c.execute(
        f"SELECT * FROM jobs WHERE key_digest = ? AND {ACTIVE_STATES_SQL}", (key_digest,)
    ).fetchone()
    return row


_UPDATABLE_JOB_COLUMNS = frozenset(
    {
        "state",
        "attempts",
        "progress",
        "message",
        "error",
        "error_class",
        "log_hash",
        "log_size",
        "artifact_id",
        "lease_expires_at",
        "not_before",
        "finished_at",
    }
)


def _update_job(c: sqlite3.Connection, job_id: str, changes: Row, now: float) -> Row:
    # Column names are interpolated, so only known ones are accepted.
    assert changes.keys() <= _UPDATABLE_JOB_COLUMNS, changes.keys() - _UPDATABLE_JOB_COLUMNS
    assignments = ", ".join(f"{column} = :{column}" for column in changes)
    row: Row = c.execute(
        f"UPDATE jobs SET {assignments}, updated_at = :updated_at WHERE job_id = :job_id RETURNING *",
        {**changes, "updated_at": now, "job_id": job_id},
    ).fetchone()
    return row


def _append_event(c: sqlite3.Connection, row: Row, now: float) -> Job:
    """Append the next event for the job in `row` (its state after a change); return the job.

    The snapshot leaves out the key columns: a job's key never changes, so they are
    read back from `jobs`.
    """
    sequence = c.execute(
        "SELECT COALESCE(MAX(sequence), 0) + 1 AS next FROM job_events WHERE job_id = ?", (row["job_id"],)
    ).fetchone()["next"]
    snapshot = {name: value for name, value in row.items() if name not in KEY_COLUMNS}
    c.execute(
        "INSERT INTO job_events (job_id, sequence, at, snapshot) VALUES (?, ?, ?, ?)",
        (row["job_id"], sequence, now, _json(snapshot)),
    )
    return _job_from_row(row)


def _publish(
    c: sqlite3.Connection,
    key: NormalizedKey,
    files: Sequence[FileEntry],
    producer: Producer,
    *,
    replace: bool,
    now: float,
) -> tuple[Artifact, bool, list[Job]]:
    """The body of `Registry.publish`, inside the caller's write transaction."""
    if not files:
        raise InvalidArgument("an artifact needs at least one file")
    ordered = tuple(sorted(files, key=_path))
    manifest = manifest_digest(ordered)
    existing = _artifact_row(c, key.digest)
    if existing is not None and existing["manifest_digest"] == manifest:
        artifact = _artifact_from_row(existing, _files(c, key.digest))
        return artifact, False, _complete_active_jobs(c, key.digest, now)
    if existing is not None and not replace:
        raise AlreadyExists(
            f"artifact {key.digest} for this key already exists with a different file list "
            f"(manifest {existing['manifest_digest']}); pass replace to overwrite"
        )
    pinned = existing is not None and bool(existing["pinned"])
    _delete_artifact_rows(c, key.digest)
    row = _insert_artifact(c, key, ordered, manifest, producer, pinned=pinned, now=now)
    completed = _complete_active_jobs(c, key.digest, now)
    return _artifact_from_row(row, ordered), True, completed


def _leased_row_or_raise(c: sqlite3.Connection, job_id: str, fencing_token: int) -> Row:
    row = _job_row_or_raise(c, job_id)
    if row["state"] != JobState.LEASED.value or row["fencing_token"] != fencing_token:
        raise FailedPrecondition(
            f"job {job_id} is not leased under fencing token {fencing_token} "
            f"(state {row['state']}, token {row['fencing_token']}); stop working on it"
        )
    return row


def _complete_active_jobs(c: sqlite3.Connection, key_digest: str, now: float) -> list[Job]:
    rows = c.execute(
        "UPDATE jobs SET state = 'succeeded', artifact_id = :digest, progress = 1.0, "
        "message = 'artifact published', error = '', error_class = '', lease_expires_at = NULL, "
        f"updated_at = :now, finished_at = :now WHERE key_digest = :digest AND {ACTIVE_STATES_SQL} "
        "RETURNING *",
        {"digest": key_digest, "now": now},
    ).fetchall()
    return [_append_event(c, row, now) for row in rows]


def _fail(
    c: sqlite3.Connection,
    row: Row,
    error: str,
    error_class: ErrorClass,
    *,
    log: Digest | None,
    now: float,
    backoff_base: float,
) -> Job:
    """Fail the active job in `row`: terminally, or back to the queue after a backoff."""
    changes: Row = {"error": error, "error_class": error_class.value, "lease_expires_at": None}
    if log is not None:
        changes.update(_log_columns(log))
    attempts, max_attempts = row["attempts"], row["max_attempts"]
    if error_class is ErrorClass.DETERMINISTIC or attempts >= max_attempts:
        changes.update(state=JobState.FAILED.value, message="failed", finished_at=now)
    else:
        changes.update(
            state=JobState.QUEUED.value,
            progress=0.0,
            not_before=now + retry_backoff(attempts, backoff_base),
            message=f"retrying after a transient failure (attempt {attempts} of {max_attempts})",
        )
    return _append_event(c, _update_job(c, row["job_id"], changes, now), now)


def _expire(c: sqlite3.Connection, row: Row, now: float, backoff_base: float) -> Job:
    error = f"lease expired: worker {row['worker']} stopped heartbeating"
    return _fail(c, row, error, ErrorClass.TRANSIENT, log=None, now=now, backoff_base=backoff_base)
