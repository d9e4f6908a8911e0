"""`prebake reindex`: rebuild the registry's artifacts from the manifest archive in the blob store.

Disaster recovery for a lost (or new, empty) registry: every object under `manifests/`
(`prebake.server.manifest_archive`) names one artifact; each is restored with its id, key,
files, producer, creation time and pin (as last set) by a conditional create, so running it
again, or while servers run on the same registry, never overwrites anything. Before an artifact
is restored every blob it names (files and producer log) is checked to be in the store; one that
is not is reported and left out, never restored broken. Hit counts and access times start
afresh; jobs are not archived (a miss creates a new one).

Several objects of one artifact id (a replace or delete interrupted before it removed the old
one) restore the newest (created_at, then manifest digest). Unreadable objects are reported.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prebake.server.backends import open_blob_store, open_object_store, open_registry
from prebake.server.blobs import ContentAddressedStore
from prebake.server.blobs.objects import NoSuchObject
from prebake.server.config import ServerConfig, parse_registry
from prebake.server.data_dir_lock import DataDirLock
from prebake.server.manifest_archive import PREFIX, UnreadableManifest, decode, parse_manifest_key
from prebake.server.records import Artifact, Digest
from prebake.server.storage import ArtifactIndex, ConditionFailed

log = logging.getLogger("prebake.reindex")
CONCURRENCY = 16
_READ_CHUNK = 1 << 20


@dataclass
class ReindexReport:
    """What a run found (artifact ids in the archive) and did with each."""

    found: int = 0
    done: int = 0
    restored: list[str] = field(default_factory=list)
    present: int = 0
    # Present in the registry with another manifest than the archive's newest: kept as it is.
    differing: list[str] = field(default_factory=list)
    # Artifact id -> the blobs it names that the store does not hold.
    missing_blobs: dict[str, list[Digest]] = field(default_factory=dict)
    # Object key -> why it cannot be restored.
    unreadable: dict[str, str] = field(default_factory=dict)
    # Objects of superseded manifests (an older one beside the newest of its id).
    superseded: int = 0

    @property
    def ok(self) -> bool:
        """Whether every archived artifact is in the registry now."""
        return not self.missing_blobs and not self.unreadable

    def progress_line(self) -> str:
        return (
            f"reindex: {self.done}/{self.found} artifacts: {len(self.restored)} restored, "
            f"{self.present} already present, {len(self.missing_blobs)} with missing blobs, "
            f"{len(self.unreadable)} unreadable"
        )


def archived_ids(blobs: ContentAddressedStore) -> dict[str, list[str]]:
    """Artifact id -> the keys of its archived manifests (one listing of `manifests/`)."""
    found: defaultdict[str, list[str]] = defaultdict(list)
    for info in blobs.objects.list_objects(PREFIX):
        parsed = parse_manifest_key(info.key)
        if parsed is not None:
            found[parsed[0]].append(info.key)
    return dict(found)


def _read(blobs: ContentAddressedStore, key: str) -> bytes:
    reader = blobs.objects.get(key, 0, None, _READ_CHUNK)
    try:
        return b"".join(reader)
    finally:
        reader.close()


def named_blobs(artifact: Artifact) -> list[Digest]:
    named = [f.digest for f in artifact.files]
    if artifact.producer.log is not None:
        named.append(artifact.producer.log)
    return named


class _Newest:
    """The newest readable manifest of one id, and what else its objects held."""

    def __init__(self) -> None:
        self.artifact: Artifact | None = None
        self.unreadable: dict[str, str] = {}
        self.superseded = 0


def _load_newest(blobs: ContentAddressedStore, artifact_id: str, keys: list[str]) -> _Newest:
    """Blocking: read and decode every object of one id; keep the newest readable one."""
    result = _Newest()
    for key in keys:
        try:
            artifact = decode(_read(blobs, key))
            if artifact.artifact_id != artifact_id or parse_manifest_key(key) != (
                artifact_id,
                artifact.manifest_digest,
            ):
                raise UnreadableManifest("its contents belong under another key")
        except NoSuchObject:
            continue  # removed since the listing (a delete of the artifact): nothing to restore
        except UnreadableManifest as exc:
            result.unreadable[key] = str(exc)
            continue
        if result.artifact is None:
            result.artifact = artifact
            continue
        result.superseded += 1
        if (artifact.created_at, artifact.manifest_digest) > (
            result.artifact.created_at,
            result.artifact.manifest_digest,
        ):
            result.artifact = artifact
    return result


async def _restore_one(
    index: ArtifactIndex,
    blobs: ContentAddressedStore,
    artifact_id: str,
    keys: list[str],
    report: ReindexReport,
) -> None:
    present = await index.get(artifact_id)
    if present is not None and any(
        parse_manifest_key(k) == (artifact_id, present.manifest_digest) for k in keys
    ):
        report.present += 1
        return
    loop = asyncio.get_running_loop()
    newest = await loop.run_in_executor(None, _load_newest, blobs, artifact_id, keys)
    report.unreadable.update(newest.unreadable)
    report.superseded += newest.superseded
    artifact = newest.artifact
    if artifact is None:
        return
    if present is not None:
        report.differing.append(artifact_id)
        return
    missing = await loop.run_in_executor(None, blobs.find_missing, named_blobs(artifact))
    if missing:
        report.missing_blobs[artifact_id] = missing
        return
    try:
        await index.put(artifact, expect_manifest=None)
    except ConditionFailed:
        # Published (or restored by another run) since our read.
        again = await index.get(artifact_id)
        if again is not None and again.manifest_digest == artifact.manifest_digest:
            report.present += 1
        else:
            report.differing.append(artifact_id)
        return
    report.restored.append(artifact_id)


async def reindex(
    index: ArtifactIndex,
    blobs: ContentAddressedStore,
    tick: Callable[[ReindexReport], None] = lambda _: None,
    concurrency: int = CONCURRENCY,
) -> ReindexReport:
    """Restore every archived artifact missing from `index` (see the module docstring).

    `tick(report)` is called after each artifact id, from the event loop. Errors of the
    registry or the store (`Unavailable`, ...) propagate: what was restored stays, and a
    second run continues where this one stopped.
    """
    loop = asyncio.get_running_loop()
    found = await loop.run_in_executor(None, archived_ids, blobs)
    report = ReindexReport(found=len(found))
    queue: Iterator[tuple[str, list[str]]] = iter(sorted(found.items()))

    async def work() -> None:
        for artifact_id, keys in queue:
            await _restore_one(index, blobs, artifact_id, keys, report)
            report.done += 1
            tick(report)

    await asyncio.gather(*(work() for _ in range(max(1, concurrency))))
    return report


def reindex_configured(
    config: ServerConfig, tick: Callable[[ReindexReport], None] = lambda _: None
) -> ReindexReport:
    """`reindex` into the configured registry from the configured store.

    A SQLite registry is written only with its data directory locked: `DataDirInUse` while a
    server runs on it (stop it first). A DynamoDB registry needs no lock: its conditional
    creates are safe beside running replicas. Raises what opening the backends raises.
    """
    lock = None
    if parse_registry(config.registry) is None:
        lock = DataDirLock.acquire(config.data_dir, "(prebake reindex)")
    try:
        blobs = open_blob_store(config, open_object_store(config))
        storage = open_registry(config)
        try:
            return asyncio.run(reindex(storage.artifacts, blobs, tick))
        finally:
            storage.close()
    finally:
        if lock is not None:
            lock.release()
