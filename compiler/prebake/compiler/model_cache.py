"""A worker's cache of downloaded S3 model sources: one complete checkpoint per revision.

Layout: `<work dir>/model-cache/<revision>/` holds the checkpoint's files and a hidden
marker, `.prebake-source.json`, that lists them (path, size, ETag) as the listing saw
them. The marker is written last and the directory is renamed into place complete, so a
directory under its revision's name is a whole checkpoint: a worker killed mid-download
leaves only a staging directory inside its own private job directory, which the worker
(or the sweep of a dead worker's directory, see work_dir.py) removes.

`recorded_revision` tells the compile child (which may have no boto3) that a directory it
was given is such a copy, and of which revision, without hashing it: the revision is
recomputed from the marker's rows, and the files on disk must be exactly the marker's,
with its sizes. Hidden files, the marker among them, are not checkpoint files, so
`revision_of` of a cached copy is that of the same files anywhere else.

No boto3 here. Every function is safe to call from several processes sharing a work dir:
installs are single renames, and a reader only ever sees complete entries. Nothing is
evicted: the cache grows by one checkpoint per revision until an operator removes entries.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from prebake.client.model_revision import checkpoint_files
from prebake.client.s3_model_revision import S3Checkpoint, SourceObject, revision_of_objects

log = logging.getLogger("prebake.worker")

CACHE_DIR_NAME = "model-cache"
MARKER = ".prebake-source.json"
MARKER_SCHEME = "prebake-model-cache-v1"


@dataclass(frozen=True)
class DownloadCache:
    """Where S3 model sources are downloaded: complete entries under `root`, one per revision;
    half-done downloads under `staging`, a private directory on the same filesystem (so that
    an entry is installed by one rename) that its owner removes, even after a SIGKILL."""

    root: Path
    staging: Path

    @classmethod
    def in_work_dir(cls, work_dir: Path, staging: Path) -> DownloadCache:
        """The cache that every worker using `work_dir` shares, staging in `staging`."""
        return cls(work_dir / CACHE_DIR_NAME, staging)

    def entry(self, revision: str) -> Path:
        return self.root / revision


def write_marker(directory: Path, checkpoint: S3Checkpoint) -> None:
    """Record in `directory` (a finished download) what it holds and where it came from."""
    document = {
        "scheme": MARKER_SCHEME,
        "source": str(checkpoint.location),
        "files": [[o.path, o.size, o.etag] for o in checkpoint.objects],
    }
    (directory / MARKER).write_text(json.dumps(document, indent=1) + "\n")


def recorded_revision(directory: Path) -> str | None:
    """The S3 revision `directory` was downloaded from, if it is an intact cached copy.

    None unless `directory` holds a readable marker of this scheme and exactly the files the
    marker lists, each with its recorded size: any other directory (a plain checkpoint, a
    copy someone changed) is not vouched for and must be hashed instead.
    """
    try:
        document = json.loads((directory / MARKER).read_text())
        if document.get("scheme") != MARKER_SCHEME:
            return None
        objects = [SourceObject(str(p), int(s), str(e)) for p, s, e in document["files"]]
        on_disk = {rel.as_posix(): (directory / rel).stat().st_size for rel in checkpoint_files(directory)}
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if not objects or on_disk != {o.path: o.size for o in objects}:
        return None
    return revision_of_objects(objects)


def cached(cache: DownloadCache, revision: str) -> Path | None:
    """The complete, intact entry of `revision`, or None if there is none."""
    entry = cache.entry(revision)
    return entry if recorded_revision(entry) == revision else None


def install(cache: DownloadCache, staged: Path, revision: str) -> Path:
    """Move the finished download `staged` (marker written) into place as `revision`'s entry.

    If another process installed the revision meanwhile, `staged` is discarded and theirs
    is used. A damaged entry (see `recorded_revision`) is moved aside into staging and
    replaced; this assumes no one compiles from an entry while it is being damaged, which
    only a person editing the cache does. Raises OSError for filesystem failures.
    """
    entry = cache.entry(revision)
    cache.root.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            os.rename(staged, entry)
            return entry
        except OSError:
            if not entry.exists():
                raise
        if cached(cache, revision) is not None:
            shutil.rmtree(staged, ignore_errors=True)
            return entry
        log.warning("model cache entry %s is damaged; replacing it", entry)
        aside = cache.staging / f"damaged-{revision}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(entry, aside)
        shutil.rmtree(aside, ignore_errors=True)
    raise OSError(f"cannot install {staged} as {entry}: it keeps being replaced")
