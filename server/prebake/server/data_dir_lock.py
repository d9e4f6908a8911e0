"""One server per data directory: an exclusive lock held for the server's lifetime.

A server locks `<data dir>/server.lock` with `flock` before it opens the registry or
touches the blob store (a second server would otherwise sweep the first one's partial
uploads and race it on the database), and writes its pid, host and address into the file
so that a server refused the lock can name the owner. The kernel drops a `flock` when
its holder exits however it exits, so a file left behind by a killed server never blocks
the next one; the file itself is never removed (unlinking a lock file lets two servers
hold locks on two different files of the same name).

Holding is per open file description: a second `DataDirLock.acquire` on the same
directory fails even from the same process. The descriptor is close-on-exec, so compile
children do not inherit (and cannot keep alive) the lock. On a network filesystem whose
`flock` is not shared across hosts the lock guards only against servers on one host.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from pathlib import Path

LOCK_FILE = "server.lock"


class DataDirInUse(OSError):
    """Another live server holds the data directory; the message names it."""


class DataDirLock:
    """The held lock on one data directory. Not thread-safe; `release` is idempotent."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, data_dir: Path, address: str) -> DataDirLock:
        """Create `data_dir` if needed and lock it for this process, recording `address`.

        Raises DataDirInUse, naming the owner's pid, host and address as it recorded them,
        if another server holds it; OSError if the directory cannot be created or written.
        """
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataDirInUse(
                f"data directory {data_dir.resolve()} is in use by another prebake server "
                f"({describe_owner(path)}); stop that server or choose another --data-dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        lock = cls(path, fd)
        lock.record(address)
        return lock

    def record(self, address: str) -> None:
        """Rewrite the owner record, e.g. with the bound address once port 0 is resolved."""
        if self._fd is None:
            raise ValueError("the data directory lock was released")
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "address": address}
        data = (json.dumps(owner) + "\n").encode()
        # Written over the old record, then cut to length: a reader never sees an empty file.
        os.pwrite(self._fd, data, 0)
        os.ftruncate(self._fd, len(data))

    def release(self) -> None:
        """Clear the owner record and unlock (the kernel also unlocks when the process exits)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            # Cleared while still held, so no reader sees a record of a stopped server.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def describe_owner(path: Path) -> str:
    """The owner as the lock file records it, for messages ("pid 12, host h, address a")."""
    try:
        owner = json.loads(path.read_text())
        parts = [f"pid {int(owner['pid'])}", f"host {owner['host']}", f"address {owner['address']}"]
    except (OSError, ValueError, KeyError, TypeError):
        # Locked before the owner wrote its record, or written by something else.
        return f"its owner is not recorded in {path}"
    return ", ".join(parts)
