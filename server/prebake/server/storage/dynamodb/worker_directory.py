"""`WorkerDirectory` on DynamoDB: one item per worker id in `PREFIX-workers`."""

from __future__ import annotations

from prebake.server.records import WorkerRecord
from prebake.server.storage.dynamodb import items
from prebake.server.storage.dynamodb.engine import Engine


class DynamoWorkerDirectory:
    """See `prebake.server.storage.worker_directory.WorkerDirectory`.

    `workers` scans the table (strongly consistent): a fleet is tens to hundreds of
    workers, and callers cache the answer for seconds (`worker_liveness`). Records are
    never deleted; expiry is `expires_at`, compared here, never DynamoDB TTL.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._table = engine.names.workers
        self._where = f"table {self._table}"

    async def put_worker(self, record: WorkerRecord) -> None:
        item = items.worker_item(record)
        await self._engine.run(self._where, lambda: self._engine.put(self._table, item))

    async def workers(self, now: float, include_expired: bool = False) -> list[WorkerRecord]:
        params = {"TableName": self._table, "ConsistentRead": True}
        found = await self._engine.run(
            self._where, lambda: [items.worker_from_item(item) for item in self._engine.scan(params)]
        )
        return sorted(
            (r for r in found if include_expired or r.live(now)), key=lambda record: record.worker_id
        )
