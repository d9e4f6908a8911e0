"""The worker directory: which workers were heard of lately and what they serve.

Lets any replica answer "which toolchain would a worker use for this key?" and "can
any live worker take this job?" about workers connected to any replica.
"""

from __future__ import annotations

from typing import Protocol

from prebake.server.records import WorkerRecord


class WorkerDirectory(Protocol):
    """Worker records by worker id; liveness is the record's own `expires_at`.

    Expiry is filtered in code (`live_workers(now)`), never left to the engine (DynamoDB
    TTL deletes items days late). Thread safety and failures: see
    `prebake.server.storage`.
    """

    async def put_worker(self, record: WorkerRecord) -> None:
        """Create or overwrite the record for `record.worker_id` (last writer wins)."""
        ...

    async def workers(self, now: float, include_expired: bool = False) -> list[WorkerRecord]:
        """Records live at `now` (or all), sorted by worker id."""
        ...
