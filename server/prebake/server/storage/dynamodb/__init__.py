"""The DynamoDB backend of the storage seams (scale-out): conditional writes and
transactions through boto3, over the tables of `tables` (`dynamodb://PREFIX`).

Every replica opening the same prefix shares one registry: single flight, leases and
fencing hold across replicas because DynamoDB's conditions enforce them. Endpoint,
region and credentials come from boto3's standard sources only.
"""

from __future__ import annotations

from botocore.exceptions import BotoCoreError, ClientError

from prebake.server.registry_url import SCHEME, validate_table_prefix
from prebake.server.storage.bundle import Storage
from prebake.server.storage.dynamodb.artifact_index import DynamoArtifactIndex
from prebake.server.storage.dynamodb.connection import new_client
from prebake.server.storage.dynamodb.engine import Engine
from prebake.server.storage.dynamodb.errors import init_hint, translate
from prebake.server.storage.dynamodb.evaluation_store import DynamoEvaluationStore
from prebake.server.storage.dynamodb.job_queue import DynamoJobQueue
from prebake.server.storage.dynamodb.tables import TABLES, TableNames, check_tables, create_tables
from prebake.server.storage.dynamodb.worker_directory import DynamoWorkerDirectory

__all__ = ["SCHEME", "TABLES", "TableNames", "create_tables", "open_dynamodb", "validate_table_prefix"]


def open_dynamodb(table_prefix: str, *, max_pool_connections: int = 32) -> Storage:
    """Open the registry `dynamodb://<table_prefix>` (its tables must exist).

    Raises `InvalidArgument` for a prefix that makes no valid table names,
    `FailedPrecondition` when a table is missing (run `prebake init-aws`), has another
    schema, or credentials or region are missing, `Unavailable` when DynamoDB cannot be
    reached. The storage runs boto3 on `max_pool_connections` threads of its own.
    """
    names = TableNames(table_prefix)
    if max_pool_connections < 1:
        raise ValueError(f"max_pool_connections must be at least 1, got {max_pool_connections}")
    try:
        client = new_client(max_pool_connections)
    except (ClientError, BotoCoreError) as exc:
        raise translate(exc, f"the tables of {SCHEME}{table_prefix}", init_hint(table_prefix)) from exc
    try:
        try:
            check_tables(client, names)
        except (ClientError, BotoCoreError) as exc:
            raise translate(exc, f"the tables of {SCHEME}{table_prefix}", init_hint(table_prefix)) from exc
    except BaseException:
        client.close()
        raise
    engine = Engine(names, client, max_pool_connections)
    jobs = DynamoJobQueue(engine)
    return Storage(
        artifacts=DynamoArtifactIndex(engine, jobs),
        jobs=jobs,
        workers=DynamoWorkerDirectory(engine),
        evaluations=DynamoEvaluationStore(engine),
        close=engine.close,
        description=f"{SCHEME}{table_prefix}",
    )
