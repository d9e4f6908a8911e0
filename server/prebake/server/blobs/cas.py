"""`BlobStore` over any `ObjectStore`: upload sessions, resume, hashing, verification and quotas, once.

Keys it uses in the object store::

    blobs/<hash[:2]>/<hash>-<size>         published blobs; only ever verified bytes
    uploads/<upload_id>--<hash>-<size>     an upload session: the key of its multipart upload, and
                                           of the assembled object between completion and publishing
    uploads/<upload_id>--late-<size>       the same for a digest-late upload (`PendingDigest`): its
                                           hash is known only at `commit`, which publishes it under
                                           the digest stated then (after checking it)
    quarantine/<hash>-<size>.<time_ns>     blobs whose stored bytes were found not to match, kept for
                                           inspection until `collect_quarantined` removes them
    verified/<hash>-<size>                 empty; its modification time is when the integrity sweep
                                           last re-hashed the blob and found it good (`scrub`)

An upload buffers what it receives up to `part_size` bytes and stores each full buffer as the next
part of the session's multipart upload, feeding the xxh3-128 hash as it goes; `close` stores the
buffered tail too if the backend accepts a part that small (local disk does, S3 does not below 5
MiB), so a resume continues from the sum of the stored parts, which any process can read from the
object store (`find_uploads` + `list_parts`). `commit` publishes a blob that fits in one buffer
with one atomic `put` after hashing it; a bigger one is assembled under its session key
(`complete_upload`), verified (from the running hash if this process hashed every stored part,
which the parts' etags prove, else by reading it back once) and only then moved under its content
address. So the content address never holds unverified bytes, on any backend. A digest-late upload takes
the same path under its own session key; only its target is named at `commit` (and if that blob is
stored already, the session is dropped as a duplicate). (The price on S3:
the move is a server-side copy; the parts of an unfinished upload cannot be read there, so the
assembled object is the only thing that can be verified after a restart.)
"""

from __future__ import annotations

import contextlib
import enum
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import xxhash

from prebake.core.digests import hash_bytes, new_hasher
from prebake.core.errors import (
    Busy,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    QuotaExceeded,
    UploadDigestMismatch,
)
from prebake.server.blobs.blob_store import (
    Collected,
    PendingDigest,
    QuarantinedBlob,
    ScrubOutcome,
    ScrubResult,
    StoredBlob,
    StoreStats,
    StoreUsage,
    UploadDigest,
    UploadStatus,
    validate_upload_id,
)
from prebake.server.blobs.objects import (
    InvalidPart,
    InvalidRange,
    NoSuchObject,
    NoSuchUpload,
    ObjectInfo,
    ObjectReader,
    ObjectStore,
    PartInfo,
    PreconditionFailed,
    Presigns,
    StorageFull,
    SweepsScratch,
    UploadHandle,
)
from prebake.server.records import Digest

DEFAULT_PART_SIZE = 8 << 20
# How long `upload_status` waits for a writer holding the upload to let go (a cut stream
# finishing its last append; a live concurrent writer is answered as it stands after this).
HELD_WAIT_SECONDS = 5.0
_HASH_CHUNK = 4 << 20
_BLOB_KEY_RE = re.compile(r"blobs/([0-9a-f]{2})/([0-9a-f]{32})-(0|[1-9][0-9]*)")
_SESSION_KEY_RE = re.compile(r"uploads/([A-Za-z0-9._-]{1,128})--([0-9a-f]{32})-(0|[1-9][0-9]*)")
# "late" is not hexadecimal: no digest-first session key has this form, nor this one the other's.
_LATE_SESSION_KEY_RE = re.compile(r"uploads/([A-Za-z0-9._-]{1,128})--late-(0|[1-9][0-9]*)")
QUARANTINE_PREFIX = "quarantine/"
VERIFIED_PREFIX = "verified/"
_QUARANTINE_KEY_RE = re.compile(r"quarantine/([0-9a-f]{32})-(0|[1-9][0-9]*)\.([0-9]{1,20})")
_VERIFIED_KEY_RE = re.compile(r"verified/([0-9a-f]{32})-(0|[1-9][0-9]*)")
# Stripes of per-digest locks: publishing and deleting one blob are serialised in this process
# (exact counters), without one slow publish (an S3 copy) holding up every other blob. A stripe
# holds whole shards (the first two hex digits of the hash), so that `rescan` can recount a shard
# while nothing of this store writes to it.
_STRIPES = 64
_SHARDS = 256


def _shard(digest: Digest) -> int:
    return int(digest.hash[:2], 16)


def blob_key(digest: Digest) -> str:
    return f"blobs/{digest.hash[:2]}/{digest.hash}-{digest.size}"


def session_key(upload_id: str, digest: UploadDigest) -> str:
    if isinstance(digest, PendingDigest):
        return f"uploads/{upload_id}--late-{digest.size}"
    return f"uploads/{upload_id}--{digest.hash}-{digest.size}"


def _session_of(key: str) -> tuple[str, UploadDigest] | None:
    """The (upload id, digest) whose `session_key` is `key`, or None."""
    if (m := _SESSION_KEY_RE.fullmatch(key)) is not None:
        return m.group(1), Digest(m.group(2), int(m.group(3)))
    if (m := _LATE_SESSION_KEY_RE.fullmatch(key)) is not None:
        return m.group(1), PendingDigest(int(m.group(2)))
    return None


def verified_key(digest: Digest) -> str:
    return f"{VERIFIED_PREFIX}{digest.hash}-{digest.size}"


def _put(objects: ObjectStore, key: str, data: bytes) -> None:
    objects.put(key, data)


def _move(objects: ObjectStore, staged: ObjectInfo, key: str) -> None:
    # Only the object that was verified: another writer of the session may have replaced it.
    info = objects.move(staged.key, key, if_etag=staged.etag)
    # Hashed on its way in: the first read (PublishArtifact's check) need not hash it again. (A
    # blob small enough for `_put` costs less to hash than to vouch for on a coarse clock.)
    objects.read_verification.vouch(key, info.etag)


