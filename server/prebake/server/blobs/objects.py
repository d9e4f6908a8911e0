"""The object-store layer: named byte strings, nothing more. What every backend (local disk, S3) promises.

This layer knows keys and bytes only: no digests, no hashing, no quotas, no upload sessions. The
content-addressed store (`prebake.server.blobs.cas`) builds all of those on top of it, once, for
every backend. Its methods are shaped so that an S3 backend is a thin mapping onto boto3 calls
(named next to each method); the local-disk backend is `prebake.server.blobs.local_objects`.
One contract test suite (`tests/contract/test_object_store.py`) checks every backend.

Contract common to every method of every backend:

* **Keys** are 1-1024 characters of ``A-Z a-z 0-9 . _ - /``, made of non-empty ``/``-separated
  segments that are neither ``.`` nor ``..``; the first segment does not start with ``.`` (backends
  may keep their own bookkeeping there). `validate_key` checks this; an invalid key is a
  programming error (`ValueError`), since only the content store makes keys.
* **Thread safety.** Every method may be called from several threads at once, and from several
  processes (or hosts) sharing the same storage. Readers (`ObjectReader`) belong to one caller.
* **Atomic visibility.** `put`, `complete_upload` and `move` make an object visible whole or not
  at all: whatever fails (an exception, a killed process, a power cut), a key names either no
  object, its previous object, or the complete new one, never a prefix or a mixture. When writers
  race on one key, the last to finish wins. Parts of an unfinished multipart upload are never
  visible as objects, and survive a restart of the process that uploaded them.
* **Durability.** Once a writing method returns, what it wrote survives a crash.
* **Consistency.** After a writing method returns, `head`, `get` and `list_objects` in any process see its
  effect (S3 has offered this read-after-write consistency since 2020). `list_objects` is weakly
  consistent with writes made while it runs.
* **Failure.** Absent keys and uploads raise `NoSuchObject` / `NoSuchUpload`; lack of space raises
  `StorageFull`; storage that cannot be reached or refuses for now raises `StorageUnavailable`; other
  storage failures raise `OSError` (an S3 backend maps botocore's errors onto these) and leave the
  state as described above.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from prebake.core.errors import Unavailable

MAX_KEY_LENGTH = 1024
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]+")


class ObjectStoreError(Exception):
    """Base of the object layer's own errors (the content store turns them into domain errors)."""


class NoSuchObject(ObjectStoreError, LookupError):
    """No object is stored under the key (S3: NoSuchKey / 404)."""


class NoSuchUpload(ObjectStoreError, LookupError):
    """The multipart upload does not exist (never created, completed or aborted; S3: NoSuchUpload)."""


class InvalidRange(ObjectStoreError, ValueError):
    """A ranged read starts past the end of the object (S3: 416 InvalidRange)."""


class InvalidPart(ObjectStoreError, ValueError):
    """`complete_upload` named a part that is missing, has another etag, or is too small (S3: InvalidPart,
    InvalidPartOrder, EntityTooSmall)."""


class PreconditionFailed(ObjectStoreError):
    """A conditional write found the object in another state than required (S3: 412)."""


class StorageFull(ObjectStoreError, OSError):
    """The backing storage has no room for the bytes (local: ENOSPC / EDQUOT)."""


class StorageUnavailable(ObjectStoreError, Unavailable, OSError):
    """The storage cannot be reached or refuses for now (S3: connection errors, throttling, 5xx,
    denied access, a missing bucket); trying again later may succeed.

    An `OSError`, as the contract requires of storage failures, and an `Unavailable`, so that it
    reaches the content store's callers and gRPC clients as UNAVAILABLE (retryable) with its message,
    which names the store and what to check, never a secret.
    """


def validate_key(key: str) -> str:
    """Return `key` if it is a valid object key (see the module docstring), else raise ValueError."""
    segments = key.split("/")
    if (
        not 0 < len(key) <= MAX_KEY_LENGTH
        or not all(_SEGMENT_RE.fullmatch(s) and s not in (".", "..") for s in segments)
        or segments[0].startswith(".")
    ):
        raise ValueError(f"invalid object key {key[:80]!r}")
    return key


