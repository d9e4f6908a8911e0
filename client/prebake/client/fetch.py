"""Placing an artifact's files in a destination directory: verified, resumable, atomic.

Files are downloaded into a temporary directory beside `dest`, named after `dest` and the
artifact plus a random part, created atomically (`tempfile.mkdtemp`: mode 0o700, never
through an existing name). An interrupted fetch (crash, Ctrl-C, lost connection) resumes
where it stopped in the directory an earlier fetch left, which is taken only if it is a
real directory (not a symbolic link), owned by this user and writable by no one else:
a link or a directory planted where a temporary directory will be is never followed,
written into or removed. Only when every file is verified is the directory renamed into place,
with a `.prebake.json` marker naming the artifact; a later fetch of the same artifact to
the same place sees the marker and does nothing. `dest` is therefore either absent, the
previous content, or the complete new artifact: never a mixture.

With a host-local cache (`prebake.client.hostcache.HostCache`), each file the cache holds
is placed from it (hard-linked or copied, and verified) instead of being downloaded.

Concurrent fetches of one artifact to one `dest` on a host serialise on a lock on the
temporary directory (where the platform has `fcntl`); the second finds the work done.
Choosing that directory is serialised by a brief lock on `dest`'s parent, given up after
CLAIM_LOCK_SECONDS (someone else holding it only costs a second download, never safety).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prebake.client.durable import fsync_dir
from prebake.client.errors import DestinationExists, UnsafeManifest
from prebake.client.transfer import DownloadResult, Progress
from prebake.core.manifest_paths import UnsafePath, safe_join, validate_manifest_paths
from prebake.core.signing import TrustSet, verify_artifact
from prebake.v1 import registry_pb2

if TYPE_CHECKING:  # only its methods are called here; avoids a load-time import
    from prebake.client.hostcache import HostCache

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: fetches of one dest are not serialised
    fcntl = None  # type: ignore[assignment]

MARKER = ".prebake.json"
MARKER_FORMAT = 1
TEMP_PREFIX = ".prebake-tmp-"
# How long choosing a temporary directory waits for the lock on dest's parent.
CLAIM_LOCK_SECONDS = 5.0
# Of dest's name, this much goes into the temporary directory's (names have 255 bytes).
_NAME_CHARS = 96

# Downloads one file of a manifest (its digest, and its presigned `download_url` if any).
Downloader = Callable[[registry_pb2.ArtifactFile, Path, Progress | None], DownloadResult]


@dataclass(frozen=True)
class FetchResult:
    """What `fetch` placed, and how much of it came over the network."""

    artifact_id: str
    dest: Path
    files: int
    total_bytes: int
    bytes_downloaded: int
    # Bytes already on disk from an earlier interrupted attempt (not downloaded again).
    bytes_resumed: int
    # `dest` already held this artifact; nothing was downloaded or changed.
    already_present: bool
    seconds: float
    # Bytes placed from a host-local cache (`HostCache`) instead of being downloaded.
    bytes_from_cache: int = 0
    # Of `bytes_downloaded`, the bytes read straight from the object store (presigned URLs).
    bytes_direct: int = 0


def temp_dir_prefix(dest: Path, artifact_id: str) -> str:
    """The name every temporary directory of fetches of `artifact_id` to `dest` starts with."""
    return f"{TEMP_PREFIX}{dest.name[:_NAME_CHARS]}-{artifact_id[:16]}-"


def temp_dirs_for(dest: Path, artifact_id: str) -> list[Path]:
    """The temporary directories of earlier fetches of `artifact_id` to `dest` that a fetch
    may resume (see `is_own_dir`), by name."""
    prefix = temp_dir_prefix(dest, artifact_id)
    try:
        names = os.listdir(dest.parent)
    except OSError:
        return []
    return sorted(dest.parent / n for n in names if n.startswith(prefix) and is_own_dir(dest.parent / n))


def new_temp_dir(dest: Path, artifact_id: str) -> Path:
    """A fresh temporary directory for a fetch of `artifact_id` to `dest`: an unpredictable
    name beside `dest`, created atomically with mode 0o700 (never an existing entry)."""
    return Path(tempfile.mkdtemp(prefix=temp_dir_prefix(dest, artifact_id), dir=dest.parent))


def is_own_dir(path: Path) -> bool:
    """Whether `path` itself (not what a link points to) is a directory owned by this user
    that no one else may write to: one that no other user can have planted or filled."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    owner = getattr(os, "geteuid", None)
    owned = owner is None or st.st_uid == owner()
    return stat.S_ISDIR(st.st_mode) and owned and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def marker_for(artifact: registry_pb2.Artifact) -> dict[str, Any]:
    return {
        "format": MARKER_FORMAT,
        "artifact_id": artifact.artifact_id,
        "manifest_digest": artifact.manifest_digest,
        "key_digest": artifact.key.digest,
        "key_canonical": artifact.key.canonical,
        "total_size_bytes": artifact.total_size_bytes,
        "files": [
            {
                "path": f.path,
                "hash": f.digest.hash,
                "size_bytes": f.digest.size_bytes,
                "executable": f.executable,
            }
            for f in artifact.files
        ],
    }