def _same_parts(a: Iterable[PartInfo], b: Iterable[PartInfo]) -> bool:
    return [(p.number, p.size, p.etag) for p in a] == [(p.number, p.size, p.etag) for p in b]


class _Quarantined(enum.Enum):
    MOVED = "moved"
    GONE = "gone"  # already quarantined or deleted by someone else
    REPLACED = "replaced"  # a fresh upload was published over it meanwhile


@dataclass(frozen=True)
class _Hashed:
    """What this process hashed of one upload session: exactly the bytes of `parts`, in order."""

    parts: tuple[PartInfo, ...]
    hasher: xxhash.xxh3_128


@dataclass
class _Recount:
    """What this store changed while one `rescan` ran: blob shards, and upload session keys."""

    shards: set[int] = field(default_factory=set)
    uploads: set[str] = field(default_factory=set)


@dataclass
class _Resume:
    """Where an upload session stands in the object store."""

    upload: UploadHandle | None = None
    parts: tuple[PartInfo, ...] = ()
    staged: ObjectInfo | None = None  # assembled, not yet verified and published
    # Multipart uploads of a session that is assembled already, and their stored bytes: a crash
    # between assembling the object and removing its parts (local disk) leaves both.
    leftovers: tuple[tuple[UploadHandle, int], ...] = ()

    @property
    def stored(self) -> int:
        return sum(p.size for p in self.parts)


