"""The DynamoDB tables of one registry: names, key schemas, indexes, and `create_tables`.

A registry `dynamodb://PREFIX` is five tables, all on-demand (PAY_PER_REQUEST):

``PREFIX-artifacts``   one item per artifact, key ``artifact_id`` (S). Its files are one
                       compressed attribute (see `items.encode_files`). Indexes:
                       ``by_created`` (``list_pk``, ``list_sk``): every artifact, newest
                       first, for listing; ``by_model`` (``kind_model``, ``list_sk``): one
                       kind and model, newest first (nearest artifacts, compatibility).
``PREFIX-blob-refs``   which artifact or job names a blob: key ``blob`` (S, "hash/size")
                       and ``holder`` (S). Makes `is_referenced` a query, not a scan.
``PREFIX-jobs``        jobs, their events and two kinds of per-key items, key ``pk`` (S)
                       and ``sk`` (S): ``job#ID``/``job`` (the job), ``job#ID``/``event#N``
                       (its events), ``key#DIGEST``/``active`` (single-flight guard, a copy
                       of the key's active job), ``key#DIGEST``/``finished#...`` (a copy of
                       each finished job, newest last). Indexes: ``queued`` (``queued_pk``
                       = kind#toolchain, ``queued_sk``: oldest first), sparse, only on
                       queued jobs; ``leased`` (``leased_pk``, ``leased_sk``: soonest lease
                       expiry first), sparse, only on leased jobs; ``by_created``
                       (``list_pk``, ``list_sk``): every job, newest first.
``PREFIX-workers``     one item per worker, key ``worker_id`` (S).
``PREFIX-evaluations`` one item per evaluation, key ``artifact_id`` (S) and ``list_sk`` (S,
                       newest first, then by evaluation id), the evaluation as one JSON
                       attribute and the artifact's nonce it belongs to (see
                       `evaluation_store`). Indexes: ``by_created`` (``list_pk``,
                       ``list_sk``): every evaluation, newest first; ``by_model``
                       (``model``, ``list_sk``): one model's. A registry created before
                       evaluations existed gains this table by `prebake init-aws` again.

IAM actions the server needs on these tables and their indexes: DescribeTable, GetItem,
PutItem, UpdateItem, DeleteItem, Query, Scan, BatchWriteItem, TransactWriteItems
(ConditionCheck is not used); `create_tables` also needs CreateTable.

Scale note (issue 10): ``by_created`` (both tables) and ``leased`` have one constant
partition key, so every write of a listed or leased item lands in one index partition.
That is fine for thousands of writes per second; sharding those keys is the next step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from prebake.core.errors import FailedPrecondition, Unavailable
from prebake.server.registry_url import SCHEME, validate_table_prefix
from prebake.server.storage.dynamodb.connection import new_client
from prebake.server.storage.dynamodb.errors import init_hint, translate

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.client import DynamoDBClient

# CreateTable on AWS takes seconds to a minute; a table stuck longer is an AWS problem.
ACTIVE_TIMEOUT_SECONDS = 300.0

# Attributes of an artifact copied into its indexes: everything but its files (up to
# hundreds of KB) and its reference nonce, so that listing reads small items.
ARTIFACT_LISTED_ATTRIBUTES = (
    "kind",
    "model",
    "key",
    "manifest_digest",
    "file_count",
    "total_size",
    "producer",
    "created_at",
    "last_accessed_at",
    "pinned",
    "hit_count",
)


@dataclass(frozen=True)
class IndexSpec:
    name: str
    hash_key: str
    range_key: str
    included: tuple[str, ...] | None = None  # None: every attribute (ALL)

    def definition(self) -> dict[str, Any]:
        projection: dict[str, Any] = {"ProjectionType": "ALL"}
        if self.included is not None:
            projection = {"ProjectionType": "INCLUDE", "NonKeyAttributes": list(self.included)}
        return {
            "IndexName": self.name,
            "KeySchema": _key_schema(self.hash_key, self.range_key),
            "Projection": projection,
        }


@dataclass(frozen=True)
class TableSpec:
    suffix: str
    hash_key: str
    range_key: str | None = None
    indexes: tuple[IndexSpec, ...] = ()

    def key_schema(self) -> list[dict[str, str]]:
        return _key_schema(self.hash_key, self.range_key)

    def attribute_definitions(self) -> list[dict[str, str]]:
        names = [self.hash_key, *([self.range_key] if self.range_key else [])]
        for index in self.indexes:
            names += [n for n in (index.hash_key, index.range_key) if n not in names]
        # Every key attribute of every table and index is a string.
        return [{"AttributeName": name, "AttributeType": "S"} for name in names]


def _key_schema(hash_key: str, range_key: str | None) -> list[dict[str, str]]:
    schema = [{"AttributeName": hash_key, "KeyType": "HASH"}]
    if range_key:
        schema.append({"AttributeName": range_key, "KeyType": "RANGE"})
    return schema


ARTIFACTS = TableSpec(
    "artifacts",
    "artifact_id",
    indexes=(
        IndexSpec("by_created", "list_pk", "list_sk", ARTIFACT_LISTED_ATTRIBUTES),
        IndexSpec("by_model", "kind_model", "list_sk", ARTIFACT_LISTED_ATTRIBUTES),
    ),
)
BLOB_REFS = TableSpec("blob-refs", "blob", "holder")
JOBS = TableSpec(
    "jobs",
    "pk",
    "sk",
    indexes=(
        IndexSpec("queued", "queued_pk", "queued_sk"),
        IndexSpec("leased", "leased_pk", "leased_sk"),
        IndexSpec("by_created", "list_pk", "list_sk"),
    ),
)
WORKERS = TableSpec("workers", "worker_id")
EVALUATIONS = TableSpec(
    "evaluations",
    "artifact_id",
    "list_sk",
    indexes=(IndexSpec("by_created", "list_pk", "list_sk"), IndexSpec("by_model", "model", "list_sk")),
)
TABLES = (ARTIFACTS, BLOB_REFS, JOBS, WORKERS, EVALUATIONS)


@dataclass(frozen=True)
class TableNames:
    """The names of one registry's tables."""

    prefix: str

    def __post_init__(self) -> None:
        validate_table_prefix(self.prefix)

    def of(self, spec: TableSpec) -> str:
        return f"{self.prefix}-{spec.suffix}"

    @property
    def artifacts(self) -> str:
        return self.of(ARTIFACTS)

    @property
    def blob_refs(self) -> str:
        return self.of(BLOB_REFS)

    @property
    def jobs(self) -> str:
        return self.of(JOBS)

    @property
    def workers(self) -> str:
        return self.of(WORKERS)

    @property
    def evaluations(self) -> str:
        return self.of(EVALUATIONS)