def read_marker(directory: Path) -> dict[str, Any] | None:
    """The marker of a directory placed by `fetch`, or None if there is none (or it is unreadable)."""
    try:
        data = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def holds_artifact(directory: Path, marker: dict[str, Any]) -> bool:
    """Whether `directory` was placed by a fetch of this exact manifest and still looks whole.

    Checks the marker and every file's size, not the content: re-hashing a large
    artifact on every deploy would cost more than it protects against.
    """
    found = read_marker(directory)
    if found is None or found.get("artifact_id") != marker["artifact_id"]:
        return False
    if found.get("files") != marker["files"]:
        return False
    for entry in marker["files"]:
        try:
            if (directory / entry["path"]).stat().st_size != entry["size_bytes"]:
                return False
        except OSError:
            return False
    return True


def _is_empty_dir(path: Path) -> bool:
    # An empty directory (e.g. a mount point prepared by the deployer) is replaced freely.
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def check_manifest(artifact: registry_pb2.Artifact) -> None:
    """Raise UnsafeManifest unless every path can be written safely under a root."""
    paths = [f.path for f in artifact.files]
    try:
        validate_manifest_paths(paths)
    except UnsafePath as exc:
        raise UnsafeManifest(f"artifact {artifact.artifact_id} has an unsafe manifest: {exc}") from None
    if MARKER in paths:
        raise UnsafeManifest(f"artifact {artifact.artifact_id} contains {MARKER}, a name prebake reserves")


def fetch_artifact(
    artifact: registry_pb2.Artifact,
    dest: Path,
    download: Downloader,
    progress: Progress | None = None,
    overwrite: bool = False,
    *,
    host_cache: HostCache | None = None,
    trust: TrustSet | None = None,
) -> FetchResult:
    """Place `artifact`'s files (the manifest must include them) in `dest`. See module doc.

    With `trust`, the manifest must be signed by one of its keys (`verify_artifact`, from
    the files as received): otherwise `UntrustedArtifact` is raised before anything is
    downloaded or `dest` is touched. Each file is then verified against the signed digest.

    With `host_cache`, every file the cache holds is placed from it (verified; see
    `HostCache.place`) and only the others are downloaded.

    Raises DestinationExists when `dest` holds something else and `overwrite` is not
    set (checked before anything is downloaded), UnsafeManifest for a path that could
    escape `dest`, DownloadDigestMismatch when a file fails verification. Exceptions from
    `progress` propagate; the partial download is kept for the next attempt.
    """
    started = time.monotonic()
    dest = Path(os.path.abspath(dest))
    check_manifest(artifact)
    if trust is not None:
        verify_artifact(trust, artifact)
    marker = marker_for(artifact)

    def result(
        downloaded: int, resumed: int, present: bool, from_cache: int = 0, direct: int = 0
    ) -> FetchResult:
        return FetchResult(
            artifact_id=artifact.artifact_id,
            dest=dest,
            files=len(artifact.files),
            total_bytes=sum(f.digest.size_bytes for f in artifact.files),
            bytes_downloaded=downloaded,
            bytes_resumed=resumed,
            already_present=present,
            seconds=time.monotonic() - started,
            bytes_from_cache=from_cache,
            bytes_direct=direct,
        )

    if holds_artifact(dest, marker):
        return result(0, 0, present=True)
    _refuse_unless_free(dest, artifact.artifact_id, overwrite)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _claimed_temp_dir(dest, artifact.artifact_id) as tmp:
        if holds_artifact(dest, marker):
            # Another fetch placed it while we waited for the lock.
            shutil.rmtree(tmp, ignore_errors=True)
            return result(0, 0, present=True)
        downloaded, resumed, from_cache, direct = _download_all(artifact, tmp, download, progress, host_cache)
        _prune(tmp, {f.path for f in artifact.files})
        marker_path = tmp / MARKER
        marker_path.write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")
        _fsync_tree(tmp, [f.path for f in artifact.files] + [MARKER])
        present = _place(tmp, dest, marker, overwrite, artifact.artifact_id)
    return result(downloaded, resumed, present=present, from_cache=from_cache, direct=direct)


