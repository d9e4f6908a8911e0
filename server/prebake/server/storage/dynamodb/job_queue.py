"""`JobQueue` on DynamoDB: jobs, events and per-key items in `PREFIX-jobs`.

Every change of a job is one TransactWriteItems: the job item put on the condition
`revision = expected` (the compare-and-set), its event item numbered by the new
revision, and the per-key items the change implies:

* the flight's **guard** (``key#DIGEST``/``active`` for the key's compile job,
  ``key#DIGEST``/``active#evaluate#SPEC`` for an evaluation job; a copy of the active job): created
  with `attribute_not_exists` when a job becomes active (single flight: a second
  active job of the key fails that condition), updated while it stays active, deleted
  when it leaves the active states, always on the condition that it is this job's;
* a **finished copy** (``key#DIGEST``/``finished#<finished_at>#<created_at>#ID``,
  ``evaluated#...`` for an evaluation job) while the job has a finished_at, so that
  `last_finished` (compile jobs) is one strongly consistent query;
* a **blob reference** of the job's log (`PREFIX-blob-refs`), for `is_referenced`.

Which of those a change needs depends on the job as stored at the expected revision.
The queue remembers the last revision of each job it read or wrote (`_Seen`), and
revision N of a job is written once and never changes, so a remembered job at the
expected revision *is* the stored one if the condition holds; otherwise it reads it.
"""

from __future__ import annotations

import heapq
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

from prebake.core.errors import Busy, InvalidArgument
from prebake.server.records import Job, JobEvent, JobState, WorkerCapability
from prebake.server.storage import page_tokens
from prebake.server.storage.conditions import ConditionFailed
from prebake.server.storage.dynamodb import items
from prebake.server.storage.dynamodb.engine import Engine
from prebake.server.storage.dynamodb.items import Item, n, s
from prebake.server.storage.job_queue import JobQuery
from prebake.server.storage.page_tokens import Page

# The SQLite backend's tags: a token means the same position on either engine.
TOKEN_TAG = "jobs"
SEEN_JOBS = 4096
# A create that keeps finding a guard which is gone when read again (the active job
# finishing meanwhile, each time) gives up as Busy after this many tries.
CREATE_ATTEMPTS = 16
# Items read per Query request when results are filtered in code.
FILTERED_PAGE = 100


class _Seen:
    """The last stored revision of recently seen jobs, by id (LRU, thread-safe)."""

    def __init__(self, size: int) -> None:
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def remember(self, job: Job) -> Job:
        with self._lock:
            known = self._jobs.get(job.job_id)
            if known is None or known.revision <= job.revision:
                self._jobs[job.job_id] = job
            self._jobs.move_to_end(job.job_id)
            while len(self._jobs) > self._size:
                self._jobs.popitem(last=False)
        return job

    def at(self, job_id: str, revision: int) -> Job | None:
        with self._lock:
            known = self._jobs.get(job_id)
        return known if known is not None and known.revision == revision else None


def _put(table: str, item: Item, condition: str = "", values: Item | None = None) -> dict[str, Any]:
    put: dict[str, Any] = {"TableName": table, "Item": item}
    if condition:
        put["ConditionExpression"] = condition
    if values:
        put["ExpressionAttributeValues"] = values
    return {"Put": put}


def _guard_key(job: Job) -> Item:
    return {"pk": s(items.key_pk(job.key.digest)), "sk": s(items.guard_sk(job))}


