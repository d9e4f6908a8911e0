"""`JobQueue` on SQLite: `jobs` (single flight by a partial unique index) and `job_events`."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from prebake.core.errors import InvalidArgument
from prebake.server.records import Job, JobEvent, JobState, WorkerCapability
from prebake.server.storage import page_tokens
from prebake.server.storage.conditions import ConditionFailed
from prebake.server.storage.job_queue import JobQuery
from prebake.server.storage.page_tokens import Page
from prebake.server.storage.record_json import to_json
from prebake.server.storage.sqlite import rows
from prebake.server.storage.sqlite.connection import Database
from prebake.server.storage.sqlite.schema import ACTIVE_STATES_SQL, KEY_COLUMNS

TOKEN_TAG = "jobs"
# Columns an event's snapshot leaves out: a job's key, request id, purpose, spec and flight
# never change, so they are read back from `jobs`.
_SNAPSHOT_EXCLUDES = frozenset({"key_digest", "request_id", "purpose", "evaluation", "flight", *KEY_COLUMNS})
# Mutable columns added after events were first written: older snapshots lack them.
_SNAPSHOT_DEFAULTS = {"evaluation_id": ""}
# The key's active compile job (evaluation jobs of the key are not it).
_ACTIVE_COMPILE = f"SELECT * FROM jobs WHERE key_digest = ? AND purpose = 'compile' AND {ACTIVE_STATES_SQL}"


def _append_event(c: sqlite3.Connection, row: dict[str, Any]) -> None:
    snapshot = {name: value for name, value in row.items() if name not in _SNAPSHOT_EXCLUDES}
    c.execute(
        "INSERT INTO job_events (job_id, sequence, at, snapshot) VALUES (?, ?, ?, ?)",
        (row["job_id"], row["revision"], row["updated_at"], to_json(snapshot)),
    )


def cas_job(c: sqlite3.Connection, job: Job, expect_revision: int) -> Job:
    """The body of `compare_and_set`, inside the caller's write transaction."""
    changes = rows.mutable_job_columns(job)
    assignments = ", ".join(f"{column} = :{column}" for column in changes)
    row = c.execute(
        f"UPDATE jobs SET {assignments}, revision = revision + 1 "
        "WHERE job_id = :job_id AND revision = :expect RETURNING *",
        {**changes, "job_id": job.job_id, "expect": expect_revision},
    ).fetchone()
    if row is None:
        raise ConditionFailed(f"job {job.job_id} changed meanwhile (expected revision {expect_revision})")
    _append_event(c, row)
    return rows.job_from_row(row)


def _capability_filter(capabilities: Sequence[WorkerCapability]) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    for cap in capabilities:
        if not cap.purposes:
            continue
        clause = f"(kind = ? AND toolchain = ? AND purpose IN ({', '.join('?' for _ in cap.purposes)})"
        params.extend([cap.kind, cap.toolchain, *(p.value for p in cap.purposes)])
        if cap.compile_targets:
            clause += f" AND compile_target IN ({', '.join('?' for _ in cap.compile_targets)})"
            params.extend(cap.compile_targets)
        clauses.append(clause + ")")
    return "(" + (" OR ".join(clauses) or "0") + ")", params


