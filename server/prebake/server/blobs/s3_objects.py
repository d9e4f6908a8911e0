"""`ObjectStore` on S3 (or any S3-compatible endpoint) through boto3.

Each method is the S3 call its docstring in `objects.ObjectStore` names, under the location's key
prefix; only what S3 does not do itself is written here. Nothing is kept in memory, so any number
of instances, processes and hosts may share a location, and a new instance is a restart.

Integrity: every upload (put, part, copy) carries a CRC32 that S3 checks before it stores the
bytes, so reads are trusted (`TrustedChecksums`); botocore also checks whole reads of single-part
objects against it (its default `response_checksum_validation`).

Endpoint, region and credentials come only from boto3's standard sources (`AWS_ENDPOINT_URL_S3`,
`AWS_REGION`, `AWS_PROFILE`, instance roles...). Errors are mapped in one place, `translate_error`.

Where moto (the test emulator) differs from S3, S3's behaviour is kept and moto's worked around,
each at its place: it ignores `CopySourceIfMatch` and part order on completion (checked here too)
and answers 500 instead of NoSuchUpload for a part of an ended upload (asked again here). It
accepts the checksums without checking them and lists no part checksums, so S3's own check and
the checksums sent back on completion are not exercised by the tests; and it reports one fixed
`Initiated` time (2010) for every upload, so only the parts' times tell a fresh upload there.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Final

import boto3
import botocore.config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
)

from prebake.core.errors import FailedPrecondition
from prebake.core.s3_urls import S3Location, parse_s3_url
from prebake.server.blobs.objects import (
    InvalidPart,
    InvalidRange,
    NoSuchObject,
    NoSuchUpload,
    ObjectInfo,
    PartInfo,
    PreconditionFailed,
    ReadVerification,
    StorageUnavailable,
    TrustedChecksums,
    UploadHandle,
    validate_key,
)

if TYPE_CHECKING:
    from botocore.response import StreamingBody
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef, CopySourceTypeDef, PartTypeDef

MiB = 1 << 20
GiB = 1 << 30
MAX_S3_KEY_LENGTH = 1024
MAX_PRESIGN_SECONDS = 7 * 24 * 3600  # SigV4's limit
# Asked of S3 for every upload: it refuses bytes that do not match (BadDigest) instead of storing them.
CHECKSUM: Final = "CRC32"

_BOTO_ERRORS = (ClientError, BotoCoreError)
_NOT_FOUND = {"NoSuchKey", "NotFound", "404"}
_BAD_PART = {"InvalidPart", "InvalidPartOrder", "EntityTooSmall"}
_DENIED = {"AccessDenied", "Forbidden", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"}
_RETRY_LATER = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "RequestTimeout",
    "ConditionalRequestConflict",  # a concurrent conditional write: S3 asks for a retry
    "OperationAborted",
}
_CREDENTIAL_ERRORS = (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)


def translate_error(exc: Exception, location: S3Location, endpoint: str, action: str) -> Exception:
    """The object-layer error that botocore's `exc` stands for, raised while trying to `action`.

    Absent objects and uploads, bad ranges and parts and failed preconditions become their
    `objects` errors; what the environment can fix (connection errors, throttling, 5xx, denied
    access, missing credentials or bucket) becomes `StorageUnavailable` saying what to check;
    anything else a plain `OSError`. Messages name the location, never a credential.
    """
    where = f"S3 location {location}"
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        if code == "NoSuchUpload":
            return NoSuchUpload(f"cannot {action}: the multipart upload no longer exists")
        if code == "NoSuchBucket":
            return StorageUnavailable(
                f"cannot {action}: the bucket of {where} does not exist at {endpoint}; "
                "check the store URL, or create the bucket (e.g. aws s3 mb), then run prebake init-aws"
            )
        if code in _NOT_FOUND or status == 404:
            return NoSuchObject(f"cannot {action}: no such object")
        if code == "InvalidRange" or status == 416:
            return InvalidRange(f"cannot {action}: the range starts past the end of the object")
        if code in _BAD_PART:
            return InvalidPart(f"cannot {action}: {code}")
        if code == "PreconditionFailed" or status == 412:
            return PreconditionFailed(f"cannot {action}: the object is not in the required state")
        if code in _DENIED or status == 403:
            return StorageUnavailable(
                f"cannot {action}: {where} denied access ({code or status}); check this process's AWS "
                "credentials (AWS_PROFILE, environment, instance role) and their policy on the bucket"
            )
        if code in _RETRY_LATER or status == 429 or status >= 500:
            return StorageUnavailable(
                f"cannot {action}: {where} is unavailable or overloaded ({code or status}); retry later"
            )
        return OSError(f"cannot {action}: {where} answered {code or 'an error'} (HTTP {status})")
    if isinstance(exc, _CREDENTIAL_ERRORS):
        return StorageUnavailable(
            f"cannot {action}: no usable AWS credentials for {where} ({type(exc).__name__}); "
            "configure them through AWS_PROFILE, the environment or an instance role"
        )
    if isinstance(exc, ParamValidationError):
        return ValueError(f"cannot {action}: {exc}")
    return StorageUnavailable(
        f"cannot {action}: cannot reach {where} at {endpoint} ({type(exc).__name__}); "
        "check the network, and AWS_ENDPOINT_URL_S3 and AWS_REGION if they are set"
    )


def _part_list(parts: Sequence[PartInfo]) -> None:
    if not parts:
        raise InvalidPart("a multipart upload needs at least one part")
    for before, after in itertools.pairwise(parts):
        if after.number <= before.number:
            raise InvalidPart(f"part {after.number} is out of order")


class S3ObjectStore:
    """`ObjectStore` on `location` (a bucket and key prefix); see the module docstring.

    Thread safe (one boto3 client, up to `max_pool_connections` requests at once). Beyond the
    protocol: `presign_get` (`objects.Presigns`), `check_bucket` (for start-up and `prebake
    init-aws`) and `open_s3_store` to build one from a URL.
    """

    min_part_size = 5 * MiB
    max_part_count = 10_000
    # S3's largest single copy_object; bigger objects are moved with a multipart copy.
    copy_threshold = 5 * GiB
    copy_part_size = 512 * MiB
    copy_threads = 8

    def __init__(
        self, location: S3Location, *, max_pool_connections: int = 32, client: S3Client | None = None
    ) -> None:
        self.location = location
        self.read_verification: ReadVerification = TrustedChecksums()
        if client is None:
            config = botocore.config.Config(
                max_pool_connections=max_pool_connections,
                retries={"mode": "standard"},
                # Presigned URLs in SigV4 (botocore's default for presigning is still SigV2).
                signature_version="s3v4",
            )
            client = boto3.session.Session().client("s3", config=config)
        self._client = client
        self._bucket = location.bucket

    def __repr__(self) -> str:
        return f"S3ObjectStore({self.location})"

    @property
    def endpoint(self) -> str:
        return str(self._client.meta.endpoint_url)

    def _key(self, key: str) -> str:
        full = self.location.key(validate_key(key))
        if len(full.encode()) > MAX_S3_KEY_LENGTH:
            raise ValueError(f"object key {key[:80]!r} is too long under the prefix {self.location.prefix!r}")
        return full

    def _name(self, s3_key: str) -> str | None:
        """The object key of an S3 key under our prefix, or None for something not ours."""
        try:
            return validate_key(s3_key[len(self.location.prefix) :])
        except ValueError:
            return None

    @contextlib.contextmanager
    def _s3(self, action: str) -> Iterator[None]:
        try:
            yield
        except _BOTO_ERRORS as exc:
            raise translate_error(exc, self.location, self.endpoint, action) from exc

    # -- whole objects -----------------------------------------------------------------

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> ObjectInfo:
        s3_key = self._key(key)
        with self._s3(f"store {key}"):
            if if_absent:
                resp = self._client.put_object(
                    Bucket=self._bucket, Key=s3_key, Body=data, ChecksumAlgorithm=CHECKSUM, IfNoneMatch="*"
                )
            else:
                resp = self._client.put_object(
                    Bucket=self._bucket, Key=s3_key, Body=data, ChecksumAlgorithm=CHECKSUM
                )
        # S3 does not say when it stored the object; the local clock is close enough.
        return ObjectInfo(key=key, size=len(data), etag=resp["ETag"], modified=time.time())

    def get(
        self, key: str, offset: int = 0, length: int | None = None, chunk_size: int = 1 << 20
    ) -> _BodyReader:
        if offset < 0 or (length is not None and length < 0) or chunk_size < 1:
            raise ValueError(f"bad range: offset {offset}, length {length}, chunk size {chunk_size}")
        s3_key = self._key(key)
        if length == 0:
            self._empty_range(key, offset)
            return _BodyReader(None, chunk_size, self)
        action = f"read {key}"
        try:
            with self._s3(action):
                if offset == 0 and length is None:
                    # No Range: S3 refuses one on an empty object, and botocore checks a whole read.
                    resp = self._client.get_object(Bucket=self._bucket, Key=s3_key)
                else:
                    end = "" if length is None else str(offset + length - 1)
                    resp = self._client.get_object(
                        Bucket=self._bucket, Key=s3_key, Range=f"bytes={offset}-{end}"
                    )
        except InvalidRange:
            # S3 also refuses a range that starts at the end; the contract reads nothing there.
            self._empty_range(key, offset)
            return _BodyReader(None, chunk_size, self)
        return _BodyReader(resp["Body"], chunk_size, self, action)

    def _empty_range(self, key: str, offset: int) -> None:
        """Raise what a read of nothing at `offset` raises: NoSuchObject or InvalidRange."""
        info = self.head(key)
        if info is None:
            raise NoSuchObject(f"cannot read {key}: no such object")
        if offset > info.size:
            raise InvalidRange(f"offset {offset} is past the end of {key} ({info.size} bytes)")

    def head(self, key: str) -> ObjectInfo | None:
        s3_key = self._key(key)
        try:
            with self._s3(f"look up {key}"):
                resp = self._client.head_object(Bucket=self._bucket, Key=s3_key)
        except NoSuchObject:
            return None
        return ObjectInfo(key, resp["ContentLength"], resp["ETag"], resp["LastModified"].timestamp())

    def delete(self, key: str) -> bool:
        if self.head(key) is None:
            return False
        with self._s3(f"delete {key}"):
            self._client.delete_object(Bucket=self._bucket, Key=self._key(key))
        return True

    def list_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self._bucket, Prefix=self.location.key(prefix)
        )
        with self._s3(f"list the objects under {prefix!r}"):
            for page in pages:
                for obj in page.get("Contents", []):
                    name = self._name(obj["Key"])
                    if name is not None:
                        yield ObjectInfo(name, obj["Size"], obj["ETag"], obj["LastModified"].timestamp())

    def move(self, src: str, dst: str, *, if_etag: str | None = None) -> ObjectInfo:
        source = self.head(src)
        if source is None:
            raise NoSuchObject(f"cannot move {src}: no such object")
        # Checked here as well as by S3's CopySourceIfMatch, which moto ignores.
        if if_etag is not None and source.etag != if_etag:
            raise PreconditionFailed(f"cannot move {src}: it changed")
        if source.size > self.copy_threshold:
            etag = self._copy_in_parts(source, dst)
        else:
            with self._s3(f"copy {src} to {dst}"):
                resp = self._client.copy_object(
                    Bucket=self._bucket,
                    Key=self._key(dst),
                    CopySource={"Bucket": self._bucket, "Key": self._key(src)},
                    CopySourceIfMatch=source.etag,
                    ChecksumAlgorithm=CHECKSUM,
                )
            etag = resp["CopyObjectResult"]["ETag"]
        # Only the object that was copied: one written over `src` meanwhile stays.
        gone = contextlib.suppress(NoSuchObject, PreconditionFailed)
        with gone, self._s3(f"delete {src} after copying it"):
            self._client.delete_object(Bucket=self._bucket, Key=self._key(src), IfMatch=source.etag)
        return ObjectInfo(dst, source.size, etag, time.time())

    def _copy_in_parts(self, source: ObjectInfo, dst: str) -> str:
        """Copy `source` to `dst` with a multipart copy (S3 copies at most 5 GiB at once); its etag."""
        part_size = max(self.copy_part_size, math.ceil(source.size / self.max_part_count))
        upload = self.create_upload(dst)
        copy_source: CopySourceTypeDef = {"Bucket": self._bucket, "Key": self._key(source.key)}

        def copy_part(number: int) -> CompletedPartTypeDef:
            start = (number - 1) * part_size
            end = min(source.size, start + part_size) - 1
            with self._s3(f"copy part {number} of {source.key} to {dst}"):
                resp = self._client.upload_part_copy(
                    Bucket=self._bucket,
                    Key=self._key(dst),
                    UploadId=upload.upload_id,
                    PartNumber=number,
                    CopySource=copy_source,
                    CopySourceRange=f"bytes={start}-{end}",
                    CopySourceIfMatch=source.etag,
                )
            result = resp["CopyPartResult"]
            part: CompletedPartTypeDef = {"PartNumber": number, "ETag": result["ETag"]}
            if "ChecksumCRC32" in result:
                part["ChecksumCRC32"] = result["ChecksumCRC32"]
            return part

        try:
            with ThreadPoolExecutor(self.copy_threads) as pool:
                parts = list(pool.map(copy_part, range(1, math.ceil(source.size / part_size) + 1)))
            with self._s3(f"complete the copy of {source.key} to {dst}"):
                resp = self._client.complete_multipart_upload(
                    Bucket=self._bucket,
                    Key=self._key(dst),
                    UploadId=upload.upload_id,
                    MultipartUpload={"Parts": parts},
                )
        except BaseException:
            with contextlib.suppress(OSError):
                self.abort_upload(upload)
            raise
        return resp["ETag"]

    # -- multipart uploads -------------------------------------------------------------

    def create_upload(self, key: str) -> UploadHandle:
        with self._s3(f"start an upload of {key}"):
            resp = self._client.create_multipart_upload(
                Bucket=self._bucket, Key=self._key(key), ChecksumAlgorithm=CHECKSUM
            )
        return UploadHandle(key=key, upload_id=resp["UploadId"], initiated=time.time())

    def find_uploads(self, prefix: str) -> list[UploadHandle]:
        found: list[UploadHandle] = []
        pages = self._client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self._bucket, Prefix=self.location.key(prefix)
        )
        with self._s3(f"list the uploads under {prefix!r}"):
            for page in pages:
                for upload in page.get("Uploads", []):
                    name = self._name(upload["Key"])
                    if name is not None:
                        found.append(UploadHandle(name, upload["UploadId"], upload["Initiated"].timestamp()))
        # Stable: S3 lists the uploads of one key oldest first already.
        found.sort(key=lambda u: u.initiated)
        return found

    def upload_part(
        self, upload: UploadHandle, number: int, data: bytes | memoryview, *, durable: bool = True
    ) -> PartInfo:
        # Every stored part is durable on S3: `durable` asks for nothing more.
        if not 1 <= number <= self.max_part_count:
            raise ValueError(f"part number {number} is outside 1..{self.max_part_count}")
        try:
            with self._s3(f"store part {number} of {upload.key}"):
                resp = self._client.upload_part(
                    Bucket=self._bucket,
                    Key=self._key(upload.key),
                    UploadId=upload.upload_id,
                    PartNumber=number,
                    Body=bytes(data),
                    ChecksumAlgorithm=CHECKSUM,
                )
        except StorageUnavailable:
            # moto answers 500, not NoSuchUpload, for an upload that ended: NoSuchUpload if so.
            try:
                self._listed_parts(upload, max_parts=1)
            except NoSuchUpload:
                raise NoSuchUpload(
                    f"cannot store part {number} of {upload.key}: the multipart upload no longer exists"
                ) from None
            raise
        return PartInfo(number=number, size=len(data), etag=resp["ETag"], modified=time.time())

    def sync_parts(self, upload: UploadHandle) -> None:
        return None  # parts are durable once stored

    def _listed_parts(self, upload: UploadHandle, max_parts: int | None = None) -> list[PartTypeDef]:
        pages = self._client.get_paginator("list_parts").paginate(
            Bucket=self._bucket,
            Key=self._key(upload.key),
            UploadId=upload.upload_id,
            PaginationConfig={"MaxItems": max_parts} if max_parts else {},
        )
        with self._s3(f"list the parts of {upload.key}"):
            return [part for page in pages for part in page.get("Parts", [])]

    def list_parts(self, upload: UploadHandle) -> list[PartInfo]:
        return [
            PartInfo(p["PartNumber"], p["Size"], p["ETag"], p["LastModified"].timestamp())
            for p in self._listed_parts(upload)
        ]

    def complete_upload(self, upload: UploadHandle, parts: Sequence[PartInfo]) -> ObjectInfo:
        _part_list(parts)
        # S3 wants each part's checksum back, and only the listing has it. Comparing with the
        # listing also checks here what moto does not (order, sizes).
        listed = {p["PartNumber"]: p for p in self._listed_parts(upload)}
        completed: list[CompletedPartTypeDef] = []
        for i, part in enumerate(parts):
            stored = listed.get(part.number)
            if stored is None or stored["ETag"] != part.etag:
                raise InvalidPart(f"part {part.number} of {upload.key} is not stored or was replaced")
            if stored["Size"] < self.min_part_size and i < len(parts) - 1:
                raise InvalidPart(
                    f"part {part.number} of {upload.key} is smaller than {self.min_part_size} bytes"
                )
            entry: CompletedPartTypeDef = {"PartNumber": part.number, "ETag": part.etag}
            if "ChecksumCRC32" in stored:
                entry["ChecksumCRC32"] = stored["ChecksumCRC32"]
            completed.append(entry)
        with self._s3(f"complete the upload of {upload.key}"):
            resp = self._client.complete_multipart_upload(
                Bucket=self._bucket,
                Key=self._key(upload.key),
                UploadId=upload.upload_id,
                MultipartUpload={"Parts": completed},
            )
        size = sum(listed[p.number]["Size"] for p in parts)
        return ObjectInfo(key=upload.key, size=size, etag=resp["ETag"], modified=time.time())

    def abort_upload(self, upload: UploadHandle) -> None:
        with contextlib.suppress(NoSuchUpload), self._s3(f"abort the upload of {upload.key}"):
            self._client.abort_multipart_upload(
                Bucket=self._bucket, Key=self._key(upload.key), UploadId=upload.upload_id
            )

    # -- beyond the protocol -----------------------------------------------------------

    def presign_get(self, key: str, expires_seconds: int) -> str:
        """See `objects.Presigns`: a SigV4 URL, valid 1 s to 7 days; ValueError outside that."""
        if not 1 <= expires_seconds <= MAX_PRESIGN_SECONDS:
            raise ValueError(f"presigned URLs last 1..{MAX_PRESIGN_SECONDS} seconds, not {expires_seconds}")
        with self._s3(f"presign a read of {key}"):
            params = {"Bucket": self._bucket, "Key": self._key(key)}
            return self._client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_seconds)

    def check_bucket(self) -> str:
        """Check that the bucket exists and this process may use it (one head_bucket); describe it.

        Returns e.g. "s3://bucket/prefix/ in region us-east-1 (endpoint https://...)". Raises
        `FailedPrecondition` if the bucket does not exist, access is denied or there are no
        credentials (saying what to fix), `StorageUnavailable` (an `Unavailable`) if the
        endpoint cannot be reached or S3 fails.
        """
        denied = FailedPrecondition(
            f"access to bucket {self._bucket!r} is denied: check this process's AWS credentials "
            "(AWS_PROFILE, the environment, an instance role) and that their policy allows s3:ListBucket, "
            "s3:GetObject, s3:PutObject, s3:DeleteObject, s3:ListBucketMultipartUploads and "
            "s3:AbortMultipartUpload on it"
        )
        try:
            resp = self._client.head_bucket(Bucket=self._bucket)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404:
                raise FailedPrecondition(
                    f"bucket {self._bucket!r} does not exist at {self.endpoint}; create it "
                    f"(e.g. aws s3 mb s3://{self._bucket}) or fix the store URL {self.location}"
                ) from None
            if status == 403:
                raise denied from None
            raise translate_error(exc, self.location, self.endpoint, "check the bucket") from exc
        except _CREDENTIAL_ERRORS:
            raise denied from None
        except BotoCoreError as exc:
            raise translate_error(exc, self.location, self.endpoint, "check the bucket") from exc
        region = resp.get("BucketRegion") or self._client.meta.region_name
        return f"{self.location} in region {region} (endpoint {self.endpoint})"


def open_s3_store(
    url: str, *, max_pool_connections: int = 32, client: S3Client | None = None
) -> S3ObjectStore:
    """`S3ObjectStore` on `s3://BUCKET/PREFIX`, parsed by `parse_s3_url` (`InvalidArgument` if bad).
    No request is made; see `S3ObjectStore.check_bucket`."""
    return S3ObjectStore(
        parse_s3_url(url, "blob store"), max_pool_connections=max_pool_connections, client=client
    )


class _BodyReader:
    """`ObjectReader` over a get_object body (None: an empty read); closes it when done."""

    def __init__(
        self, body: StreamingBody | None, chunk_size: int, store: S3ObjectStore, action: str = ""
    ) -> None:
        self._body = body
        self._chunks = body.iter_chunks(chunk_size) if body is not None else iter(())
        self._store = store
        self._action = action

    def __iter__(self) -> _BodyReader:
        return self

    def __next__(self) -> bytes:
        if self._body is None:
            raise StopIteration
        try:
            chunk: bytes = next(self._chunks)
        except StopIteration:
            self.close()
            raise
        except _BOTO_ERRORS as exc:
            self.close()
            store = self._store
            raise translate_error(exc, store.location, store.endpoint, self._action) from exc
        except BaseException:
            self.close()
            raise
        return chunk

    def close(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            body.close()
