"""`EvaluationStore` on SQLite: one row per evaluation in `evaluations` (schema migration 8),
deleted with its artifact by a trigger in the artifact's own transaction."""

from __future__ import annotations

import sqlite3
from typing import Any

from prebake.core.errors import InvalidArgument
from prebake.server.records import Evaluation
from prebake.server.storage import page_tokens
from prebake.server.storage.conditions import ConditionFailed
from prebake.server.storage.evaluation_store import TOKEN_TAG, EvaluationQuery
from prebake.server.storage.page_tokens import Page
from prebake.server.storage.record_json import evaluation_from_json, evaluation_json
from prebake.server.storage.sqlite.connection import Database


class SqliteEvaluationStore:
    """See `prebake.server.storage.evaluation_store.EvaluationStore`. Reads run beside the
    loop (pages of up to a thousand bodies to decode), writes on the writer thread."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def add(self, evaluation: Evaluation, *, expect_manifest: str) -> None:
        body = evaluation_json(evaluation)

        def write(c: sqlite3.Connection) -> None:
            # In the writer's transaction: the artifact cannot change between check and insert.
            row = c.execute(
                "SELECT manifest_digest FROM artifacts WHERE artifact_id = ?", (evaluation.artifact_id,)
            ).fetchone()
            if row is None or row["manifest_digest"] != expect_manifest:
                raise ConditionFailed(f"artifact {evaluation.artifact_id} is gone or changed meanwhile")
            try:
                c.execute(
                    "INSERT INTO evaluations (evaluation_id, artifact_id, model, created_at, body) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (
                        evaluation.evaluation_id,
                        evaluation.artifact_id,
                        evaluation.model,
                        evaluation.created_at,
                        body,
                    ),
                )
            except sqlite3.IntegrityError as exc:
                raise ConditionFailed(f"evaluation {evaluation.evaluation_id} exists") from exc

        await self._db.write(write)

    async def list_page(self, query: EvaluationQuery, page_token: str, limit: int) -> Page[Evaluation]:
        if limit < 1:
            raise InvalidArgument(f"limit must be positive, got {limit}")
        tag = page_tokens.list_tag(TOKEN_TAG, [query.artifact_id, query.model])
        after = page_tokens.decode(tag, page_token, (float, str))
        where: list[str] = ["1"]
        params: list[Any] = []
        if query.artifact_id:
            where.append("artifact_id = ?")
            params.append(query.artifact_id)
        if query.model:
            where.append("model = ?")
            params.append(query.model)
        if after is not None:
            # As ArtifactIndex.list_page: a range the newest-first indexes start from.
            where.append("created_at <= ? AND (created_at < ? OR evaluation_id > ?)")
            params.extend([after[0], after[0], after[1]])
        sql = (
            f"SELECT body FROM evaluations WHERE {' AND '.join(where)} "
            "ORDER BY created_at DESC, evaluation_id LIMIT ?"
        )

        def read(c: sqlite3.Connection) -> tuple[list[Evaluation], bool]:
            found = c.execute(sql, (*params, limit + 1)).fetchall()
            return [evaluation_from_json(row["body"]) for row in found[:limit]], len(found) > limit

        items, more = await self._db.read_off_loop(read)
        token = ""
        if more:
            last = items[-1]
            token = page_tokens.encode(tag, [last.created_at, last.evaluation_id])
        return Page(items, token)
