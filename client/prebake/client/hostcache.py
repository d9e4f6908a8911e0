"""A host-local, content-addressed blob cache that fetches on this host use first.

A host operator fills it ahead of time (`prebake prewarm --host-cache`, or
`HostCache.put_from_server`); `Client.fetch` / `Client.ensure` with `host_cache=` then
place every file the cache holds from local disk and download only the rest, so the next
deploy on the host moves no bytes over the network.

Layout under `root`::

    blobs/<hash[:2]>/<hash>-<size>   one verified blob per file, read-only (0o444)
    tmp/<hash>-<size>.partial        a download in progress (resumed by the next put)
    tmp/<hash>-<size>.lock           held while that download runs

A blob is identified like on the server, by (xxh3-128, size). It enters the cache only
complete and verified: it is downloaded into `tmp/` (inside `root`, so on the same file
system), its size and xxh3-128 checked, fsynced, made read-only and renamed into place
with `os.replace`, which is atomic. A reader therefore sees a blob whole or not at all.

Concurrency: any number of threads and processes may use one cache. Puts of one digest
serialise on an advisory lock (`fcntl.flock`) on its lock file; the second finds the
blob present and does nothing. Without `fcntl` (Windows) each put downloads into a file
of its own, and the last rename wins with identical bytes. Readers take no lock.

Placing a blob into a fetch's destination (`place`) hard-links it when it can: no bytes
are copied and no space is used, which is the point of a host cache. A hard link *is*
the cache file (one inode), so:

- a linked destination file is read-only (0o444) like the cache file; it must not be
  made writable and modified, or the cache entry changes with it;
- a file the manifest marks executable is COPIED instead: making the link executable
  would chmod the cache file, and other fetches expect the manifest's modes;
- when linking fails (another file system, a link-count limit, a file system without
  hard links, protected_hardlinks for another user's cache) the blob is copied.

Create the cache with `hardlink=False` to always copy (destination files then get the
usual writable modes, at the cost of the space and of one copy per fetch). Reflinks
(copy-on-write clones) would give both, but the standard library has no portable way
to make one. Every placement is verified against the digest (linked files are hashed,
copies are hashed while copying; xxh3 runs at tens of GiB/s): a cache entry that was
modified or corrupted on disk is evicted and the caller downloads the file instead.
"""

from __future__ import annotations

import contextlib
import os
import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from prebake.client.durable import fsync_dir
from prebake.client.transfer import DownloadResult, Progress
from prebake.core import digests
from prebake.v1 import blobs_pb2

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: puts do not serialise (see module doc)
    fcntl = None  # type: ignore[assignment]

ENV = "PREBAKE_HOST_CACHE"
READ_ONLY = 0o444
_CHUNK = 1 << 20


class BlobSource(Protocol):
    """What `put_from_server` needs of a client: `Client.download_blob`."""

    def download_blob(
        self, digest: blobs_pb2.Digest, path: Path | str, progress: Progress | None = None
    ) -> DownloadResult: ...


@dataclass(frozen=True)
class PutResult:
    """What `HostCache.put_from_server` did for one blob."""

    path: Path
    bytes_downloaded: int
    # Bytes of an interrupted earlier put that were kept (not downloaded again).
    bytes_resumed: int
    # The cache held the blob already; nothing was downloaded.
    already_present: bool


@dataclass(frozen=True)
class CacheStats:
    root: Path
    blobs: int
    bytes: int
    # Downloads in progress or interrupted (resumed by the next put of their blob).
    partial_files: int
    partial_bytes: int


