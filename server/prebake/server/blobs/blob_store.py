"""The blob store contract: content-addressed, verified, resumable storage of immutable blobs.

A blob is an immutable byte string named by its `Digest` (xxh3-128 and size). The gRPC `Blobs`
service and the publish checks are written against `BlobStore` only. It has one implementation,
`prebake.server.blobs.cas.ContentAddressedStore`, over any `ObjectStore` backend (local disk, S3),
checked for every backend by `tests/contract/test_content_store.py`.

Contract common to every method:

* **Concurrency.** Every `BlobStore` method is safe to call from several threads at once, and from
  several processes (or replicas) sharing the same object store. A `BlobWriter` or `BlobReader`
  belongs to one caller at a time. Within one store instance an upload (upload id + digest) has at
  most one open writer (`Busy` for a second one); across processes nothing excludes two writers of
  one upload, and none is needed: the bytes at each offset of a blob are fixed by its digest, so
  honest writers store the same parts, and anything else fails verification.
* **Nothing partial or unverified is ever visible.** A blob becomes visible to `contains`, `read`,
  `find_missing` and `iter_digests` only once its whole content has been received, hashed and
  found equal to its digest, and been made durable and published under its content address in one
  atomic step. Whatever fails (an exception, a killed process, a power cut), a digest names either
  no blob or the complete, verified blob.
* **Resume.** What an upload keeps is what the object store holds (its stored parts). An
  interrupted upload continues from `upload_status().committed_size`, from this or any other store
  instance on the same storage (after a restart, on another replica). A backend whose parts have a
  minimum size (S3: 5 MiB) may keep less than was received: bytes after the last stored part are
  received again.
* **Digest-late uploads.** An uploader that has not hashed its content yet opens the upload with a
  `PendingDigest` (the size only) and states the digest at `commit`, which checks it against the
  hash computed while receiving, so the uploader reads its content once. Such an upload is staged
  under its upload id and size, apart from every digest-first upload of the same id, and resumes
  like one (`open_write` / `upload_status` with the same `PendingDigest`). Nothing is visible
  before `commit`, as for any upload; a wrong digest at commit stores nothing.
* **Idempotency.** Storing a blob that already exists succeeds without changing anything visible;
  concurrent uploads of one blob all succeed and one of them publishes it. `delete` of an absent
  blob and `close`/`abort` of an ended writer are no-ops.
* **Verification on read** is the backend's: a local disk re-hashes a blob whose file changed since
  it was last found good (see `local_stamps`), an object store with its own checksums is trusted.
  A blob found corrupt is quarantined (reported missing from then on, so it can be uploaded again)
  and `DataLoss` is raised; its bytes are never served.
* **Scrubbing** (`scrub`) re-hashes a blob in full whatever the backend vouches for (what read
  stamps and checksums cannot see: bit rot, an object replaced behind the store's back), and
  records when it was found good (`last_verified`, `scrub_order`), in the store, for every
  process. Quarantined blobs stay under `quarantine/` for inspection until `remove_quarantined`
  or `collect_quarantined` (garbage collection, after a grace) deletes them.
* **Errors** are the domain exceptions of `prebake.core.errors` (the gRPC layer maps them to
  status codes); failures of the backing storage propagate as `OSError` and leave the store as
  described above.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

from prebake.core.errors import InvalidArgument
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


@dataclass(frozen=True)
class PendingDigest:
    """The blob of a digest-late upload before its commit: only its size is known.

    Its hash is stated at `BlobWriter.commit`; see "Digest-late uploads" in the module docstring.
    """

    size: int

    def __post_init__(self) -> None:
        if self.size < 0:
            raise InvalidArgument(f"digest size {self.size} is negative")

    def __str__(self) -> str:
        return f"(hash stated at commit)/{self.size}"


UploadDigest = Digest | PendingDigest
"""What an upload is opened with: the blob's digest, or only its size (digest-late)."""


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


