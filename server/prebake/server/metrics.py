"""Prometheus metrics of a server: what it counts on the rpc path and what it reads from storage.

`exposition(state)` renders them in the Prometheus text format (the status server serves
it on ``--metrics-listen``, ``/metrics``). Metrics, by name:

Counted on the rpc path (cheap: a dict lookup and a locked add, no I/O):

* ``prebake_lookups_total{result, reason}``: lookups since start-up. ``result`` is
  ``hit``, ``miss``, ``compiling`` or ``failed``; ``reason`` says why: for a hit the policy
  that matched (``exact``, ``longer_sequence``, ...); for a miss ``enqueued`` (this lookup
  created the job), ``report_only`` (``on_miss=REPORT``) or ``enqueue_refused`` (a reader
  may not enqueue); ``joined`` for compiling (a job was in flight); ``negative_cache``
  for failed (a recent deterministic failure).
* ``prebake_rpc_duration_seconds{method, code}``: a histogram of every rpc (method as
  ``prebake.v1.Registry/Lookup``, code as ``OK``, ``NOT_FOUND``, ...), fed by the rpc
  interceptor (`prebake.server.rpc_observer`) together with the rpc log line.
* ``prebake_blob_read_bytes_total`` and ``prebake_blob_written_bytes_total``: blob bytes
  served by ``Blobs/Read`` and received by ``Blobs/Write`` (bytes out / in).
* ``prebake_job_duration_seconds{kind, outcome}``: from creation to the end of jobs that
  finished on this server (completed, failed, cancelled, or failed by lease expiry);
  ``outcome`` is the final state. Its ``_count`` is the outcomes counter.

Read from storage and the blob store (`StoreCollector`), never on the rpc path: a
snapshot refreshed every `REFRESH_SECONDS` by a background task (`refresh_periodically`,
cheap queries: the trigger-kept registry counts, the queued jobs' index, the live workers)
and rendered at scrape time:

* ``prebake_artifacts``, ``prebake_artifacts_pinned``; ``prebake_jobs{state}``;
* ``prebake_queue_depth{kind, compile_target}``: queued jobs;
* ``prebake_leases_active``: leased jobs;
* ``prebake_workers_live{kind, toolchain, compile_target}``: live workers by capability
  (``compile_target`` ``*`` for a capability that serves any target);
* ``prebake_store_blobs``, ``prebake_store_blob_bytes``, ``prebake_store_upload_bytes``,
  ``prebake_store_quota_bytes`` (0: no quota);
* ``prebake_lifetime_lookups_total``, ``prebake_lifetime_hits_total`` and
  ``prebake_lifetime_hit_ratio``: persisted in the registry (`ArtifactIndex.record_lookups`,
  flushed in batches with the hit counts), so they survive restarts; hits per artifact are
  the artifacts' persisted ``hit_count`` (GetArtifact, ListArtifacts).
* ``prebake_metrics_snapshot_age_seconds``: how old those numbers are.

Hit ratio: ``prebake_lifetime_hit_ratio`` is a gauge over the registry's whole life; a
recent ratio is derived from the counters, e.g.
``sum(rate(prebake_lookups_total{result="hit"}[5m])) / sum(rate(prebake_lookups_total[5m]))``.

Several server processes (``prebake serve --processes N``): the counters and histograms
are prometheus_client metrics, so its multiprocess mode covers them. `prebake serve` with
N > 1 calls `enable_multiprocess(directory)` with a fresh temporary directory (removed at
exit) before any `ServerMetrics` exists; it sets ``PROMETHEUS_MULTIPROC_DIR``, which the
serving processes started afterwards inherit. Every process then writes its values to
files there, and `exposition` in any process renders the sum over all of them
(`MultiProcessCollector`) plus one copy of the storage gauges, which are the same for
every process because they come from the shared store (the primary refreshes them). There
are no in-process gauges, so a process that exits needs no clean-up (its counters stay in
the sums, as Prometheus expects of counters). Without the variable each process counts in
memory, and `exposition` shows that process only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import values as prometheus_values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from prebake.server.records import Job, JobState, RegistryCounts

if TYPE_CHECKING:
    from prebake.server.state import ServerState

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# How old the storage numbers of a scrape may be.
REFRESH_SECONDS = 5.0
# From a cached hit (~100 µs) to a long poll or a big transfer.
RPC_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 300.0,
)  # fmt: skip
# Compiles take seconds (a tiny model) to hours (neuronx-cc on a 70B model).
JOB_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0)
ANY_TARGET = "*"


def multiprocess_dir() -> str | None:
    """The multiprocess directory in use (``PROMETHEUS_MULTIPROC_DIR``), or None."""
    return os.environ.get(MULTIPROC_ENV) or None


def enable_multiprocess(directory: Path) -> None:
    """Switch this process (and the processes it starts later) to multiprocess metrics.

    Empties or creates `directory` (give each server a fresh one: old files would add
    their counts), sets ``PROMETHEUS_MULTIPROC_DIR`` and makes metrics created from now on
    write there. Call before any `ServerMetrics` is created.
    """
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(directory)
    # prometheus_client chose its value class when it was imported; choose again.
    prometheus_values.ValueClass = prometheus_values.get_value_class()  # type: ignore[no-untyped-call]


@dataclass(frozen=True)
class StoreSnapshot:
    """What the storage gauges show, as read by `refresh` at `taken_at` (UNIX seconds)."""

    taken_at: float
    counts: RegistryCounts
    queued: dict[tuple[str, str], int]
    # (kind, toolchain, compile target or ANY_TARGET) -> live workers serving it.
    workers: dict[tuple[str, str, str], int]
    blobs: int
    blob_bytes: int
    upload_bytes: int
    max_store_bytes: int


@dataclass
class ServerMetrics:
    """The metrics one server process counts. Event-loop only (the rpc path).

    `registry` holds them and, once a state is bound (`bind`), its `StoreCollector`.
    """

    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))
    snapshot: StoreSnapshot | None = None

    def __post_init__(self) -> None:
        self.lookups = Counter(
            "prebake_lookups", "Lookups since start-up, by result and reason", ["result", "reason"],
            registry=self.registry,
        )  # fmt: skip
        self.rpc_seconds = Histogram(
            "prebake_rpc_duration_seconds", "Duration of rpcs, by method and status code", ["method", "code"],
            buckets=RPC_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.blob_read_bytes = Counter(
            "prebake_blob_read_bytes", "Blob bytes served by Blobs/Read", registry=self.registry
        )
        self.blob_written_bytes = Counter(
            "prebake_blob_written_bytes", "Blob bytes received by Blobs/Write", registry=self.registry
        )
        self.job_seconds = Histogram(
            "prebake_job_duration_seconds", "From creation to the end of finished jobs, by kind and outcome",
            ["kind", "outcome"], buckets=JOB_BUCKETS, registry=self.registry,
        )  # fmt: skip
        # Labelled children by label values: `labels()` takes a lock and validates every call.
        self._lookup_children: dict[tuple[str, str], Counter] = {}
        self._rpc_children: dict[tuple[str, str], Histogram] = {}

    def bind(self, state: ServerState) -> None:
        """Add the storage gauges of `state` to `registry` (once per state)."""
        self.registry.register(StoreCollector(state))

    def lookup(self, result: str, reason: str) -> None:
        """Count one lookup (see the module docstring for the values)."""
        child = self._lookup_children.get((result, reason))
        if child is None:
            child = self._lookup_children[(result, reason)] = self.lookups.labels(result, reason)
        child.inc()

    def rpc(self, method: str, code: str, seconds: float) -> None:
        """Observe one finished rpc."""
        child = self._rpc_children.get((method, code))
        if child is None:
            child = self._rpc_children[(method, code)] = self.rpc_seconds.labels(method, code)
        child.observe(seconds)

    def jobs_finished(self, jobs: Iterable[Job]) -> None:
        """Observe the jobs among `jobs` that are finished (others are ignored)."""
        for job in jobs:
            if job.finished_at is not None and not job.state.active:
                self.job_seconds.labels(job.key.kind, job.state.value).observe(
                    max(0.0, job.finished_at - job.created_at)
                )


async def refresh(state: ServerState) -> StoreSnapshot:
    """Read the storage gauges now, keep them for the next scrapes and return them."""
    s = state.storage
    counts = await s.artifacts.counts()
    queued = await s.jobs.queued_counts()
    now = time.time()
    workers: dict[tuple[str, str, str], int] = {}
    for worker in await s.workers.workers(now):
        for cap in worker.capabilities:
            for target in cap.compile_targets or (ANY_TARGET,):
                label = (cap.kind, cap.toolchain, target)
                workers[label] = workers.get(label, 0) + 1
    blob_count, blob_bytes = state.blobs.stats()
    usage = state.blobs.usage()
    snapshot = StoreSnapshot(
        taken_at=now,
        counts=counts,
        queued=queued,
        workers=workers,
        blobs=blob_count,
        blob_bytes=blob_bytes,
        upload_bytes=usage.upload_bytes,
        max_store_bytes=state.config.max_store_bytes,
    )
    state.metrics.snapshot = snapshot
    return snapshot


async def refresh_periodically(state: ServerState, interval: float = REFRESH_SECONDS) -> None:
    """`refresh` every `interval` seconds until cancelled; failures are logged and retried."""
    while True:
        try:
            await refresh(state)
        except Exception:
            log.exception("reading the storage metrics failed; retrying later")
        await asyncio.sleep(interval)


class StoreCollector:
    """The storage gauges of one state, from its latest `StoreSnapshot` (nothing before one)."""

    def __init__(self, state: ServerState) -> None:
        self._state = state

    def describe(self) -> list[Metric]:
        return []  # families depend on the snapshot; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        snap = self._state.metrics.snapshot
        if snap is None:
            return
        counts = snap.counts
        yield _gauge("prebake_artifacts", "Published artifacts", counts.artifacts)
        yield _gauge("prebake_artifacts_pinned", "Pinned artifacts", counts.pinned_artifacts)
        jobs = GaugeMetricFamily("prebake_jobs", "Jobs by state", labels=["state"])
        for state in JobState:
            jobs.add_metric([state.value], counts.jobs_by_state.get(state.value, 0))
        yield jobs
        depth = GaugeMetricFamily(
            "prebake_queue_depth", "Queued jobs by kind and compile target", labels=["kind", "compile_target"]
        )
        for (kind, target), n in sorted(snap.queued.items()):
            depth.add_metric([kind, target], n)
        yield depth
        yield _gauge(
            "prebake_leases_active", "Jobs leased to a worker", counts.jobs_by_state.get("leased", 0)
        )
        live = GaugeMetricFamily(
            "prebake_workers_live",
            "Live workers by capability (compile_target * = any)",
            labels=["kind", "toolchain", "compile_target"],
        )
        for labels, n in sorted(snap.workers.items()):
            live.add_metric(list(labels), n)
        yield live
        yield _gauge("prebake_store_blobs", "Blobs in the store", snap.blobs)
        yield _gauge("prebake_store_blob_bytes", "Bytes of the blobs in the store", snap.blob_bytes)
        yield _gauge("prebake_store_upload_bytes", "Bytes of unfinished uploads", snap.upload_bytes)
        yield _gauge("prebake_store_quota_bytes", "max_store_bytes (0: no quota)", snap.max_store_bytes)
        # This process's unflushed batch counts at once (the next flush persists it).
        tracker = self._state.tracker
        lookups = counts.lifetime_lookups + tracker.pending_lookups
        hits = counts.lifetime_hits + tracker.pending_hits
        yield CounterMetricFamily(
            "prebake_lifetime_lookups", "Lookups over the registry's life (persisted)", value=lookups
        )
        yield CounterMetricFamily(
            "prebake_lifetime_hits", "Hits over the registry's life (persisted)", value=hits
        )
        yield _gauge(
            "prebake_lifetime_hit_ratio",
            "Hits / lookups over the registry's life",
            hits / lookups if lookups else 0,
        )
        yield _gauge(
            "prebake_metrics_snapshot_age_seconds",
            "Age of the storage numbers above",
            max(0.0, time.time() - snap.taken_at),
        )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def scrape_registry(state: ServerState) -> CollectorRegistry:
    """What a scrape of this server shows: this process's metrics and the storage gauges,
    or in multiprocess mode every process's metrics (from their files) and the gauges."""
    directory = multiprocess_dir()
    if directory is None:
        return state.metrics.registry
    registry = CollectorRegistry()
    MultiProcessCollector(registry, directory)  # type: ignore[no-untyped-call]
    registry.register(StoreCollector(state))
    return registry


def exposition(state: ServerState, registry: CollectorRegistry | None = None) -> tuple[bytes, str]:
    """The Prometheus text exposition of `registry` (default: `scrape_registry(state)`) and
    its content type. Cheap and non-blocking (storage numbers come from the latest
    snapshot); callable from the event loop or any thread."""
    return generate_latest(scrape_registry(state) if registry is None else registry), CONTENT_TYPE_LATEST


async def scrape(state: ServerState) -> tuple[bytes, str]:
    """`exposition` after a fresh `refresh` (numbers read now, for tests and on-demand scrapes)."""
    await refresh(state)
    return exposition(state)
