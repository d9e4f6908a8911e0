"""Verified-at stamps: a local file is hashed again only when it may have changed since it was found good.

A stamp is a small file under `<root>/.stamps/<key>` whose content is the object file's identity
(device, inode, size, mtime, ctime) at the time it was hashed, and whose own mtime is a time on the
filesystem's clock taken just before the hashing started. A stamp vouches for a file when

* the file's identity is unchanged, so no write or rename touched it since, and
* the file's ctime is strictly older than the stamp's mtime.

The second rule closes the hole that coarse file timestamps leave (git calls it the "racily clean"
case): a file changed within the same clock tick as the one its identity was read in would keep
its identity, so a stamp is only trusted once the clock has moved on since the file's last change.
Any change after the stamp was started gets a ctime at or after the stamp's mtime, so it changes
the identity. What stamps cannot see is bit rot that leaves the file's metadata alone; a stamp is
an optimisation of reads, not a scrub (that is `ContentAddressedStore.scrub`, run by the
integrity sweep, `prebake.server.integrity`).

Stamps are best-effort: they are written without fsync (a lost or torn stamp only costs one more
hash), are never required for correctness, and a stale one (its blob deleted) is harmless.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path


def _identity(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


class StampedVerification:
    """`ReadVerification` for a local filesystem; safe for threads and processes sharing `root`."""

    def __init__(self, root: Path, object_path: Callable[[str], Path]) -> None:
        self._root = Path(root)
        self._object_path = object_path

    def _stamp_path(self, key: str) -> Path:
        return self._root / key

    def is_current(self, key: str) -> bool:
        """Whether a stamp vouches for the object's current bytes (no hashing)."""
        try:
            st = os.stat(self._object_path(key))
            with open(self._stamp_path(key), "rb") as f:
                recorded = f.read(256).decode(errors="replace")
                stamped_at = os.fstat(f.fileno()).st_mtime_ns
        except OSError:
            return False
        return recorded == _identity(st) and st.st_ctime_ns < stamped_at

    def verified(self, key: str, rehash: Callable[[], bool]) -> bool:
        if self.is_current(key):
            return True
        path = self._object_path(key)
        try:
            before = _identity(os.stat(path))
        except OSError:
            return rehash()  # absent or unreadable: let the caller's hash report it
        stamp = self._stamp_path(key)
        # Written before hashing, so its mtime is a filesystem time no later than the first byte read.
        pending = stamp.parent / f".{stamp.name}.{uuid.uuid4().hex}.tmp"
        try:
            pending.parent.mkdir(parents=True, exist_ok=True)
            pending.write_text(before)
        except OSError:
            return rehash()  # no room for stamps: verify every time
        try:
            good = rehash()
            with contextlib.suppress(OSError):
                if good and _identity(os.stat(path)) == before:
                    os.replace(pending, stamp)
            return good
        finally:
            with contextlib.suppress(OSError):
                os.unlink(pending)

    def forget(self, key: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self._stamp_path(key))