@dataclass(frozen=True)
class QuarantinedBlob:
    """A blob moved aside because its stored bytes did not match its digest."""

    key: str
    """Its object key under `quarantine/` (what `remove_quarantined` takes)."""
    digest: Digest
    """The digest the bytes were stored under (not theirs: they failed it)."""
    quarantined_at: float
    """Seconds since the epoch."""
    size: int
    """Bytes actually held."""


class ScrubOutcome(enum.Enum):
    GOOD = "good"
    CORRUPT = "corrupt"  # wrong size or hash; quarantined (with `quarantine`)
    MISSING = "missing"  # nothing stored under the blob's content address


@dataclass(frozen=True)
class ScrubResult:
    """What `ContentAddressedStore.scrub` found about one blob."""

    digest: Digest
    outcome: ScrubOutcome
    hashed_bytes: int
    detail: str = ""


class StoreUsage(NamedTuple):
    """What counts against the store's quota (`max_store_bytes`), and the quota."""

    blob_bytes: int
    """Published blobs (referenced by an artifact or not)."""
    upload_bytes: int
    """Unfinished uploads: the parts (or the assembled object) the store keeps for them."""
    reserved_bytes: int
    """The rest of the blobs that open writers of this instance are receiving."""
    max_store_bytes: int
    """The quota; 0 means none."""

    @property
    def used_bytes(self) -> int:
        return self.blob_bytes + self.upload_bytes + self.reserved_bytes


class StoredBlob(NamedTuple):
    """One published blob and when it was stored (seconds since the epoch)."""

    digest: Digest
    stored_at: float


class Collected(NamedTuple):
    """What a collection removed (or, in a dry run, would remove)."""

    items: int
    bytes: int

    def __add__(self, other: object) -> Collected:  # type: ignore[override]
        if not isinstance(other, Collected):
            return NotImplemented
        return Collected(self.items + other.items, self.bytes + other.bytes)


@runtime_checkable
class BlobReader(Iterator[bytes], Protocol):
    """The chunks of one read, in order.

    Holds resources until it is exhausted or `close()`d, whichever comes first; `close()` is
    idempotent. A blob deleted during the read may be served to the end (local disk: the open file
    pins it) or cut short with `DataLoss`/`NotFound`; never with other bytes.
    """

    def close(self) -> None: ...


