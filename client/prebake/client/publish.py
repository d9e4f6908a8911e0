"""Turning a local directory into a manifest: scan, hash, and describe its files.

The walk refuses anything that would not round-trip through a fetch: symbolic links
(their target would silently be lost or, worse, escape the tree), sockets, devices and
FIFOs. Empty directories are not represented (an artifact is a list of files). A
`.prebake.json` marker at the root, left by `fetch`, is skipped, so a fetched artifact
can be published to another server as is.

A scan may leave files unhashed (`hash_files=False`): `Client.publish` then hashes each
while uploading it, reading it once. A digest memo (`digest_memo`) supplies the digests of
files unchanged since they were last read, so that their blobs can be skipped when the
server holds them.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from prebake.client.digest_memo import DigestMemo
from prebake.client.errors import InvalidArgument
from prebake.client.fetch import MARKER
from prebake.core import digests
from prebake.core.manifest_paths import UnsafePath, validate_manifest_paths
from prebake.v1 import blobs_pb2, registry_pb2


@dataclass(frozen=True)
class LocalFile:
    """One file of a directory being published."""

    path: str  # relative POSIX path, as in the manifest
    source: Path
    hash: str  # "" until known (a scan without `hash_files`: hashed while uploading)
    size: int
    executable: bool
    # As the scan found it: the digest memo's identity of the file.
    stat: os.stat_result | None = None

    @property
    def digest(self) -> blobs_pb2.Digest:
        if not self.hash:
            raise ValueError(f"{self.source} has not been hashed yet")
        return blobs_pb2.Digest(hash=self.hash, size_bytes=self.size)

    @property
    def file_identity(self) -> object:
        """The same for every path of one file (hard links): its device and inode."""
        return (self.stat.st_dev, self.stat.st_ino) if self.stat is not None else self.source

    def with_digest(self, digest: blobs_pb2.Digest) -> LocalFile:
        """This file with the digest its upload computed (of the bytes sent: their size counts)."""
        return dataclasses.replace(self, hash=digest.hash, size=digest.size_bytes)

    def to_proto(self) -> registry_pb2.ArtifactFile:
        return registry_pb2.ArtifactFile(path=self.path, digest=self.digest, executable=self.executable)


def scan_directory(
    directory: Path, *, hash_files: bool = True, digest_memo: DigestMemo | None = None
) -> list[LocalFile]:
    """Every regular file under `directory`, sorted by path: hashed, or without `hash_files`
    only those `digest_memo` knows (the others' `hash` is "").

    With `digest_memo`, files it knows are not read, and files hashed here are recorded.
    Raises InvalidArgument for a missing directory, a symbolic link or special file
    anywhere in the tree, an unsafe or over-long path, or a tree with no files.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise InvalidArgument(f"{directory} is not a directory")
    found: list[tuple[str, Path, bool]] = []
    for root, dirs, files in os.walk(directory, followlinks=False):
        dirs.sort()
        for name in sorted(dirs + files):
            path = Path(root) / name
            rel = path.relative_to(directory).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise InvalidArgument(
                    f"{path} is a symbolic link; artifacts hold regular files only "
                    "(copy the target in place of the link, or remove it)"
                )
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise InvalidArgument(f"{path} is not a regular file (socket, device or FIFO)")
            if rel == MARKER:
                continue
            found.append((rel, path, bool(mode & stat.S_IXUSR)))
    if not found:
        raise InvalidArgument(f"{directory} contains no files to publish")
    found.sort()
    try:
        validate_manifest_paths([rel for rel, _, _ in found])
    except UnsafePath as exc:
        raise InvalidArgument(f"cannot publish {directory}: {exc}") from None
    result = []
    for rel, path, executable in found:
        st = os.stat(path)
        known = digest_memo.get(path, st) if digest_memo is not None else None
        if known is not None:
            hash_hex, size = known, st.st_size
        elif hash_files:
            started = time.time_ns()
            hash_hex, size = digests.hash_file(path)
            if digest_memo is not None and size == st.st_size:
                digest_memo.record(path, st, hash_hex, started)
        else:
            hash_hex, size = "", st.st_size
        result.append(
            LocalFile(path=rel, source=path, hash=hash_hex, size=size, executable=executable, stat=st)
        )
    return result