def default_root() -> Path:
    """`$PREBAKE_HOST_CACHE`, else `$XDG_CACHE_HOME/prebake/blobs`, else `~/.cache/prebake/blobs`."""
    env = os.environ.get(ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "prebake" / "blobs"


class HostCache:
    """A content-addressed store of verified blobs on this host (see the module doc).

    Nothing is created on disk until the first put, so a cache that was never filled
    costs nothing to consult.
    """

    def __init__(self, root: Path | str | None = None, *, hardlink: bool = True) -> None:
        self.root = Path(os.path.abspath(Path(root).expanduser() if root else default_root()))
        self.hardlink = hardlink
        self._blobs = self.root / "blobs"
        self._tmp = self.root / "tmp"

    def __repr__(self) -> str:
        return f"HostCache({str(self.root)!r})"

    def blob_path(self, digest: blobs_pb2.Digest) -> Path:
        """Where the blob lives when cached. Raises ValueError for a malformed digest.

        The hash is checked because it comes from a manifest, i.e. from the network,
        and becomes part of a path.
        """
        if not digests.HASH_RE.match(digest.hash) or digest.size_bytes < 0:
            raise ValueError(f"not a blob digest: hash {digest.hash!r}, size {digest.size_bytes}")
        return self._blobs / digest.hash[:2] / f"{digest.hash}-{digest.size_bytes}"

    def path_for(self, digest: blobs_pb2.Digest) -> Path | None:
        """The cached file of `digest` if present as a regular file of the right size, else None.

        Checks the size only (cheap); `place` verifies the content.
        """
        path = self.blob_path(digest)
        try:
            st = path.stat()
        except OSError:
            return None
        return path if stat.S_ISREG(st.st_mode) and st.st_size == digest.size_bytes else None

    def __contains__(self, digest: blobs_pb2.Digest) -> bool:
        return self.path_for(digest) is not None

    def put_from_server(
        self, source: BlobSource, digest: blobs_pb2.Digest, progress: Progress | None = None
    ) -> PutResult:
        """Make the cache hold `digest`, downloading it with `source.download_blob` if needed.

        The download goes to a partial file under `root/tmp` (resumed if an earlier put
        was interrupted), is verified (size and xxh3-128) and fsynced by
        `download_blob`, then made read-only and renamed into place. Safe to call
        concurrently for one digest from threads or processes (one downloads, the others
        wait and find it present). Raises what `download_blob` raises (DownloadDigestMismatch,
        NotFound, Unavailable, ...), leaving the cache without the blob.
        """
        final = self.blob_path(digest)
        if self.path_for(digest) is not None:
            return PutResult(final, 0, 0, already_present=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        if self._tmp.is_symlink():
            # Lock and partial files are created in it: never somewhere a link points.
            raise FileExistsError(f"{self._tmp} is a symbolic link, not the cache's own directory; remove it")
        final.parent.mkdir(parents=True, exist_ok=True)
        name = f"{digest.hash}-{digest.size_bytes}"
        with _locked(self._tmp / f"{name}.lock") as exclusive:
            if self.path_for(digest) is not None:
                return PutResult(final, 0, 0, already_present=True)  # another put finished it
            # Under the lock the partial file is ours to resume; without locking it is
            # private to this call, so concurrent puts never append to one file.
            partial = self._tmp / (f"{name}.partial" if exclusive else f"{name}.{uuid.uuid4().hex}.partial")
            if os.path.lexists(partial) and not _is_regular_file(partial):
                partial.unlink()  # a link (or anything else) planted there is not followed
            if partial.exists():
                # A crash between chmod and rename below leaves a read-only partial.
                partial.chmod(0o644)
            try:
                result = source.download_blob(digest, partial, progress)
                partial.chmod(READ_ONLY)
                os.replace(partial, final)
            finally:
                if not exclusive:
                    partial.unlink(missing_ok=True)
            fsync_dir(final.parent)
        return PutResult(final, result.bytes_downloaded, result.bytes_resumed, already_present=False)

    def place(self, digest: blobs_pb2.Digest, dest: Path | str, *, executable: bool = False) -> bool:
        """Put the cached blob at `dest` (replacing a file there); False if not cached.

        Hard-links when the cache allows it and the file is not `executable`, else
        copies (see the module doc for why). The content is verified either way; a
        cached file that does not match its digest is evicted, `dest` is removed and
        False is returned, so the caller downloads it instead. A copy is fsynced; a
        link needs no data sync (the cache file was fsynced when it was added).
        """
        source = self.path_for(digest)
        if source is None:
            return False
        dest = Path(dest)
        dest.unlink(missing_ok=True)
        want = (digest.hash, digest.size_bytes)
        try:
            reader = open(source, "rb")  # noqa: SIM115 (closed below, on every path)
        except OSError:
            return False  # evicted meanwhile, or not readable by us: download instead
        with reader:
            if self.hardlink and not executable:
                if _hash_stream(reader) != want:
                    self._discard(digest)
                    return False
                try:
                    os.link(source, dest)
                    return True
                except OSError:
                    reader.seek(0)  # another file system, link limit, no hard links: copy
            if _copy_verified(reader, dest) != want:
                dest.unlink(missing_ok=True)
                self._discard(digest)
                return False
        return True

    def _discard(self, digest: blobs_pb2.Digest) -> None:
        # A corrupt entry is removed so that the next put replaces it; failing to remove
        # it (someone else's cache) must not fail the caller, who downloads instead.
        with contextlib.suppress(OSError):
            self.evict(digest)

    def evict(self, digest: blobs_pb2.Digest) -> bool:
        """Remove a blob from the cache; True if it was there.

        Files already placed by hard link keep their content (they are other names of
        the same inode).
        """
        try:
            self.blob_path(digest).unlink()
        except FileNotFoundError:
            return False
        return True

    def stats(self) -> CacheStats:
        """Blobs and bytes held, and partial downloads, by walking the directory tree."""
        blobs = size = partial_files = partial_bytes = 0
        for path in _files(self._blobs):
            blobs += 1
            size += path.stat().st_size
        for path in _files(self._tmp):
            if path.name.endswith(".partial"):
                partial_files += 1
                partial_bytes += path.stat().st_size
        return CacheStats(self.root, blobs, size, partial_files, partial_bytes)


def _is_regular_file(path: Path) -> bool:
    """Whether `path` itself (not a link's target) is a regular file."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _files(root: Path) -> Iterator[Path]:
    for directory, _dirs, names in os.walk(root):
        for name in names:
            path = Path(directory) / name
            with contextlib.suppress(OSError):
                if path.is_file() and not path.is_symlink():
                    yield path


def _hash_stream(reader: BinaryIO) -> tuple[str, int]:
    hasher = digests.new_hasher()
    size = 0
    while chunk := reader.read(_CHUNK):
        hasher.update(chunk)
        size += len(chunk)
    return hasher.hexdigest(), size


def _copy_verified(reader: BinaryIO, dest: Path) -> tuple[str, int]:
    """Copy `reader` to a new file `dest`, fsynced, hashing what was read; returns (xxh3, size)."""
    hasher = digests.new_hasher()
    size = 0
    with open(dest, "xb") as writer:
        while chunk := reader.read(_CHUNK):
            hasher.update(chunk)
            writer.write(chunk)
            size += len(chunk)
        writer.flush()
        os.fsync(writer.fileno())
    return hasher.hexdigest(), size


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[bool]:
    """Hold an exclusive advisory lock on `path` (created if needed); yields False if unsupported.

    The lock file is removed on release while still held, so a waiter that then gets
    the lock finds that `path` is gone or another inode and retries: at any time, at
    most one holder locks the file `path` names.
    """
    if fcntl is None:  # pragma: no cover
        yield False
        return
    while True:
        try:
            # Never through a link planted at the name (O_NOFOLLOW), nor creating its target.
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError:
            if not os.path.islink(path):
                raise
            # Planted: removed (lock files are removed on release anyway), never followed.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held = os.fstat(fd)
            current = os.lstat(path)
            if (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino):
                break
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)
