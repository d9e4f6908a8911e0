"""`ArtifactIndex` on SQLite: rows in `artifacts`, files in `artifact_files`."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from prebake.core.errors import InvalidArgument
from prebake.server import nearest as near
from prebake.server.bounded import Bounded
from prebake.server.records import Artifact, Digest, FileEntry, JobState, NormalizedKey, RegistryCounts
from prebake.server.storage import page_tokens
from prebake.server.storage.artifact_index import ArtifactQuery, JobWrite
from prebake.server.storage.conditions import ConditionFailed
from prebake.server.storage.page_tokens import Page
from prebake.server.storage.sqlite import rows
from prebake.server.storage.sqlite.connection import Database
from prebake.server.storage.sqlite.job_queue import cas_job

TOKEN_TAG = "artifacts"
_INSERT_FILE = "INSERT INTO artifact_files (artifact_id, path, hash, size, executable) VALUES (?, ?, ?, ?, ?)"
# The columns of an artifact that change without a new manifest; the rest of a row and its
# files are fixed for as long as (manifest_digest, created_at) is (a replace writes a new row).
_VOLATILE_SQL = (
    "SELECT manifest_digest, created_at, pinned, hit_count, last_accessed_at, unavailable "
    "FROM artifacts WHERE artifact_id = ?"
)
_EXISTS_SQL = "SELECT 1 AS found FROM artifacts WHERE artifact_id = ?"
# The column of a NormalizedKey field where the names differ (see rows.key_row).
_KEY_COLUMN = {"options": "key_options"}
# Decoded artifacts kept to answer repeated gets with a one-row read (`_VOLATILE_SQL`).
RECENT_ARTIFACTS = 4096


def _artifact_row(c: sqlite3.Connection, artifact_id: str) -> dict[str, Any] | None:
    row: dict[str, Any] | None = c.execute(
        "SELECT * FROM artifacts WHERE artifact_id = ?", (artifact_id,)
    ).fetchone()
    return row


def _files(c: sqlite3.Connection, artifact_id: str) -> tuple[FileEntry, ...]:
    found = c.execute(
        "SELECT path, hash, size, executable FROM artifact_files WHERE artifact_id = ? ORDER BY path",
        (artifact_id,),
    ).fetchall()
    return tuple(rows.file_from_row(row) for row in found)


def _delete_rows(c: sqlite3.Connection, artifact_id: str) -> None:
    c.execute("DELETE FROM artifact_files WHERE artifact_id = ?", (artifact_id,))
    c.execute("DELETE FROM artifacts WHERE artifact_id = ?", (artifact_id,))


def _insert(c: sqlite3.Connection, artifact: Artifact) -> None:
    row = rows.artifact_row(artifact)
    c.execute(f"INSERT INTO artifacts ({', '.join(row)}) VALUES ({', '.join(':' + k for k in row)})", row)
    try:
        c.executemany(
            _INSERT_FILE,
            [
                (artifact.artifact_id, f.path, f.digest.hash, f.digest.size, int(f.executable))
                for f in artifact.files
            ],
        )
    except sqlite3.IntegrityError as exc:
        repeated = sorted(path for path, n in Counter(f.path for f in artifact.files).items() if n > 1)
        if not repeated:
            raise
        raise InvalidArgument(f"file paths must be unique; repeated: {', '.join(repeated)}") from exc


class SqliteArtifactIndex:
    """See `prebake.server.storage.artifact_index.ArtifactIndex`. Reads run inline
    (WAL snapshots), writes on the database's writer thread."""

    def __init__(self, db: Database) -> None:
        self._db = db
        # Artifacts recently read, by id. A get of one of them reads only its volatile
        # columns (`_VOLATILE_SQL`; decoding whole rows dominated a hit's cost); since those
        # are read from the shared file every time, a change made by another process is
        # seen at once, as without the memo.
        self._recent: Bounded[str, Artifact] = Bounded(RECENT_ARTIFACTS)

    async def get(self, artifact_id: str) -> Artifact | None:
        known = self._recent.get(artifact_id)
        if known is not None:
            now = self._db.read_one(_VOLATILE_SQL, (artifact_id,))
            if now is None:
                self._recent.pop(artifact_id)
                return None
            if now["manifest_digest"] == known.manifest_digest and now["created_at"] == known.created_at:
                return dataclasses.replace(
                    known,
                    pinned=bool(now["pinned"]),
                    hit_count=now["hit_count"],
                    last_accessed_at=now["last_accessed_at"],
                    unavailable=now["unavailable"],
                )
        # An absent one (every miss asks) in one statement; a present one, once, with its files
        # in one snapshot.
        if self._db.read_one(_EXISTS_SQL, (artifact_id,)) is None:
            return None
        with self._db.read() as c:
            row = _artifact_row(c, artifact_id)
            if row is None:
                return None
            files = _files(c, artifact_id)
        found = rows.artifact_from_row(row, files)
        self._recent.put(artifact_id, found)
        return found

    def change_marker(self) -> Hashable | None:
        return self._db.data_version()

    async def put(
        self, artifact: Artifact, *, expect_manifest: str | None, complete: JobWrite | None = None
    ) -> None:
        def write(c: sqlite3.Connection) -> None:
            existing = _artifact_row(c, artifact.artifact_id)
            if expect_manifest is None and existing is not None:
                raise ConditionFailed(f"artifact {artifact.artifact_id} already exists")
            if expect_manifest is not None and (
                existing is None or existing["manifest_digest"] != expect_manifest
            ):
                raise ConditionFailed(f"artifact {artifact.artifact_id} changed meanwhile")
            if existing is not None:
                _delete_rows(c, artifact.artifact_id)
            _insert(c, artifact)
            if complete is not None:
                cas_job(c, complete.job, complete.expect_revision)

        await self._db.write(write)

    async def put_new_many(self, artifacts: Sequence[Artifact]) -> None:
        """Store many new artifacts (rows and files) in one write transaction: bulk loading of
        large registries (benchmarks, tests of scale): one statement per table, not a transaction each.

        Not part of `ArtifactIndex`: no manifest archive is written (`prebake reindex` would not
        restore these) and the only condition is that no id exists yet; if one does, or a file
        path repeats within an artifact, `sqlite3.IntegrityError` is raised and nothing is stored.
        The counts `counts` reports are kept as for `put` (the same triggers).
        """

        def write(c: sqlite3.Connection) -> None:
            if not artifacts:
                return
            columns = list(rows.artifact_row(artifacts[0]))
            c.executemany(
                f"INSERT INTO artifacts ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                (tuple(rows.artifact_row(a).values()) for a in artifacts),
            )
            c.executemany(
                _INSERT_FILE,
                (
                    (a.artifact_id, f.path, f.digest.hash, f.digest.size, int(f.executable))
                    for a in artifacts
                    for f in a.files
                ),
            )

        await self._db.write(write)

    async def delete(self, artifact_id: str, *, expect_manifest: str, expect_pinned: bool) -> None:
        def write(c: sqlite3.Connection) -> None:
            row = _artifact_row(c, artifact_id)
            if (
                row is None
                or row["manifest_digest"] != expect_manifest
                or bool(row["pinned"]) != expect_pinned
            ):
                raise ConditionFailed(f"artifact {artifact_id} changed meanwhile")
            _delete_rows(c, artifact_id)

        await self._db.write(write)

    async def set_pinned(self, artifact_id: str, pinned: bool) -> Artifact | None:
        def write(c: sqlite3.Connection) -> Artifact | None:
            row = c.execute(
                "UPDATE artifacts SET pinned = ? WHERE artifact_id = ? RETURNING *",
                (int(pinned), artifact_id),
            ).fetchone()
            return None if row is None else rows.artifact_from_row(row, _files(c, artifact_id))

        return await self._db.write(write)

    async def record_hits(self, hits: Mapping[str, tuple[int, float]]) -> None:
        if not hits:
            return
        params = [(count, at, artifact_id) for artifact_id, (count, at) in hits.items()]

        def write(c: sqlite3.Connection) -> None:
            c.executemany(
                "UPDATE artifacts SET hit_count = hit_count + ?, "
                "last_accessed_at = MAX(last_accessed_at, ?) WHERE artifact_id = ?",
                params,
            )

        await self._db.write(write)

    async def record_lookups(self, lookups: int, hits: int) -> None:
        if not lookups and not hits:
            return

        def write(c: sqlite3.Connection) -> None:
            c.executemany(
                "UPDATE registry_counts SET n = n + ? WHERE name = ?",
                [(lookups, "lifetime_lookups"), (hits, "lifetime_hits")],
            )

        await self._db.write(write)

    async def list_page(self, query: ArtifactQuery, page_token: str, limit: int) -> Page[Artifact]:
        if limit < 1:
            raise InvalidArgument(f"limit must be positive, got {limit}")
        tag = page_tokens.list_tag(TOKEN_TAG, [query.kind, query.model, query.pinned_only])
        after = page_tokens.decode(tag, page_token, (float, str))
        where: list[str] = ["1"]
        params: list[Any] = []
        if query.kind:
            where.append("kind = ?")
            params.append(query.kind)
        if query.model:
            where.append("model = ?")
            params.append(query.model)
        if query.pinned_only:
            where.append("pinned = 1")
        if after is not None:
            # Newest first, then by id: the rows after (created_at, id) in that order. The
            # leading `created_at <= ?` is a range the (created_at DESC, artifact_id) index
            # starts from, so a deep page costs what the first one does.
            where.append("created_at <= ? AND (created_at < ? OR artifact_id > ?)")
            params.extend([after[0], after[0], after[1]])
        sql = (
            f"SELECT * FROM artifacts WHERE {' AND '.join(where)} "
            "ORDER BY created_at DESC, artifact_id LIMIT ?"
        )

        def read(c: sqlite3.Connection) -> tuple[list[Artifact], bool]:
            found = c.execute(sql, (*params, limit + 1)).fetchall()
            return [rows.artifact_from_row(row) for row in found[:limit]], len(found) > limit

        items, more = await self._db.read_off_loop(read)
        token = ""
        if more:
            last = items[-1]
            token = page_tokens.encode(tag, [last.created_at, last.artifact_id])
        return Page(items, token)

    async def of_model(self, kind: str, model: str, limit: int) -> list[Artifact]:
        def read(c: sqlite3.Connection) -> list[Artifact]:
            found = c.execute(
                "SELECT * FROM artifacts WHERE kind = ? AND model = ? "
                "ORDER BY created_at DESC, artifact_id LIMIT ?",
                (kind, model, limit),
            ).fetchall()
            return [rows.artifact_from_row(row) for row in found]

        return await self._db.read_off_loop(read)

    async def nearest(self, key: NormalizedKey, limit: int) -> list[Artifact]:
        # rank_nearest in SQL: the distance is the number of differing key columns, summed
        # by SQLite over the model's newest SCAN_LIMIT rows; only the winners are decoded.
        wanted = rows.key_row(key)
        columns = [_KEY_COLUMN.get(name, name) for name in near.DISTANCE_FIELDS]
        distance = " + ".join(f"({column} IS NOT ?)" for column in columns)
        # The newest rows through the covering (kind, model, created_at DESC, artifact_id,
        # key columns...) index, ranked and cut to `limit` before the join: joining first
        # (one row lookup per scanned entry) made the scan of 500 cost 1.9 ms instead of 0.4.
        sql = (
            "SELECT artifacts.* FROM (SELECT id, at, distance FROM ("
            f"SELECT artifact_id AS id, created_at AS at, {distance} AS distance FROM artifacts "
            "WHERE kind = ? AND model = ? ORDER BY created_at DESC, artifact_id LIMIT ?"
            ") WHERE id != ? ORDER BY distance, at DESC, id LIMIT ?"
            ") AS near JOIN artifacts ON artifacts.artifact_id = near.id "
            "ORDER BY near.distance, near.at DESC, near.id"
        )
        params = (*(wanted[c] for c in columns), key.kind, key.model, near.SCAN_LIMIT, key.digest, limit)

        def read(c: sqlite3.Connection) -> list[Artifact]:
            return [rows.artifact_from_row(row) for row in c.execute(sql, params).fetchall()]

        return await self._db.read_off_loop(read)

    async def is_referenced(self, digest: Digest) -> bool:
        with self._db.read() as c:
            row = c.execute(
                """
                SELECT EXISTS (SELECT 1 FROM artifact_files WHERE hash = :h AND size = :s)
                    OR EXISTS (SELECT 1 FROM artifacts WHERE log_hash = :h AND log_size = :s)
                    OR EXISTS (SELECT 1 FROM jobs WHERE log_hash = :h AND log_size = :s) AS used
                """,
                {"h": digest.hash, "s": digest.size},
            ).fetchone()
        return bool(row["used"])

    async def artifacts_using(self, digest: Digest, limit: int) -> list[str]:
        with self._db.read() as c:
            found = c.execute(
                """
                SELECT artifact_id FROM artifact_files WHERE hash = :h AND size = :s
                UNION SELECT artifact_id FROM artifacts WHERE log_hash = :h AND log_size = :s
                ORDER BY artifact_id LIMIT :n
                """,
                {"h": digest.hash, "s": digest.size, "n": max(0, limit)},
            ).fetchall()
        return [row["artifact_id"] for row in found]

    async def mark_unavailable(
        self, artifact_id: str, reason: str, *, expect_manifest: str
    ) -> Artifact | None:
        if not reason:
            raise ValueError("an unavailable artifact needs a reason")

        def write(c: sqlite3.Connection) -> Artifact | None:
            row = c.execute(
                "UPDATE artifacts SET unavailable = ? "
                "WHERE artifact_id = ? AND manifest_digest = ? RETURNING *",
                (reason, artifact_id, expect_manifest),
            ).fetchone()
            return None if row is None else rows.artifact_from_row(row, _files(c, artifact_id))

        return await self._db.write(write)

    async def least_recently_used(self, limit: int) -> list[Artifact]:
        if limit < 1:
            return []

        def read(c: sqlite3.Connection) -> list[Artifact]:
            found = c.execute(
                "SELECT * FROM artifacts WHERE pinned = 0 ORDER BY last_accessed_at, artifact_id LIMIT ?",
                (limit,),
            ).fetchall()
            return [rows.artifact_from_row(row) for row in found]

        return await self._db.read_off_loop(read)

    async def counts(self) -> RegistryCounts:
        # Kept by triggers (schema migration 5): a read of a few rows, not a COUNT.
        with self._db.read() as c:
            kept = {row["name"]: row["n"] for row in c.execute("SELECT name, n FROM registry_counts")}
        by_state = {state.value: kept.get(f"jobs:{state.value}", 0) for state in JobState}
        return RegistryCounts(
            artifacts=kept.get("artifacts", 0),
            pinned_artifacts=kept.get("pinned", 0),
            jobs_by_state=by_state,
            lifetime_lookups=kept.get("lifetime_lookups", 0),
            lifetime_hits=kept.get("lifetime_hits", 0),
        )