def _mismatch(spec: TableSpec, described: dict[str, Any]) -> str:
    """What differs between the described table and `spec` ("" if nothing that matters)."""

    def keys(schema: list[dict[str, Any]]) -> list[tuple[str, str]]:
        return [(k["AttributeName"], k["KeyType"]) for k in schema]

    if keys(described.get("KeySchema", [])) != keys(spec.key_schema()):
        return f"key schema {keys(described.get('KeySchema', []))}, expected {keys(spec.key_schema())}"
    found = {i["IndexName"]: i for i in described.get("GlobalSecondaryIndexes", [])}
    for index in spec.indexes:
        have = found.get(index.name)
        wanted = index.definition()
        if have is None:
            return f"no index {index.name!r}"
        if keys(have["KeySchema"]) != keys(wanted["KeySchema"]):
            return (
                f"index {index.name!r} has key schema {keys(have['KeySchema'])}, "
                f"expected {keys(wanted['KeySchema'])}"
            )
        projection = have.get("Projection", {})
        if projection.get("ProjectionType") != wanted["Projection"]["ProjectionType"] or set(
            projection.get("NonKeyAttributes", [])
        ) != set(wanted["Projection"].get("NonKeyAttributes", [])):
            return f"index {index.name!r} projects {projection}, expected {wanted['Projection']}"
    return ""


