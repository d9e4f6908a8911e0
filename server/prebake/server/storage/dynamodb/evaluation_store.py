"""`EvaluationStore` on DynamoDB: one item per evaluation in `PREFIX-evaluations`.

An evaluation item carries the `ref_nonce` its artifact's item had when it was added (a new
nonce per artifact put: see `artifact_index`), and counts only while the artifact item still
holds that nonce. So a delete or replace of the artifact hides its evaluations at the instant
of that write, with no transaction across the two tables; `DynamoArtifactIndex` then deletes
them (`drop_evaluations`, best effort: one left behind counts for nothing and costs its bytes).

`add` writes the item and then re-reads the artifact's nonce: if the artifact was deleted or
replaced in between, the new item is deleted again and the add fails with `ConditionFailed`,
so an add racing a delete never leaves an evaluation behind that the delete's clean-up missed.
"""

from __future__ import annotations

import logging
from typing import Any

from prebake.core.errors import InvalidArgument, PrebakeError
from prebake.server.records import Evaluation
from prebake.server.storage import page_tokens
from prebake.server.storage.conditions import ConditionFailed
from prebake.server.storage.dynamodb import items
from prebake.server.storage.dynamodb.engine import Engine
from prebake.server.storage.dynamodb.items import Item, n, s
from prebake.server.storage.evaluation_store import TOKEN_TAG, EvaluationQuery
from prebake.server.storage.page_tokens import Page
from prebake.server.storage.record_json import evaluation_from_json, evaluation_json

log = logging.getLogger(__name__)

EVALUATIONS_PARTITION = "evaluations"
# Items read per query page while filtering (items of replaced artifacts are skipped).
READ_PAGE = 100


def _item(evaluation: Evaluation, nonce: str) -> Item:
    return {
        "artifact_id": s(evaluation.artifact_id),
        "list_sk": s(items.newest_first(evaluation.created_at, evaluation.evaluation_id)),
        "list_pk": s(EVALUATIONS_PARTITION),
        "model": s(evaluation.model),
        "evaluation_id": s(evaluation.evaluation_id),
        "created_at": n(evaluation.created_at),
        "nonce": s(nonce),
        "body": s(evaluation_json(evaluation)),
    }


def _artifact_state(engine: Engine, artifact_id: str) -> tuple[str, str] | None:
    """(manifest digest, ref nonce) of the artifact item, or None."""
    found = engine.get(
        engine.names.artifacts, {"artifact_id": s(artifact_id)}, ("manifest_digest", "ref_nonce")
    )
    if found is None:
        return None
    return items.get_s(found, "manifest_digest"), items.get_s(found, "ref_nonce")


async def drop_evaluations(engine: Engine, artifact_id: str, nonce: str) -> None:
    """Delete the evaluations of artifact `artifact_id` added while it held `nonce` (they no
    longer count). Best effort: failures are logged, never raised."""
    table = engine.names.evaluations
    params = {
        "TableName": table,
        "KeyConditionExpression": "#artifact_id = :id",
        "FilterExpression": "#nonce = :nonce",
        "ProjectionExpression": "#artifact_id, #list_sk, #nonce",
        "ExpressionAttributeValues": {":id": s(artifact_id), ":nonce": s(nonce)},
        "ConsistentRead": True,
    }

    def drop() -> int:
        keys = [
            {"DeleteRequest": {"Key": {"artifact_id": item["artifact_id"], "list_sk": item["list_sk"]}}}
            for item in engine.query(params)
        ]
        engine.batch_write(table, keys)
        return len(keys)

    try:
        await engine.run(f"table {table}", drop)
    except PrebakeError as exc:
        log.warning(
            "left evaluations of artifact %s in %s (they count for nothing): %s", artifact_id, table, exc
        )


class DynamoEvaluationStore:
    """See `prebake.server.storage.evaluation_store.EvaluationStore`. Thread safety: as the Protocol."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._table = engine.names.evaluations
        self._where = f"tables {self._table} and {engine.names.artifacts}"

    async def add(self, evaluation: Evaluation, *, expect_manifest: str) -> None:
        engine = self._engine
        key = {
            "artifact_id": s(evaluation.artifact_id),
            "list_sk": s(items.newest_first(evaluation.created_at, evaluation.evaluation_id)),
        }

        def write() -> None:
            state = _artifact_state(engine, evaluation.artifact_id)
            if state is None or state[0] != expect_manifest:
                raise ConditionFailed(f"artifact {evaluation.artifact_id} is gone or changed meanwhile")
            put = {
                "TableName": self._table,
                "Item": _item(evaluation, state[1]),
                "ConditionExpression": "attribute_not_exists(#list_sk)",
            }
            engine.transact([{"Put": put}])  # a transaction for its idempotency token
            if _artifact_state(engine, evaluation.artifact_id) != state:
                engine.client.delete_item(TableName=self._table, Key=key)
                raise ConditionFailed(
                    f"artifact {evaluation.artifact_id} changed while its evaluation was added"
                )

        await engine.run(self._where, write)

    async def list_page(self, query: EvaluationQuery, page_token: str, limit: int) -> Page[Evaluation]:
        if limit < 1:
            raise InvalidArgument(f"limit must be positive, got {limit}")
        tag = page_tokens.list_tag(TOKEN_TAG, [query.artifact_id, query.model])
        after = page_tokens.decode(tag, page_token, (float, str))
        params: dict[str, Any] = {"TableName": self._table, "Limit": READ_PAGE}
        if query.artifact_id:
            params.update(KeyConditionExpression="#artifact_id = :pk", ConsistentRead=True)
            pk = query.artifact_id
        elif query.model:
            params.update(IndexName="by_model", KeyConditionExpression="#model = :pk")
            pk = query.model
        else:
            params.update(IndexName="by_created", KeyConditionExpression="#list_pk = :pk")
            pk = EVALUATIONS_PARTITION
        params["ExpressionAttributeValues"] = {":pk": s(pk)}
        if after is not None:
            params["KeyConditionExpression"] += " AND #list_sk > :after"
            params["ExpressionAttributeValues"][":after"] = s(
                items.newest_first(float(after[0]), str(after[1]))
            )
        engine = self._engine

        def read() -> list[Evaluation]:
            # The index's order is the page's; items of artifacts deleted or replaced since
            # (another nonce) are skipped, reading on until the page is full.
            nonces: dict[str, str | None] = {}
            kept: list[Evaluation] = []
            for item in engine.query(params):
                artifact_id = items.get_s(item, "artifact_id")
                if artifact_id not in nonces:
                    state = _artifact_state(engine, artifact_id)
                    nonces[artifact_id] = None if state is None else state[1]
                if nonces[artifact_id] != items.get_s(item, "nonce"):
                    continue
                kept.append(evaluation_from_json(items.get_s(item, "body")))
                if len(kept) > limit:
                    break
            return kept

        found = await engine.run(self._where, read)
        page = found[:limit]
        token = ""
        if len(found) > limit:
            token = page_tokens.encode(tag, [page[-1].created_at, page[-1].evaluation_id])
        return Page(page, token)