def _refuse_unless_free(dest: Path, artifact_id: str, overwrite: bool) -> None:
    if overwrite or not os.path.lexists(dest) or _is_empty_dir(dest):
        return
    found = read_marker(dest) if dest.is_dir() else None
    what = (
        f"artifact {found.get('artifact_id')}"
        if found and found.get("artifact_id") != artifact_id
        else "another version or a modified copy of this artifact"
        if found
        else "other files"
    )
    raise DestinationExists(
        f"{dest} already exists and holds {what}, not artifact {artifact_id}; "
        "set `overwrite` to replace it, or choose another destination"
    )


# Files of one artifact downloaded at once: each is its own stream (a Neuron artifact is
# many files), so the transfer is not bound by one stream's per-chunk turn-around.
PARALLEL_FILES = 4


class _Stopped(Exception):
    """Raised in a download thread's progress callback once another download failed."""


def _download_all(
    artifact: registry_pb2.Artifact,
    tmp: Path,
    download: Downloader,
    progress: Progress | None,
    host_cache: HostCache | None = None,
) -> tuple[int, int, int, int]:
    """Download (or place from `host_cache`) every file; returns (downloaded, resumed, from cache,
    direct). Up to PARALLEL_FILES files download at once; the first failure stops the others
    and is raised."""
    total = sum(f.digest.size_bytes for f in artifact.files)
    from_cache = 0
    targets = []
    for entry in artifact.files:
        try:
            targets.append(safe_join(tmp, entry.path))
        except UnsafePath as exc:
            raise UnsafeManifest(f"artifact {artifact.artifact_id}: {exc}") from None
    # Identical files within one artifact are fetched once and copied locally afterwards.
    first: dict[tuple[str, int], Path] = {}
    copies: list[tuple[Path, Path]] = []
    todo: list[tuple[registry_pb2.ArtifactFile, Path]] = []
    for entry, target in zip(artifact.files, targets, strict=True):
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.is_dir():
            _remove(target)
        identity = (entry.digest.hash, entry.digest.size_bytes)
        if identity in first and not target.exists():
            copies.append((first[identity], target))
        elif host_cache is not None and host_cache.place(entry.digest, target, executable=entry.executable):
            from_cache += entry.digest.size_bytes
        else:
            _unshare(target)
            todo.append((entry, target))
        first.setdefault(identity, target)
    done = {id(target): 0 for _, target in todo}
    lock = threading.Lock()
    stop = threading.Event()

    def one(entry: registry_pb2.ArtifactFile, target: Path) -> DownloadResult:
        def report(file_done: int, _file_total: int) -> None:
            if stop.is_set():
                raise _Stopped
            with lock:  # reported under the lock, so that the total reported never goes back
                done[id(target)] = file_done
                if progress is not None:
                    progress(from_cache + sum(done.values()), total)

        return download(entry, target, report)

    if progress is not None and from_cache:
        progress(from_cache, total)
    outcomes: list[DownloadResult] = []
    if len(todo) <= 1:
        outcomes = [one(entry, target) for entry, target in todo]
    else:
        with ThreadPoolExecutor(min(PARALLEL_FILES, len(todo)), thread_name_prefix="prebake-fetch") as pool:
            futures = [pool.submit(one, entry, target) for entry, target in todo]
            try:
                for future in as_completed(futures):
                    outcomes.append(future.result())
            except BaseException:
                # Ctrl-C or the first failed file (raised): the other downloads stop at their
                # next chunk, and what they received so far is kept for the next attempt.
                stop.set()
                for future in futures:
                    future.cancel()
                wait(futures)
                raise
    for source, target in copies:
        shutil.copyfile(source, target)
    for entry, target in zip(artifact.files, targets, strict=True):
        _set_executable(target, entry.executable)
    if progress is not None:
        progress(total, total)
    return (
        sum(o.bytes_downloaded for o in outcomes),
        sum(o.bytes_resumed for o in outcomes),
        from_cache,
        sum(o.bytes_direct for o in outcomes),
    )


def _unshare(target: Path) -> None:
    """Remove `target` if it is a hard link (placed from a host cache by an earlier attempt).

    download_blob appends to what it finds; appending to a name of a cache file's inode
    would change the cache entry.
    """
    try:
        if target.stat().st_nlink > 1:
            target.unlink()
    except FileNotFoundError:
        pass


