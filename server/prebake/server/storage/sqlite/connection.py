"""One SQLite database file: per-thread read connections and one writer thread.

WAL journaling lets readers run while a writer holds the write lock, so reads run
inline on the calling thread (the event loop included: a WAL read never waits for a
writer, and a point query costs microseconds, less than a hop to a thread) on a
connection of that thread's own. Writes go to one dedicated writer thread with its own
connection, so the event loop never waits on SQLite's busy timeout and the writes of
this process are serialised fairly (several SQLite writers waiting on a busy timeout
are served unfairly). Other processes may open the same file; SQLite's locking keeps
them correct, and a write that cannot get the lock within the busy timeout fails as
`Unavailable`, which callers may retry.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlite_utils import Database as SqliteUtilsDatabase

from prebake.core.errors import FailedPrecondition, Unavailable
from prebake.server.storage.sqlite.schema import migrate

T = TypeVar("T")
Row = dict[str, Any]

# Long enough to ride out another process's short write transaction (and a start-up
# migration), short enough that a wedged writer surfaces as an error, not a hang.
BUSY_TIMEOUT_MS = 10_000


def _dict_row(cursor: sqlite3.Cursor, values: tuple[Any, ...]) -> Row:
    return {column[0]: value for column, value in zip(cursor.description, values, strict=True)}


def _connect(path: Path, busy_timeout_ms: int) -> sqlite3.Connection:
    # isolation_level=None: the driver opens no implicit transactions, so every
    # transaction is an explicit BEGIN ... COMMIT below.
    conn = sqlite3.connect(
        str(path), check_same_thread=False, isolation_level=None, timeout=busy_timeout_ms / 1000
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
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


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _open_and_migrate(path: Path, now: float, busy_timeout_ms: int) -> sqlite3.Connection:
    """Connect and migrate, retrying for up to the busy timeout while the file is locked.

    Some of SQLite's lock waits do not go through the busy handler: switching a fresh
    file to WAL, and opening one while another process runs WAL recovery or removes the
    WAL on close, answer SQLITE_BUSY at once. Several processes starting on one fresh
    data directory hit exactly these, so the whole open is retried, with a short
    growing sleep, until the same deadline a locked write would have.
    """
    deadline = time.monotonic() + busy_timeout_ms / 1000
    pause = 0.005
    while True:
        conn: sqlite3.Connection | None = None
        try:
            conn = _connect(path, busy_timeout_ms)
            migrate(SqliteUtilsDatabase(conn, execute_plugins=False), now, where=str(path))
            return conn
        except sqlite3.OperationalError as exc:
            if conn is not None:
                conn.close()
            if not _is_busy(exc) or time.monotonic() + pause > deadline:
                raise
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


@contextmanager
def _translated(path: Path) -> Iterator[None]:
    try:
        yield
    except sqlite3.OperationalError as exc:
        if _is_busy(exc):
            raise Unavailable(
                f"the registry database is busy (another process holds its write lock: {exc}); retry"
            ) from exc
        raise


class Database:
    """The registry file, its migrations, its readers and its writer.

    Thread-safe: `read` may be used from any thread (each gets its own connection);
    `write` may be awaited from any event loop and `write_sync` called from any thread
    (both run on the writer thread). `close` waits for queued writes.
    """

    def __init__(self, path: Path, now: float, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
        """Open (creating if needed) the file and apply pending migrations.

        Raises `SchemaTooNew` (a `FailedPrecondition`) for a file written by a newer
        prebake, `Unavailable` if another process keeps it locked.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="prebake-sqlite-writer")
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        try:
            with _translated(path):
                self._write_conn = _open_and_migrate(path, now, busy_timeout_ms)
        except BaseException:
            self._writer.shutdown()
            raise
        # Set after migrating: sqlite-utils expects plain tuple rows.
        self._write_conn.row_factory = _dict_row

    def _reader(self) -> sqlite3.Connection:
        # Checked first: `close` closes every thread's connection, which would then fail
        # with sqlite3's own error.
        if self._closed:
            raise Unavailable("the registry is closed (the server is shutting down)")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path, self._busy_timeout_ms)
            conn.row_factory = _dict_row
            conn.execute("PRAGMA query_only = ON")
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction (one consistent snapshot) on this thread's connection."""
        conn = self._reader()
        with _translated(self.path):
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")

    async def read_off_loop(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`fn` in a `read` on a thread of the default executor (its own connection), for
        reads of many rows: the query (SQLite releases the GIL while it steps) and the
        decoding in `fn` run beside the event loop instead of stopping every other rpc."""

        def run() -> T:
            with self.read() as c:
                return fn(c)

        return await asyncio.to_thread(run)

    def read_one(self, sql: str, params: tuple[Any, ...]) -> Row | None:
        """The first row of one query, run on its own: a single statement reads one
        consistent snapshot without an explicit transaction (two statements fewer than
        `read`, which matters on the hit path)."""
        conn = self._reader()
        with _translated(self.path):
            # fetchall, not fetchone: the statement runs to its end, so no read snapshot
            # stays open behind an unfinished cursor.
            found: list[Row] = conn.execute(sql, params).fetchall()
        return found[0] if found else None

    def data_version(self) -> tuple[int, int]:
        """(this thread's reader connection, its `PRAGMA data_version`): changes once any
        other connection (the writer, another process's) commits, never otherwise. About
        6 µs, half a point read."""
        conn = self._reader()
        with _translated(self.path):
            row = conn.execute("PRAGMA data_version").fetchone()
        return id(conn), int(row["data_version"])

    def _run_write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._write_conn
        with _translated(self.path):
            # BEGIN IMMEDIATE takes the write lock up front: a deferred transaction that
            # reads and then writes fails with SQLITE_BUSY (no waiting) when another
            # connection committed in between.
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        return result

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` in one write transaction on the writer thread; rolled back if it raises."""
        if self._closed:
            raise Unavailable("the registry is closed (the server is shutting down)")
        return await asyncio.get_running_loop().run_in_executor(self._writer, self._run_write, fn)

    def write_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`write` for code without an event loop (tools, tests)."""
        if self._closed:
            raise Unavailable("the registry is closed (the server is shutting down)")
        return self._writer.submit(self._run_write, fn).result()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._writer.shutdown(wait=True)
        self._write_conn.close()
        with self._readers_lock:
            readers, self._readers = self._readers, []
        for conn in readers:
            conn.close()
