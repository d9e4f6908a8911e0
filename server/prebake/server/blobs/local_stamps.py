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
import time
import uuid
from collections.abc import Callable
from pathlib import Path

# How long `vouch` waits for the filesystem clock to move past a file's last change (one tick of a
# coarse clock is a few milliseconds; kernels with fine-grained timestamps need no wait).
_VOUCH_WAIT_SECONDS = 0.02


def _identity(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


class StampedVerification:
    """`ReadVerification` for a local filesystem; safe for threads and processes sharing `root`."""

    def __init__(
        self, root: Path, object_path: Callable[[str], Path], etag: Callable[[os.stat_result], str]
    ) -> None:
        self._root = Path(root)
        self._object_path = object_path
        self._etag = etag

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

    def vouch(self, key: str, etag: str) -> None:
        # The bytes were hashed before the file existed (as they were received), so there is no
        # moment "before hashing" to stamp. Instead: wait (at most a few clock ticks) until the
        # filesystem clock has moved past the file's last change, take that time as the stamp's,
        # and only then look at the file. A change after the look gets a ctime at or after the
        # stamp's mtime; a change between the rename and the look shows in the etag (inode, size,
        # mtime of the object the caller made). What no metadata shows is a write by someone else
        # within the very clock tick of the rename; published files are never written in place.
        path = self._object_path(key)
        stamp = self._stamp_path(key)
        pending = stamp.parent / f".{stamp.name}.{uuid.uuid4().hex}.tmp"
        try:
            changed = os.stat(path).st_ctime_ns
            pending.parent.mkdir(parents=True, exist_ok=True)
            deadline = time.monotonic() + _VOUCH_WAIT_SECONDS
            while True:
                pending.write_bytes(b"")
                started = os.stat(pending).st_mtime_ns
                if started > changed:
                    break
                if time.monotonic() > deadline:
                    return  # a coarse clock that did not move: the first read hashes instead
                time.sleep(0.0005)
            st = os.stat(path)
            if self._etag(st) != etag or st.st_ctime_ns != changed:
                return
            pending.write_text(_identity(st))
            os.utime(pending, ns=(started, started))  # back to the time taken before the look
            os.replace(pending, stamp)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                os.unlink(pending)

    def forget(self, key: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self._stamp_path(key))