class ContentAddressedStore:
    """The `BlobStore`: content-addressed blobs on an `ObjectStore`; see the module docstring.

    `stats()` and `usage()` are served from in-memory counters, initialised by one listing of
    `blobs/` and `uploads/` here and kept up to date by this instance's own uploads, publishes,
    deletes and quarantines; other processes' changes are seen after `rescan()`, which may run
    while this instance writes (its own writes meanwhile are never lost from the counters). The
    `max_store_bytes` quota is checked against them, so it is exact for one server per store and
    approximate otherwise. What counts (`StoreUsage`): published blobs, the stored parts of
    unfinished uploads (until `collect_uploads` removes stale ones), and, for each open writer,
    the rest of its blob (reserved at `open_write`, so that concurrent uploads cannot together
    overrun the quota half-way). Quarantined blobs do not count. `part_size` is the upload buffer
    and part size (raised per blob where the backend's part count would not suffice); the
    backend's `min_part_size` bounds it from below.
    """

    def __init__(
        self,
        objects: ObjectStore,
        *,
        max_blob_bytes: int = 64 << 30,
        max_store_bytes: int = 0,
        part_size: int = DEFAULT_PART_SIZE,
        remembered_uploads: int = 1024,
    ) -> None:
        if max_blob_bytes < 0 or max_store_bytes < 0:
            raise ValueError(
                f"max_blob_bytes ({max_blob_bytes}) and max_store_bytes ({max_store_bytes}) must be >= 0"
            )
        if part_size < max(1, objects.min_part_size):
            raise ValueError(f"part size {part_size} is below the backend's minimum {objects.min_part_size}")
        self.objects = objects
        self.max_blob_bytes = max_blob_bytes
        self.max_store_bytes = max_store_bytes
        self.part_size = part_size
        # Guards the counters, `_held` and `_hashed`.
        self._lock = threading.Lock()
        # Notified whenever a writer lets go of its session (`upload_status` waits for it).
        self._released = threading.Condition(self._lock)
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]
        # Who signs download URLs for a backend that cannot presign its own (local disk
        # behind `prebake.server.blob_http`); set once at start-up, before any read.
        self.urls: Presigns | None = None
        # Decided once: a runtime Protocol check costs about 12 µs, and every hit asks.
        self._own_presigns: Presigns | None = objects if isinstance(objects, Presigns) else None
        self._held: set[tuple[str, UploadDigest]] = set()
        # Running hashes of uploads whose writer closed, so that a resume in this process need not
        # read the stored parts back. Bounded: forgetting one only costs that read.
        self._hashed: OrderedDict[tuple[str, UploadDigest], _Hashed] = OrderedDict()
        self._remembered_uploads = remembered_uploads
        # Published blobs, per shard (so that `rescan` can recount one shard) and in all.
        self._shard_counts = [0] * _SHARDS
        self._shard_bytes = [0] * _SHARDS
        self._count = 0
        self._bytes = 0
        # One per `rescan` running: what this store changes meanwhile.
        self._recounts: list[_Recount] = []
        # Bytes stored for unfinished uploads, by session key (parts, or the assembled object).
        self._uploads: dict[str, int] = {}
        self._upload_bytes = 0
        # The rest of each held session's blob, not stored yet.
        self._reserved: dict[tuple[str, UploadDigest], int] = {}
        self._reserved_bytes = 0
        self._hashed_bytes = 0
        self.rescan()

    def _stripe(self, digest: Digest) -> threading.Lock:
        return self._stripes[_shard(digest) % _STRIPES]

    def part_size_for(self, digest: UploadDigest) -> int:
        """The part size of `digest`'s uploads: big enough that its parts fit the backend's part count,
        with a tenth of the numbers left for short parts stored by interrupted uploads."""
        usable = max(1, self.objects.max_part_count * 9 // 10)
        return max(self.part_size, math.ceil(digest.size / usable))

    # -- queries ---------------------------------------------------------------------

    def contains(self, digest: Digest) -> bool:
        return self.objects.head(blob_key(digest)) is not None

    def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        seen: set[Digest] = set()
        missing: list[Digest] = []
        for d in digests:
            if d in seen:
                continue
            seen.add(d)
            if not self.contains(d):
                missing.append(d)
        return missing

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(self._count, self._bytes)

    def usage(self) -> StoreUsage:
        with self._lock:
            return StoreUsage(self._bytes, self._upload_bytes, self._reserved_bytes, self.max_store_bytes)

    # -- quota accounting (every `_locked` method runs with `_lock` held) -----------------

    def _set_shard_locked(self, shard: int, count: int, size: int) -> None:
        self._count += count - self._shard_counts[shard]
        self._bytes += size - self._shard_bytes[shard]
        self._shard_counts[shard], self._shard_bytes[shard] = count, size

    def _count_blob_locked(self, digest: Digest, sign: int) -> None:
        """Count a blob in (+1) or out (-1); its caller holds the blob's stripe."""
        shard = _shard(digest)
        count = max(0, self._shard_counts[shard] + sign)
        size = max(0, self._shard_bytes[shard] + sign * digest.size)
        self._set_shard_locked(shard, count, size)
        self._touched_locked(digest)

    def _touched_locked(self, digest: Digest) -> None:
        """This store changed what is stored under `blobs/` for `digest` (called after the change,
        with the blob's stripe held): a running `rescan` recounts its shard."""
        for recount in self._recounts:
            recount.shards.add(_shard(digest))

    def _touch_upload_locked(self, key: str) -> None:
        """This store changes (or will change) the upload session `key`: a running `rescan` keeps
        this store's own count of it rather than what its listing found."""
        for recount in self._recounts:
            recount.uploads.add(key)

    def _add_upload_locked(self, key: str, delta: int) -> None:
        self._touch_upload_locked(key)
        before = self._uploads.get(key, 0)
        after = max(0, before + delta)
        self._upload_bytes += after - before
        if after:
            self._uploads[key] = after
        else:
            self._uploads.pop(key, None)

    def _reserve_locked(self, session: tuple[str, UploadDigest], size: int) -> None:
        self._reserved_bytes += max(0, size) - self._reserved.pop(session, 0)
        if size > 0:
            self._reserved[session] = size

    def _check_room_locked(
        self, digest: UploadDigest, adding: int, exclude: tuple[str, UploadDigest] | None = None
    ) -> None:
        """Raise QuotaExceeded unless `adding` more bytes fit; `exclude`'s own upload and
        reservation do not count (they become the blob being published)."""
        if not self.max_store_bytes:
            return
        used = self._bytes + self._upload_bytes + self._reserved_bytes
        if exclude is not None:
            used -= self._uploads.get(session_key(*exclude), 0) + self._reserved.get(exclude, 0)
        if used + adding > self.max_store_bytes:
            raise QuotaExceeded(
                f"the blob store is full: blob {digest} needs {adding} more bytes, but {used} of its "
                f"max_store_bytes {self.max_store_bytes} are used ({self._bytes} by blobs, "
                f"{self._upload_bytes} by unfinished uploads, {self._reserved_bytes} reserved by uploads "
                "in progress); reads still work. Free space (`prebake gc` removes expired unpublished "
                "blobs and stale uploads and evicts unpinned artifacts; `prebake rm` deletes "
                "artifacts) or raise max_store_bytes, then retry"
            )

    @property
    def hashed_bytes(self) -> int:
        """Bytes read back and hashed to verify stored blobs or uploads, since start-up."""
        with self._lock:
            return self._hashed_bytes

    def rescan(self) -> StoreStats:
        """Recount blobs and bytes from one listing of `blobs/`, and unfinished uploads from
        `uploads/`; return the blobs' count and bytes. Reservations of open writers stay.

        This store may write while the listings run, and a listing may or may not show such a
        write, so neither overwrites what this store counted itself: a blob shard it wrote
        meanwhile is listed again while its stripe is held (no write of this store to it in
        flight), and an upload session it wrote (or holds open) keeps this store's own count.
        """
        recount = _Recount()
        with self._lock:
            self._recounts.append(recount)
            recount.uploads.update(session_key(*session) for session in self._held)
        try:
            listed = self._count_shards(self.list_blobs())
            uploads = self._list_uploads()
            self._install_shard_counts(listed, recount)
            with self._lock:
                kept = {key: n for key, n in self._uploads.items() if key in recount.uploads}
                found = {key: n for key, n in uploads.items() if key not in recount.uploads and n > 0}
                self._uploads = {**found, **kept}
                self._upload_bytes = sum(self._uploads.values())
                return StoreStats(self._count, self._bytes)
        finally:
            with self._lock:
                self._recounts.remove(recount)

    def _install_shard_counts(self, listed: list[tuple[int, int]], recount: _Recount) -> None:
        """Take each shard's (count, bytes) from `listed`, unless this store wrote to the shard
        while `recount` ran: such a shard is listed again with its stripe held, when no write of
        this store to it is in flight, so that the listing and the counters agree."""
        for index, stripe in enumerate(self._stripes):
            with stripe:
                for shard in range(index, _SHARDS, _STRIPES):
                    with self._lock:
                        written = shard in recount.shards
                        if not written:
                            self._set_shard_locked(shard, *listed[shard])
                    if written:
                        again = self._count_shards(self._blobs_under(f"blobs/{shard:02x}/"))
                        with self._lock:
                            self._set_shard_locked(shard, *again[shard])

    @staticmethod
    def _count_shards(blobs: Iterable[StoredBlob]) -> list[tuple[int, int]]:
        """(count, bytes) of `blobs` per shard."""
        counts = [0] * _SHARDS
        sizes = [0] * _SHARDS
        for stored in blobs:
            shard = _shard(stored.digest)
            counts[shard] += 1
            # The key's size, not the object's: a wrong-length object is corrupt and is later
            # quarantined under the key's size, which keeps the counters exact.
            sizes[shard] += stored.digest.size
        return list(zip(counts, sizes, strict=True))

    def _list_uploads(self) -> dict[str, int]:
        """Bytes stored under `uploads/` (parts of multipart uploads, assembled objects), by key."""
        uploads: dict[str, int] = {}
        for upload in self.objects.find_uploads("uploads/"):
            try:
                parts = self.objects.list_parts(upload)
            except NoSuchUpload:
                continue
            uploads[upload.key] = uploads.get(upload.key, 0) + sum(p.size for p in parts)
        for info in self.objects.list_objects("uploads/"):
            uploads[info.key] = uploads.get(info.key, 0) + info.size
        return uploads

    def iter_digests(self) -> Iterator[Digest]:
        """Every well-named object under `blobs/` in its right shard."""
        for stored in self.list_blobs():
            yield stored.digest

    def list_blobs(self) -> Iterator[StoredBlob]:
        return self._blobs_under("blobs/")

    def _blobs_under(self, prefix: str) -> Iterator[StoredBlob]:
        for info in self.objects.list_objects(prefix):
            m = _BLOB_KEY_RE.fullmatch(info.key)
            # A misplaced or foreign object is unreachable through blob_key: not a blob of ours.
            if m is not None and m.group(2)[:2] == m.group(1):
                yield StoredBlob(Digest(m.group(2), int(m.group(3))), info.modified)

    # -- verification ----------------------------------------------------------------

    def _hash_object(self, key: str, throttle: Callable[[int], None] | None = None) -> tuple[str, int]:
        hasher = new_hasher()
        size = 0
        reader = self.objects.get(key, 0, None, _HASH_CHUNK)
        try:
            for chunk in reader:
                hasher.update(chunk)
                size += len(chunk)
                if throttle is not None:
                    throttle(len(chunk))
        finally:
            reader.close()
            with self._lock:
                self._hashed_bytes += size
        return hasher.hexdigest(), size

    def _checked(self, digest: Digest) -> ObjectInfo:
        """The stored blob, verified as far as the backend needs (see `BlobStore.verify`)."""
        key = blob_key(digest)
        # Loops only if a fresh upload replaced the object while it was being checked.
        for _ in range(3):
            info = self.objects.head(key)
            if info is None:
                raise self._not_stored(digest)
            if info.size != digest.size:
                if self._quarantine(digest, info) is _Quarantined.REPLACED:
                    continue
                raise DataLoss(
                    f"blob {digest} is corrupt in storage ({info.size} bytes instead of {digest.size}); "
                    "quarantined — upload it again"
                )
            found: list[tuple[str, int]] = []

            def rehash(key: str = key, found: list[tuple[str, int]] = found) -> bool:
                found.append(self._hash_object(key))
                return found[-1] == (digest.hash, digest.size)

            try:
                if self.objects.read_verification.verified(key, rehash):
                    return info
            except NoSuchObject:
                raise NotFound(f"blob {digest} is not stored") from None
            actual, size = found[-1] if found else ("(not hashed)", info.size)
            if self._quarantine(digest, info) is not _Quarantined.REPLACED:
                raise DataLoss(
                    f"blob {digest} is corrupt in storage (read {actual}/{size}); "
                    "quarantined — upload it again"
                )
        raise DataLoss(f"blob {digest} kept changing in storage while being checked; try again")

    def verify(self, digest: Digest) -> None:
        self._checked(digest)

    def _not_stored(self, digest: Digest) -> NotFound:
        """NotFound for `digest`, naming the sizes its hash is stored with, if any: a caller
        with the right hash and a wrong `size_bytes` learns which field is wrong. (One listing
        of the hash's prefix, on this path only; a hash is a content address, so its sizes
        tell nothing that the content's owner does not know.)"""
        sizes = sorted(
            blob.digest.size
            for blob in self._blobs_under(f"blobs/{digest.hash[:2]}/{digest.hash}-")
            if blob.digest.hash == digest.hash and blob.digest.size != digest.size
        )
        if not sizes:
            return NotFound(f"blob {digest} is not stored")
        stored = " or ".join(str(size) for size in sizes[:3])
        return NotFound(
            f"blob {digest} is not stored: hash {digest.hash} is stored with size_bytes {stored}, "
            f"not {digest.size}; a digest's size_bytes is the content's length in bytes"
        )

    def _quarantine(self, digest: Digest, seen: ObjectInfo) -> _Quarantined:
        """Move the blob aside, but only if it still is the object that was found bad."""
        key = blob_key(digest)
        with self._stripe(digest):
            try:
                self.objects.move(
                    key, f"{QUARANTINE_PREFIX}{digest.hash}-{digest.size}.{time.time_ns()}", if_etag=seen.etag
                )
            except NoSuchObject:
                return _Quarantined.GONE
            except PreconditionFailed:
                return _Quarantined.REPLACED
            self.objects.read_verification.forget(key)
            self._forget_verified(digest)
            with self._lock:
                self._count_blob_locked(digest, -1)
        return _Quarantined.MOVED

    def _quarantine_if_short(self, digest: Digest, at: int) -> None:
        info = self.objects.head(blob_key(digest))
        if info is not None and info.size != digest.size:
            self._quarantine(digest, info)
        raise DataLoss(
            f"blob {digest} is corrupt in storage (it ends after {at} bytes); quarantined — upload it again"
        )

    # -- integrity sweep -------------------------------------------------------------

    def _forget_verified(self, digest: Digest) -> None:
        # Best effort: a stale record of an absent blob is ignored by `scrub_order`.
        with contextlib.suppress(OSError):
            self.objects.delete(verified_key(digest))

    def scrub(
        self, digest: Digest, *, quarantine: bool = True, throttle: Callable[[int], None] | None = None
    ) -> ScrubResult:
        """Re-hash the stored blob whatever the backend vouches for (bit rot leaves a file's
        metadata, and so its read stamp, alone), and record when it was found good.

        CORRUPT (wrong size or hash) quarantines it when `quarantine` (as a read that found it
        would); MISSING means nothing is stored under its content address. `throttle(n)` is
        called after each chunk of n bytes hashed (a rate limit; it may raise to stop the scrub,
        which then propagates). Thread safe; blocking (reads the whole blob).
        """
        key = blob_key(digest)
        hashed = 0
        # Loops only if a fresh upload replaced the object while it was being checked.
        for _ in range(3):
            info = self.objects.head(key)
            if info is None:
                return ScrubResult(digest, ScrubOutcome.MISSING, hashed, f"blob {digest} is not stored")
            if info.size == digest.size:
                try:
                    actual, size = self._hash_object(key, throttle)
                except NoSuchObject:
                    return ScrubResult(digest, ScrubOutcome.MISSING, hashed, f"blob {digest} is not stored")
                hashed += size
                if (actual, size) == (digest.hash, digest.size):
                    with contextlib.suppress(OSError):
                        self.objects.put(verified_key(digest), b"")
                    return ScrubResult(digest, ScrubOutcome.GOOD, hashed)
                detail = f"blob {digest} is corrupt in storage (read {actual}/{size})"
            else:
                detail = f"blob {digest} is corrupt in storage ({info.size} bytes instead of {digest.size})"
            if not quarantine:
                return ScrubResult(digest, ScrubOutcome.CORRUPT, hashed, detail)
            if self._quarantine(digest, info) is not _Quarantined.REPLACED:
                return ScrubResult(digest, ScrubOutcome.CORRUPT, hashed, detail + "; quarantined")
        return ScrubResult(digest, ScrubOutcome.GOOD, hashed, "replaced by a fresh upload while checked")

    def last_verified(self, digest: Digest) -> float | None:
        """When `scrub` last found the blob good (any process or replica), or None."""
        info = self.objects.head(verified_key(digest))
        return None if info is None else info.modified

    def scrub_order(self, also: Iterable[Digest] = ()) -> list[Digest]:
        """Every stored blob and every digest of `also`, least recently verified first.

        A blob never scrubbed counts as verified when it was published (its bytes were hashed
        then); a digest of `also` that is not stored comes first (it is missing: checking that
        costs nothing). Two listings (`blobs/`, `verified/`); weakly consistent like them.
        """
        when = {digest: 0.0 for digest in also}
        for info in self.objects.list_objects("blobs/"):
            m = _BLOB_KEY_RE.fullmatch(info.key)
            if m is not None and m.group(2)[:2] == m.group(1):
                when[Digest(m.group(2), int(m.group(3)))] = info.modified
        for info in self.objects.list_objects(VERIFIED_PREFIX):
            m = _VERIFIED_KEY_RE.fullmatch(info.key)
            if m is None:
                continue
            digest = Digest(m.group(1), int(m.group(2)))
            if when.get(digest, 0.0) > 0.0:  # stored (a record of an absent blob is stale)
                when[digest] = max(when[digest], info.modified)
        return sorted(when, key=lambda d: (when[d], d))

    def list_quarantined(self) -> list[QuarantinedBlob]:
        """Every quarantined blob, oldest first. One listing of `quarantine/`."""
        found: list[QuarantinedBlob] = []
        for info in self.objects.list_objects(QUARANTINE_PREFIX):
            m = _QUARANTINE_KEY_RE.fullmatch(info.key)
            if m is not None:
                digest = Digest(m.group(1), int(m.group(2)))
                found.append(QuarantinedBlob(info.key, digest, int(m.group(3)) / 1e9, info.size))
        return sorted(found, key=lambda q: (q.quarantined_at, q.key))

    def remove_quarantined(self, key: str) -> bool:
        """Delete one quarantined blob (a `QuarantinedBlob.key`); True if it existed.

        Raises InvalidArgument for a key that is not a quarantined blob's: this never deletes
        anything else.
        """
        if not _QUARANTINE_KEY_RE.fullmatch(key):
            raise InvalidArgument(f"{key[:80]!r} is not the key of a quarantined blob")
        return self.objects.delete(key)

    # -- reading ---------------------------------------------------------------------

    def read(
        self, digest: Digest, offset: int = 0, limit: int = 0, chunk_size: int = 1 << 20
    ) -> _CheckedReader:
        if offset < 0 or limit < 0:
            raise InvalidArgument(f"read offset ({offset}) and limit ({limit}) must not be negative")
        if chunk_size < 1:
            raise InvalidArgument(f"read chunk size {chunk_size} must be at least 1")
        self._checked(digest)
        if offset > digest.size:
            raise OutOfRange(f"read offset {offset} is past the end of blob {digest} ({digest.size} bytes)")
        end = digest.size if limit == 0 else min(digest.size, offset + limit)
        inner: ObjectReader | None = None
        if end > offset:
            try:
                inner = self.objects.get(blob_key(digest), offset, end - offset, chunk_size)
            except NoSuchObject:
                raise NotFound(f"blob {digest} is not stored") from None
            except InvalidRange:
                self._quarantine_if_short(digest, offset)
        return _CheckedReader(inner, offset, end, lambda at: self._quarantine_if_short(digest, at))

    @property
    def presigns(self) -> bool:
        """Whether `download_url` can answer a URL (it costs nothing to ask)."""
        return (self.urls or self._own_presigns) is not None

    def download_url(self, digest: Digest, expires_seconds: int) -> str | None:
        """A URL that reads the published blob straight from the backend (or `urls`), or None
        if neither can presign. Only ever for a blob's content address, which holds verified bytes
        only; the reader verifies them again. Costs no request to the backend."""
        presigns = self.urls or self._own_presigns
        if presigns is None or expires_seconds <= 0:
            return None
        return presigns.presign_get(blob_key(digest), expires_seconds)

    # -- writing ---------------------------------------------------------------------

    def _resume(self, upload_id: str, digest: UploadDigest) -> _Resume:
        key = session_key(upload_id, digest)
        staged = self.objects.head(key)
        assembled = staged is not None and staged.size == digest.size
        best = _Resume()
        leftovers: list[tuple[UploadHandle, int]] = []
        for upload in self.objects.find_uploads(key):
            if upload.key != key:
                continue  # a longer key with this one as prefix
            try:
                listed = self.objects.list_parts(upload)
            except NoSuchUpload:
                continue
            if assembled:
                leftovers.append((upload, sum(p.size for p in listed)))
                continue
            parts: list[PartInfo] = []
            for part in listed:
                if part.number != len(parts) + 1:
                    break
                parts.append(part)
                if part.size < self.objects.min_part_size:
                    break  # nothing can follow a short part
            candidate = _Resume(upload=upload, parts=tuple(parts))
            # Several uploads of one session (two processes started at once): keep the longest.
            if candidate.stored <= digest.size and (best.upload is None or candidate.stored > best.stored):
                best = candidate
        if assembled:
            return _Resume(staged=staged, leftovers=tuple(leftovers))
        return best

    def open_write(self, upload_id: str, digest: UploadDigest) -> BlobUpload:
        validate_upload_id(upload_id)
        # A digest-late upload cannot be known complete before its commit names the blob.
        if not isinstance(digest, PendingDigest) and self.contains(digest):
            return BlobUpload.already_stored(digest)
        if digest.size > self.max_blob_bytes:
            raise QuotaExceeded(
                f"blob {digest} is {digest.size} bytes; this store accepts blobs of at most "
                f"{self.max_blob_bytes} bytes"
            )
        session = (upload_id, digest)
        with self._lock:
            if session in self._held:
                raise Busy(
                    f"upload {upload_id!r} of blob {digest} is being written by another request right now; "
                    "retry later after QueryWriteStatus"
                )
            counted = self._uploads.get(session_key(upload_id, digest), 0)
            self._check_room_locked(digest, digest.size - counted)
            self._held.add(session)
            self._touch_upload_locked(session_key(upload_id, digest))
            self._reserve_locked(session, digest.size - counted)
            remembered = self._hashed.pop(session, None)
        try:
            resume = self._resume(upload_id, digest)
            self._abort_leftovers(resume)
            with self._lock:
                stored = digest.size if resume.staged is not None else resume.stored
                self._reserve_locked(session, digest.size - stored)
            if not isinstance(digest, PendingDigest) and self.contains(digest):
                # Published by another upload meanwhile: what this one kept is of no use.
                self._discard(resume)
                self._release(session)
                return BlobUpload.already_stored(digest)
            hasher: xxhash.xxh3_128 | None = None
            if resume.staged is None and not resume.parts:
                hasher = new_hasher()
            elif remembered is not None and _same_parts(remembered.parts, resume.parts):
                hasher = remembered.hasher
        except BaseException:
            self._release(session)
            raise
        return BlobUpload(self, upload_id, digest, resume, hasher)

    def _abort_leftovers(self, resume: _Resume) -> None:
        """Remove the parts a crash left beside an assembled session (its resume finishes the
        assembled object; nothing else would remove them before they go stale)."""
        for upload, size in resume.leftovers:
            self.objects.abort_upload(upload)
            with self._lock:
                self._add_upload_locked(upload.key, -size)

    def _discard(self, resume: _Resume) -> None:
        if resume.upload is not None:
            self.objects.abort_upload(resume.upload)
            with self._lock:
                self._add_upload_locked(resume.upload.key, -sum(p.size for p in resume.parts))
        if resume.staged is not None:
            self.objects.delete(resume.staged.key)
            with self._lock:
                self._add_upload_locked(resume.staged.key, -resume.staged.size)

    def _release(self, session: tuple[str, UploadDigest], hashed: _Hashed | None = None) -> None:
        with self._lock:
            self._held.discard(session)
            self._released.notify_all()
            self._reserve_locked(session, 0)
            if hashed is not None:
                self._hashed[session] = hashed
                while len(self._hashed) > self._remembered_uploads:
                    self._hashed.popitem(last=False)

    def _publish(self, digest: Digest, put: Callable[[], None], session: tuple[str, UploadDigest]) -> None:
        """Run `put` (which makes the verified blob visible) unless the blob is stored, counting it
        (and no longer `session`'s upload, whose bytes it becomes)."""
        with self._stripe(digest):
            if self.contains(digest):
                return
            with self._lock:
                self._check_room_locked(digest, digest.size, exclude=session)
                self._count_blob_locked(digest, +1)
            try:
                put()
            except BaseException:
                with self._lock:
                    self._count_blob_locked(digest, -1)
                raise
            with self._lock:
                self._touched_locked(digest)  # counted before the put, which a rescan may have missed
                self._add_upload_locked(session_key(*session), -digest.size)
                self._reserve_locked(session, 0)

    def upload_status(self, upload_id: str, digest: UploadDigest) -> UploadStatus:
        validate_upload_id(upload_id)
        with self._lock:
            # A cut stream's writer may still be storing what it received (its last message, its
            # buffer): answered now, the client would resume short of it and be refused.
            self._released.wait_for(lambda: (upload_id, digest) not in self._held, HELD_WAIT_SECONDS)
        if not isinstance(digest, PendingDigest) and self.contains(digest):
            return UploadStatus(digest.size, True)
        resume = self._resume(upload_id, digest)
        if resume.upload is not None:
            # What is reported is what the client continues from: it must survive a crash.
            with contextlib.suppress(NoSuchUpload):
                self.objects.sync_parts(resume.upload)
        return UploadStatus(digest.size if resume.staged is not None else resume.stored, False)

    # -- removal ---------------------------------------------------------------------

    def delete(self, digest: Digest) -> bool:
        key = blob_key(digest)
        with self._stripe(digest):
            if not self.objects.delete(key):
                return False
            self.objects.read_verification.forget(key)
            self._forget_verified(digest)
            with self._lock:
                self._count_blob_locked(digest, -1)
        return True

    def _is_held(self, key: str) -> bool:
        session = _session_of(key)
        if session is None:
            return False
        with self._lock:
            return session in self._held

    def sweep_uploads(self, older_than_seconds: float) -> int:
        return self._collect_sessions(older_than_seconds, dry_run=False).items

    def collect_uploads(self, older_than_seconds: float, *, dry_run: bool = False) -> Collected:
        removed = self._collect_sessions(older_than_seconds, dry_run=dry_run)
        if isinstance(self.objects, SweepsScratch):
            removed += Collected(*self.objects.sweep_scratch(older_than_seconds, dry_run=dry_run))
        return removed

    def _collect_sessions(self, older_than_seconds: float, *, dry_run: bool) -> Collected:
        """Abort multipart uploads, and delete assembled objects, under `uploads/` that nothing
        touched for `older_than_seconds`. Anything else under `uploads/` (left by hand or by
        older versions) goes too: nothing else belongs there."""
        cutoff = time.time() - older_than_seconds
        removed = Collected(0, 0)
        for upload in self.objects.find_uploads("uploads/"):
            if self._is_held(upload.key):
                continue
            try:
                parts = self.objects.list_parts(upload)
            except NoSuchUpload:
                continue
            if max([upload.initiated, *(p.modified for p in parts)]) > cutoff:
                continue
            size = sum(p.size for p in parts)
            if not dry_run:
                with self._lock:
                    self._touch_upload_locked(upload.key)
                self.objects.abort_upload(upload)
                with self._lock:
                    self._add_upload_locked(upload.key, -size)
            removed += Collected(1, size)
        for info in list(self.objects.list_objects("uploads/")):
            if info.modified > cutoff or self._is_held(info.key):
                continue
            if dry_run:
                removed += Collected(1, info.size)
                continue
            with self._lock:
                self._touch_upload_locked(info.key)
            if self.objects.delete(info.key):
                with self._lock:
                    self._add_upload_locked(info.key, -info.size)
                removed += Collected(1, info.size)
        return removed

    def collect_quarantined(self, older_than_seconds: float, *, dry_run: bool = False) -> Collected:
        """Delete objects under `quarantine/` moved there at least `older_than_seconds` ago (the
        time in the name, `<hash>-<size>.<time_ns>`; else the object's last write). Whatever
        quarantines a blob (a failed read check, the integrity sweep) moves it there."""
        cutoff = time.time() - older_than_seconds
        removed = Collected(0, 0)
        for info in list(self.objects.list_objects(QUARANTINE_PREFIX)):
            _, _, stamp = info.key.rpartition(".")
            at = int(stamp) / 1e9 if stamp.isdigit() else info.modified
            if at > cutoff:
                continue
            if dry_run or self.objects.delete(info.key):
                removed += Collected(1, info.size)
        return removed


class _CheckedReader:
    """Chunks of [pos, end) of a blob; a stored object that ends early is DataLoss, not a short read."""

    def __init__(
        self, inner: ObjectReader | None, pos: int, end: int, truncated: Callable[[int], None]
    ) -> None:
        self._inner = inner
        self._pos = pos
        self._end = end
        self._truncated = truncated

    def __iter__(self) -> _CheckedReader:
        return self

    def __next__(self) -> bytes:
        inner = self._inner
        if inner is None:
            raise StopIteration
        try:
            data = next(inner)
        except StopIteration:
            self.close()
            if self._pos < self._end:
                self._truncated(self._pos)
            raise
        except BaseException:
            self.close()
            raise
        data = data[: self._end - self._pos]
        self._pos += len(data)
        return data

    def close(self) -> None:
        inner, self._inner = self._inner, None
        if inner is not None:
            inner.close()

    def __enter__(self) -> _CheckedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BlobUpload:
    """`BlobWriter` of `ContentAddressedStore`: one upload session, buffered into parts."""

    def __init__(
        self,
        store: ContentAddressedStore | None,
        upload_id: str,
        digest: UploadDigest,
        resume: _Resume,
        hasher: xxhash.xxh3_128 | None,
    ) -> None:
        self._store = store
        self._upload_id = upload_id
        # What the session is named by (its key, its hold and reservation), for good; `_digest`
        # becomes the committed blob's once a digest-late upload commits.
        self._session: tuple[str, UploadDigest] = (upload_id, digest)
        self._digest = digest
        self._upload = resume.upload
        self._parts = list(resume.parts)
        self._stored = resume.stored
        self._staged = resume.staged
        # The digest the staged object was found to match, once it has been.
        self._verified_as: Digest | None = None
        self._buffer = bytearray()
        # Has consumed exactly the bytes of `_parts`; None if some were stored by another process.
        self._hasher = hasher
        self._open = store is not None
        self._complete = store is None

    @classmethod
    def already_stored(cls, digest: Digest) -> BlobUpload:
        return cls(None, "", digest, _Resume(), None)

    @property
    def digest(self) -> UploadDigest:
        return self._digest

    @property
    def committed_size(self) -> int:
        if self._complete or self._staged is not None:
            return self._digest.size
        return self._stored + len(self._buffer)

    @property
    def complete(self) -> bool:
        return self._complete

    def _live_store(self, action: str) -> ContentAddressedStore:
        if self._complete:
            raise FailedPrecondition(f"cannot {action} blob {self._digest}: it is already stored")
        if not self._open or self._store is None:
            raise FailedPrecondition(
                f"cannot {action} upload {self._upload_id!r} of blob {self._digest}: the writer has ended"
            )
        return self._store

    def _lost(self) -> Busy:
        """The session was completed or discarded by another writer (another process) meanwhile."""
        self._end(keep_hash=False)
        return Busy(
            f"upload {self._upload_id!r} of blob {self._digest} was changed by another request; "
            "retry after QueryWriteStatus"
        )

    def _store_part(self, store: ContentAddressedStore, size: int) -> None:
        objects = store.objects
        number = len(self._parts) + 1
        if number > objects.max_part_count:
            raise QuotaExceeded(
                f"upload {self._upload_id!r} of blob {self._digest} was interrupted too often to resume; "
                "use another upload id"
            )
        if self._upload is None:
            self._upload = objects.create_upload(session_key(*self._session))
        # A view, not a copy, of the buffer's head (released before the buffer is trimmed). Not
        # durable yet: `close` syncs the parts when it acknowledges a partial upload, and `commit`
        # needs only the assembled object durable (see ObjectStore.upload_part).
        with memoryview(self._buffer) as whole, whole[:size] as data:
            try:
                part = objects.upload_part(self._upload, number, data, durable=False)
            except NoSuchUpload:
                raise self._lost() from None
            except StorageFull as exc:
                raise QuotaExceeded(
                    f"no space left to store upload {self._upload_id!r} of blob {self._digest}; "
                    "free space and resume from the committed size"
                ) from exc
            if self._hasher is not None:
                self._hasher.update(data)
        self._parts.append(part)
        self._stored += size
        del self._buffer[:size]
        session = self._session
        with store._lock:
            store._add_upload_locked(self._upload.key, size)
            store._reserve_locked(session, store._reserved.get(session, 0) - size)

    def append(self, data: bytes) -> None:
        store = self._live_store("append to")
        if not data:
            return
        before = self.committed_size
        end = before + len(data)
        if end > self._digest.size:
            self.abort()
            raise UploadDigestMismatch(
                f"upload of {self._digest} sent {end} bytes, more than its declared size "
                f"{self._digest.size}; the partial upload was discarded"
            )
        self._buffer += data
        part_size = store.part_size_for(self._digest)
        try:
            while len(self._buffer) >= part_size:
                self._store_part(store, part_size)
        except BaseException:
            # Nothing of `data` counts unless a part holding it is stored.
            del self._buffer[max(0, before - self._stored) :]
            raise

    def _target(self, stated: Digest | None) -> Digest:
        """The blob this upload commits: the digest it was opened with, or the one stated now."""
        opened = self._digest
        if isinstance(opened, PendingDigest):
            if stated is None:
                raise InvalidArgument(
                    f"upload {self._upload_id!r} was started without a digest; its commit must state it"
                )
            if stated.size != opened.size:
                raise InvalidArgument(
                    f"upload {self._upload_id!r} was started for {opened.size} bytes; the digest stated "
                    f"at its commit is of {stated.size} bytes"
                )
            return stated
        if stated is not None and stated != opened:
            raise InvalidArgument(f"upload of {opened} cannot be committed as {stated}")
        return opened

    def commit(self, digest: Digest | None = None) -> None:
        if self._complete:
            return
        store = self._live_store("commit")
        digest = self._target(digest)
        if self.committed_size != digest.size:
            raise InvalidArgument(
                f"upload of {digest} is incomplete: {self.committed_size} of {digest.size} bytes"
            )
        blob = blob_key(digest)
        if self._staged is None and self._upload is None:
            # Every byte is in the buffer: hash it, then one atomic put under the content address.
            data = bytes(self._buffer)
            actual = hash_bytes(data)
            if actual != digest.hash:
                self.abort()
                raise self._mismatch(actual, digest)
            store._publish(digest, lambda: _put(store.objects, blob, data), self._session)
            return self._finish(digest)
        if self._staged is None:
            assert self._upload is not None
            if self._buffer:
                self._store_part(store, len(self._buffer))
            try:
                # Our own part list: it fails if another writer replaced a part we hashed.
                self._staged = store.objects.complete_upload(self._upload, self._parts)
            except (InvalidPart, NoSuchUpload):
                raise self._lost() from None
            self._upload = None
        staged = self._staged
        # A digest-late upload is checked against the digest stated now, and may be verified
        # against no other: a second commit with another digest re-hashes (see `_verified_as`).
        if self._verified_as != digest:
            if self._hasher is not None and self._stored == digest.size:
                actual = self._hasher.hexdigest()
            else:
                try:
                    actual, _ = store._hash_object(staged.key)
                except NoSuchObject:
                    raise self._lost() from None
            if actual != digest.hash:
                store.objects.delete(staged.key)
                with store._lock:
                    store._add_upload_locked(staged.key, -staged.size)
                self._end(keep_hash=False)
                raise self._mismatch(actual, digest)
            self._verified_as = digest
        try:
            store._publish(digest, lambda: _move(store.objects, staged, blob), self._session)
        except (NoSuchObject, PreconditionFailed):
            if not store.contains(digest):
                raise self._lost() from None
        # Left if the blob was published by another upload first (for a digest-late upload: it
        # was a duplicate of a stored blob): no longer this upload's bytes.
        if store.objects.delete(staged.key):
            with store._lock:
                store._add_upload_locked(staged.key, -staged.size)
        return self._finish(digest)

    def _mismatch(self, actual: str, digest: Digest) -> UploadDigestMismatch:
        return UploadDigestMismatch(
            f"uploaded bytes hash to {actual} but the digest says {digest.hash}; nothing was stored"
        )

    def _finish(self, digest: Digest) -> None:
        self._digest = digest
        self._complete = True
        self._end(keep_hash=False)

    def close(self) -> None:
        if not self._open:
            return
        store = self._store
        assert store is not None
        try:
            if self._buffer and len(self._buffer) >= store.objects.min_part_size and self._staged is None:
                # What the backend accepts as a part is kept; the rest is received again on resume.
                with contextlib.suppress(OSError, QuotaExceeded, Busy, NoSuchUpload):
                    self._store_part(store, len(self._buffer))
            if self._upload is not None and self._staged is None:
                # The caller acknowledges committed_size next: those bytes must survive a crash.
                with contextlib.suppress(NoSuchUpload):
                    store.objects.sync_parts(self._upload)
        finally:
            self._buffer.clear()
            self._end(keep_hash=True)

    def abort(self) -> None:
        if not self._open:
            return
        store = self._store
        assert store is not None
        try:
            store._discard(_Resume(upload=self._upload, staged=self._staged))
        finally:
            self._end(keep_hash=False)

    def _end(self, *, keep_hash: bool) -> None:
        if not self._open or self._store is None:
            return
        self._open = False
        self._buffer.clear()
        hashed = None
        if keep_hash and self._hasher is not None and self._parts:
            hashed = _Hashed(tuple(self._parts), self._hasher)
        self._hasher = None
        self._store._release(self._session, hashed)
