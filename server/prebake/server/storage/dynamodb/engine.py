"""One registry's DynamoDB connection: a boto3 client, its threads, and the calls every
seam makes (consistent reads, paginated queries, transactions, batch writes).

boto3 calls block, so none runs on the event loop: `Engine.run` hands a function of
them to the engine's own thread pool (as many threads as the client has connections)
and translates whatever botocore raises (`errors.translate`). The sync helpers below
are meant to be called inside such a function.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from botocore.exceptions import BotoCoreError, ClientError

from prebake.core.errors import Unavailable
from prebake.server.storage.dynamodb.errors import TransactionConflict, init_hint, translate
from prebake.server.storage.dynamodb.items import Item
from prebake.server.storage.dynamodb.tables import TableNames

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.client import DynamoDBClient

T = TypeVar("T")
_NAME_RE = re.compile(r"#(\w+)")
_EXPRESSIONS = (
    "ConditionExpression",
    "KeyConditionExpression",
    "FilterExpression",
    "UpdateExpression",
    "ProjectionExpression",
)
# A transaction that met another one on the same item is retried this many times
# (nothing was written); a conflict that persists is `Unavailable`.
TRANSACTION_ATTEMPTS = 5
# BatchWriteItem takes at most 25 requests; unprocessed ones are retried with backoff.
BATCH_SIZE = 25
BATCH_ATTEMPTS = 8


def named(request: dict[str, Any]) -> dict[str, Any]:
    """`request` with an ExpressionAttributeNames entry for every `#name` in its expressions.

    Every attribute in this backend's expressions is written `#name`, so that none can
    collide with DynamoDB's reserved words (BLOB, STATE, ... are reserved).
    """
    names = {
        f"#{name}": name
        for field in _EXPRESSIONS
        if field in request
        for name in _NAME_RE.findall(request[field])
    }
    return {**request, "ExpressionAttributeNames": names} if names else request


class Engine:
    """The client, the thread pool and the table names of one opened registry.

    Thread-safe. `close` waits for running calls; later calls raise `Unavailable`.
    """

    def __init__(self, names: TableNames, client: DynamoDBClient, threads: int) -> None:
        self.names = names
        self.client = client
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="prebake-dynamodb")
        self._closed = False
        self._hint = init_hint(names.prefix)

    async def run(self, where: str, fn: Callable[[], T]) -> T:
        """`fn()` on the engine's threads; botocore errors become domain errors naming `where`."""
        if self._closed:
            raise Unavailable("the registry is closed (the server is shutting down)")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._guarded, where, fn)
        except RuntimeError as exc:  # the executor shut down under us
            if self._closed:
                raise Unavailable("the registry is closed (the server is shutting down)") from exc
            raise

    def _guarded(self, where: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (ClientError, BotoCoreError) as exc:
            raise translate(exc, where, self._hint) from exc

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=True)
        self.client.close()

    # --- sync helpers (inside `run`) -----------------------------------------------------

    def get(self, table: str, key: Item, projection: Sequence[str] = ()) -> Item | None:
        """The item (strongly consistent), or None."""
        params: dict[str, Any] = {"TableName": table, "Key": key, "ConsistentRead": True}
        if projection:
            params["ProjectionExpression"] = ", ".join(f"#{name}" for name in projection)
        found = self.client.get_item(**named(params)).get("Item")
        return None if found is None else dict(found)

    def query(self, params: dict[str, Any]) -> Iterator[Item]:
        """The items of a Query, page after page, lazily (stop iterating to stop reading)."""
        params = named(params)
        while True:
            page = self.client.query(**params)
            for item in page.get("Items", []):
                yield dict(item)
            last = page.get("LastEvaluatedKey")
            if not last:
                return
            params["ExclusiveStartKey"] = last

    def scan(self, params: dict[str, Any]) -> Iterator[Item]:
        params = named(params)
        while True:
            page = self.client.scan(**params)
            for item in page.get("Items", []):
                yield dict(item)
            last = page.get("LastEvaluatedKey")
            if not last:
                return
            params["ExclusiveStartKey"] = last

    def transact(self, items: list[dict[str, Any]]) -> None:
        """One TransactWriteItems; retried (with jitter) while it meets a concurrent one.

        boto3 sends an idempotency token with each call, so botocore's own retries of a
        call whose answer was lost cannot apply it twice.
        """
        request: dict[str, Any] = {
            "TransactItems": [{action: named(body) for action, body in item.items()} for item in items]
        }
        for attempt in range(TRANSACTION_ATTEMPTS):
            try:
                self.client.transact_write_items(**request)
                return
            except ClientError as exc:
                if not isinstance(translate(exc, "", ""), TransactionConflict):
                    raise
                if attempt == TRANSACTION_ATTEMPTS - 1:
                    raise
                time.sleep(random.uniform(0.005, 0.02) * 2**attempt)

    def put(self, table: str, item: Item) -> None:
        """One unconditional PutItem (create or overwrite)."""
        params: dict[str, Any] = {"TableName": table, "Item": item}
        self.client.put_item(**params)

    def update(self, params: dict[str, Any]) -> Item | None:
        """One UpdateItem; the item's new attributes if `ReturnValues` asks for them."""
        found = self.client.update_item(**named(params)).get("Attributes")
        return None if found is None else dict(found)

    def batch_write(self, table: str, requests: list[dict[str, Any]]) -> None:
        """Put or delete items (not atomically, each idempotent), 25 at a time."""
        for start in range(0, len(requests), BATCH_SIZE):
            pending: dict[str, Any] = {table: requests[start : start + BATCH_SIZE]}
            for attempt in range(BATCH_ATTEMPTS):
                pending = dict(
                    self.client.batch_write_item(RequestItems=pending).get("UnprocessedItems") or {}
                )
                if not pending:
                    break
                time.sleep(random.uniform(0.01, 0.05) * 2**attempt)
            else:
                raise Unavailable(f"DynamoDB kept refusing writes to table {table} (throttled); retry")