def _set_executable(path: Path, executable: bool) -> None:
    old = stat.S_IMODE(path.stat().st_mode)
    # Executable: execute permission wherever read permission is granted (like `chmod +x`
    # under umask).
    mode = old | (old & 0o444) >> 2 if executable else old & ~0o111
    # Unchanged modes are not set again: a file hard-linked from a host cache shares its
    # inode (and owner) with the cache, whose modes are not ours to touch.
    if mode != old:
        path.chmod(mode)


def _prune(tmp: Path, keep: set[str]) -> None:
    """Remove leftovers of an older attempt (e.g. a replaced manifest) not in this one."""
    for root, dirs, files in os.walk(tmp, topdown=False):
        for name in files + dirs:
            path = Path(root) / name
            rel = path.relative_to(tmp).as_posix()
            if rel in keep:
                continue
            if path.is_dir() and not path.is_symlink():
                if not any(path.iterdir()):
                    path.rmdir()
            else:
                path.unlink()


def _fsync_tree(tmp: Path, files: list[str]) -> None:
    # download_blob fsyncs file contents; the directory entries need their own fsync
    # for the rename into place to be durable.
    directories = {tmp} | {(tmp / rel).parent for rel in files}
    with open(tmp / MARKER, "rb+") as f:
        os.fsync(f.fileno())
    for directory in sorted(directories, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(directory)


def _place(tmp: Path, dest: Path, marker: dict[str, Any], overwrite: bool, artifact_id: str) -> bool:
    """Rename the verified `tmp` into `dest`; returns True if `dest` already held it."""
    # Made 0o700 (see new_temp_dir); placed with the mode a directory made here would get.
    os.chmod(tmp, 0o777 & ~_umask())
    if not os.path.lexists(dest) or _is_empty_dir(dest):
        try:
            os.rename(tmp, dest)
            fsync_dir(dest.parent)
            return False
        except OSError:
            pass  # `dest` appeared meanwhile (another process): decide below.
    if holds_artifact(dest, marker):
        shutil.rmtree(tmp, ignore_errors=True)
        return True
    # Raises unless overwrite; the verified download stays in `tmp` for a rerun.
    _refuse_unless_free(dest, artifact_id, overwrite)
    aside = dest.parent / f".prebake-old-{dest.name}-{uuid.uuid4().hex[:12]}"
    os.rename(dest, aside)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(aside, dest)
        raise
    fsync_dir(dest.parent)
    _remove(aside)
    return False


@functools.cache
def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it: set it, and put it back at once
    os.umask(mask)
    return mask


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


_OPEN_DIR = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)


@contextlib.contextmanager
def _claimed_temp_dir(dest: Path, artifact_id: str) -> Iterator[Path]:
    """The temporary directory of this fetch, exclusively locked for the block.

    An earlier fetch's directory (`temp_dirs_for`) is resumed, else a new one is made
    (`new_temp_dir`); the choice is made under the lock on dest's parent, so concurrent
    fetches choose the same one and then wait for each other on its lock. It is opened
    without following a link, and used only if, once locked, the name still holds that
    very directory (the holder before us may have renamed it into place).
    """
    for _ in range(1000):
        with _parent_locked(dest.parent):
            found = temp_dirs_for(dest, artifact_id)
            tmp = found[0] if found else new_temp_dir(dest, artifact_id)
            try:
                fd = os.open(tmp, _OPEN_DIR | getattr(os, "O_NOFOLLOW", 0))
            except OSError:
                continue  # gone (or replaced) since it was listed
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            current = os.lstat(tmp)
            held = os.fstat(fd)
            same = (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino) and is_own_dir(tmp)
        except FileNotFoundError:
            same = False
        if same:
            break
        # The holder renamed or removed the directory while we waited: start over.
        os.close(fd)
    else:
        raise FileExistsError(f"cannot create and lock a temporary directory beside {dest}")
    try:
        yield tmp
    finally:
        os.close(fd)


@contextlib.contextmanager
def _parent_locked(parent: Path) -> Iterator[None]:
    """A lock on `parent` for at most CLAIM_LOCK_SECONDS of waiting, then without it."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(parent, _OPEN_DIR)
    try:
        deadline = time.monotonic() + CLAIM_LOCK_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    break  # held for long (by someone else?): choose without it
                time.sleep(0.005)
        yield
    finally:
        os.close(fd)