@runtime_checkable
class BlobWriter(Protocol):
    """One upload of one blob, held exclusively by its caller until `commit`, `close` or `abort`.

    While a writer is open, no other writer of the same store instance can open the same
    (upload_id, digest): `BlobStore.open_write` raises `Busy`. Writers of the same blob under
    different upload ids are independent. Every writer must be ended by `commit`, `close` or `abort` (the
    first of them to succeed ends it; calling `close` afterwards, e.g. in a `finally`,
    is always safe). On an ended writer `append` raises `FailedPrecondition`, and so
    does `commit` unless the writer is complete, when it is a no-op.
    """

    @property
    def digest(self) -> UploadDigest:
        """The blob being written: as opened (a `PendingDigest` for a digest-late upload until its
        `commit` succeeds), and after `commit` the digest it was committed under."""
        ...

    @property
    def committed_size(self) -> int:
        """Offset of the next `append`: bytes of this upload the writer holds (stored or buffered).

        After `close` it is what the store kept (the size `upload_status` reports), which may be
        less than was appended on backends with a minimum part size.
        """
        ...

    @property
    def complete(self) -> bool:
        """The blob is stored: committed by this writer, or already present at `open_write`."""
        ...

    def append(self, data: bytes) -> None:
        """Add the next bytes of the content (buffered up to a part, then stored as one).

        Raises `UploadDigestMismatch` if the upload would exceed `digest.size` (the partial
        upload is discarded and the writer ends), `FailedPrecondition` on a complete or
        ended writer, `QuotaExceeded` if the backing storage is full (nothing of `data`
        is kept, the writer stays usable). On failure `committed_size` does not grow.
        """
        ...

    def commit(self, digest: Digest | None = None) -> None:
        """Verify the bytes and publish the blob atomically; afterwards `complete` is True.

        `digest` is required for a digest-late upload (opened with a `PendingDigest`): the blob's
        digest, of the size it was opened with, which the bytes are checked against
        (`InvalidArgument` if it is missing or of another size: nothing changes, the writer stays
        open). If that blob is stored already, the upload is discarded and the commit succeeds (a
        duplicate). For a digest-first upload `digest` may be omitted or must equal the one opened.

        Hashes what this writer has not hashed while receiving it (after a resume in another
        process, the stored parts are read back once). Raises `InvalidArgument` if fewer than
        `digest.size` bytes were appended (the partial upload is kept, the writer stays open);
        `UploadDigestMismatch` if the bytes hash to something else (the partial upload is deleted,
        nothing is stored, the writer ends); `QuotaExceeded` if publishing would exceed the
        store's quota (the upload is kept for a later retry). Succeeds if another upload
        published the same blob first. A no-op on a complete writer.
        """
        ...

    def close(self) -> None:
        """End the writer, storing what the backend can keep so the upload can be resumed.

        Afterwards `committed_size` is the durable resume point. A no-op after `commit`,
        `abort` or a previous `close`.
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
    process-safety, nothing partial or unverified ever visible, resume, idempotency.
    """

    def contains(self, digest: Digest) -> bool:
        """Whether the complete blob is stored. Never true for a partial upload."""
        ...

    def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        """The digests not stored, in the order given, each at most once."""
        ...

    @property
    def presigns(self) -> bool:
        """Whether `download_url` can make URLs at all: checked once per manifest, so a backend
        that cannot presign costs a hit nothing per file."""
        ...

    def download_url(self, digest: Digest, expires_seconds: int) -> str | None:
        """A URL that reads the blob straight from the backend for `expires_seconds`, or None if
        the backend cannot make one (then reads go through `read`). No request to the backend;
        it does not check that the blob is stored."""
        ...

    def verify(self, digest: Digest) -> None:
        """Check that the stored bytes still match `digest`, as far as the backend needs to.

        Raises `NotFound` if the blob is absent. If the stored size or hash differ, quarantines
        the blob and raises `DataLoss`. Costs one full read of the blob where the backend cannot
        vouch for it (local disk: the file changed since it was last found good), else nothing.
        """
        ...

    def read(self, digest: Digest, offset: int = 0, limit: int = 0, chunk_size: int = 1 << 20) -> BlobReader:
        """Stream the blob's bytes from `offset`, at most `limit` of them (0: to the end).

        Every chunk is non-empty and at most `chunk_size` bytes; reading at offset ==
        size yields nothing. Verifies the blob first as `verify` does, so a corrupt blob
        is never served (a blob known good costs no hashing, whatever the range). Raises at
        the call, before any iteration: `InvalidArgument` (negative offset or limit,
        chunk_size < 1), `NotFound`, `OutOfRange` (offset > size), `DataLoss` (quarantined);
        and `DataLoss` while iterating if the stored blob turns out shorter than its digest.
        """
        ...

    def open_write(self, upload_id: str, digest: UploadDigest) -> BlobWriter:
        """Start or resume upload `upload_id` of `digest`.

        With a `PendingDigest` (digest-late; see the module docstring) the blob is not known yet:
        the upload never starts complete, and resumes what the store kept for this upload id and
        size; its digest is given to `commit`.

        If the blob is already stored, returns a complete writer (committed_size ==
        size) that holds nothing. Otherwise resumes from what the store kept for this
        upload id and digest (`committed_size`), or starts at 0. Raises `InvalidArgument`
        (malformed upload id), `QuotaExceeded` (blob larger than the store accepts, or
        the store's total would exceed its quota), `Busy` (a writer of this store instance
        holds the same upload id and digest right now).
        """
        ...

    def upload_status(self, upload_id: str, digest: UploadDigest) -> UploadStatus:
        """(size, True) if the blob is stored; else (bytes the store keeps for this upload, False).

        For a `PendingDigest`, the digest-late upload of that id and size: never complete (the
        store does not know which blob it will be; once committed it holds nothing any more).

        Those bytes are what a client must send from; never more than `open_write` resumes
        from. While a writer of this store holds the upload (a stream that was cut and is still
        storing what it received), waits a few seconds for it to let go, so the size is not
        reported short of what that stream keeps. Raises `InvalidArgument` for a malformed
        upload id.
        """
        ...

    def delete(self, digest: Digest) -> bool:
        """Remove the blob; True if it was stored. See `BlobReader` for readers already streaming it."""
        ...

    def stats(self) -> StoreStats:
        """(number of blobs, their total bytes). Cheap; each backend documents its freshness."""
        ...

    def rescan(self) -> StoreStats:
        """Recount what `stats` and `usage` report from the storage itself (one listing), picking
        up other processes' changes; return the new `stats`. Writes of this store made while it
        runs still count."""
        ...

    def iter_digests(self) -> Iterator[Digest]:
        """Every stored blob, once each, in no particular order.

        Weakly consistent: a blob stored for the whole iteration is yielded; one added or
        removed meanwhile may or may not be.
        """
        ...

    def list_blobs(self) -> Iterator[StoredBlob]:
        """`iter_digests`, with when each blob was stored (its object's last write)."""
        ...

    def usage(self) -> StoreUsage:
        """Bytes counted against `max_store_bytes`: blobs, unfinished uploads, and what open
        writers still expect. From in-memory counters, as `stats`."""
        ...

    def sweep_uploads(self, older_than_seconds: float) -> int:
        """Discard partial uploads untouched for at least `older_than_seconds` and not
        held by an open writer of this instance; return how many were discarded. Stored
        blobs are never touched.
        """
        ...

    # -- integrity (see `prebake.server.integrity`) ----------------------------------

    def scrub(
        self, digest: Digest, *, quarantine: bool = True, throttle: Callable[[int], None] | None = None
    ) -> ScrubResult:
        """Re-hash the stored blob in full, whatever the backend vouches for, and record when it
        was found good. A corrupt blob is quarantined (with `quarantine`); see `ScrubOutcome`.
        `throttle(n)` runs after every n bytes hashed (rate limiting; what it raises propagates)."""
        ...

    def last_verified(self, digest: Digest) -> float | None:
        """When `scrub` last found the blob good, in any process or replica; None if never."""
        ...

    def scrub_order(self, also: Iterable[Digest] = ()) -> list[Digest]:
        """Stored blobs and `also` (digests that should be stored), least recently verified
        first; absent digests of `also` first of all."""
        ...

    def list_quarantined(self) -> list[QuarantinedBlob]:
        """Every quarantined blob, oldest first."""
        ...

    def remove_quarantined(self, key: str) -> bool:
        """Delete one quarantined blob by its `QuarantinedBlob.key`; True if it existed.
        `InvalidArgument` for any other key."""
        ...

    def collect_uploads(self, older_than_seconds: float, *, dry_run: bool = False) -> Collected:
        """`sweep_uploads`, plus the backend's own temporary files of that age (local disk:
        interrupted writes); how many and their bytes. With `dry_run`, removes nothing and
        reports what it would remove. Stored blobs are never touched.
        """
        ...

    def collect_quarantined(self, older_than_seconds: float, *, dry_run: bool = False) -> Collected:
        """Remove quarantined blobs (bytes found corrupt and moved aside, kept for inspection)
        quarantined at least `older_than_seconds` ago; how many and their bytes. With
        `dry_run`, removes nothing. Nothing else is touched.
        """
        ...
