"""`WorkerDirectory` on SQLite: one row per worker id in `workers`."""

from __future__ import annotations

import sqlite3

from prebake.server.records import WorkerRecord
from prebake.server.storage.record_json import capabilities_json
from prebake.server.storage.sqlite import rows
from prebake.server.storage.sqlite.connection import Database


class SqliteWorkerDirectory:
    """See `prebake.server.storage.worker_directory.WorkerDirectory`."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def put_worker(self, record: WorkerRecord) -> None:
        def write(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT INTO workers (worker_id, capabilities, last_seen, expires_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (worker_id) DO UPDATE SET capabilities = excluded.capabilities, "
                "last_seen = excluded.last_seen, expires_at = excluded.expires_at",
                (
                    record.worker_id,
                    capabilities_json(record.capabilities),
                    record.last_seen,
                    record.expires_at,
                ),
            )

        await self._db.write(write)

    async def workers(self, now: float, include_expired: bool = False) -> list[WorkerRecord]:
        sql = "SELECT * FROM workers" + ("" if include_expired else " WHERE expires_at > ?")
        with self._db.read() as c:
            found = c.execute(sql + " ORDER BY worker_id", () if include_expired else (now,)).fetchall()
        return [rows.worker_from_row(row) for row in found]
