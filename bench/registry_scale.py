"""Data directories holding a registry of N artifacts, populated directly through the storage layer.

Every artifact is a real normalised key (`normalize_key`, as the server computes it) with one
file, the same small blob, stored in the data directory's blob store, so hits are servable
and fetchable. A tenth of the artifacts belong to one "hot" model (`HOT_MODEL`), the rest
to `N / 1000` other models; each model's keys vary in sequence length and batch size.
`created_at` increases with the index, so newest-first order is index descending.

Rows go in through `SqliteArtifactIndex.put_new_many` (one transaction per batch), not one
rpc per artifact: 1M artifacts take about a minute, a publish each would take hours. A
populated directory is kept under `CACHE_DIR` keyed by its size and the schema versions, and
copied for each run (the server writes to its registry: hit counts, jobs).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prebake.core.digests import hash_bytes
from prebake.server.backends import BLOBS_DIR, REGISTRY_FILE
from prebake.server.blobs import ContentAddressedStore, LocalObjectStore
from prebake.server.instance_catalog import InstanceCatalog
from prebake.server.job_lifecycle import new_artifact
from prebake.server.key_normalization import SCHEMA_VERSION, KeyRequest, normalize_key
from prebake.server.records import Artifact, Digest, FileEntry, Producer
from prebake.server.storage.sqlite import open_sqlite
from prebake.server.storage.sqlite.artifact_index import SqliteArtifactIndex
from prebake.server.storage.sqlite.schema import latest_version

CACHE_DIR = Path.home() / ".cache" / "prebake-bench"
HOT_MODEL = "bench/hot-model"
INSTANCE = "ml.c6a.4xlarge"
PER_MODEL = 1000  # artifacts of each cold model
BATCH_SIZES = 200  # batch sizes 1..200 per sequence length: 100k hot artifacts fit below 1000 lengths
BASE_TIME = 1_700_000_000.0
BLOB = b"prebake bench artifact\n" * 64
# Bumped when what is populated changes, so old caches are not reused.
LAYOUT_VERSION = 1


@dataclass(frozen=True)
class Registry:
    """A populated data directory and what the benchmarks need to know about it."""

    data_dir: Path
    size: int
    hot_count: int

    def hot_key(self, i: int) -> KeyRequest:
        """The key of the hot model's `i`-th artifact (0 <= i < hot_count): a hit."""
        return hot_key(i)

    def created_at(self, index: int) -> float:
        return BASE_TIME + index


def hot_key(i: int) -> KeyRequest:
    return KeyRequest(
        kind="inductor",
        model=HOT_MODEL,
        instance_type=INSTANCE,
        sequence_length=1 + i // BATCH_SIZES,
        batch_size=1 + i % BATCH_SIZES,
        precision="fp32",
    )


def miss_key(i: int) -> KeyRequest:
    """A key of the hot model that no registry here holds (a sequence length above every
    stored one), different for every `i`: a miss whose near-miss list is computed afresh."""
    return KeyRequest(
        kind="inductor",
        model=HOT_MODEL,
        instance_type=INSTANCE,
        sequence_length=100_000 + i,
        batch_size=1,
        precision="fp32",
    )


def _keys(size: int) -> Iterator[KeyRequest]:
    """`size` distinct keys; index i is hot when i % 10 == 0 (spread through time)."""
    hot = 0
    cold = 0
    for i in range(size):
        if i % 10 == 0:
            yield hot_key(hot)
            hot += 1
        else:
            model, j = divmod(cold, PER_MODEL)
            yield KeyRequest(
                kind="inductor",
                model=f"bench/model-{model}",
                instance_type=INSTANCE,
                sequence_length=1 + j // BATCH_SIZES,
                batch_size=1 + j % BATCH_SIZES,
                precision="fp32",
            )
            cold += 1


def key_at(index: int) -> KeyRequest:
    """The key of the artifact populated at `index` (created at BASE_TIME + index)."""
    return next(k for j, k in enumerate(_keys(index + 1)) if j == index)


def _populate(data_dir: Path, size: int) -> None:
    objects = LocalObjectStore(data_dir / BLOBS_DIR)
    blobs = ContentAddressedStore(objects, max_blob_bytes=1 << 30, max_store_bytes=0)
    digest = Digest(hash_bytes(BLOB), len(BLOB))
    upload = blobs.open_write("bench-populate", digest)
    upload.append(BLOB)
    upload.commit()
    upload.close()
    files = (FileEntry("model.pt2", digest),)
    producer = Producer(worker="bench", note="populated by bench.registry_scale")
    catalog = InstanceCatalog.load_default()
    storage = open_sqlite(data_dir / REGISTRY_FILE)
    index = storage.artifacts
    assert isinstance(index, SqliteArtifactIndex)
    try:
        batch: list[Artifact] = []
        for i, request in enumerate(_keys(size)):
            key = normalize_key(request, catalog)
            batch.append(new_artifact(key, files, producer, BASE_TIME + i, pinned=False))
            if len(batch) == 50_000:
                asyncio.run(index.put_new_many(batch))
                batch = []
        asyncio.run(index.put_new_many(batch))
    finally:
        storage.close()


def cache_path(size: int) -> Path:
    return CACHE_DIR / f"registry-{size}-schema{latest_version()}-key{SCHEMA_VERSION}-v{LAYOUT_VERSION}"


def prepare(size: int, dest: Path, *, use_cache: bool = True, log: bool = True) -> Registry:
    """A data directory at `dest` (must not exist) with a registry of `size` artifacts.

    Built once and copied from the cache when `use_cache` (sizes of 100k and more; smaller
    ones are built in place, which is faster than a copy).
    """
    hot_count = (size + 9) // 10
    if not use_cache or size < 100_000:
        dest.mkdir(parents=True)
        _populate(dest, size)
        return Registry(dest, size, hot_count)
    cached = cache_path(size)
    if not (cached / "complete").exists():
        started = time.perf_counter()
        if log:
            print(f"# populating a registry of {size:,} artifacts once, cached in {cached}", flush=True)
        building = cached.with_name(cached.name + ".building")
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir(parents=True)
        _populate(building, size)
        (building / "complete").write_text("")
        shutil.rmtree(cached, ignore_errors=True)
        building.rename(cached)
        if log:
            print(f"# populated in {time.perf_counter() - started:.0f} s", flush=True)
    shutil.copytree(cached, dest, ignore=shutil.ignore_patterns("complete"))
    return Registry(dest, size, hot_count)
