"""`BlobStore` on a local (POSIX) filesystem.

Layout under `root`::

    blobs/<hash[:2]>/<hash>-<size>         published blobs, sharded by hash prefix
    uploads/<upload_id>--<hash>-<size>.part  partial uploads, one per (upload id, digest)
    quarantine/<hash>-<size>.<time_ns>      blobs whose bytes no longer matched their digest

A blob is published by `os.replace` of its complete, hash-checked, fsynced partial file,
so `blobs/` only ever holds complete files; `uploads/` must therefore be on the same
filesystem (checked at start-up). An upload is owned by whoever holds
`flock(LOCK_EX)` on its partial file, which excludes other threads and other processes
alike. The root must be on a local filesystem where `flock` and atomic rename work
(not NFS).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import io
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NoReturn

import xxhash

from prebake.core.digests import new_hasher, seed_hasher
from prebake.server.blobs.base import StoreStats, UploadStatus, validate_upload_id
from prebake.server.errors import (
    Busy,
    DataLoss,
    DigestMismatch,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    QuotaExceeded,
)
from prebake.server.records import Digest

_BLOB_NAME_RE = re.compile(r"([0-9a-f]{32})-(0|[1-9][0-9]*)")
_HASH_BUFFER = 4 << 20
# Retrying only happens when the partial file was renamed or removed between our open()
# and our flock(); more than a couple of rounds means something is badly wrong.
_LOCK_ATTEMPTS = 20


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


class _Quarantined(enum.Enum):
    MOVED = "moved"
    GONE = "gone"  # already quarantined or deleted by someone else
    REPLACED = "replaced"  # a fresh upload was published over it meanwhile


class LocalBlobStore:
    """`BlobStore` over a directory tree; see the module docstring for the layout.

    Safe for concurrent use by threads and by processes sharing `root`. `stats()` is
    served from in-memory counters, initialised by one scan of `blobs/` here and kept up
    to date by this instance's own writes, deletes and quarantines; changes made by
    other processes are not seen until `rescan()`. The `max_store_bytes` quota is checked
    against those counters, so it is exact for a single server process per root and
    approximate otherwise. Partial uploads and quarantined blobs do not count.
    """

    def __init__(self, root: Path, max_blob_bytes: int = 64 << 30, max_store_bytes: int = 0) -> None:
        if max_blob_bytes < 0 or max_store_bytes < 0:
            raise ValueError(
                f"max_blob_bytes ({max_blob_bytes}) and max_store_bytes ({max_store_bytes}) must be >= 0"
            )
        self.root = Path(root)
        self.max_blob_bytes = max_blob_bytes
        self.max_store_bytes = max_store_bytes
        self._blobs = self.root / "blobs"
        self._uploads = self.root / "uploads"
        self._quarantine = self.root / "quarantine"
        for d in (self._blobs, self._uploads, self._quarantine):
            d.mkdir(parents=True, exist_ok=True)
        if os.stat(self._blobs).st_dev != os.stat(self._uploads).st_dev:
            raise ValueError(
                f"{self._uploads} and {self._blobs} are on different filesystems; "
                "publishing a blob needs an atomic rename between them"
            )
        # Guards the counters and makes "does it exist? then change it" sequences atomic
        # within this process; other processes are covered by the filesystem's atomic
        # rename and the per-upload flock.
        self._lock = threading.Lock()
        self._count = 0
        self._bytes = 0
        self.rescan()

    # -- naming ----------------------------------------------------------------------

    def _blob_path(self, digest: Digest) -> Path:
        return self._blobs / digest.hash[:2] / f"{digest.hash}-{digest.size}"

    def _partial_path(self, upload_id: str, digest: Digest) -> Path:
        return self._uploads / f"{upload_id}--{digest.hash}-{digest.size}.part"

    # -- queries ---------------------------------------------------------------------

    def contains(self, digest: Digest) -> bool:
        return self._blob_path(digest).is_file()

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

    def rescan(self) -> StoreStats:
        """Recount blobs and bytes from disk (one listing of `blobs/`) and return the result."""
        count = 0
        total = 0
        for digest in self.iter_digests():
            count += 1
            # The name's size, not the file's: a file of the wrong length is corrupt and
            # is later quarantined under its name's size, which keeps the counters exact.
            total += digest.size
        with self._lock:
            self._count, self._bytes = count, total
        return StoreStats(count, total)

    def iter_digests(self) -> Iterator[Digest]:
        """Every well-named regular file in its right shard, found by listing `blobs/`."""
        with os.scandir(self._blobs) as shards:
            shard_names = [e.name for e in shards if e.is_dir(follow_symlinks=False)]
        for shard in shard_names:
            try:
                with os.scandir(self._blobs / shard) as entries:
                    found = [(e.name, e) for e in entries]
            except FileNotFoundError:
                continue
            for name, entry in found:
                m = _BLOB_NAME_RE.fullmatch(name)
                # A misplaced or foreign file is unreachable through _blob_path, so it
                # is not a blob of this store.
                if m is None or m.group(1)[:2] != shard:
                    continue
                if not entry.is_file(follow_symlinks=False):
                    continue
                yield Digest(m.group(1), int(m.group(2)))

    # -- verification ----------------------------------------------------------------

    def verify(self, digest: Digest) -> None:
        path = self._blob_path(digest)
        # Loops only if a fresh upload replaced the file while we were hashing it.
        for _ in range(3):
            try:
                f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by the with below
            except FileNotFoundError:
                raise NotFound(f"blob {digest} is not stored") from None
            with f:
                st = os.fstat(f.fileno())
                hasher = new_hasher()
                size = 0
                buf = bytearray(_HASH_BUFFER)
                view = memoryview(buf)
                while n := f.readinto(buf):
                    hasher.update(view[:n])
                    size += n
            actual = hasher.hexdigest()
            if size == digest.size and actual == digest.hash:
                return
            if self._quarantine_blob(digest, st) is not _Quarantined.REPLACED:
                raise DataLoss(
                    f"blob {digest} is corrupt on disk (read {actual}/{size}); quarantined — upload it again"
                )
        raise DataLoss(f"blob {digest} kept changing on disk while being checked; try again")

    def _quarantine_blob(self, digest: Digest, seen: os.stat_result) -> _Quarantined:
        """Move the blob aside, but only if it is still the file that was found bad."""
        path = self._blob_path(digest)
        dest = self._quarantine / f"{digest.hash}-{digest.size}.{time.time_ns()}"
        with self._lock:
            try:
                now = os.lstat(path)
            except FileNotFoundError:
                return _Quarantined.GONE
            if not _same_file(now, seen):
                return _Quarantined.REPLACED
            try:
                os.replace(path, dest)
            except FileNotFoundError:
                return _Quarantined.GONE  # another process got there first
            self._count = max(0, self._count - 1)
            self._bytes = max(0, self._bytes - digest.size)
        _fsync_dir(path.parent)
        return _Quarantined.MOVED

    # -- reading ---------------------------------------------------------------------

    def read(
        self, digest: Digest, offset: int = 0, limit: int = 0, chunk_size: int = 1 << 20
    ) -> _ChunkReader:
        if offset < 0 or limit < 0:
            raise InvalidArgument(f"read offset ({offset}) and limit ({limit}) must not be negative")
        if chunk_size < 1:
            raise InvalidArgument(f"read chunk size {chunk_size} must be at least 1")
        try:
            f = open(self._blob_path(digest), "rb", buffering=0)  # noqa: SIM115 - owned by the reader
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is not stored") from None
        try:
            st = os.fstat(f.fileno())
            if st.st_size != digest.size:
                if self._quarantine_blob(digest, st) is _Quarantined.REPLACED:
                    f.close()
                    return self.read(digest, offset, limit, chunk_size)  # a fresh upload won the race
                raise DataLoss(
                    f"blob {digest} is corrupt on disk ({st.st_size} bytes instead of {digest.size}); "
                    "quarantined — upload it again"
                )
            if offset > digest.size:
                raise OutOfRange(
                    f"read offset {offset} is past the end of blob {digest} ({digest.size} bytes)"
                )
        except BaseException:
            f.close()
            raise
        end = digest.size if limit == 0 else min(digest.size, offset + limit)

        def truncated(at: int) -> NoReturn:
            self._quarantine_blob(digest, st)
            raise DataLoss(
                f"blob {digest} is corrupt on disk (it ends after {at} bytes); quarantined — upload it again"
            )

        return _ChunkReader(f, offset, end, chunk_size, truncated)

    # -- writing ---------------------------------------------------------------------

    def open_write(self, upload_id: str, digest: Digest) -> LocalBlobWriter:
        validate_upload_id(upload_id)
        if self.contains(digest):
            return LocalBlobWriter.already_stored(digest)
        if digest.size > self.max_blob_bytes:
            raise QuotaExceeded(
                f"blob {digest} is {digest.size} bytes; this store accepts blobs of at most "
                f"{self.max_blob_bytes} bytes"
            )
        with self._lock:
            self._check_quota_locked(digest)
        partial = self._partial_path(upload_id, digest)
        f = self._lock_partial(partial, upload_id, digest)
        try:
            if self.contains(digest):
                # Published by another upload while this one was idle: nothing to resume.
                os.unlink(partial)
                f.close()
                return LocalBlobWriter.already_stored(digest)
            committed = os.fstat(f.fileno()).st_size
            if committed > digest.size:
                # Cannot be a prefix of this blob; keeping it would only fail the commit.
                os.ftruncate(f.fileno(), 0)
                committed = 0
            hasher = seed_hasher(partial, committed)
        except BaseException:
            f.close()
            raise
        return LocalBlobWriter(
            store=self,
            upload_id=upload_id,
            digest=digest,
            partial=partial,
            file=f,
            committed_size=committed,
            hasher=hasher,
        )

    def _check_quota_locked(self, digest: Digest) -> None:
        if self.max_store_bytes and self._bytes + digest.size > self.max_store_bytes:
            raise QuotaExceeded(
                f"storing blob {digest} ({digest.size} bytes) would exceed the store's quota: "
                f"{self._bytes} of {self.max_store_bytes} bytes are used; free space and retry"
            )

    def _lock_partial(self, partial: Path, upload_id: str, digest: Digest) -> io.FileIO:
        """Open (creating) the partial file and take its exclusive lock, or raise Busy."""
        for _ in range(_LOCK_ATTEMPTS):
            fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            # A FileIO closes the descriptor (and so drops the lock) even if the writer
            # is garbage-collected without close().
            f = io.FileIO(fd, "r+", closefd=True)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                raise Busy(
                    f"upload {upload_id!r} of blob {digest} is being written by another request right now; "
                    "retry later after QueryWriteStatus"
                ) from None
            except BaseException:
                f.close()
                raise
            # The previous holder may have published (renamed) or discarded (unlinked)
            # the file between our open() and our flock(); then we hold the lock of an
            # orphan and must start over with whatever the path names now.
            try:
                current = os.lstat(partial)
            except FileNotFoundError:
                f.close()
                continue
            if _same_file(current, os.fstat(fd)):
                return f
            f.close()
        raise Busy(f"upload {upload_id!r} of blob {digest} is contended; retry later after QueryWriteStatus")

    def _publish(self, partial: Path, digest: Digest) -> None:
        """Rename a complete, checked, fsynced partial file into place."""
        dest = self._blob_path(digest)
        try:
            dest.parent.mkdir()
        except FileExistsError:
            pass
        else:
            _fsync_dir(self._blobs)  # so the new shard itself survives a crash
        with self._lock:
            existed = dest.is_file()
            if not existed:
                self._check_quota_locked(digest)
            # Replacing an existing copy is harmless (same verified content) and heals
            # one that rotted since; readers holding the old file keep reading it.
            os.replace(partial, dest)
            if not existed:
                self._count += 1
                self._bytes += digest.size

    def upload_status(self, upload_id: str, digest: Digest) -> UploadStatus:
        validate_upload_id(upload_id)
        if self.contains(digest):
            return UploadStatus(digest.size, True)
        try:
            kept = os.stat(self._partial_path(upload_id, digest)).st_size
        except FileNotFoundError:
            return UploadStatus(0, False)
        # open_write discards a partial longer than the blob, so none of it counts.
        return UploadStatus(kept if kept <= digest.size else 0, False)

    # -- removal ---------------------------------------------------------------------

    def delete(self, digest: Digest) -> bool:
        path = self._blob_path(digest)
        with self._lock:
            try:
                os.unlink(path)
            except FileNotFoundError:
                return False
            self._count = max(0, self._count - 1)
            self._bytes = max(0, self._bytes - digest.size)
        # No directory fsync: a delete undone by a crash leaves an unreferenced blob,
        # which costs space, not correctness.
        return True

    def sweep_uploads(self, older_than_seconds: float) -> int:
        """Discard unlocked files in `uploads/` not modified for `older_than_seconds`.

        Files there that are not partial uploads (left by hand or by older versions) go
        too: nothing else belongs in that directory.
        """
        cutoff = time.time() - older_than_seconds
        with os.scandir(self._uploads) as entries:
            names = [e.name for e in entries if e.is_file(follow_symlinks=False)]
        removed = 0
        for name in names:
            path = self._uploads / name
            try:
                if os.lstat(path).st_mtime > cutoff:
                    continue
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a writer holds it: not stale
                held = os.fstat(fd)
                # Re-checked under the lock: a writer may have appended (and closed), or
                # the name may now be a different file, since we looked.
                try:
                    current = os.lstat(path)
                except FileNotFoundError:
                    continue
                if not _same_file(current, held) or held.st_mtime > cutoff:
                    continue
                os.unlink(path)
                removed += 1
            finally:
                os.close(fd)
        return removed


class _ChunkReader:
    """Iterator over [pos, end) of an open blob file; closes the file when done."""

    def __init__(
        self, f: io.FileIO, pos: int, end: int, chunk_size: int, truncated: Callable[[int], NoReturn]
    ) -> None:
        self._file: io.FileIO | None = f
        self._pos = pos
        self._end = end
        self._chunk_size = chunk_size
        self._truncated = truncated

    def __iter__(self) -> _ChunkReader:
        return self

    def __next__(self) -> bytes:
        f = self._file
        if f is None:
            raise StopIteration
        if self._pos >= self._end:
            self.close()
            raise StopIteration
        try:
            data = os.pread(f.fileno(), min(self._chunk_size, self._end - self._pos), self._pos)
        except BaseException:
            self.close()
            raise
        if not data:
            self.close()
            self._truncated(self._pos)
        self._pos += len(data)
        return data

    def close(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            f.close()

    def __enter__(self) -> _ChunkReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalBlobWriter:
    """`BlobWriter` over a locked partial file; created by `LocalBlobStore.open_write`."""

    def __init__(
        self,
        *,
        store: LocalBlobStore | None,
        upload_id: str,
        digest: Digest,
        partial: Path | None,
        file: io.FileIO | None,
        committed_size: int,
        hasher: xxhash.xxh3_128 | None,
    ) -> None:
        self._store = store
        self._upload_id = upload_id
        self._digest = digest
        self._partial = partial
        self._file = file
        self._committed = committed_size
        self._hasher = hasher
        self._complete = file is None

    @classmethod
    def already_stored(cls, digest: Digest) -> LocalBlobWriter:
        return cls(
            store=None,
            upload_id="",
            digest=digest,
            partial=None,
            file=None,
            committed_size=digest.size,
            hasher=None,
        )

    @property
    def digest(self) -> Digest:
        return self._digest

    @property
    def committed_size(self) -> int:
        return self._committed

    @property
    def complete(self) -> bool:
        return self._complete

    def _open_file(self, action: str) -> io.FileIO:
        if self._complete:
            raise FailedPrecondition(f"cannot {action} blob {self._digest}: it is already stored")
        if self._file is None:
            raise FailedPrecondition(
                f"cannot {action} upload {self._upload_id!r} of blob {self._digest}: the writer has ended"
            )
        return self._file

    def append(self, data: bytes) -> None:
        f = self._open_file("append to")
        if not data:
            return
        end = self._committed + len(data)
        if end > self._digest.size:
            self.abort()
            raise DigestMismatch(
                f"upload of {self._digest} sent {end} bytes, more than its declared size "
                f"{self._digest.size}; the partial upload was discarded"
            )
        fd = f.fileno()
        view = memoryview(data)
        pos = self._committed
        try:
            while view:
                n = os.pwrite(fd, view, pos)
                view = view[n:]
                pos += n
        except OSError as exc:
            # Drop the bytes that did land so the file stays equal to what was hashed.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, self._committed)
            if _is_disk_full(exc):
                raise QuotaExceeded(
                    f"no space left to store upload {self._upload_id!r} of blob {self._digest}; "
                    "free space and resume from the committed size"
                ) from exc
            raise
        assert self._hasher is not None
        self._hasher.update(data)
        self._committed = end

    def commit(self) -> None:
        if self._complete:
            return
        f = self._open_file("commit")
        if self._committed != self._digest.size:
            raise InvalidArgument(
                f"upload of {self._digest} is incomplete: {self._committed} of {self._digest.size} bytes"
            )
        assert self._hasher is not None and self._store is not None and self._partial is not None
        actual = self._hasher.hexdigest()
        if actual != self._digest.hash:
            self.abort()
            raise DigestMismatch(
                f"uploaded bytes hash to {actual} but the digest says {self._digest.hash}; nothing was stored"
            )
        os.fsync(f.fileno())
        self._store._publish(self._partial, self._digest)
        self._complete = True
        self._release()
        _fsync_dir(self._store._blob_path(self._digest).parent)

    def close(self) -> None:
        f = self._file
        if f is None:
            return
        try:
            os.fsync(f.fileno())
        finally:
            self._release()

    def abort(self) -> None:
        if self._file is None:
            return
        assert self._partial is not None
        try:
            # Unlinked while we still hold the lock, so nobody can resume a file that is
            # on its way out (see LocalBlobStore._lock_partial).
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._partial)
        finally:
            self._release()

    def _release(self) -> None:
        f, self._file = self._file, None
        self._hasher = None
        if f is not None:
            f.close()
