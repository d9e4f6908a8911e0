"""The blob store contract: what every backend (local filesystem, S3, ...) promises.

A blob is an immutable byte string named by its `Digest` (xxh3-128 and size). The gRPC
`Blobs` service is written against `BlobStore` only, so every guarantee the service gives
its clients is stated here, once, and checked for every backend by one shared test suite
(`tests/test_blobstore.py`).

Contract common to every method of every backend:

* **Concurrency.** Every `BlobStore` method is safe to call from several threads at
  once, and from several processes sharing the same backing storage. A `BlobWriter` and
  a `BlobReader` belong to one caller at a time (they may be handed from thread to
  thread, but not used by two at once).
* **Nothing partial is ever visible.** A blob becomes visible to `contains`, `read`,
  `find_missing` and `iter_digests` only once its whole content has been received, its
  digest checked, flushed to stable storage and atomically published. Whatever fails
  (an exception, a killed process, a power cut), a digest names either no blob or the
  complete, verified blob, never a prefix or a mixture.
* **Idempotency.** Blobs are content-addressed, so storing a blob that already exists
  succeeds without changing anything visible; concurrent uploads of one blob under
  different upload ids all succeed and the first to finish publishes it. `delete` of an
  absent blob and `close`/`abort` of a finished writer are no-ops.
* **Errors** are the domain exceptions of `prebake.server.errors` (the gRPC layer maps
  them to status codes); I/O failures of the backing storage propagate as `OSError`
  and leave the store as described above.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import NamedTuple, Protocol, runtime_checkable

from prebake.server.errors import InvalidArgument
from prebake.server.records import Digest

MAX_UPLOAD_ID_LENGTH = 128
_UPLOAD_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")


def validate_upload_id(upload_id: str) -> str:
    """Return `upload_id` if it is 1-128 characters of `A-Z a-z 0-9 . _ -`, else raise InvalidArgument.

    Every backend uses the id in a storage name, so the alphabet is part of the contract.
    """
    if not _UPLOAD_ID_RE.fullmatch(upload_id):
        shown = upload_id if len(upload_id) <= 40 else upload_id[:40] + "..."
        raise InvalidArgument(
            f"upload id {shown!r} ({len(upload_id)} characters) is invalid: use 1-{MAX_UPLOAD_ID_LENGTH} "
            "characters of A-Z a-z 0-9 . _ -"
        )
    return upload_id


class UploadStatus(NamedTuple):
    """How far an upload has got. A tuple, so `committed, complete = ...` works."""

    committed_size: int
    """Bytes of this upload the store holds; a client continues from here."""
    complete: bool
    """The whole blob is stored (by this or any other upload); then committed_size == size."""


class StoreStats(NamedTuple):
    """Size of the store. A tuple, so `count, total = ...` works."""

    blob_count: int
    total_bytes: int


@runtime_checkable
class BlobReader(Iterator[bytes], Protocol):
    """The chunks of one read, in order. A generator satisfies this protocol.

    Holds an open handle on the blob until it is exhausted or `close()`d, whichever
    comes first; `close()` is idempotent. A blob deleted during the read keeps being
    served to this reader (the handle pins it).
    """

    def close(self) -> None: ...


@runtime_checkable
class BlobWriter(Protocol):
    """One upload of one blob, held exclusively by its caller until `commit`, `close` or `abort`.

    While a writer is open, no other writer can open the same (upload_id, digest):
    `BlobStore.open_write` raises `Busy`. Writers of the same blob under different upload
    ids are independent. Every writer must be ended by `commit`, `close` or `abort` (the
    first of them to succeed ends it; calling `close` afterwards, e.g. in a `finally`,
    is always safe). On an ended writer `append` raises `FailedPrecondition`, and so
    does `commit` unless the writer is complete, when it is a no-op.
    """

    @property
    def digest(self) -> Digest:
        """The blob being written."""
        ...

    @property
    def committed_size(self) -> int:
        """Bytes received so far for this upload; durable once `close` or `commit` returns."""
        ...

    @property
    def complete(self) -> bool:
        """The blob is stored: committed by this writer, or already present at `open_write`."""
        ...

    def append(self, data: bytes) -> None:
        """Add the next bytes of the content, feeding the running xxh3-128 hash.

        Raises `DigestMismatch` if the upload would exceed `digest.size` (the partial
        upload is discarded and the writer ends), `FailedPrecondition` on a complete or
        ended writer, `QuotaExceeded` if the backing storage is full (nothing of `data`
        is kept, the writer stays usable). On any failure `committed_size` is unchanged.
        """
        ...

    def commit(self) -> None:
        """Check the digest and publish the blob atomically; afterwards `complete` is True.

        Raises `InvalidArgument` if fewer than `digest.size` bytes were appended (the
        partial upload is kept, the writer stays open); `DigestMismatch` if the bytes
        hash to something else (the partial upload is deleted, nothing is stored, the
        writer ends); `QuotaExceeded` if publishing would exceed the store's quota (the
        partial upload is kept for a later retry). Succeeds if another upload published
        the same blob first. A no-op on a complete writer.
        """
        ...

    def close(self) -> None:
        """End the writer, keeping the bytes received so the upload can be resumed.

        Makes `committed_size` durable before releasing the upload. A no-op after
        `commit`, `abort` or a previous `close`.
        """
        ...

    def abort(self) -> None:
        """End the writer and discard the partial upload. Never removes a stored blob.

        A no-op after `commit`, `close` or a previous `abort`.
        """
        ...


@runtime_checkable
class BlobStore(Protocol):
    """Content-addressed blob storage with verified, resumable, atomic uploads.

    See the module docstring for the guarantees shared by every method: thread- and
    process-safety, nothing partial ever visible, idempotency.
    """

    def contains(self, digest: Digest) -> bool:
        """Whether the complete blob is stored. Never true for a partial upload."""
        ...

    def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        """The digests not stored, in the order given, each at most once."""
        ...

    def verify(self, digest: Digest) -> None:
        """Re-hash the stored bytes and check them against `digest`.

        Raises `NotFound` if the blob is absent. If the stored size or hash differ, moves
        the blob to quarantine (from then on it is reported missing, so it can be uploaded
        again) and raises `DataLoss`. Costs one full read of the blob.
        """
        ...

    def read(self, digest: Digest, offset: int = 0, limit: int = 0, chunk_size: int = 1 << 20) -> BlobReader:
        """Stream the blob's bytes from `offset`, at most `limit` of them (0: to the end).

        Every chunk is non-empty and at most `chunk_size` bytes; reading at offset ==
        size yields nothing. Does not hash the content (call `verify` first), but
        refuses bytes that plainly do not fit the digest (wrong length) with `DataLoss`,
        quarantining the blob. Raises at the call, before any iteration:
        `InvalidArgument` (negative offset or limit, chunk_size < 1), `NotFound`,
        `OutOfRange` (offset > size).
        """
        ...

    def open_write(self, upload_id: str, digest: Digest) -> BlobWriter:
        """Start or resume upload `upload_id` of `digest`.

        If the blob is already stored, returns a complete writer (committed_size ==
        size) that holds nothing. Otherwise resumes from the bytes this upload id kept
        for this digest (`committed_size`), or starts at 0. Raises `InvalidArgument`
        (malformed upload id), `QuotaExceeded` (blob larger than the store accepts, or
        the store's total would exceed its quota), `Busy` (another writer holds the same
        upload id and digest right now, in this or another process).
        """
        ...

    def upload_status(self, upload_id: str, digest: Digest) -> UploadStatus:
        """(size, True) if the blob is stored; else (bytes kept for this upload id, False).

        Raises `InvalidArgument` for a malformed upload id.
        """
        ...

    def delete(self, digest: Digest) -> bool:
        """Remove the blob; True if it was stored. Readers already streaming it finish."""
        ...

    def stats(self) -> StoreStats:
        """(number of blobs, their total bytes). Cheap; each backend documents its freshness."""
        ...

    def iter_digests(self) -> Iterator[Digest]:
        """Every stored blob, once each, in no particular order.

        Weakly consistent: a blob stored for the whole iteration is yielded; one added or
        removed meanwhile may or may not be.
        """
        ...

    def sweep_uploads(self, older_than_seconds: float) -> int:
        """Discard partial uploads untouched for at least `older_than_seconds` and not
        held by an open writer; return how many were discarded. Stored blobs are never
        touched.
        """
        ...
