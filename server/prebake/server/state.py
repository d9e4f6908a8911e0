"""What every service shares: configuration, storage, job rules, blobs, catalog, counters.

Built once by `prebake.server.app` and handed to each service. All members are used
from the server's event loop; blocking work (hashing, fsync) goes to `run_blocking`;
the storage seams keep their own blocking work off the loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from prebake.server.blob_http import BlobHttpServer
from prebake.server.blobs import BlobStore
from prebake.server.config import ServerConfig, parse_default_toolchains
from prebake.server.events import JobEventHub, Pulse
from prebake.server.garbage import GarbageCollector, InUse
from prebake.server.instance_catalog import InstanceCatalog
from prebake.server.job_lifecycle import JobLifecycle
from prebake.server.key_normalization import DEFAULT_TOOLCHAINS
from prebake.server.metrics import ServerMetrics
from prebake.server.model_catalog import ModelCatalog
from prebake.server.model_sources import ModelSources
from prebake.server.price_table import PriceTable, load_price_table
from prebake.server.signatures import SignaturePolicy, signature_policy
from prebake.server.storage import ArtifactIndex
from prebake.server.storage.bundle import Storage
from prebake.server.worker_liveness import WorkerLiveness

T = TypeVar("T")


@dataclass
class Counters:
    """Counters since start-up, reported by GetStats. Event-loop only."""

    started_at: float = field(default_factory=time.time)
    lookups: int = 0
    hits: int = 0
    misses: int = 0
    bytes_served: int = 0
    bytes_received: int = 0


class AccessTracker:
    """Collects artifact hits and lookup totals in memory and writes them to the index in batches.

    A hit must not cost a database write on the lookup path; losing the last few
    seconds of access times (and of lifetime totals) in a crash only makes eviction
    slightly less precise and the lifetime hit ratio slightly older.
    """

    def __init__(self, index: ArtifactIndex, clock: Callable[[], float] = time.time) -> None:
        self._index = index
        self._clock = clock
        self._pending: dict[str, tuple[int, float]] = {}
        # Lookups and hits not yet added to the lifetime totals (`record_lookups`).
        self.pending_lookups = 0
        self.pending_hits = 0

    def lookup(self) -> None:
        """Count one lookup (a hit is counted by `hit` as well)."""
        self.pending_lookups += 1

    def hit(self, artifact_id: str) -> None:
        count, _ = self._pending.get(artifact_id, (0, 0.0))
        self._pending[artifact_id] = (count + 1, self._clock())
        self.pending_hits += 1

    async def flush(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, {}
            await self._index.record_hits(pending)
        if self.pending_lookups or self.pending_hits:
            lookups, hits = self.pending_lookups, self.pending_hits
            self.pending_lookups = self.pending_hits = 0
            try:
                await self._index.record_lookups(lookups, hits)
            except BaseException:
                # Kept for the next flush: totals are counters, a retry only delays them.
                self.pending_lookups += lookups
                self.pending_hits += hits
                raise


@dataclass
class ServerState:
    config: ServerConfig
    storage: Storage
    blobs: BlobStore
    catalog: InstanceCatalog
    executor: ThreadPoolExecutor
    models: ModelCatalog = field(default_factory=ModelCatalog.load_default)
    hub: JobEventHub = field(default_factory=JobEventHub)
    # Fired whenever a job may have become leasable (created, requeued, released).
    work: Pulse = field(default_factory=Pulse)
    counters: Counters = field(default_factory=Counters)
    # Prometheus metrics (`prebake.server.metrics`); its storage gauges read this state.
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    # The blob download endpoint this process serves (`prebake.server.blob_http`), if any.
    blob_http: BlobHttpServer | None = None
    tracker: AccessTracker = field(init=False)
    lifecycle: JobLifecycle = field(init=False)
    liveness: WorkerLiveness = field(init=False)
    # The kinds whose default toolchain the configuration names (others are resolved
    # from live workers, then from DEFAULT_TOOLCHAINS).
    configured_toolchains: dict[str, str] = field(init=False)
    # What a job may read (see `prebake.server.model_sources`).
    model_sources: ModelSources = field(init=False)
    # Held from "every blob is present" to the registry write that references them by
    # publishes, and from "no artifact references it" to the blob delete by deletes, so
    # a delete never removes a blob a concurrent publish of this replica relies on.
    blob_refs: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Blobs this replica is streaming or told a client are present (garbage collection keeps them).
    in_use: InUse = field(default_factory=InUse)
    collector: GarbageCollector = field(init=False)
    # Which signatures publishes need and which signers are revoked (signing settings).
    signatures: SignaturePolicy = field(init=False)
    # Hourly prices that evaluation jobs record (`price_table_file`, or the shipped table).
    prices: PriceTable = field(init=False)

    def __post_init__(self) -> None:
        self.collector = GarbageCollector(self)
        self.tracker = AccessTracker(self.storage.artifacts)
        self.lifecycle = JobLifecycle(
            self.storage.artifacts, self.storage.jobs, backoff_base=self.config.retry_backoff_seconds
        )
        self.liveness = WorkerLiveness(self.storage.workers, self.config.worker_ttl_seconds)
        self.configured_toolchains = parse_default_toolchains(
            self.config.default_toolchains, DEFAULT_TOOLCHAINS
        )
        self.model_sources = ModelSources.from_config(
            self.config.model_source_roots, self.config.model_source_map, self.config.data_dir
        )
        self.signatures = signature_policy(self.config)
        self.prices = load_price_table(
            Path(self.config.price_table_file) if self.config.price_table_file else None
        )
        self.metrics.bind(self)

    @property
    def in_worker_grace(self) -> bool:
        """Still too soon after start-up to say that no worker serves a job."""
        return time.time() - self.counters.started_at < self.config.worker_grace_seconds

    async def run_blocking(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