@dataclass(frozen=True)
class ObjectInfo:
    """What `head` and `list_objects` can say about one stored object."""

    key: str
    size: int
    etag: str
    """Opaque; changes whenever the object's bytes may have changed (S3: the ETag; local: the file's
    identity and timestamps). Equal etags of one key mean the same bytes."""
    modified: float
    """Seconds since the epoch of the last write (S3: LastModified)."""


@dataclass(frozen=True)
class UploadHandle:
    """One multipart upload: enough to continue it from any process, found again by `find_uploads`."""

    key: str
    """The object that `complete_upload` creates."""
    upload_id: str
    """Chosen by the backend (S3: the UploadId)."""
    initiated: float
    """Seconds since the epoch (S3: Initiated)."""


@dataclass(frozen=True)
class PartInfo:
    """One stored part of a multipart upload."""

    number: int
    """1-based; parts are concatenated in number order."""
    size: int
    etag: str
    """Opaque; changes when the part is uploaded again with other bytes (S3: the part's ETag)."""
    modified: float


@runtime_checkable
class ObjectReader(Protocol):
    """The chunks of one ranged read, in order; each non-empty. A generator satisfies it.

    Ends early, without an error, if the stored object turned out shorter than the range (a backend
    cannot always tell that from a closed connection): callers that know the length check it. Holds
    resources until exhausted or `close()`d; `close()` is idempotent.
    """

    def __iter__(self) -> Iterator[bytes]: ...

    def __next__(self) -> bytes: ...

    def close(self) -> None: ...


@runtime_checkable
class ReadVerification(Protocol):
    """How far a backend's own integrity checks go, i.e. when stored bytes must be hashed again.

    The content store asks before serving an object; `rehash` reads the whole object and returns
    whether its bytes are the expected ones (it may raise `NoSuchObject`). Safe for concurrent use.
    """

    def verified(self, key: str, rehash: Callable[[], bool]) -> bool:
        """Whether the object's current bytes are known good, calling `rehash` if the backend cannot
        vouch for them on its own. Never True for bytes that changed since they were last checked."""
        ...

    def vouch(self, key: str, etag: str) -> None:
        """Record, without reading them, that the bytes of object `key` are known good if it still
        is the object with `etag`: the caller hashed them on their way in and has just made them
        that object. Best effort (a backend may decline, and the next read then hashes)."""
        ...

    def forget(self, key: str) -> None:
        """Drop what is remembered about `key` (it was deleted or moved away)."""
        ...


class TrustedChecksums:
    """`ReadVerification` of a store that checks its own bytes (S3: checksums on upload, ETags).

    Nothing is ever hashed again on read: the content store publishes only verified bytes, and the
    store guarantees it returns what it was given.
    """

    def verified(self, key: str, rehash: Callable[[], bool]) -> bool:
        return True

    def vouch(self, key: str, etag: str) -> None:
        return None

    def forget(self, key: str) -> None:
        return None


@runtime_checkable
class Presigns(Protocol):
    """An object store that can hand out URLs its objects are read from directly (S3 presigned GETs).

    Optional: a backend without it (local disk) streams every read through the server.
    """

    def presign_get(self, key: str, expires_seconds: int) -> str:
        """A URL that GETs `key` (a `Range` header selects bytes) until `expires_seconds` from now.

        Computed locally, without a request to the store: it does not prove the object exists.
        Thread safe. S3: generate_presigned_url("get_object").
        """
        ...


@runtime_checkable
class SweepsScratch(Protocol):
    """An object store that keeps bookkeeping files of its own (local disk: `.tmp/`, half-built
    uploads), which a killed writer may leave behind. Optional: S3 keeps none (its unfinished
    multipart uploads are `find_uploads`').
    """

    def sweep_scratch(self, older_than_seconds: float, *, dry_run: bool = False) -> tuple[int, int]:
        """Remove (with `dry_run`: only count) leftovers untouched for `older_than_seconds`;
        return (how many, their bytes). Younger ones may belong to a write still running in
        another process and are kept. Thread safe."""
        ...


