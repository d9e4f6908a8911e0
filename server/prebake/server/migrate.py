"""`prebake migrate`: copy a local installation (a data directory: SQLite + local disk) into the
backends a configuration names (typically S3 + DynamoDB; any combination works).

Blobs first, then artifacts, so a destination never holds an artifact without its blobs:

* **blobs**: every blob of the source store (artifact files, producer and job logs) that the
  destination lacks is streamed through the destination's content-addressed store (multipart on
  S3, hashed and verified there before it becomes visible). Each copy uses the upload id
  `migrate-<hash>`, so a run that was interrupted resumes a big blob from its committed parts.
* **artifacts**: every artifact is created in the destination registry with a conditional
  create, keeping its id, files, producer, creation time, pin, hit count and last access, and
  its manifest archived beside the blobs (`storage.archived_index`). One whose blobs did not
  all arrive is reported and left out.

Idempotent: blobs already stored and artifacts already present are skipped (an artifact present
with another file list is kept and reported), so re-running copies nothing new. Jobs and the
worker directory are not copied (a miss after the switch creates a new job). The source must not
be served while it runs: its data directory lock is taken (`DataDirInUse` otherwise), and so is
the destination's when the destination keeps anything under its data directory.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path

from prebake.core.errors import FailedPrecondition, PrebakeError
from prebake.server.backends import (
    BLOBS_DIR,
    REGISTRY_FILE,
    keeps_local_state,
    open_blob_store,
    open_object_store,
    open_storage,
)
from prebake.server.blobs import ContentAddressedStore, LocalObjectStore
from prebake.server.blobs.objects import ObjectStoreError
from prebake.server.config import ServerConfig
from prebake.server.data_dir_lock import DataDirLock
from prebake.server.records import Digest
from prebake.server.reindex import named_blobs
from prebake.server.storage import ArtifactIndex, ArtifactQuery, ConditionFailed
from prebake.server.storage.sqlite import open_sqlite

COPY_THREADS = 4
CHUNK = 8 << 20
PAGE = 200
# The destination takes whatever the source holds: its blob size limit is not the source's.
UNLIMITED_BLOB_BYTES = 1 << 62
LOCK_OWNER = "(prebake migrate)"


@dataclass
class MigrateReport:
    """What a run found in the source and did with it."""

    blobs_found: int = 0
    blobs_copied: int = 0
    blobs_present: int = 0
    bytes_copied: int = 0
    # Blobs that could not be copied (corrupt in the source, destination refused): why.
    blob_errors: dict[Digest, str] = field(default_factory=dict)
    artifacts_found: int = 0
    artifacts_copied: int = 0
    artifacts_present: int = 0
    # Present in the destination with another file list: kept as they are.
    artifacts_differing: list[str] = field(default_factory=list)
    # Artifact id -> blobs it names that the destination does not hold.
    artifacts_missing_blobs: dict[str, list[Digest]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.blob_errors and not self.artifacts_missing_blobs

    def blob_line(self) -> str:
        return (
            f"migrate: blobs {self.blobs_copied + self.blobs_present + len(self.blob_errors)}/"
            f"{self.blobs_found} seen: {self.blobs_copied} copied ({self.bytes_copied} bytes), "
            f"{self.blobs_present} already present, {len(self.blob_errors)} failed"
        )

    def artifact_line(self) -> str:
        return (
            f"migrate: artifacts {self.artifacts_found} seen: {self.artifacts_copied} copied, "
            f"{self.artifacts_present} already present, {len(self.artifacts_differing)} differing, "
            f"{len(self.artifacts_missing_blobs)} with missing blobs"
        )


def copy_blob(source: ContentAddressedStore, target: ContentAddressedStore, digest: Digest) -> int | None:
    """Stream one blob into `target` (resuming an earlier attempt); the bytes sent, or None if
    `target` holds it already. Raises the stores' errors (`DataLoss` for a corrupt source)."""
    writer = target.open_write(f"migrate-{digest.hash}", digest)
    try:
        if writer.complete:
            return None
        offset = writer.committed_size
        reader = source.read(digest, offset=offset, chunk_size=CHUNK)
        try:
            for chunk in reader:
                writer.append(chunk)
        finally:
            reader.close()
        writer.commit()
        return digest.size - offset
    finally:
        writer.close()