class SqliteJobQueue:
    """See `prebake.server.storage.job_queue.JobQueue`. Reads run inline (WAL
    snapshots), writes on the database's writer thread."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def _one(self, sql: str, params: Sequence[Any]) -> Job | None:
        # One statement: its own snapshot, without BEGIN and COMMIT around it.
        row = self._db.read_one(sql, tuple(params))
        return None if row is None else rows.job_from_row(row)

    def _many(self, sql: str, params: Sequence[Any]) -> list[Job]:
        with self._db.read() as c:
            found = c.execute(sql, params).fetchall()
        return [rows.job_from_row(row) for row in found]

    async def _many_off_loop(self, sql: str, params: Sequence[Any]) -> list[Job]:
        """`_many` for pages of up to a thousand jobs: see `Database.read_off_loop`."""
        return await self._db.read_off_loop(
            lambda c: [rows.job_from_row(row) for row in c.execute(sql, params).fetchall()]
        )

    async def get(self, job_id: str) -> Job | None:
        return self._one("SELECT * FROM jobs WHERE job_id = ?", (job_id,))

    async def active(self, key_digest: str) -> Job | None:
        return self._one(_ACTIVE_COMPILE, (key_digest,))

    async def active_evaluation(self, key_digest: str, spec_digest: str) -> Job | None:
        flight = f"evaluate:{key_digest}:{spec_digest}"  # Job.flight
        return self._one(f"SELECT * FROM jobs WHERE flight = ? AND {ACTIVE_STATES_SQL}", (flight,))

    async def last_finished(self, key_digest: str) -> Job | None:
        return self._one(
            "SELECT * FROM jobs WHERE key_digest = ? AND purpose = 'compile' AND finished_at IS NOT NULL "
            "ORDER BY finished_at DESC, created_at DESC LIMIT 1",
            (key_digest,),
        )

    async def create_if_absent(self, job: Job) -> tuple[Job, bool]:
        if not job.state.active:
            raise InvalidArgument(f"a new job must be queued or leased, not {job.state.value}")
        row = {**rows.job_row(job), "revision": 1}
        sql = f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join(':' + c for c in row)}) RETURNING *"

        def write(c: sqlite3.Connection) -> tuple[Job, bool]:
            try:
                inserted = c.execute(sql, row).fetchone()
            except sqlite3.IntegrityError:
                # The partial unique index on active jobs' flight: single flight.
                existing = c.execute(
                    f"SELECT * FROM jobs WHERE flight = ? AND {ACTIVE_STATES_SQL}", (job.flight,)
                ).fetchone()
                if existing is None:
                    raise
                return rows.job_from_row(existing), False
            _append_event(c, inserted)
            return rows.job_from_row(inserted), True

        return await self._db.write(write)

    async def compare_and_set(self, job: Job, expect_revision: int) -> Job:
        return await self._db.write(lambda c: cas_job(c, job, expect_revision))

    async def events(self, job_id: str, after_sequence: int = 0) -> list[JobEvent]:
        with self._db.read() as c:
            job = c.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if job is None:
                return []
            found = c.execute(
                "SELECT sequence, at, snapshot FROM job_events WHERE job_id = ? AND sequence > ? "
                "ORDER BY sequence",
                (job_id, after_sequence),
            ).fetchall()
        key_columns = {name: job[name] for name in _SNAPSHOT_EXCLUDES}
        return [
            JobEvent(
                job_id=job_id,
                sequence=row["sequence"],
                at=row["at"],
                job=rows.job_from_row(
                    {
                        **_SNAPSHOT_DEFAULTS,
                        "revision": row["sequence"],
                        **json.loads(row["snapshot"]),
                        **key_columns,
                    }
                ),
            )
            for row in found
        ]

    async def list_page(self, query: JobQuery, page_token: str, limit: int) -> Page[Job]:
        if limit < 1:
            raise InvalidArgument(f"limit must be positive, got {limit}")
        states = sorted({JobState(state).value for state in query.states})
        tag = page_tokens.list_tag(TOKEN_TAG, [states, query.kind])
        after = page_tokens.decode(tag, page_token, (float, str))
        where: list[str] = ["1"]
        params: list[Any] = []
        if states:
            where.append(f"state IN ({', '.join('?' for _ in states)})")
            params.extend(states)
        if query.kind:
            where.append("kind = ?")
            params.append(query.kind)
        if after is not None:
            where.append("(created_at < ? OR (created_at = ? AND job_id > ?))")
            params.extend([after[0], after[0], after[1]])
        found = await self._many_off_loop(
            f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY created_at DESC, job_id LIMIT ?",
            (*params, limit + 1),
        )
        items = found[:limit]
        token = ""
        if len(found) > limit:
            token = page_tokens.encode(tag, [items[-1].created_at, items[-1].job_id])
        return Page(items, token)

    async def leasable(self, capabilities: Sequence[WorkerCapability], now: float, limit: int) -> list[Job]:
        if not capabilities:
            return []
        matches, params = _capability_filter(capabilities)
        return self._many(
            f"SELECT * FROM jobs WHERE state = 'queued' AND not_before <= ? AND {matches} "
            "ORDER BY created_at, job_id LIMIT ?",
            (now, *params, limit),
        )

    async def expired_leases(self, now: float, limit: int) -> list[Job]:
        return self._many(
            "SELECT * FROM jobs WHERE state = 'leased' AND lease_expires_at <= ? "
            "ORDER BY lease_expires_at, job_id LIMIT ?",
            (now, limit),
        )

    async def queued_counts(self) -> dict[tuple[str, str], int]:
        with self._db.read() as c:
            found = c.execute(
                "SELECT kind, compile_target, COUNT(*) AS n FROM jobs WHERE state = 'queued' "
                "GROUP BY kind, compile_target"
            ).fetchall()
        return {(row["kind"], row["compile_target"]): row["n"] for row in found}
