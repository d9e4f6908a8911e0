"""What the S3 object store does beyond the shared contract (tests/contract/test_object_store.py):
error mapping, presigned reads, bucket checks, prefixes, multipart copies, and resume across
replicas. Against moto in server mode over HTTP, like every S3 test.
"""

from __future__ import annotations

import random
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import boto3
import botocore.config
import grpc
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from prebake.core.digests import hash_bytes
from prebake.core.errors import FailedPrecondition, InvalidArgument, Unavailable
from prebake.core.rpc_errors import to_status
from prebake.core.s3_urls import S3Location
from prebake.server.blobs import ContentAddressedStore
from prebake.server.blobs.objects import (
    InvalidPart,
    InvalidRange,
    NoSuchObject,
    NoSuchUpload,
    PreconditionFailed,
    StorageUnavailable,
)
from prebake.server.blobs.s3_objects import S3ObjectStore, open_s3_store, translate_error
from prebake.server.records import Digest
from tests.aws_emulator import Emulator
from tests.contract.blob_backends import _remove_bucket

MiB = 1 << 20
PART = S3ObjectStore.min_part_size
SECRET = "s3cr3t-never-shown"
TOKEN = "t0ken-never-shown"


@pytest.fixture
def bucket(aws_serial: Emulator) -> Iterator[str]:
    name = aws_serial.create_bucket()
    yield name
    _remove_bucket(aws_serial, name)


@pytest.fixture
def store(bucket: str) -> S3ObjectStore:
    return S3ObjectStore(S3Location(bucket, "p/"))


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- errors ----------------------------------------------------------------------------


def test_an_unreachable_endpoint_is_unavailable_with_a_clear_message(
    bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{closed_port()}")
    store = S3ObjectStore(S3Location(bucket, "p/"))
    with pytest.raises(StorageUnavailable) as raised:
        store.head("some/key")
    exc = raised.value
    assert isinstance(exc, OSError) and isinstance(exc, Unavailable) and exc.retryable
    message = str(exc)
    assert f"s3://{bucket}/p/" in message and "AWS_ENDPOINT_URL_S3" in message
    # What reaches a gRPC client: UNAVAILABLE with that message, never INTERNAL.
    with pytest.raises(StorageUnavailable) as through_cas:
        ContentAddressedStore(store)  # its first listing
    code, answered = to_status(through_cas.value)
    assert code == grpc.StatusCode.UNAVAILABLE and bucket in answered
    with pytest.raises(Unavailable):
        store.check_bucket()
    for text in (message, answered, repr(exc)):
        assert SECRET not in text and TOKEN not in text


def test_a_missing_bucket(aws_serial: Emulator) -> None:
    store = S3ObjectStore(S3Location(aws_serial.unique_name("never-created"), "x/"))
    with pytest.raises(FailedPrecondition, match=r"does not exist.*aws s3 mb"):
        store.check_bucket()
    with pytest.raises(StorageUnavailable, match="does not exist"):
        store.put("k", b"data")


def test_check_bucket_describes_the_location(store: S3ObjectStore, bucket: str) -> None:
    assert store.check_bucket().startswith(f"s3://{bucket}/p/ in region us-east-1")


def _client_error(code: str, status: int) -> ClientError:
    response: Any = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "Op")


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (_client_error("NoSuchKey", 404), NoSuchObject),
        (_client_error("404", 404), NoSuchObject),
        (_client_error("NoSuchUpload", 404), NoSuchUpload),
        (_client_error("InvalidRange", 416), InvalidRange),
        (_client_error("InvalidPart", 400), InvalidPart),
        (_client_error("InvalidPartOrder", 400), InvalidPart),
        (_client_error("EntityTooSmall", 400), InvalidPart),
        (_client_error("PreconditionFailed", 412), PreconditionFailed),
        (_client_error("SlowDown", 503), StorageUnavailable),
        (_client_error("InternalError", 500), StorageUnavailable),
        (_client_error("AccessDenied", 403), StorageUnavailable),
        (_client_error("NoSuchBucket", 404), StorageUnavailable),
        (EndpointConnectionError(endpoint_url="http://example.invalid"), StorageUnavailable),
        (NoCredentialsError(), StorageUnavailable),
        (_client_error("MalformedXML", 400), OSError),
    ],
)
def test_translate_error(error: Exception, expected: type[Exception]) -> None:
    translated = translate_error(error, S3Location("bucket"), "https://s3.example", "do it")
    assert type(translated) is expected
    assert "do it" in str(translated)


# -- presigned reads -------------------------------------------------------------------


def test_presigned_get_reads_the_object_and_ranges(store: S3ObjectStore) -> None:
    data = payload(100_000, seed=1)
    store.put("blob", data)
    url = store.presign_get("blob", 60)
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert resp.read() == data
    ranged = urllib.request.Request(url, headers={"Range": "bytes=1000-1999"})
    with urllib.request.urlopen(ranged, timeout=30) as resp:
        assert resp.status == 206 and resp.read() == data[1000:2000]


