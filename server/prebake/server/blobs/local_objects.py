"""`ObjectStore` on a local (POSIX) filesystem.

Layout under `root`::

    <key>                          every object, at its key's path (so keys map to plain files)
    .tmp/                          files being written; renamed into place once complete and fsynced
    .multipart/<upload id>/key     one directory per unfinished multipart upload, naming its object
    .multipart/<upload id>/data    parts written in place, one after another (see below)
    .multipart/<upload id>/inline-N-OFFSET-SIZE[.BOOT]   an empty marker: part N is those bytes of data
    .multipart/<upload id>/part-N  a part that could not go in place, written like an object
    .multipart/<upload id>/lock    serialises the writers of in-place parts (flock)
    .stamps/                       verified-at stamps, see `local_stamps`

Parts written in order (1, 2, 3 ..., as the content store writes them) go in place: part N is
written into `data` just after part N-1, and completing an upload of such parts renames `data` into
place, so no byte is copied and every byte is written to disk once. Any other part (out of order, or
replacing one already stored) is a file of its own, and completing an upload that has one copies
the parts into a new file in the kernel (`copy_file_range`).

A part stored without `durable` has a marker suffixed with this boot's id (the kernel's `boot_id`):
after a machine crash its bytes may never have reached the disk, so a marker from another boot is
not listed. `sync_parts` syncs `data` and renames the markers to their durable names.

Every write goes to a temporary file under `.tmp/` (or the upload's directory), is fsynced and
renamed into place, and the directory is fsynced, so an object or part is visible whole or not at
all and survives a crash once the call returns. Everything lives on one filesystem (checked at
start-up): a rename is only atomic within one. Nothing is kept in memory, so any number of
instances and processes may share a root, and a new instance on the same root is a restart.
The root must be on a local filesystem where rename is atomic (not NFS).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from prebake.server.blobs.local_stamps import StampedVerification
from prebake.server.blobs.objects import (
    InvalidPart,
    InvalidRange,
    NoSuchObject,
    NoSuchUpload,
    ObjectInfo,
    PartInfo,
    PreconditionFailed,
    ReadVerification,
    StorageFull,
    UploadHandle,
    validate_key,
)

_PART_RE = re.compile(r"part-([0-9]{5,})")
# An in-place part: number, offset and size (hex) in `data`; `.BOOT` while not yet synced.
_INLINE_RE = re.compile(r"inline-([0-9]{5,})-([0-9a-f]+)-([0-9a-f]+)(?:\.([0-9a-f]+))?")
_DATA = "data"
_LOCK = "lock"


def _boot_id() -> str:
    """This boot's id (hex), or "" where the kernel does not say (parts are then always synced)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")
    except OSError:
        return ""


BOOT_ID = _boot_id()
_COPY_CHUNK = 8 << 20


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _etag(st: os.stat_result) -> str:
    # A rewrite makes a new inode (temp file + rename) or at least a new mtime. Not the ctime: a
    # rename changes it, and the etag of an object must be known before it is renamed into place
    # (afterwards another process may already have moved it on).
    return f"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"


def _info(key: str, st: os.stat_result) -> ObjectInfo:
    return ObjectInfo(key=key, size=st.st_size, etag=_etag(st), modified=st.st_mtime)


# Bytes per write(2): an upload part (8 MiB) is written in slices of this size. Measured on this
# project's 2-core VM (ext4), 512 MiB in 1 MiB writes took 0.15 s every time; in 8 MiB writes,
# 0.15 s usually but 1.7-6 s one time in three (the kernel stalling to find room for the large
# page-cache folios a large write asks for), which made publish 2-3x a bare upload.
_WRITE_SLICE = 1 << 20


def _write_all(fd: int, data: bytes | memoryview, offset: int | None = None) -> None:
    """Write all of `data` at the file's position, or at `offset` (pwrite), in `_WRITE_SLICE` writes."""
    with memoryview(data) as whole:
        done = 0
        while done < len(whole):
            with whole[done : done + _WRITE_SLICE] as piece:
                n = os.write(fd, piece) if offset is None else os.pwrite(fd, piece, offset + done)
            done += n