def _describe(client: DynamoDBClient, name: str) -> dict[str, Any] | None:
    try:
        return dict(client.describe_table(TableName=name)["Table"])
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "ResourceNotFoundException":
            return None
        raise


def _is_active(described: dict[str, Any]) -> bool:
    indexes = described.get("GlobalSecondaryIndexes", [])
    return described.get("TableStatus") == "ACTIVE" and all(
        i.get("IndexStatus", "ACTIVE") == "ACTIVE" for i in indexes
    )


def _wrong_schema(name: str, problem: str, prefix: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"DynamoDB table {name} exists but is not a prebake {prefix!r} table: {problem}; "
        "use another table prefix, or delete the table"
    )


def _wait_active(client: DynamoDBClient, spec: TableSpec, name: str, prefix: str) -> None:
    deadline = time.monotonic() + ACTIVE_TIMEOUT_SECONDS
    delay = 0.05
    while True:
        described = _describe(client, name)
        if described is None:
            raise Unavailable(f"DynamoDB table {name} disappeared while it was being created; retry")
        if problem := _mismatch(spec, described):
            raise _wrong_schema(name, problem, prefix)
        if _is_active(described):
            return
        if time.monotonic() > deadline:
            raise Unavailable(
                f"DynamoDB table {name} is not ACTIVE after {ACTIVE_TIMEOUT_SECONDS:.0f} s; retry later"
            )
        time.sleep(delay)
        delay = min(delay * 2, 2.0)


def _create_one(client: DynamoDBClient, spec: TableSpec, name: str, prefix: str) -> str:
    outcome = "exists"
    if _describe(client, name) is None:
        params: dict[str, Any] = {
            "TableName": name,
            "BillingMode": "PAY_PER_REQUEST",
            "AttributeDefinitions": spec.attribute_definitions(),
            "KeySchema": spec.key_schema(),
        }
        if spec.indexes:
            params["GlobalSecondaryIndexes"] = [index.definition() for index in spec.indexes]
        try:
            client.create_table(**params)
            outcome = "created"
        except ClientError as exc:
            # Another `init-aws` created it meanwhile: checked like any existing table.
            if exc.response.get("Error", {}).get("Code") != "ResourceInUseException":
                raise
    _wait_active(client, spec, name, prefix)
    return outcome


def create_tables(table_prefix: str) -> list[tuple[str, str]]:
    """Create the registry's tables if missing; return (table name, "created" | "exists").

    Idempotent: an existing table with the expected key schema and indexes is left as
    it is. Waits until every table and index is ACTIVE. Raises `FailedPrecondition`
    for a table that exists with another schema (naming the difference) or for missing
    credentials, `Unavailable` if DynamoDB cannot be reached, `InvalidArgument` for a
    prefix that makes no valid table names. The endpoint, region and credentials come
    from boto3's standard sources.
    """
    names = TableNames(table_prefix)
    where = f"the tables of {SCHEME}{table_prefix}"
    try:
        client = new_client(max_pool_connections=2)
        try:
            return [
                (names.of(spec), _create_one(client, spec, names.of(spec), table_prefix)) for spec in TABLES
            ]
        finally:
            client.close()
    except (ClientError, BotoCoreError) as exc:
        raise translate(exc, where, init_hint(table_prefix)) from exc


def check_tables(client: DynamoDBClient, names: TableNames) -> None:
    """Raise unless every table exists, is ACTIVE and has the expected schema.

    Missing: `FailedPrecondition` saying to run `prebake init-aws`; another schema:
    `FailedPrecondition` naming the difference; still being created: `Unavailable`.
    """
    missing: list[str] = []
    for spec in TABLES:
        name = names.of(spec)
        described = _describe(client, name)
        if described is None:
            missing.append(name)
            continue
        if problem := _mismatch(spec, described):
            raise _wrong_schema(name, problem, names.prefix)
        if not _is_active(described):
            raise Unavailable(f"DynamoDB table {name} is still being created; retry in a moment")
    if missing:
        raise FailedPrecondition(
            f"the registry {SCHEME}{names.prefix} has no DynamoDB table {', '.join(missing)}: "
            f"{init_hint(names.prefix)}"
        )