def test_presigned_get_expires(store: S3ObjectStore) -> None:
    before = int(time.time())
    url = store.presign_get("blob", 300)
    after = int(time.time())
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    # SigV4 signs the date and the lifetime into the URL; S3 refuses it once they have passed
    # (moto does not check expiry, so this is as far as the emulator lets a test go).
    assert query["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
    assert query["X-Amz-Expires"] == "300"
    assert "X-Amz-Signature" in query
    signed = int(datetime.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp())
    assert before - 1 <= signed <= after + 1
    for bad in (0, -5, 7 * 24 * 3600 + 1):
        with pytest.raises(ValueError):
            store.presign_get("blob", bad)


def test_presigning_needs_no_request(bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{closed_port()}")
    url = S3ObjectStore(S3Location(bucket, "p/")).presign_get("blob", 60)
    assert f"/{bucket}/p/blob?" in url


def test_the_content_store_hands_out_presigned_blob_urls(store: S3ObjectStore) -> None:
    cas = ContentAddressedStore(store)
    data = payload(3000, seed=2)
    digest = Digest(hash_bytes(data), len(data))
    writer = cas.open_write("up", digest)
    writer.append(data)
    writer.commit()
    assert cas.presigns
    url = cas.download_url(digest, 60)
    assert url is not None
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert resp.read() == data


# -- locations -------------------------------------------------------------------------


def test_open_s3_store_parses_the_url(bucket: str) -> None:
    store = open_s3_store(f"s3://{bucket}/a/b")
    assert store.location == S3Location(bucket, "a/b/")
    with pytest.raises(InvalidArgument):
        open_s3_store("s3://Not_A_Bucket/x")


def test_prefixes_keep_stores_apart(bucket: str) -> None:
    one, two = S3ObjectStore(S3Location(bucket, "one/")), S3ObjectStore(S3Location(bucket, "two/"))
    whole = S3ObjectStore(S3Location(bucket))
    one.put("k", b"1")
    two.put("k", b"2")
    upload = one.create_upload("pending")
    assert [o.key for o in one.list_objects("")] == ["k"]
    assert b"".join(two.get("k")) == b"2"
    assert two.find_uploads("") == [] and [u.key for u in one.find_uploads("")] == ["pending"]
    assert sorted(o.key for o in whole.list_objects("")) == ["one/k", "two/k"]
    one.abort_upload(upload)


def test_objects_that_are_not_ours_are_not_listed(store: S3ObjectStore, bucket: str) -> None:
    raw = boto3.client("s3")
    raw.put_object(Bucket=bucket, Key="p/.hidden/x", Body=b"")
    raw.put_object(Bucket=bucket, Key="p/a//b", Body=b"")
    store.put("mine", b"x")
    assert [o.key for o in store.list_objects("")] == ["mine"]


# -- moves -----------------------------------------------------------------------------


class SmallCopyS3ObjectStore(S3ObjectStore):
    """Moves objects above 6 MiB with a multipart copy, as S3ObjectStore does above 5 GiB."""

    copy_threshold = 6 * MiB
    copy_part_size = 5 * MiB


def test_a_big_object_is_moved_with_a_multipart_copy(bucket: str) -> None:
    store = SmallCopyS3ObjectStore(S3Location(bucket, "p/"))
    data = payload(11 * MiB + 3, seed=3)
    info = store.put("staging/big", data)
    with pytest.raises(PreconditionFailed):
        store.move("staging/big", "final/big", if_etag='"other"')
    moved = store.move("staging/big", "final/big", if_etag=info.etag)
    assert moved.size == len(data)
    assert store.head("staging/big") is None
    assert b"".join(store.get("final/big")) == data
    assert store.find_uploads("") == []


# -- resume across replicas ------------------------------------------------------------


def _counting_client(sent: list[tuple[int, int]]) -> Any:
    """A real S3 client that records (part number, bytes) of every part it uploads."""
    client = boto3.session.Session().client("s3", config=botocore.config.Config(retries={"mode": "standard"}))

    def record(params: dict[str, Any], **_: Any) -> None:
        sent.append((params["PartNumber"], len(params["Body"])))

    client.meta.events.register("provide-client-params.s3.UploadPart", record)
    return client


def test_an_upload_resumes_on_another_replica_without_resending_parts(bucket: str) -> None:
    location = S3Location(bucket, "p/")
    data = payload(3 * PART + 1234, seed=4)
    digest = Digest(hash_bytes(data), len(data))

    first = ContentAddressedStore(S3ObjectStore(location), part_size=PART)
    writer = first.open_write("moved", digest)
    writer.append(data[: 2 * PART + 100])
    writer.close()  # two parts stored; the 100 bytes after them are too few for a part
    [upload] = first.objects.find_uploads("uploads/")
    before = first.objects.list_parts(upload)
    assert [(p.number, p.size) for p in before] == [(1, PART), (2, PART)]

    sent: list[tuple[int, int]] = []
    second = ContentAddressedStore(S3ObjectStore(location, client=_counting_client(sent)), part_size=PART)
    assert second.upload_status("moved", digest).committed_size == 2 * PART
    writer = second.open_write("moved", digest)
    assert writer.committed_size == 2 * PART
    writer.append(data[2 * PART :])
    parts = second.objects.list_parts(upload)
    assert parts[:2] == before, "the committed parts were neither re-sent nor replaced"
    assert [(p.number, p.size) for p in parts] == [(1, PART), (2, PART), (3, PART)]
    writer.commit()
    assert sent == [(3, PART), (4, 1234)], "only the rest was uploaded"
    assert second.hashed_bytes == len(data)  # the parts it did not receive were read back once
    assert b"".join(second.read(digest)) == data
    assert second.objects.find_uploads("") == []
