"""Backends of the two blob-storage contract suites (`test_object_store.py`, `test_content_store.py`).

A backend joins both suites by adding one `ObjectBackend` factory to `OBJECT_BACKENDS`. A factory
takes the requesting test's `pytest.FixtureRequest` and asks it for what it needs (`tmp_path`, an
emulator), so the suites themselves know no engine. Everything a child process needs is picklable
(module-level functions and `functools.partial`), since the race and crash tests run real
processes; the S3 backend's children find the emulator through the environment they inherit.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import pytest

from prebake.core.s3_urls import S3Location
from prebake.server.blobs import ContentAddressedStore, LocalObjectStore, ObjectStore
from prebake.server.blobs.cas import blob_key
from prebake.server.blobs.objects import TrustedChecksums
from prebake.server.blobs.s3_objects import S3ObjectStore
from prebake.server.records import Digest
from tests.aws_emulator import Emulator

if TYPE_CHECKING:
    from mypy_boto3_s3.type_defs import ObjectIdentifierTypeDef

KiB = 1 << 10


class MinPartLocalObjectStore(LocalObjectStore):
    """Local disk with S3's rules scaled down: parts of at least 256 KiB, own checksums trusted.

    Runs the content store's object-store paths (dropped short tails, resume from a part boundary,
    no re-hash on read) without an S3 endpoint.
    """

    min_part_size = 256 * KiB

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.read_verification = TrustedChecksums()


def _local_scratch(root: Path) -> list[str]:
    """Temporary files and unfinished uploads under a local root."""
    return sorted(
        p.relative_to(root).as_posix() for d in (root / ".tmp", root / ".multipart") for p in d.iterdir()
    )


def _corrupt_local(root: Path, key: str) -> None:
    path = root / key
    data = bytearray(path.read_bytes())
    if data:
        data[len(data) // 2] ^= 0xFF
    else:
        data.append(0)
    path.write_bytes(bytes(data))


def _settle_local(root: Path, key: str) -> None:
    """Wait until the filesystem clock has moved past the object's last change (see local_stamps)."""
    changed = os.stat(root / key).st_ctime_ns
    probe = root / ".tmp" / f".settle-{os.getpid()}.tmp"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        probe.write_bytes(b"")
        if os.stat(probe).st_mtime_ns > changed:
            probe.unlink()
            return
        time.sleep(0.001)
    raise AssertionError("the filesystem clock did not advance")


def _no_scratch() -> list[str]:
    return []


def _nothing(key: str) -> None:
    return None


@dataclass
class ObjectBackend:
    """How to make a backend's store, plus the test-only hooks the suites need."""

    name: str
    # A new store instance over the same storage: a restart, or another process.
    make: Callable[[], ObjectStore]
    # Bookkeeping a finished operation must not leave behind (temp files, unfinished uploads).
    scratch: Callable[[], list[str]] = _no_scratch
    # Damage a stored object's bytes in place (only meaningful where reads re-hash).
    corrupt: Callable[[str], None] = _nothing
    # Wait until a later read may trust that the object was verified (local: clock tick).
    settle: Callable[[str], None] = _nothing
    rehashes_on_read: bool = False
    part_size: int = 8 << 20
    cleanup: Callable[[], None] = field(default=lambda: None)

    def content_store(self, **limits: int) -> ContentAddressedStore:
        """A content store over a new instance of this backend (picklable through `content_factory`)."""
        return ContentAddressedStore(self.make(), part_size=self.part_size, **limits)

    def content_factory(self, **limits: int) -> Callable[[], ContentAddressedStore]:
        return functools.partial(_content_store, self.make, self.part_size, limits)

    def corrupt_blob(self, digest: Digest) -> None:
        self.corrupt(blob_key(digest))

    def settle_blob(self, digest: Digest) -> None:
        self.settle(blob_key(digest))


def _content_store(
    make: Callable[[], ObjectStore], part_size: int, limits: dict[str, int]
) -> ContentAddressedStore:
    return ContentAddressedStore(make(), part_size=part_size, **limits)


def local_backend(request: pytest.FixtureRequest, part_size: int = 8 << 20) -> ObjectBackend:
    root: Path = request.getfixturevalue("tmp_path") / "store"
    return ObjectBackend(
        name="local",
        make=functools.partial(LocalObjectStore, root),
        scratch=functools.partial(_local_scratch, root),
        corrupt=functools.partial(_corrupt_local, root),
        settle=functools.partial(_settle_local, root),
        rehashes_on_read=True,
        part_size=part_size,
    )


def local_small_parts_backend(request: pytest.FixtureRequest) -> ObjectBackend:
    return local_backend(request, part_size=64 * KiB)


def min_part_backend(request: pytest.FixtureRequest) -> ObjectBackend:
    root: Path = request.getfixturevalue("tmp_path") / "store"
    return ObjectBackend(
        name="min-part",
        make=functools.partial(MinPartLocalObjectStore, root),
        scratch=functools.partial(_local_scratch, root),
        part_size=MinPartLocalObjectStore.min_part_size,
    )


# The S3 store lives under this prefix of its bucket, so that the prefix is exercised and anything
# the store leaves outside it is visible.
S3_PREFIX = "store/"


def _s3_scratch(emulator: Emulator, bucket: str) -> list[str]:
    """Unfinished multipart uploads anywhere in the bucket, and objects outside the store's prefix."""
    s3 = boto3.client("s3", endpoint_url=emulator.endpoint)
    uploads = [
        f"upload {u['Key']}"
        for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket)
        for u in page.get("Uploads", [])
    ]
    strays = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for o in page.get("Contents", [])
        if not o["Key"].startswith(S3_PREFIX)
    ]
    return sorted(uploads + strays)


def _remove_bucket(emulator: Emulator, bucket: str) -> None:
    """Empty and delete a test bucket: the emulator serves the whole session, in memory."""
    s3 = boto3.client("s3", endpoint_url=emulator.endpoint)
    for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
        for u in page.get("Uploads", []):
            s3.abort_multipart_upload(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
    for listing in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        if listing.get("Contents"):
            keys: list[ObjectIdentifierTypeDef] = [{"Key": o["Key"]} for o in listing["Contents"]]
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys})
    s3.delete_bucket(Bucket=bucket)


def s3_backend(request: pytest.FixtureRequest) -> ObjectBackend:
    """A fresh bucket on the serial emulator (the suites race real processes on it)."""
    emulator: Emulator = request.getfixturevalue("aws_serial")
    bucket = emulator.create_bucket()
    return ObjectBackend(
        name="s3",
        make=functools.partial(S3ObjectStore, S3Location(bucket, S3_PREFIX)),
        scratch=functools.partial(_s3_scratch, emulator, bucket),
        part_size=S3ObjectStore.min_part_size,
        cleanup=functools.partial(_remove_bucket, emulator, bucket),
    )


OBJECT_BACKENDS: list[Any] = [
    pytest.param(local_backend, id="local"),
    pytest.param(min_part_backend, id="min-part"),
    pytest.param(s3_backend, id="s3"),
]
# The content store also runs over local disk with small parts, so that multipart paths are taken
# by small test blobs.
CONTENT_BACKENDS: list[Any] = [
    *OBJECT_BACKENDS,
    pytest.param(local_small_parts_backend, id="local-64k-parts"),
]