def copy_blobs(
    source: ContentAddressedStore,
    target: ContentAddressedStore,
    report: MigrateReport,
    tick: Callable[[], None],
    threads: int = COPY_THREADS,
) -> None:
    """Copy every blob of `source` that `target` lacks, `threads` at a time (blocking)."""

    def settle(done: set[Future[int | None]]) -> None:
        for future in done:
            digest = running.pop(future)
            try:
                sent = future.result()
            except (PrebakeError, OSError, ObjectStoreError) as exc:
                report.blob_errors[digest] = str(exc)
            else:
                if sent is None:
                    report.blobs_present += 1
                else:
                    report.blobs_copied += 1
                    report.bytes_copied += sent
            tick()

    running: dict[Future[int | None], Digest] = {}
    with ThreadPoolExecutor(threads, thread_name_prefix="prebake-migrate") as pool:
        for digest in source.iter_digests():
            report.blobs_found += 1
            running[pool.submit(copy_blob, source, target, digest)] = digest
            if len(running) >= 2 * threads:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                settle(done)
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            settle(done)


async def copy_artifacts(
    source: ArtifactIndex,
    target: ArtifactIndex,
    target_blobs: ContentAddressedStore,
    report: MigrateReport,
    tick: Callable[[], None],
) -> None:
    """Create every artifact of `source` in `target`, as it is (see the module docstring)."""
    loop = asyncio.get_running_loop()
    token = ""
    while True:
        page = await source.list_page(ArtifactQuery(), token, PAGE)
        for listed in page.items:
            artifact = await source.get(listed.artifact_id)
            if artifact is None:
                continue
            report.artifacts_found += 1
            existing = await target.get(artifact.artifact_id)
            if existing is None:
                missing = await loop.run_in_executor(None, target_blobs.find_missing, named_blobs(artifact))
                if missing:
                    report.artifacts_missing_blobs[artifact.artifact_id] = missing
                    tick()
                    continue
                try:
                    await target.put(artifact, expect_manifest=None)
                    report.artifacts_copied += 1
                    tick()
                    continue
                except ConditionFailed:
                    existing = await target.get(artifact.artifact_id)
            if existing is not None and existing.manifest_digest == artifact.manifest_digest:
                report.artifacts_present += 1
            else:
                report.artifacts_differing.append(artifact.artifact_id)
            tick()
        token = page.next_token
        if not token:
            return


def _same_dir(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def check_source(source: Path) -> None:
    """`FailedPrecondition` unless `source` is a local installation's data directory."""
    if not (source / REGISTRY_FILE).is_file() or not (source / BLOBS_DIR).is_dir():
        raise FailedPrecondition(
            f"{source} is not a prebake data directory (it has no {REGISTRY_FILE} and {BLOBS_DIR}/): "
            "pass the --data-dir of the server to migrate"
        )


@contextlib.contextmanager
def _locked(source: Path, target: ServerConfig) -> Iterator[None]:
    check_source(source)
    if keeps_local_state(target) and _same_dir(source, target.data_dir):
        raise FailedPrecondition(
            f"the destination keeps its registry or blobs in {target.data_dir}, the source itself: "
            "choose another destination data directory"
        )
    with contextlib.ExitStack() as stack:
        source_lock = DataDirLock.acquire(source, LOCK_OWNER)
        stack.callback(source_lock.release)
        if keeps_local_state(target):
            target_lock = DataDirLock.acquire(target.data_dir, LOCK_OWNER)
            stack.callback(target_lock.release)
        yield


def migrate(
    source: Path,
    target: ServerConfig,
    blob_tick: Callable[[MigrateReport], None] = lambda _: None,
    artifact_tick: Callable[[MigrateReport], None] = lambda _: None,
) -> MigrateReport:
    """Copy the installation in `source` into `target`'s backends; see the module docstring.

    Raises `DataDirInUse` if a server (or another migrate) holds the source or the local
    destination, `FailedPrecondition` for a source that is no data directory or a destination
    that cannot be opened, `Unavailable` when S3 or DynamoDB cannot be reached (a second run
    continues where this one stopped). Blobs and artifacts that cannot be copied are reported
    in the result, not raised.
    """
    target = replace(target, max_blob_bytes=UNLIMITED_BLOB_BYTES, max_store_bytes=0)
    report = MigrateReport()
    with _locked(source, target), contextlib.ExitStack() as stack:
        source_blobs = ContentAddressedStore(
            LocalObjectStore(source / BLOBS_DIR), max_blob_bytes=UNLIMITED_BLOB_BYTES
        )
        source_storage = open_sqlite(source / REGISTRY_FILE)
        stack.callback(source_storage.close)
        # Everything is opened (the bucket and tables checked) before the first byte is copied.
        target_objects = open_object_store(target)
        target_blobs = open_blob_store(target, target_objects)
        target_storage = open_storage(target, target_objects)
        stack.callback(target_storage.close)
        copy_blobs(source_blobs, target_blobs, report, lambda: blob_tick(report))
        asyncio.run(
            copy_artifacts(
                source_storage.artifacts,
                target_storage.artifacts,
                target_blobs,
                report,
                lambda: artifact_tick(report),
            )
        )
    return report