def _full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class _Marker:
    """An in-place part: `size` bytes of the upload's `data` from `offset`, named by marker file `name`."""

    name: str
    offset: int
    size: int
    st: os.stat_result

    @property
    def end(self) -> int:
        return self.offset + self.size

    def part(self, number: int) -> PartInfo:
        # The marker's inode and mtime stay when sync_parts renames it; a replacement is a new marker.
        etag = f"i{self.st.st_ino:x}-{self.size:x}-{self.st.st_mtime_ns:x}"
        return PartInfo(number=number, size=self.size, etag=etag, modified=self.st.st_mtime)


class LocalObjectStore:
    """`ObjectStore` over a directory tree; see the module docstring for the layout.

    Parts may be any size (`min_part_size` 1), so the content store can keep every received byte.
    Reads use `StampedVerification`: a blob is hashed again only when its file changed since it was
    last found good.
    """

    min_part_size = 1
    max_part_count = 99_999

    def __init__(self, root: Path, leftover_seconds: float = 24 * 3600.0) -> None:
        self.root = Path(root)
        self._root_text = str(self.root)
        self._tmp = self.root / ".tmp"
        self._multipart = self.root / ".multipart"
        for d in (self._tmp, self._multipart):
            d.mkdir(parents=True, exist_ok=True)
        devices = {os.stat(d).st_dev for d in (self.root, self._tmp, self._multipart)}
        if len(devices) > 1:
            raise ValueError(
                f"{self._tmp}, {self._multipart} and {self.root} are on different filesystems; "
                "publishing an object needs an atomic rename between them"
            )
        self.read_verification: ReadVerification = StampedVerification(
            self.root / ".stamps", self.path, _etag
        )
        self.sweep_scratch(leftover_seconds)

    def path(self, key: str) -> Path:
        """The file that holds object `key` (whether or not it exists)."""
        return self.root / validate_key(key)

    # -- whole objects -----------------------------------------------------------------

    def _temp_file(self, directory: Path) -> tuple[int, Path]:
        path = directory / f".{uuid.uuid4().hex}.tmp"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        return fd, path

    def _write_temp(
        self, directory: Path, data: bytes | memoryview, *, durable: bool = True
    ) -> tuple[Path, os.stat_result]:
        """A complete file holding `data` (fsynced if `durable`), not yet at its final name, and its stat."""
        fd, path = self._temp_file(directory)
        try:
            try:
                _write_all(fd, data)
                if durable:
                    os.fsync(fd)
                st = os.fstat(fd)
            finally:
                os.close(fd)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(path)
            if isinstance(exc, OSError) and _full(exc):
                raise StorageFull(
                    exc.errno, f"no space left to store {len(data)} bytes under {directory}"
                ) from exc
            raise
        return path, st

    def _make_parent(self, dest: Path) -> None:
        missing: list[Path] = []
        parent = dest.parent
        while not parent.is_dir():
            missing.append(parent)
            parent = parent.parent
        for d in reversed(missing):
            with contextlib.suppress(FileExistsError):
                d.mkdir()
            # So that the new directory itself survives a crash.
            fsync_dir(d.parent)

    def _install(self, temp: Path, dest: Path, *, if_absent: bool = False) -> None:
        try:
            self._make_parent(dest)
            if if_absent:
                try:
                    os.link(temp, dest)  # fails, atomically, if dest exists
                except FileExistsError:
                    raise PreconditionFailed(f"object {dest.relative_to(self.root)} already exists") from None
            else:
                os.replace(temp, dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
        fsync_dir(dest.parent)

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> ObjectInfo:
        dest = self.path(key)
        temp, st = self._write_temp(self._tmp, data)
        self._install(temp, dest, if_absent=if_absent)
        return _info(key, st)

    def get(
        self, key: str, offset: int = 0, length: int | None = None, chunk_size: int = 1 << 20
    ) -> _FileReader:
        if offset < 0 or (length is not None and length < 0) or chunk_size < 1:
            raise ValueError(f"bad range: offset {offset}, length {length}, chunk size {chunk_size}")
        try:
            f = open(self.path(key), "rb", buffering=0)  # noqa: SIM115 - owned by the reader
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NoSuchObject(key) from None
        try:
            size = os.fstat(f.fileno()).st_size
            if offset > size:
                raise InvalidRange(f"offset {offset} is past the end of {key} ({size} bytes)")
        except BaseException:
            f.close()
            raise
        end = size if length is None else min(size, offset + length)
        return _FileReader(f, offset, end, chunk_size)

    def head(self, key: str) -> ObjectInfo | None:
        try:
            # A string path, not `self.path`'s Path: FindMissingBlobs heads up to 10,000 keys a
            # call, and building Paths was most of its time (holding the GIL against the loop).
            st = os.stat(os.path.join(self._root_text, validate_key(key)))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return _info(key, st) if stat.S_ISREG(st.st_mode) else None

    def delete(self, key: str) -> bool:
        try:
            os.unlink(self.path(key))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError):
            return False
        # No directory fsync: a delete undone by a crash leaves the object, which the caller's
        # bookkeeping (e.g. an unreferenced blob) tolerates.
        return True

    def list_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        directory, _, name_prefix = prefix.rpartition("/")
        start = self.root / directory if directory else self.root
        yield from self._walk(start, name_prefix, top=not directory)

    def _walk(self, directory: Path, name_prefix: str, top: bool) -> Iterator[ObjectInfo]:
        try:
            with os.scandir(directory) as it:
                entries = [e for e in it if e.name.startswith(name_prefix)]
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            if top and entry.name.startswith("."):
                continue  # bookkeeping, not objects
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                yield from self._walk(path, "", top=False)
            elif entry.is_file(follow_symlinks=False):
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                yield _info(path.relative_to(self.root).as_posix(), st)

    def move(self, src: str, dst: str, *, if_etag: str | None = None) -> ObjectInfo:
        source, dest = self.path(src), self.path(dst)
        if if_etag is not None:
            try:
                current = _etag(os.stat(source))
            except FileNotFoundError:
                raise NoSuchObject(src) from None
            if current != if_etag:
                raise PreconditionFailed(f"object {src} changed")
        self._make_parent(dest)
        try:
            st = os.stat(source)
            os.replace(source, dest)
        except FileNotFoundError:
            raise NoSuchObject(src) from None
        fsync_dir(dest.parent)
        return _info(dst, st)

    # -- multipart uploads -------------------------------------------------------------

    def create_upload(self, key: str) -> UploadHandle:
        validate_key(key)
        upload_id = uuid.uuid4().hex
        # Built under a dot name and renamed, so find_uploads never sees an upload without its key.
        building = self._multipart / f".{upload_id}"
        building.mkdir()
        try:
            key_file, _ = self._write_temp(building, key.encode())
            os.rename(key_file, building / "key")
            fsync_dir(building)
            os.rename(building, self._multipart / upload_id)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        fsync_dir(self._multipart)
        return UploadHandle(
            key=key, upload_id=upload_id, initiated=os.stat(self._multipart / upload_id).st_mtime
        )

    def find_uploads(self, prefix: str) -> list[UploadHandle]:
        found: list[UploadHandle] = []
        with os.scandir(self._multipart) as it:
            names = [e.name for e in it if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)]
        for name in names:
            try:
                key_file = self._multipart / name / "key"
                key = key_file.read_text()
                initiated = os.stat(key_file).st_mtime
            except (FileNotFoundError, NotADirectoryError):
                continue  # completed or aborted meanwhile
            if key.startswith(prefix):
                found.append(UploadHandle(key=key, upload_id=name, initiated=initiated))
        found.sort(key=lambda u: (u.initiated, u.upload_id))
        return found

    def _upload_dir(self, upload: UploadHandle) -> Path:
        if not re.fullmatch(r"[0-9a-f]{32}", upload.upload_id):
            raise NoSuchUpload(upload.upload_id)
        directory = self._multipart / upload.upload_id
        try:
            key = (directory / "key").read_text()
        except (FileNotFoundError, NotADirectoryError):
            raise NoSuchUpload(upload.upload_id) from None
        if key != upload.key:
            raise NoSuchUpload(f"{upload.upload_id} is an upload of {key!r}, not {upload.key!r}")
        return directory

    def upload_part(
        self, upload: UploadHandle, number: int, data: bytes | memoryview, *, durable: bool = True
    ) -> PartInfo:
        if not 1 <= number <= self.max_part_count:
            raise ValueError(f"part number {number} is outside 1..{self.max_part_count}")
        directory = self._upload_dir(upload)
        try:
            in_place = self._put_in_place(directory, number, data, durable=durable or not BOOT_ID)
        except FileNotFoundError:
            raise NoSuchUpload(upload.upload_id) from None  # aborted or completed meanwhile
        if in_place is not None:
            return in_place
        try:
            # Without `durable` no fsync: sync_parts makes the part durable when a partial upload
            # is acknowledged, and complete_upload syncs the object it assembles.
            temp, st = self._write_temp(directory, data, durable=durable)
        except FileNotFoundError:
            raise NoSuchUpload(upload.upload_id) from None
        dest = directory / f"part-{number:05d}"
        try:
            os.replace(temp, dest)
            with self._locked(directory):
                # This part replaces the one of its number stored in place, if any.
                for marker in self._markers(directory).pop(number, ()):
                    os.unlink(directory / marker.name)
            if durable:
                fsync_dir(directory)
        except FileNotFoundError:
            raise NoSuchUpload(upload.upload_id) from None  # aborted or completed meanwhile
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
        return PartInfo(number=number, size=st.st_size, etag=_etag(st), modified=st.st_mtime)

    @contextlib.contextmanager
    def _locked(self, directory: Path) -> Iterator[None]:
        """Hold the upload's lock (against writers of in-place parts in any process); raise
        FileNotFoundError if the upload has gone, before or while waiting for it."""
        fd = os.open(directory / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # Completed or aborted while we waited: its directory was renamed away.
            os.stat(directory / "key")
            yield
        finally:
            os.close(fd)  # releases the lock

    def _markers(self, directory: Path) -> dict[int, list[_Marker]]:
        """The in-place parts' markers by number, this boot's unsynced ones included, another
        boot's left out (see the module docstring)."""
        found: dict[int, list[_Marker]] = {}
        with os.scandir(directory) as it:
            for entry in it:
                m = _INLINE_RE.fullmatch(entry.name)
                if m is None or m.group(4) not in (None, BOOT_ID):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    st = entry.stat(follow_symlinks=False)
                    found.setdefault(int(m.group(1)), []).append(
                        _Marker(entry.name, int(m.group(2), 16), int(m.group(3), 16), st)
                    )
        return found

    def _put_in_place(
        self, directory: Path, number: int, data: bytes | memoryview, *, durable: bool
    ) -> PartInfo | None:
        """Write part `number` into `data` right after the last part there, if it is the next one
        (else None: the caller stores it as a file of its own)."""
        with self._locked(directory):
            markers = self._markers(directory)
            if number in markers or (directory / f"part-{number:05d}").exists():
                return None  # a replacement
            last = max(markers, default=0)
            if number != last + 1:
                return None
            offset = markers[last][0].end if markers else 0
            fd = os.open(directory / _DATA, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                _write_all(fd, data, offset)
                if durable:
                    os.fdatasync(fd)
            except OSError as exc:
                if _full(exc):
                    raise StorageFull(exc.errno, f"no space left to store {len(data)} bytes") from exc
                raise
            finally:
                os.close(fd)
            size = len(data)
            name = f"inline-{number:05d}-{offset:x}-{size:x}" + ("" if durable else f".{BOOT_ID}")
            os.close(os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
            if durable:
                fsync_dir(directory)
            marker = _Marker(name, offset, size, os.stat(directory / name))
        return marker.part(number)

    def sync_parts(self, upload: UploadHandle) -> None:
        directory = self._upload_dir(upload)
        try:
            with os.scandir(directory) as it:
                names = [e.name for e in it if _PART_RE.fullmatch(e.name)]
            for name in names:
                with contextlib.suppress(FileNotFoundError):  # replaced meanwhile: that one syncs itself
                    fd = os.open(directory / name, os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        os.fsync(fd)  # cheap for a part already written back
                    finally:
                        os.close(fd)
            with self._locked(directory):
                unsynced = [m for ms in self._markers(directory).values() for m in ms if "." in m.name]
                if unsynced:
                    fd = os.open(directory / _DATA, os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        os.fdatasync(fd)
                    finally:
                        os.close(fd)
                    fsync_dir(directory)  # the markers exist on disk before their durable names do
                    for marker in unsynced:
                        os.rename(directory / marker.name, directory / marker.name.split(".")[0])
            fsync_dir(directory)
        except FileNotFoundError:
            raise NoSuchUpload(upload.upload_id) from None

    def list_parts(self, upload: UploadHandle) -> list[PartInfo]:
        directory = self._upload_dir(upload)
        parts: dict[int, PartInfo] = {}
        try:
            with os.scandir(directory) as it:
                entries = [(m, e) for e in it if (m := _PART_RE.fullmatch(e.name))]
            for m, entry in entries:
                with contextlib.suppress(FileNotFoundError):
                    st = entry.stat(follow_symlinks=False)
                    parts[int(m.group(1))] = PartInfo(int(m.group(1)), st.st_size, _etag(st), st.st_mtime)
            markers = self._markers(directory)
            if markers:
                try:
                    stored = os.stat(directory / _DATA).st_size
                except FileNotFoundError:
                    stored = 0
                for number, found in markers.items():
                    # A file of its own replaced the in-place part (its marker is being removed).
                    whole = [m for m in found if m.end <= stored]
                    if number not in parts and whole:
                        parts[number] = whole[0].part(number)
        except FileNotFoundError:
            raise NoSuchUpload(upload.upload_id) from None
        return [parts[n] for n in sorted(parts)]

    def complete_upload(self, upload: UploadHandle, parts: Sequence[PartInfo]) -> ObjectInfo:
        directory = self._upload_dir(upload)
        previous = 0
        for i, part in enumerate(parts):
            if part.number <= previous:
                raise InvalidPart(f"part {part.number} is out of order")
            if part.size < self.min_part_size and i < len(parts) - 1:
                raise InvalidPart(f"part {part.number} is smaller than {self.min_part_size} bytes")
            previous = part.number
        try:
            with self._locked(directory):
                current = {p.number: p for p in self.list_parts(upload)}
                for part in parts:
                    if part.number not in current:
                        raise InvalidPart(f"part {part.number} of {upload.key} is not stored")
                    if current[part.number].etag != part.etag:
                        raise InvalidPart(f"part {part.number} of {upload.key} was replaced")
                info = self._complete_in_place(directory, upload, parts)
                if info is None:
                    info = self._complete_by_copy(directory, upload, parts)
                # Still holding the lock: a writer waiting for it finds the upload gone.
                self._discard(directory)
        except FileNotFoundError:
            raise NoSuchUpload(upload.upload_id) from None
        return info

    def _complete_in_place(
        self, directory: Path, upload: UploadHandle, parts: Sequence[PartInfo]
    ) -> ObjectInfo | None:
        """Rename `data` into place when `parts` are exactly its bytes from the start, else None."""
        markers = self._markers(directory)
        end = 0
        for part in parts:
            marker = next(
                (m for m in markers.get(part.number, ()) if m.part(part.number).etag == part.etag), None
            )
            if marker is None or marker.offset != end or (directory / f"part-{part.number:05d}").exists():
                return None
            end = marker.end
        dest = self.path(upload.key)
        data = directory / _DATA
        try:
            fd = os.open(data, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                os.ftruncate(fd, end)  # parts stored after those completed are dropped
                os.fsync(fd)
                st = os.fstat(fd)
            finally:
                os.close(fd)
            self._install(data, dest)
        except OSError as exc:
            if _full(exc):
                raise StorageFull(exc.errno, f"no space left to complete {upload.key}") from exc
            raise
        return _info(upload.key, st)

    def _complete_by_copy(
        self, directory: Path, upload: UploadHandle, parts: Sequence[PartInfo]
    ) -> ObjectInfo:
        dest = self.path(upload.key)
        markers = self._markers(directory)
        fd, temp = self._temp_file(self._tmp)
        try:
            try:
                for part in parts:
                    in_place = next(
                        (m for m in markers.get(part.number, ()) if m.part(part.number).etag == part.etag),
                        None,
                    )
                    if in_place is not None:
                        self._copy(fd, directory / _DATA, in_place.offset, part, upload)
                    else:
                        self._copy(fd, directory / f"part-{part.number:05d}", 0, part, upload)
                os.fsync(fd)
                st = os.fstat(fd)
            finally:
                os.close(fd)
            self._install(temp, dest)
        except BaseException as exc:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            if isinstance(exc, OSError) and _full(exc):
                raise StorageFull(exc.errno, f"no space left to complete {upload.key}") from exc
            raise
        return _info(upload.key, st)

    def _copy(self, fd: int, path: Path, offset: int, part: PartInfo, upload: UploadHandle) -> None:
        try:
            src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise InvalidPart(f"part {part.number} of {upload.key} is not stored") from None
        try:
            remaining = part.size
            while remaining > 0:
                # In the kernel; a reflink where the filesystem supports it (btrfs, xfs).
                n = os.copy_file_range(src, fd, min(remaining, _COPY_CHUNK), offset)
                if n == 0:
                    raise InvalidPart(f"part {part.number} of {upload.key} is shorter than {part.size} bytes")
                remaining -= n
                offset += n
        finally:
            os.close(src)

    def _discard(self, directory: Path) -> None:
        # Renamed first, so the upload disappears at once even if the removal is interrupted.
        trash = self._tmp / f".{directory.name}.{uuid.uuid4().hex}.tmp"
        try:
            os.rename(directory, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def abort_upload(self, upload: UploadHandle) -> None:
        try:
            directory = self._upload_dir(upload)
        except NoSuchUpload:
            return
        self._discard(directory)

    def sweep_scratch(self, older_than_seconds: float, *, dry_run: bool = False) -> tuple[int, int]:
        """Remove temporary files and half-built uploads that a killed process left behind
        (see `SweepsScratch`); return (how many, their bytes).

        Only old ones: a younger one may belong to a write still running in another process.
        """
        cutoff = time.time() - older_than_seconds
        count = size = 0
        for directory, pattern in ((self._tmp, "*"), (self._multipart, ".*")):
            for path in directory.glob(pattern):
                try:
                    if os.lstat(path).st_mtime > cutoff:
                        continue
                    is_dir = path.is_dir() and not path.is_symlink()
                    found = _tree_bytes(path) if is_dir else os.lstat(path).st_size
                    if not dry_run:
                        if is_dir:
                            shutil.rmtree(path, ignore_errors=True)
                        else:
                            path.unlink(missing_ok=True)
                except FileNotFoundError:
                    continue
                count += 1
                size += found
        return count, size


def _tree_bytes(directory: Path) -> int:
    total = 0
    for path in directory.rglob("*"):
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


class _FileReader:
    """Iterator over [pos, end) of an open file; closes it when done. Ends early at end of file."""

    def __init__(self, f: io.FileIO, pos: int, end: int, chunk_size: int) -> None:
        self._file: io.FileIO | None = f
        self._pos = pos
        self._end = end
        self._chunk_size = chunk_size

    def __iter__(self) -> _FileReader:
        return self

    def __next__(self) -> bytes:
        f = self._file
        if f is None:
            raise StopIteration
        data = b""
        if self._pos < self._end:
            try:
                data = os.pread(f.fileno(), min(self._chunk_size, self._end - self._pos), self._pos)
            except BaseException:
                self.close()
                raise
        if not data:
            self.close()
            raise StopIteration
        self._pos += len(data)
        return data

    def close(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            f.close()