class DynamoJobQueue:
    """See `prebake.server.storage.job_queue.JobQueue`. Thread safety: as the Protocol."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._table = engine.names.jobs
        self._where = f"table {self._table}"
        self._with_refs = f"tables {self._table} and {engine.names.blob_refs}"
        self._seen = _Seen(SEEN_JOBS)

    # --- the writes ------------------------------------------------------------------

    async def stored_at(self, job_id: str, revision: int) -> Job:
        """The job as stored at `revision`; `ConditionFailed` if it is not (or unknown)."""
        known = self._seen.at(job_id, revision)
        if known is None:
            known = await self.get(job_id)
        if known is None or known.revision != revision:
            raise ConditionFailed(f"job {job_id} changed meanwhile (expected revision {revision})")
        return known

    def change_items(self, old: Job, job: Job) -> tuple[Job, list[dict[str, Any]]]:
        """The job as a compare-and-set from `old` stores it, and the transaction's items.

        The key, id and creation time of a job never change: they are kept from `old`.
        """
        new = replace(job, key=old.key, created_at=old.created_at, revision=old.revision + 1)
        jobs, me = self._table, {":me": s(new.job_id)}
        writes = [
            _put(jobs, items.job_item(new), "#revision = :expect", {":expect": n(old.revision)}),
            _put(jobs, items.event_item(new)),
        ]
        if new.state.active:
            condition = "#job_id = :me" if old.state.active else "attribute_not_exists(#pk)"
            writes.append(_put(jobs, items.guard_item(new), condition, me if old.state.active else None))
        elif old.state.active:
            delete = {"TableName": jobs, "Key": _guard_key(new), "ConditionExpression": "#job_id = :me"}
            writes.append({"Delete": {**delete, "ExpressionAttributeValues": me}})
        if old.finished_at is not None and (
            new.finished_at is None or items.finished_sk(new) != items.finished_sk(old)
        ):
            old_key = {"pk": s(items.key_pk(old.key.digest)), "sk": s(items.finished_sk(old))}
            writes.append({"Delete": {"TableName": jobs, "Key": old_key}})
        if new.finished_at is not None:
            writes.append(_put(jobs, items.finished_item(new)))
        if new.log is not None and new.log != old.log:
            writes.append(
                _put(self._engine.names.blob_refs, items.ref_item(new.log, items.job_holder(new.job_id)))
            )
        return new, writes

    def remember(self, job: Job) -> Job:
        return self._seen.remember(job)

    async def create_if_absent(self, job: Job) -> tuple[Job, bool]:
        if not job.state.active:
            raise InvalidArgument(f"a new job must be queued or leased, not {job.state.value}")
        new = replace(job, revision=1)
        jobs = self._table
        writes = [
            _put(jobs, items.guard_item(new), "attribute_not_exists(#pk)"),
            _put(jobs, items.job_item(new), "attribute_not_exists(#pk)"),
            _put(jobs, items.event_item(new)),
        ]
        if new.finished_at is not None:
            writes.append(_put(jobs, items.finished_item(new)))
        if new.log is not None:
            writes.append(
                _put(self._engine.names.blob_refs, items.ref_item(new.log, items.job_holder(new.job_id)))
            )
        where = self._with_refs if new.log else self._where
        for _ in range(CREATE_ATTEMPTS):
            try:
                await self._engine.run(where, lambda: self._engine.transact(writes))
            except ConditionFailed:
                # The flight has an active job (or, never in practice, the id is taken).
                existing = await self._engine.run(
                    self._where, lambda: self._get_sync(items.key_pk(job.key.digest), items.guard_sk(job))
                )
                if existing is not None:
                    return self.remember(existing), False
                continue
            return self.remember(new), True
        raise Busy(f"the jobs of key {job.key.digest} are being changed concurrently; retry")

    async def compare_and_set(self, job: Job, expect_revision: int) -> Job:
        old = await self.stored_at(job.job_id, expect_revision)
        new, writes = self.change_items(old, job)
        where = self._with_refs if new.log is not None and new.log != old.log else self._where
        await self._engine.run(where, lambda: self._engine.transact(writes))
        return self.remember(new)

    # --- the reads -------------------------------------------------------------------

    def _get_sync(self, pk: str, sk: str) -> Job | None:
        found = self._engine.get(self._table, {"pk": s(pk), "sk": s(sk)})
        return None if found is None else items.job_from_item(found)

    async def get(self, job_id: str) -> Job | None:
        job = await self._engine.run(self._where, lambda: self._get_sync(items.job_pk(job_id), items.JOB_SK))
        return None if job is None else self.remember(job)

    async def active(self, key_digest: str) -> Job | None:
        job = await self._engine.run(
            self._where, lambda: self._get_sync(items.key_pk(key_digest), items.ACTIVE_SK)
        )
        return None if job is None else self.remember(job)

    async def active_evaluation(self, key_digest: str, spec_digest: str) -> Job | None:
        sk = items.EVALUATION_GUARD_PREFIX + spec_digest  # items.guard_sk
        job = await self._engine.run(self._where, lambda: self._get_sync(items.key_pk(key_digest), sk))
        return None if job is None else self.remember(job)

    async def last_finished(self, key_digest: str) -> Job | None:
        params = {
            "TableName": self._table,
            "KeyConditionExpression": "#pk = :pk AND begins_with(#sk, :finished)",
            "ExpressionAttributeValues": {
                ":pk": s(items.key_pk(key_digest)),
                ":finished": s(items.FINISHED_PREFIX),
            },
            "ScanIndexForward": False,
            "Limit": 1,
            "ConsistentRead": True,
        }

        def read() -> Job | None:
            newest = next(self._engine.query(params), None)
            return None if newest is None else items.job_from_item(newest)

        job = await self._engine.run(self._where, read)
        return None if job is None else self.remember(job)

    async def events(self, job_id: str, after_sequence: int = 0) -> list[JobEvent]:
        # One query: the events after the sequence, then the job item itself ("job"
        # sorts after every "event#..."), which carries the key the events leave out.
        params = {
            "TableName": self._table,
            "KeyConditionExpression": "#pk = :pk AND #sk > :after",
            "ExpressionAttributeValues": {
                ":pk": s(items.job_pk(job_id)),
                ":after": s(items.event_sk(max(after_sequence, 0))),
            },
            "ConsistentRead": True,
        }
        found = await self._engine.run(self._where, lambda: list(self._engine.query(params)))
        jobs = [item for item in found if items.get_s(item, "sk") == items.JOB_SK]
        if not jobs:
            return []
        key = items.job_from_item(jobs[0]).key
        return [
            JobEvent(
                job_id=job_id,
                sequence=items.get_int(item, "sequence"),
                at=items.get_float(item, "at"),
                job=items.job_from_json(items.get_s(item, "job"), key, items.get_int(item, "sequence")),
            )
            for item in found
            if items.is_event(item)
        ]

    def _index(
        self, index: str, pk_name: str, pk: str, range_condition: str = "", **values: Item
    ) -> dict[str, Any]:
        condition = f"#{pk_name} = :pk" + (f" AND {range_condition}" if range_condition else "")
        return {
            "TableName": self._table,
            "IndexName": index,
            "KeyConditionExpression": condition,
            "ExpressionAttributeValues": {":pk": s(pk), **values},
        }

    async def list_page(self, query: JobQuery, page_token: str, limit: int) -> Page[Job]:
        if limit < 1:
            raise InvalidArgument(f"limit must be positive, got {limit}")
        states = sorted({JobState(state).value for state in query.states})
        tag = page_tokens.list_tag(TOKEN_TAG, [states, query.kind])
        after = page_tokens.decode(tag, page_token, (float, str))
        if after is None:
            params = self._index("by_created", "list_pk", items.JOBS_PARTITION)
        else:
            start = items.newest_first(float(after[0]), str(after[1]))
            params = self._index(
                "by_created", "list_pk", items.JOBS_PARTITION, "#list_sk > :after", **{":after": s(start)}
            )
        filtered = bool(states or query.kind)
        params["Limit"] = max(limit + 1, FILTERED_PAGE) if filtered else limit + 1

        def wanted(job: Job) -> bool:
            return (not states or job.state.value in states) and (
                not query.kind or job.key.kind == query.kind
            )

        # Newest first, then by id: the index's order. Filtered in code, reading on until
        # the page is full (DynamoDB's Limit counts the items read, not those kept).
        found = await self._engine.run(self._where, lambda: _first(self._jobs(params), wanted, limit + 1))
        page = [self.remember(job) for job in found[:limit]]
        token = ""
        if len(found) > limit:
            token = page_tokens.encode(tag, [page[-1].created_at, page[-1].job_id])
        return Page(page, token)

    def _jobs(self, params: dict[str, Any]) -> Iterator[Job]:
        return (items.job_from_item(item) for item in self._engine.query(params))

    async def leasable(self, capabilities: Sequence[WorkerCapability], now: float, limit: int) -> list[Job]:
        if not capabilities or limit < 1:
            return []
        # One index partition per (kind, toolchain), each oldest first; targets and
        # backoff are filtered here, then the partitions are merged in the same order.
        partitions = sorted({items.queued_partition(c.kind, c.toolchain) for c in capabilities})

        def runnable(job: Job) -> bool:
            return (
                job.state is JobState.QUEUED
                and job.not_before <= now
                and any(c.serves_job(job) for c in capabilities)
            )

        def read() -> list[Job]:
            per_partition = []
            for partition in partitions:
                params = self._index("queued", "queued_pk", partition)
                params["Limit"] = max(limit, FILTERED_PAGE // 4)
                per_partition.append(_first(self._jobs(params), runnable, limit))
            merged = heapq.merge(*per_partition, key=lambda job: (job.created_at, job.job_id))
            return list(merged)[:limit]

        return [self.remember(job) for job in await self._engine.run(self._where, read)]

    async def expired_leases(self, now: float, limit: int) -> list[Job]:
        if limit < 1:
            return []
        params = self._index(
            "leased",
            "leased_pk",
            items.LEASED_PARTITION,
            "#leased_sk < :end",
            **{":end": s(items.not_after(now))},
        )
        params["Limit"] = max(limit, FILTERED_PAGE // 4)

        def expired(job: Job) -> bool:
            # The index is eventually consistent on AWS: re-checked on the job it holds.
            return (
                job.state is JobState.LEASED
                and job.lease_expires_at is not None
                and job.lease_expires_at <= now
            )

        found = await self._engine.run(self._where, lambda: _first(self._jobs(params), expired, limit))
        return [self.remember(job) for job in found]

    async def queued_counts(self) -> dict[tuple[str, str], int]:
        # The sparse `queued` index holds queued jobs only: a scan of it reads no other job.
        params = {"TableName": self._table, "IndexName": "queued", "ProjectionExpression": "#key"}

        def read() -> dict[tuple[str, str], int]:
            counted: dict[tuple[str, str], int] = {}
            for item in self._engine.scan(params):
                key = items.key_from_json(items.get_s(item, "key"))
                pair = (key.kind, key.compile_target)
                counted[pair] = counted.get(pair, 0) + 1
            return counted

        return await self._engine.run(self._where, read)


def _first(jobs: Iterator[Job], keep: Any, count: int) -> list[Job]:
    """The first `count` of `jobs` that `keep` keeps (reading no further)."""
    kept: list[Job] = []
    for job in jobs:
        if keep(job):
            kept.append(job)
            if len(kept) == count:
                break
    return kept
