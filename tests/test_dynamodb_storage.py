"""What is specific to the DynamoDB backend (the shared behaviour is in tests/contract):
creating and checking its tables, its errors, its item-size limit, its blob references,
its sort keys and number encoding, reading past filtered pages.

Against moto in server mode, single-threaded (`aws_serial`), through boto3 over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import socket
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from prebake.core.errors import FailedPrecondition, Internal, InvalidArgument, Unavailable
from prebake.server.job_lifecycle import JobLifecycle
from prebake.server.records import JobState, WorkerCapability
from prebake.server.storage import ArtifactQuery, ConditionFailed, JobWrite
from prebake.server.storage.bundle import Storage
from prebake.server.storage.dynamodb import TableNames, create_tables, open_dynamodb
from prebake.server.storage.dynamodb import items as dynamo_items
from prebake.server.storage.dynamodb.errors import TransactionConflict, translate
from prebake.server.storage.dynamodb.items import MAX_FILES_BYTES, newest_first, oldest_first, ordered_time
from tests.aws_emulator import REGION, Emulator
from tests.contract.samples import FILES, START, blob, entry, make_artifact, make_job, make_key

CANCELLED = "TransactionCanceledException"
SUFFIXES = ("artifacts", "blob-refs", "jobs", "workers", "evaluations")


def _client(emulator: Emulator) -> Any:
    return boto3.client("dynamodb", endpoint_url=emulator.endpoint, region_name=REGION)


@pytest.fixture
def prefix(aws_serial: Emulator) -> Iterator[str]:
    name = aws_serial.unique_name("prebake-unit")
    yield name
    client = _client(aws_serial)
    for suffix in SUFFIXES:
        with contextlib.suppress(ClientError):
            client.delete_table(TableName=f"{name}-{suffix}")


@pytest.fixture
def storage(prefix: str) -> Iterator[Storage]:
    create_tables(prefix)
    opened = open_dynamodb(prefix)
    try:
        yield opened
    finally:
        opened.close()


def _refs(emulator: Emulator, prefix: str) -> list[tuple[str, str]]:
    pages = _client(emulator).get_paginator("scan").paginate(TableName=f"{prefix}-blob-refs")
    return sorted((i["blob"]["S"], i["holder"]["S"]) for page in pages for i in page["Items"])


# --- tables ----------------------------------------------------------------------------


def test_create_tables_is_idempotent(prefix: str) -> None:
    names = [f"{prefix}-{suffix}" for suffix in SUFFIXES]
    assert create_tables(prefix) == [(name, "created") for name in names]
    assert create_tables(prefix) == [(name, "exists") for name in names]
    open_dynamodb(prefix).close()


def test_opening_without_tables_says_how_to_create_them(prefix: str) -> None:
    with pytest.raises(FailedPrecondition) as refused:
        open_dynamodb(prefix)
    message = str(refused.value)
    assert f"prebake init-aws --registry dynamodb://{prefix}" in message
    assert f"{prefix}-jobs" in message


def test_a_table_with_another_key_schema_is_refused(aws_serial: Emulator, prefix: str) -> None:
    _client(aws_serial).create_table(
        TableName=f"{prefix}-workers",
        BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
    )
    with pytest.raises(FailedPrecondition, match=rf"{prefix}-workers exists .*key schema"):
        create_tables(prefix)
    with pytest.raises(FailedPrecondition, match=rf"{prefix}-workers exists .*key schema"):
        open_dynamodb(prefix)


@pytest.mark.parametrize("bad", ["", "has space", "x" * 246, "prefix/slash", "ünïcode"])
def test_a_prefix_that_makes_no_table_names_is_invalid(bad: str) -> None:
    for call in (create_tables, open_dynamodb):
        with pytest.raises(InvalidArgument, match="table prefix"):
            call(bad)


def _dead_endpoint() -> str:
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_an_unreachable_endpoint_is_unavailable(
    aws_serial: Emulator, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", _dead_endpoint())
    for call in (create_tables, open_dynamodb):
        with pytest.raises(Unavailable) as failed:
            call(prefix)
        assert failed.value.retryable
        assert "DynamoDB is unreachable" in str(failed.value) and prefix in str(failed.value)
        assert "testing" not in str(failed.value)  # the emulator's credentials


def test_an_engine_lost_after_opening_is_unavailable(aws_serial: Emulator, storage: Storage) -> None:
    asyncio.run(storage.artifacts.put(make_artifact(), expect_manifest=None))
    # The same tables behind an endpoint that is gone: every seam reports Unavailable.
    storage.artifacts._engine.client = boto3.client(  # type: ignore[attr-defined]
        "dynamodb", endpoint_url=_dead_endpoint(), region_name=REGION
    )

    async def calls() -> None:
        for call in (
            storage.artifacts.get(make_key().digest),
            storage.jobs.create_if_absent(make_job()),
            storage.workers.workers(START),
        ):
            with pytest.raises(Unavailable, match=f"{storage.description.removeprefix('dynamodb://')}"):
                await call

    asyncio.run(calls())


def test_a_closed_storage_is_unavailable(storage: Storage) -> None:
    storage.close()
    with pytest.raises(Unavailable, match="closed"):
        asyncio.run(storage.jobs.get("j-" + "0" * 24))
    storage.close()  # twice is fine


# --- errors ----------------------------------------------------------------------------


def _client_error(
    code: str, status: int = 400, reasons: list[str] | None = None, message: str = "m"
) -> ClientError:
    response: dict[str, Any] = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    if reasons is not None:
        response["CancellationReasons"] = [{"Code": r} for r in reasons]
    return ClientError(response, "TransactWriteItems")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (_client_error("ConditionalCheckFailedException"), ConditionFailed),
        (_client_error(CANCELLED, reasons=["None", "ConditionalCheckFailed"]), ConditionFailed),
        (_client_error(CANCELLED, reasons=["TransactionConflict", "None"]), TransactionConflict),
        (_client_error(CANCELLED, reasons=["ThrottlingError"]), Unavailable),
        (_client_error("ProvisionedThroughputExceededException"), Unavailable),
        (_client_error("ThrottlingException"), Unavailable),
        (_client_error("SomethingNew", status=503), Unavailable),
        (_client_error("ResourceNotFoundException"), FailedPrecondition),
        (_client_error("AccessDeniedException"), FailedPrecondition),
        (_client_error("ValidationException", message="Item size has exceeded the maximum"), InvalidArgument),
        (_client_error("ValidationException", message="Invalid KeyConditionExpression"), Internal),
        (_client_error("SerializationException"), Internal),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), Unavailable),
    ],
)
def test_botocore_errors_become_domain_errors(error: Exception, expected: type[Exception]) -> None:
    hint = "run `prebake init-aws --registry dynamodb://p`"
    translated = translate(error, "table p-jobs", hint)  # type: ignore[arg-type]
    assert type(translated) is expected
    assert "p-jobs" in str(translated)
    if expected is FailedPrecondition and "NotFound" in str(error):
        assert "prebake init-aws" in str(translated)


# --- items -----------------------------------------------------------------------------


def test_too_many_files_for_one_item_are_refused_and_store_nothing(aws_serial: Emulator, prefix: str) -> None:
    create_tables(prefix)
    storage = open_dynamodb(prefix)
    rng = random.Random(7)
    # Random paths do not compress: enough of them overflow the item.
    many = tuple(entry(f"{rng.randbytes(200).hex()}.bin", f"c{i}") for i in range(2000))
    key = make_key()

    async def check() -> None:
        job, _ = await storage.jobs.create_if_absent(make_job(key))
        artifact = make_artifact(key, files=many)
        done = replace(job, state=JobState.SUCCEEDED, artifact_id=key.digest, finished_at=START)
        with pytest.raises(InvalidArgument, match=rf"2000 files is too large .* at most {MAX_FILES_BYTES}"):
            await storage.artifacts.put(artifact, expect_manifest=None, complete=JobWrite(done, job.revision))
        assert await storage.artifacts.get(key.digest) is None
        assert await storage.jobs.get(job.job_id) == job
        # A file list that fits is published.
        await storage.artifacts.put(make_artifact(key, files=many[:100]), expect_manifest=None)

    try:
        asyncio.run(check())
    finally:
        storage.close()
    # Only the references of the put that fitted are left: its files and its producer's log.
    refs = _refs(aws_serial, prefix)
    assert len({holder for _, holder in refs}) == 1 and refs[0][1].startswith(f"a#{key.digest}#")
    assert len(refs) == 100 + 1


def test_blob_references_follow_put_replace_delete_and_job_logs(
    aws_serial: Emulator, storage: Storage
) -> None:
    prefix = storage.description.removeprefix("dynamodb://")
    first = make_artifact()
    second = make_artifact(files=(entry("v2.bin"),), at=START + 1)
    digest = first.artifact_id

    def holders() -> set[str]:
        return {holder for _, holder in _refs(aws_serial, prefix)}

    async def check() -> None:
        await storage.artifacts.put(first, expect_manifest=None)
        assert len(_refs(aws_serial, prefix)) == len(FILES) + 1  # the files and the producer log
        [holder] = holders()
        with pytest.raises(ConditionFailed):  # a refused put leaves no references behind
            await storage.artifacts.put(second, expect_manifest=None)
        assert holders() == {holder}

        await storage.artifacts.put(second, expect_manifest=first.manifest_digest)
        [replaced] = holders()
        assert replaced != holder and replaced.startswith(f"a#{digest}#")
        assert not await storage.artifacts.is_referenced(FILES[0].digest)
        assert await storage.artifacts.is_referenced(entry("v2.bin").digest)

        job, _ = await storage.jobs.create_if_absent(make_job(make_key(batch_size=1)))
        await storage.jobs.compare_and_set(replace(job, log=blob("job-log")), job.revision)
        await storage.artifacts.delete(digest, expect_manifest=second.manifest_digest, expect_pinned=False)
        assert holders() == {f"j#{job.job_id}"}
        assert not await storage.artifacts.is_referenced(entry("v2.bin").digest)
        assert await storage.artifacts.is_referenced(blob("job-log"))

    asyncio.run(check())


def test_a_reference_of_a_put_that_never_committed_counts_for_nothing(
    aws_serial: Emulator, storage: Storage
) -> None:
    prefix = storage.description.removeprefix("dynamodb://")
    artifact = make_artifact()
    # What a put killed between its references and its transaction leaves behind.
    _client(aws_serial).put_item(
        TableName=f"{prefix}-blob-refs",
        Item=dynamo_items.ref_item(
            FILES[0].digest, dynamo_items.artifact_holder(artifact.artifact_id, "0" * 16)
        ),
    )

    async def check() -> None:
        assert not await storage.artifacts.is_referenced(FILES[0].digest)
        await storage.artifacts.put(artifact, expect_manifest=None)
        assert await storage.artifacts.is_referenced(FILES[0].digest)

    asyncio.run(check())


def test_sort_keys_order_like_the_numbers_then_the_ids() -> None:
    rng = random.Random(3)
    values = [0.0, -0.0, 1.0, -1.0, 1e-300, -1e300, 1e300, START, START + 0.1, START + 1e-9, 0.5]
    values += [rng.uniform(-1e9, 1e9) for _ in range(300)] + [START + rng.random() for _ in range(300)]
    pairs = [(v, f"{i % 7:032x}") for i, v in enumerate(values)]
    assert sorted(pairs, key=lambda p: oldest_first(*p)) == sorted(pairs, key=lambda p: (p[0], p[1]))
    assert sorted(pairs, key=lambda p: newest_first(*p)) == sorted(pairs, key=lambda p: (-p[0], p[1]))
    assert ordered_time(-0.0) == ordered_time(0.0)


def test_times_round_trip_exactly(storage: Storage) -> None:
    times = [START + 0.1 + 0.2, 1e-7, 1.5e16, 1 / 3, 1_700_000_000.123456789]

    async def check() -> None:
        for i, at in enumerate(times):
            artifact = make_artifact(make_key(batch_size=i), at=at)
            await storage.artifacts.put(artifact, expect_manifest=None)
            assert await storage.artifacts.get(artifact.artifact_id) == artifact
            job = make_job(make_key(batch_size=i), at=at, not_before=at, lease_expires_at=at / 3)
            stored, _ = await storage.jobs.create_if_absent(job)
            assert await storage.jobs.get(job.job_id) == stored == replace(job, revision=1)
        # A hit at the stored access time exactly does not move it; one a ulp later does.
        artifact_id = make_key(batch_size=0).digest
        await storage.artifacts.record_hits({artifact_id: (1, times[0])})
        await storage.artifacts.record_hits({artifact_id: (1, math.nextafter(times[0], math.inf))})
        hit = await storage.artifacts.get(artifact_id)
        assert hit is not None and (hit.hit_count, hit.last_accessed_at) == (
            2,
            math.nextafter(times[0], math.inf),
        )

    asyncio.run(check())


# --- filtered reads past one page --------------------------------------------------------


def test_filtered_reads_go_past_the_rows_they_skip(storage: Storage) -> None:
    async def check() -> None:
        lifecycle = JobLifecycle(storage.artifacts, storage.jobs)
        wanted, _ = await lifecycle.create_or_join(make_key(model="oldest"))
        for i in range(60):
            await lifecycle.create_or_join(make_key(batch_size=i, compile_target="trn1"))
        inf2 = WorkerCapability("neuron", "neuronx-cc 2.x", ("inf2",))
        assert [j.job_id for j in await storage.jobs.leasable([inf2], START, 1)] == [wanted.job_id]

        pinned = make_artifact(make_key(model="pinned"), at=START, pinned=True)
        await storage.artifacts.put(pinned, expect_manifest=None)
        for i in range(110):
            await storage.artifacts.put(
                make_artifact(make_key(batch_size=i), at=START + 1 + i), expect_manifest=None
            )
        page = await storage.artifacts.list_page(ArtifactQuery(pinned_only=True), "", 1)
        assert [a.artifact_id for a in page.items] == [pinned.artifact_id] and page.next_token == ""

    asyncio.run(check())


def test_table_names_are_documented_by_tables(prefix: str) -> None:
    names = TableNames(prefix)
    assert [names.artifacts, names.blob_refs, names.jobs, names.workers, names.evaluations] == [
        f"{prefix}-{suffix}" for suffix in SUFFIXES
    ]