@runtime_checkable
class ObjectStore(Protocol):
    """A flat namespace of immutable-once-written objects with ranged reads and multipart uploads.

    See the module docstring for what every method guarantees. The S3 call each method maps onto
    is named in its docstring.
    """

    @property
    def min_part_size(self) -> int:
        """Every part of a multipart upload but the last must be at least this big (S3: 5 MiB)."""
        ...

    @property
    def max_part_count(self) -> int:
        """Highest part number (S3: 10,000)."""
        ...

    @property
    def read_verification(self) -> ReadVerification:
        """When this backend's stored bytes must be hashed again before they are served."""
        ...

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> ObjectInfo:
        """Store `data` as the whole object `key`, replacing any previous one, atomically.

        With `if_absent`, raises `PreconditionFailed` instead if the key already names an object
        (atomic across processes). S3: put_object (IfNoneMatch="*").
        """
        ...

    def get(
        self, key: str, offset: int = 0, length: int | None = None, chunk_size: int = 1 << 20
    ) -> ObjectReader:
        """Stream bytes [offset, offset + length) of the object (`length` None: to the end).

        Chunks are at most `chunk_size` bytes. An offset equal to the size yields nothing.
        Raises at the call, before any iteration: `NoSuchObject`, `InvalidRange` (offset past the
        end), `ValueError` (negative offset or length, chunk_size < 1). S3: get_object(Range=...)
        and the body's iter_chunks.
        """
        ...

    def head(self, key: str) -> ObjectInfo | None:
        """The object's size and etag, or None if absent. S3: head_object."""
        ...

    def delete(self, key: str) -> bool:
        """Remove the object; True if it existed. S3: head_object + delete_object."""
        ...

    def list_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with `prefix`, once each, in no promised order.

        Pages are fetched as the iterator advances. S3: the list_objects_v2 paginator.
        """
        ...

    def move(self, src: str, dst: str, *, if_etag: str | None = None) -> ObjectInfo:
        """Make `src`'s bytes the object `dst` (replacing it, atomically), then remove `src`.

        A crash in between may leave both objects, never neither. With `if_etag`, raises
        `PreconditionFailed` unless `src` currently has that etag. Raises `NoSuchObject` if `src`
        is absent. Local: one rename. S3: copy_object (or a multipart copy above 5 GiB) with
        CopySourceIfMatch, then delete_object.
        """
        ...

    def create_upload(self, key: str) -> UploadHandle:
        """Start a multipart upload that will create `key`. S3: create_multipart_upload."""
        ...

    def find_uploads(self, prefix: str) -> list[UploadHandle]:
        """Every unfinished multipart upload whose key starts with `prefix`, oldest first; works from
        any process, after any restart. S3: the list_multipart_uploads paginator."""
        ...

    def upload_part(
        self, upload: UploadHandle, number: int, data: bytes | memoryview, *, durable: bool = True
    ) -> PartInfo:
        """Store part `number` (1..max_part_count), replacing an earlier part of that number.

        With `durable` (the default) the part survives a crash once this returns. Without it, an
        exception to the common durability rule: the part survives a crash of the process, but a
        crash of the machine before `sync_parts` returns may lose it or cut it short (it is then
        listed shorter, or not at all). A writer that acknowledges bytes to its own caller syncs
        first; one that only completes the upload need not, since `complete_upload` makes the
        assembled object durable. (A backend whose parts are always durable, S3, ignores it.)

        Raises `NoSuchUpload`, `StorageFull`, `ValueError` (number out of range). S3: upload_part.
        """
        ...

    def sync_parts(self, upload: UploadHandle) -> None:
        """Make every part stored so far durable (see `upload_part`). Raises `NoSuchUpload` where
        the backend can tell it ended. S3: nothing to do."""
        ...

    def list_parts(self, upload: UploadHandle) -> list[PartInfo]:
        """The stored parts, by number. Raises `NoSuchUpload`. S3: the list_parts paginator."""
        ...

    def complete_upload(self, upload: UploadHandle, parts: Sequence[PartInfo]) -> ObjectInfo:
        """Make the concatenation of `parts` (ascending numbers, as returned by `upload_part` or
        `list_parts`) the object `upload.key`, atomically, and end the upload (other parts are
        dropped). Raises `InvalidPart` (a part missing, changed, out of order, or smaller than
        `min_part_size` but not last) and `NoSuchUpload`. S3: complete_multipart_upload.
        """
        ...

    def abort_upload(self, upload: UploadHandle) -> None:
        """Discard the upload and its parts; a no-op if it no longer exists. S3: abort_multipart_upload."""
        ...
