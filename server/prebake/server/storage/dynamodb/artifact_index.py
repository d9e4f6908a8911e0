"""`ArtifactIndex` on DynamoDB: one item per artifact in `PREFIX-artifacts`, blob
references in `PREFIX-blob-refs`.

Publishing is one TransactWriteItems: the artifact item on `attribute_not_exists`
(create) or on its stored manifest digest (replace), plus, for complete-and-publish,
the job's compare-and-set items (`DynamoJobQueue.change_items`: its revision captures
owner and fencing token). An artifact's files live inside its item (`items.encode_files`),
so no reader ever sees part of one.

Blob references (`is_referenced` without scanning): before the transaction, one
reference item per blob of the artifact, ``blob`` = "hash/size", ``holder`` =
``a#ID#NONCE``, where NONCE is new for each put and stored in the artifact item. A
reference counts only while the artifact item holds that nonce, so references of a put
that failed or was killed, and of a replaced or deleted artifact, count for nothing;
they are deleted once their put failed or their artifact is replaced or deleted (a
reference is never deleted while it could still count: nonces are never reused).
Because references are written first, a reader never sees an artifact whose blob
`is_referenced` denies. Job logs are referenced by ``j#JOB_ID`` items, checked
against the job's log.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
from collections import Counter
from collections.abc import Hashable, Mapping
from typing import Any

from botocore.exceptions import ClientError

from prebake.core.errors import InvalidArgument, PrebakeError
from prebake.server import nearest as near
from prebake.server.records import Artifact, Digest, JobState, NormalizedKey, RegistryCounts
from prebake.server.storage import page_tokens
from prebake.server.storage.artifact_index import ArtifactQuery, JobWrite
from prebake.server.storage.conditions import ConditionFailed
from prebake.server.storage.dynamodb import items
from prebake.server.storage.dynamodb.engine import Engine
from prebake.server.storage.dynamodb.evaluation_store import drop_evaluations
from prebake.server.storage.dynamodb.items import Item, boolean, n, s
from prebake.server.storage.dynamodb.job_queue import DynamoJobQueue
from prebake.server.storage.dynamodb.tables import ARTIFACT_LISTED_ATTRIBUTES
from prebake.server.storage.page_tokens import Page

log = logging.getLogger(__name__)

# The SQLite backend's tag: a token means the same position on either engine.
TOKEN_TAG = "artifacts"
FILTERED_PAGE = 100
REFS_PAGE = 25


def _repeated_paths(artifact: Artifact) -> None:
    repeated = sorted(path for path, k in Counter(f.path for f in artifact.files).items() if k > 1)
    if repeated:
        raise InvalidArgument(f"file paths must be unique; repeated: {', '.join(repeated)}")


def _refs(digests: set[Digest], holder: str, action: str) -> list[dict[str, Any]]:
    if action == "put":
        return [{"PutRequest": {"Item": items.ref_item(d, holder)}} for d in sorted(digests)]
    return [{"DeleteRequest": {"Key": items.ref_item(d, holder)}} for d in sorted(digests)]


class DynamoArtifactIndex:
    """See `prebake.server.storage.artifact_index.ArtifactIndex`. Thread safety: as the Protocol."""

    def __init__(self, engine: Engine, jobs: DynamoJobQueue) -> None:
        self._engine = engine
        self._jobs = jobs
        self._table = engine.names.artifacts
        self._refs = engine.names.blob_refs
        self._where = f"table {self._table}"

    def _key(self, artifact_id: str) -> Item:
        return {"artifact_id": s(artifact_id)}

    def _get_sync(self, artifact_id: str) -> Artifact | None:
        found = self._engine.get(self._table, self._key(artifact_id))
        return None if found is None else items.artifact_from_item(found)

    async def get(self, artifact_id: str) -> Artifact | None:
        return await self._engine.run(self._where, lambda: self._get_sync(artifact_id))

    def change_marker(self) -> Hashable | None:
        return None  # knowing would take a read of the table (and replicas write it)

    async def _stored_nonce(self, artifact_id: str) -> tuple[Artifact, str] | None:
        def read() -> tuple[Artifact, str] | None:
            found = self._engine.get(self._table, self._key(artifact_id))
            if found is None:
                return None
            return items.artifact_from_item(found), items.get_s(found, "ref_nonce")

        return await self._engine.run(self._where, read)

    async def _drop_refs(self, digests: set[Digest], holder: str) -> None:
        """Delete references that no longer count. Best effort: one left behind counts
        for nothing and costs only its few bytes."""
        try:
            await self._engine.run(
                f"table {self._refs}",
                lambda: self._engine.batch_write(self._refs, _refs(digests, holder, "delete")),
            )
        except PrebakeError as exc:
            log.warning(
                "left %d stale blob references of %s in %s: %s", len(digests), holder, self._refs, exc
            )

    async def put(
        self, artifact: Artifact, *, expect_manifest: str | None, complete: JobWrite | None = None
    ) -> None:
        _repeated_paths(artifact)
        files = items.encode_files(artifact.files)
        nonce = secrets.token_hex(8)
        item = items.artifact_item(artifact, files, nonce)
        old: tuple[Artifact, str] | None = None
        if expect_manifest is None:
            write = {
                "TableName": self._table,
                "Item": item,
                "ConditionExpression": "attribute_not_exists(#artifact_id)",
            }
        else:
            old = await self._stored_nonce(artifact.artifact_id)
            if old is None or old[0].manifest_digest != expect_manifest:
                raise ConditionFailed(f"artifact {artifact.artifact_id} changed meanwhile")
            write = {
                "TableName": self._table,
                "Item": item,
                "ConditionExpression": "#manifest_digest = :manifest AND #ref_nonce = :nonce",
                "ExpressionAttributeValues": {":manifest": s(expect_manifest), ":nonce": s(old[1])},
            }
        writes: list[dict[str, Any]] = [{"Put": write}]
        stored_job = None
        if complete is not None:
            before = await self._jobs.stored_at(complete.job.job_id, complete.expect_revision)
            stored_job, job_writes = self._jobs.change_items(before, complete.job)
            writes += job_writes
        holder = items.artifact_holder(artifact.artifact_id, nonce)
        blobs = items.artifact_blobs(artifact)
        where = f"tables {self._table}, {self._refs}" + (
            f" and {self._engine.names.jobs}" if complete else ""
        )

        def publish() -> None:
            # References first: there is never a moment when the artifact is visible
            # and one of its blobs looks unreferenced.
            self._engine.batch_write(self._refs, _refs(blobs, holder, "put"))
            self._engine.transact(writes)

        try:
            await self._engine.run(where, publish)
        except (ConditionFailed, InvalidArgument):
            # Cancelled for sure (unlike `Unavailable`, whose write may have landed).
            await self._drop_refs(blobs, holder)
            raise
        if stored_job is not None:
            self._jobs.remember(stored_job)
        if old is not None:
            await self._drop_refs(
                items.artifact_blobs(old[0]), items.artifact_holder(artifact.artifact_id, old[1])
            )
            # The replaced artifact's evaluations: hidden since the write (another nonce).
            await drop_evaluations(self._engine, artifact.artifact_id, old[1])

    async def delete(self, artifact_id: str, *, expect_manifest: str, expect_pinned: bool) -> None:
        old = await self._stored_nonce(artifact_id)
        if old is None or old[0].manifest_digest != expect_manifest or old[0].pinned != expect_pinned:
            raise ConditionFailed(f"artifact {artifact_id} changed meanwhile")
        delete = {
            "TableName": self._table,
            "Key": self._key(artifact_id),
            "ConditionExpression": (
                "#manifest_digest = :manifest AND #pinned = :pinned AND #ref_nonce = :nonce"
            ),
            "ExpressionAttributeValues": {
                ":manifest": s(expect_manifest),
                ":pinned": boolean(expect_pinned),
                ":nonce": s(old[1]),
            },
        }
        # A transaction of one item for its idempotency token: a retried delete whose
        # first answer was lost does not report a condition failure.
        await self._engine.run(self._where, lambda: self._engine.transact([{"Delete": delete}]))
        await self._drop_refs(items.artifact_blobs(old[0]), items.artifact_holder(artifact_id, old[1]))
        await drop_evaluations(self._engine, artifact_id, old[1])

    async def set_pinned(self, artifact_id: str, pinned: bool) -> Artifact | None:
        params = {
            "TableName": self._table,
            "Key": self._key(artifact_id),
            "UpdateExpression": "SET #pinned = :pinned",
            "ConditionExpression": "attribute_exists(#artifact_id)",
            "ExpressionAttributeValues": {":pinned": boolean(pinned)},
            "ReturnValues": "ALL_NEW",
        }
        try:
            found = await self._engine.run(self._where, lambda: self._engine.update(params))
        except ConditionFailed:
            return None
        return None if found is None else items.artifact_from_item(found)

    def _record_hit(self, artifact_id: str, count: int, at: float) -> None:
        base = {"TableName": self._table, "Key": self._key(artifact_id)}
        # Usually the access time moves on: one update. Else only the count (and only
        # for an existing item: `attribute_exists` keeps an unknown id from being created).
        later = {
            **base,
            "UpdateExpression": "ADD #hit_count :count SET #last_accessed_at = :at",
            "ConditionExpression": "attribute_exists(#artifact_id) AND #last_accessed_at < :at",
            "ExpressionAttributeValues": {":count": n(count), ":at": n(at)},
        }
        count_only = {
            **base,
            "UpdateExpression": "ADD #hit_count :count",
            "ConditionExpression": "attribute_exists(#artifact_id)",
            "ExpressionAttributeValues": {":count": n(count)},
        }
        for params in (later, count_only):
            try:
                self._engine.update(params)
                return
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
                    raise

    async def record_hits(self, hits: Mapping[str, tuple[int, float]]) -> None:
        # Not conditional on anything but existence and time; a retried ADD may count a
        # batch twice, a crash may lose one: counters, never artifacts.
        await asyncio.gather(
            *[
                self._engine.run(self._where, functools.partial(self._record_hit, artifact_id, count, at))
                for artifact_id, (count, at) in hits.items()
            ]
        )

    async def record_lookups(self, lookups: int, hits: int) -> None:
        if not lookups and not hits:
            return
        # One atomic ADD per batch on one item of the jobs table (created by the first ADD).
        params = {
            "TableName": self._engine.names.jobs,
            "Key": items.COUNTERS_KEY,
            "UpdateExpression": "ADD #lookups :lookups, #hits :hits",
            "ExpressionAttributeValues": {":lookups": n(lookups), ":hits": n(hits)},
        }
        await self._engine.run(f"table {self._engine.names.jobs}", lambda: self._engine.update(params))

    async def list_page(self, query: ArtifactQuery, page_token: str, limit: int) -> Page[Artifact]:
        if limit < 1:
            raise InvalidArgument(f"limit must be positive, got {limit}")
        tag = page_tokens.list_tag(TOKEN_TAG, [query.kind, query.model, query.pinned_only])
        after = page_tokens.decode(tag, page_token, (float, str))
        if query.kind and query.model:  # both in the index key: only the pin is filtered here
            params = self._index("by_model", "kind_model", items.kind_model(query.kind, query.model))
        else:
            params = self._index("by_created", "list_pk", items.ARTIFACTS_PARTITION)
        if after is not None:
            params["KeyConditionExpression"] += " AND #list_sk > :after"
            params["ExpressionAttributeValues"][":after"] = s(
                items.newest_first(float(after[0]), str(after[1]))
            )
        by_model = bool(query.kind and query.model)
        filtered = query.pinned_only or (not by_model and bool(query.kind or query.model))
        params["Limit"] = max(limit + 1, FILTERED_PAGE) if filtered else limit + 1

        def wanted(artifact: Artifact) -> bool:
            return (
                (not query.kind or artifact.key.kind == query.kind)
                and (not query.model or artifact.key.model == query.model)
                and (not query.pinned_only or artifact.pinned)
            )

        def read() -> list[Artifact]:
            # Newest first, then by id: the index's order. Filters in code, reading on
            # until the page is full (DynamoDB's Limit counts items read, not kept).
            kept: list[Artifact] = []
            for item in self._engine.query(params):
                artifact = items.artifact_from_item(item)
                if wanted(artifact):
                    kept.append(artifact)
                    if len(kept) > limit:
                        break
            return kept

        found = await self._engine.run(self._where, read)
        page = found[:limit]
        token = ""
        if len(found) > limit:
            token = page_tokens.encode(tag, [page[-1].created_at, page[-1].artifact_id])
        return Page(page, token)

    def _index(self, index: str, pk_name: str, pk: str) -> dict[str, Any]:
        return {
            "TableName": self._table,
            "IndexName": index,
            "KeyConditionExpression": f"#{pk_name} = :pk",
            "ExpressionAttributeValues": {":pk": s(pk)},
        }

    async def of_model(self, kind: str, model: str, limit: int) -> list[Artifact]:
        if limit < 1:
            return []
        params = {**self._index("by_model", "kind_model", items.kind_model(kind, model)), "Limit": limit}

        def read() -> list[Artifact]:
            found: list[Artifact] = []
            for item in self._engine.query(params):
                found.append(items.artifact_from_item(item))
                if len(found) == limit:
                    break
            return found

        return await self._engine.run(self._where, read)

    async def nearest(self, key: NormalizedKey, limit: int) -> list[Artifact]:
        return near.rank_nearest(await self.of_model(key.kind, key.model, near.SCAN_LIMIT), key, limit)

    def _counts(self, holder: str, digest: Digest) -> bool:
        """Whether the reference `holder` of `digest` still counts (see the module doc)."""
        if holder.startswith("a#"):
            _, artifact_id, nonce = holder.split("#", 2)
            found = self._engine.get(self._table, self._key(artifact_id), ("ref_nonce",))
            return found is not None and items.get_s(found, "ref_nonce") == nonce
        job_id = holder.removeprefix("j#")
        job = self._engine.get(
            self._engine.names.jobs, {"pk": s(items.job_pk(job_id)), "sk": s(items.JOB_SK)}
        )
        return job is not None and items.job_from_item(job).log == digest

    async def is_referenced(self, digest: Digest) -> bool:
        params = {
            "TableName": self._refs,
            "KeyConditionExpression": "#blob = :blob",
            "ExpressionAttributeValues": {":blob": s(str(digest))},
            "ConsistentRead": True,
            "Limit": REFS_PAGE,
        }

        def read() -> bool:
            return any(self._counts(items.get_s(ref, "holder"), digest) for ref in self._engine.query(params))

        where = f"tables {self._refs}, {self._table} and {self._engine.names.jobs}"
        return await self._engine.run(where, read)

    async def artifacts_using(self, digest: Digest, limit: int) -> list[str]:
        params = {
            "TableName": self._refs,
            "KeyConditionExpression": "#blob = :blob",
            "ExpressionAttributeValues": {":blob": s(str(digest))},
            "ConsistentRead": True,
        }

        def read() -> list[str]:
            found: set[str] = set()
            for ref in self._engine.query(params):
                holder = items.get_s(ref, "holder")
                # Only references that still count: of the artifact's current put (its nonce).
                if holder.startswith("a#") and self._counts(holder, digest):
                    found.add(holder.split("#", 2)[1])
            return sorted(found)[: max(0, limit)]

        return await self._engine.run(f"tables {self._refs}, {self._table}", read)

    async def mark_unavailable(
        self, artifact_id: str, reason: str, *, expect_manifest: str
    ) -> Artifact | None:
        if not reason:
            raise ValueError("an unavailable artifact needs a reason")
        params = {
            "TableName": self._table,
            "Key": self._key(artifact_id),
            "UpdateExpression": "SET #unavailable = :reason",
            "ConditionExpression": "attribute_exists(#artifact_id) AND #manifest_digest = :manifest",
            "ExpressionAttributeValues": {":reason": s(reason), ":manifest": s(expect_manifest)},
            "ReturnValues": "ALL_NEW",
        }
        try:
            found = await self._engine.run(self._where, lambda: self._engine.update(params))
        except ConditionFailed:
            return None
        return None if found is None else items.artifact_from_item(found)

    async def least_recently_used(self, limit: int) -> list[Artifact]:
        if limit < 1:
            return []
        # No index orders by access time (every hit would rewrite it): one scan of the small
        # listed attributes, sorted here. For the periodic collector only.
        params = {
            "TableName": self._table,
            "ProjectionExpression": ", ".join(f"#{a}" for a in ("artifact_id", *ARTIFACT_LISTED_ATTRIBUTES)),
            "FilterExpression": "#pinned = :unpinned",
            "ExpressionAttributeValues": {":unpinned": boolean(False)},
            "ConsistentRead": True,
        }

        def read() -> list[Artifact]:
            found = [items.artifact_from_item(item) for item in self._engine.scan(params)]
            found.sort(key=lambda a: (a.last_accessed_at, a.artifact_id))
            return found[:limit]

        return await self._engine.run(self._where, read)

    async def counts(self) -> RegistryCounts:
        # Full scans (COUNT-like, one small attribute each): fine for an operator's status
        # call on thousands of items; a counter item per state is issue 10's.
        artifacts = {"TableName": self._table, "ProjectionExpression": "#pinned", "ConsistentRead": True}
        jobs = {
            "TableName": self._engine.names.jobs,
            "ProjectionExpression": "#state, #sk",
            "FilterExpression": "#sk = :job",
            "ExpressionAttributeValues": {":job": s(items.JOB_SK)},
            "ConsistentRead": True,
        }

        def read() -> RegistryCounts:
            total = pinned = 0
            for item in self._engine.scan(artifacts):
                total += 1
                pinned += items.get_bool(item, "pinned")
            by_state = {state.value: 0 for state in JobState}
            for item in self._engine.scan(jobs):
                by_state[items.get_s(item, "state")] += 1
            totals = self._engine.get(self._engine.names.jobs, items.COUNTERS_KEY) or {}
            return RegistryCounts(
                artifacts=total,
                pinned_artifacts=pinned,
                jobs_by_state=by_state,
                lifetime_lookups=items.get_int(totals, "lookups") if "lookups" in totals else 0,
                lifetime_hits=items.get_int(totals, "hits") if "hits" in totals else 0,
            )

        return await self._engine.run(f"tables {self._table} and {self._engine.names.jobs}", read)
