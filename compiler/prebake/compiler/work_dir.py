"""A worker's private, locked directory for its jobs, and the sweeping of dead workers' leftovers.

Layout under the configured work directory: `worker-<pid>-<n>/` (one per live worker,
holding one `<job>-<token>/` directory per running job) beside `worker-<pid>-<n>.lock`.
`model-cache/` beside them holds the S3 model sources the workers downloaded (model_cache.py);
sweeping leaves it alone.

Contract:
* A live worker holds an exclusive flock on its `.lock` file; the kernel drops it when
  the process dies (even by SIGKILL), so an unlockable lock file means a live owner and
  `sweep_work_dir` never removes a live worker's files. Several workers (processes or
  threads) may share one work directory and sweep concurrently.
* `worker_dir` yields an empty directory and removes it and its lock on exit, whatever
  happened inside. Filesystem errors other than a concurrent removal raise OSError.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("prebake.worker")

# Distinguishes the directories of several workers in one process (embedded workers).
_worker_numbers = itertools.count(1)


def default_work_dir() -> Path:
    """Where a worker started without `--work-dir` keeps its job directories."""
    return Path(tempfile.gettempdir()) / "prebake-worker"


def _lock_path(path: Path) -> int:
    """An fd holding an exclusive flock on `path` (created if missing), which still names it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # a sweeper removed it between open and flock: take the new one


def sweep_work_dir(work_dir: Path) -> int:
    """Remove the directories of workers that died without cleaning up; return how many.

    Every live worker holds a flock on `<dir>.lock` beside its directory; the kernel drops
    it when the process dies (even by SIGKILL), so an unlockable file means a live owner.
    """
    removed = 0
    for lock in sorted(work_dir.glob("worker-*.lock")):
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            with contextlib.suppress(FileNotFoundError):
                if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                    shutil.rmtree(lock.with_suffix(""), ignore_errors=True)
                    lock.unlink()
                    removed += 1
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def worker_dir(work_dir: Path) -> Iterator[Path]:
    """This worker's private, locked, initially empty directory under `work_dir`."""
    work_dir.mkdir(parents=True, exist_ok=True)
    swept = sweep_work_dir(work_dir)
    if swept:
        log.info("removed %d job director%s left by dead workers", swept, "y" if swept == 1 else "ies")
    path = work_dir / f"worker-{os.getpid()}-{next(_worker_numbers)}"
    fd = _lock_path(path.with_suffix(".lock"))
    try:
        shutil.rmtree(path, ignore_errors=True)  # a dead process with our pid may have left it
        path.mkdir()
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            path.with_suffix(".lock").unlink()
        os.close(fd)
