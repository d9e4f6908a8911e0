"""The SQLite backend of the storage seams (embedded default): one file, WAL, one writer."""

from __future__ import annotations

import time
from pathlib import Path

from prebake.server.storage.bundle import Storage
from prebake.server.storage.sqlite import connection
from prebake.server.storage.sqlite.artifact_index import SqliteArtifactIndex
from prebake.server.storage.sqlite.connection import BUSY_TIMEOUT_MS, Database
from prebake.server.storage.sqlite.evaluation_store import SqliteEvaluationStore
from prebake.server.storage.sqlite.job_queue import SqliteJobQueue
from prebake.server.storage.sqlite.schema import SchemaTooNew
from prebake.server.storage.sqlite.worker_directory import SqliteWorkerDirectory

__all__ = ["BUSY_TIMEOUT_MS", "Database", "SchemaTooNew", "open_sqlite"]


def open_sqlite(path: Path, busy_timeout_ms: int | None = None) -> Storage:
    """Open (creating and migrating if needed) the registry database at `path`.

    `busy_timeout_ms` defaults to `connection.BUSY_TIMEOUT_MS` as it is at the call.
    """
    timeout = connection.BUSY_TIMEOUT_MS if busy_timeout_ms is None else busy_timeout_ms
    db = Database(path, time.time(), timeout)
    return Storage(
        artifacts=SqliteArtifactIndex(db),
        jobs=SqliteJobQueue(db),
        workers=SqliteWorkerDirectory(db),
        evaluations=SqliteEvaluationStore(db),
        close=db.close,
        description=f"sqlite:{path}",
    )
