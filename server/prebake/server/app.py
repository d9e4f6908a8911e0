"""Assemble and run the prebake gRPC server (grpc.aio).

`serve(config)` is what `prebake serve` runs: it blocks until SIGINT/SIGTERM, then
stops accepting rpcs, gives in-flight ones `shutdown_grace_seconds`, flushes access
times and closes the storage. `BackgroundServer` runs the same server on a thread with
its own event loop, for tests, benchmarks and the demo.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # re-exported at run time
from grpc_reflection.v1alpha import reflection, reflection_pb2

from prebake.core.errors import PrebakeError
from prebake.server import integrity
from prebake.server.auth.server_security import ServerSecurity
from prebake.server.backends import describe, keeps_local_state, open_backends
from prebake.server.config import ServerConfig
from prebake.server.data_dir_lock import DataDirLock
from prebake.server.exclusive_bind import NO_PORT_SHARING, bind_exclusively
from prebake.server.hit_history import HitHistory
from prebake.server.http_endpoint import MetricsEndpoint, check_metrics_listen
from prebake.server.instance_catalog import InstanceCatalog
from prebake.server.request_limits import REQUEST_LIMIT, add_service
from prebake.server.services.admin_service import AdminService
from prebake.server.services.blobs_service import BlobsService
from prebake.server.services.catalog_service import CatalogService
from prebake.server.services.jobs_service import JobsService
from prebake.server.services.registry_service import RegistryService
from prebake.server.services.workers_service import WorkersService
from prebake.server.state import ServerState
from prebake.v1 import (
    admin_pb2,
    blobs_pb2,
    catalog_pb2,
    jobs_pb2,
    registry_pb2,
    workers_pb2,
)

log = logging.getLogger("prebake.server")

# Answers may be large (pages of manifests); requests are limited per method, and in all
# to what a blob chunk needs (request_limits).
RESPONSE_LIMIT = 16 << 20
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", REQUEST_LIMIT),
    ("grpc.max_send_message_length", RESPONSE_LIMIT),
    # Detect dead peers on long streams (downloads, job watches) without app traffic.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    # A port in use makes start() fail instead of splitting connections with its owner.
    NO_PORT_SHARING,
]

SERVICE_NAMES = (
    registry_pb2.DESCRIPTOR.services_by_name["Registry"].full_name,
    blobs_pb2.DESCRIPTOR.services_by_name["Blobs"].full_name,
    jobs_pb2.DESCRIPTOR.services_by_name["Jobs"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
    workers_pb2.DESCRIPTOR.services_by_name["Workers"].full_name,
    catalog_pb2.DESCRIPTOR.services_by_name["Catalog"].full_name,
)


def open_state(config: ServerConfig) -> ServerState:
    """Open the configured registry and blob store (local ones created if needed; see
    `prebake.server.backends`). Raises what opening them raises: `FailedPrecondition` for a
    missing bucket, tables or AWS extra, `Unavailable` for an unreachable S3 or DynamoDB."""
    storage, blobs = open_backends(config)
    try:
        swept = blobs.sweep_uploads(config.stale_upload_seconds)
    except BaseException:
        storage.close()
        raise
    if swept:
        log.info("removed %d stale partial uploads", swept)
    return ServerState(
        config=config,
        storage=storage,
        blobs=blobs,
        catalog=InstanceCatalog.load_default(),
        executor=ThreadPoolExecutor(config.io_threads, thread_name_prefix="prebake-io"),
    )


class RunningServer:
    """A started server: its bound address and the means to stop it."""

    def __init__(
        self, server: grpc.aio.Server, state: ServerState, address: str, health: health_aio.HealthServicer
    ) -> None:
        self.server = server
        # Set by start(); released last on stop(), once the state is closed.
        self.data_dir_lock: DataDirLock | None = None
        self.state = state
        self.address = address
        self.health = health
        self._tasks: list[asyncio.Task[None]] = []
        # How the server's own in-process workers reach it (set by start): the target to
        # dial and, with authentication on, the token minted for them.
        self.local_target = address
        self.embedded_token: str | None = None
        self.security: ServerSecurity | None = None
        # The metrics port (metrics_listen), serving from its own thread; None when off.
        self.metrics: MetricsEndpoint | None = None

    @property
    def metrics_address(self) -> str:
        """The bound HOST:PORT of the metrics port and status page ("" when off)."""
        return self.metrics.address if self.metrics is not None else ""

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.state.config.access_flush_seconds)
            try:
                await self.state.tracker.flush()
            except Exception:
                log.exception("recording artifact access times failed; retrying later")

    async def _expire_leases_periodically(self) -> None:
        s = self.state
        # A quarter of the lease: an expired job waits at most that long to be requeued.
        interval = max(0.05, min(5.0, s.config.lease_seconds / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                expired = await s.lifecycle.expire_leases()
            except Exception:
                log.exception("expiring leases failed; retrying later")
                continue
            if expired:
                log.info("requeued or failed %d job(s) whose worker stopped heartbeating", len(expired))
                s.hub.notify(j.job_id for j in expired)
                s.work.fire()

    async def _collect_garbage_periodically(self) -> None:
        collector = self.state.collector
        while True:
            await asyncio.sleep(self.state.config.gc_interval_seconds)
            try:
                report = await collector.collect()
            except Exception:
                log.exception("garbage collection failed; retrying later")
                continue
            if report.removed_anything:
                log.info("%s", report.summary())

    def start_background_tasks(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._flush_periodically()),
            loop.create_task(self._expire_leases_periodically()),
        ]
        if self.state.config.integrity_sweep_seconds > 0:
            self._tasks.append(loop.create_task(integrity.sweep_periodically(self.state)))
        if self.state.config.gc_interval_seconds > 0:
            self._tasks.append(loop.create_task(self._collect_garbage_periodically()))
        if self.metrics is not None:
            history = self.metrics.history.run(self.state.counters, self.state.config.status_sample_seconds)
            self._tasks.append(loop.create_task(history))

    async def stop(self, grace: float | None = None) -> None:
        for task in self._tasks:
            task.cancel()
        if self.metrics is not None:
            # First: its requests read the state that is closed below.
            await asyncio.to_thread(self.metrics.stop)
        # Load balancers and health probes see NOT_SERVING while in-flight rpcs finish.
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.state.config.shutdown_grace_seconds if grace is None else grace)
        await self.state.tracker.flush()
        self.state.executor.shutdown(wait=True)
        self.state.storage.close()
        if self.security is not None:
            self.security.close()
        if self.data_dir_lock is not None:
            self.data_dir_lock.release()


async def start(config: ServerConfig) -> RunningServer:
    """Lock the data directory (if the registry or the blobs live there), open the state,
    bind `config.listen` (port 0 picks a free port) and start serving.

    Raises DataDirInUse if another server holds the data directory, CannotListen if the
    address is taken (both name the other server where they can), FailedPrecondition for
    an unusable token or certificate file or an unauthenticated non-loopback address
    (see `prebake.server.auth.server_security`), and what `open_state` raises. With a
    remote registry and store nothing is locked: replicas are stateless.
    """
    if not keeps_local_state(config):
        return await _start_locked(config)
    data_dir_lock = DataDirLock.acquire(config.data_dir, config.listen)
    try:
        running = await _start_locked(config)
    except BaseException:
        data_dir_lock.release()
        raise
    data_dir_lock.record(running.address)
    running.data_dir_lock = data_dir_lock
    return running


async def _start_locked(config: ServerConfig) -> RunningServer:
    # Before anything is opened: a bad token or certificate file, or an anonymous
    # non-loopback address, is refused at once.
    security = ServerSecurity.from_config(config)
    check_metrics_listen(config, security.authenticator is not None)
    state = open_state(config)
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=security.interceptors())
    # Registered from the descriptors with per-method request limits (request_limits).
    for servicer, module in (
        (RegistryService(state), registry_pb2),
        (BlobsService(state), blobs_pb2),
        (JobsService(state), jobs_pb2),
        (AdminService(state), admin_pb2),
        (WorkersService(state), workers_pb2),
        (CatalogService(state), catalog_pb2),
    ):
        (service,) = module.DESCRIPTOR.services_by_name.values()
        add_service(server, servicer, service, config.max_request_bytes)
    health_servicer = health_aio.HealthServicer()
    health_service = health_pb2.DESCRIPTOR.services_by_name["Health"]
    add_service(server, health_servicer, health_service, config.max_request_bytes, foreign=True)
    add_service(
        server,
        reflection.aio.ReflectionServicer(  # type: ignore[attr-defined]  # re-exported at run time
            (*SERVICE_NAMES, health_service.full_name, reflection.SERVICE_NAME)
        ),
        reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
        config.max_request_bytes,
        foreign=True,
    )
    host, _, _ = config.listen.rpartition(":")
    metrics: MetricsEndpoint | None = None
    try:
        port = bind_exclusively(server, config.listen, security.credentials)
        local_target = f"{host}:{port}"
        if config.embedded_workers > 0:
            local_target = security.add_local_port(server, local_target)
        if config.metrics_listen:
            metrics = MetricsEndpoint.bind(
                config, state, HitHistory(), asyncio.get_running_loop(), security.authenticator
            )
    except (OSError, RuntimeError, PrebakeError):
        state.storage.close()
        security.close()
        raise
    await server.start()
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    running = RunningServer(server, state, f"{host}:{port}", health_servicer)
    running.security = security
    running.local_target = local_target
    running.metrics = metrics
    if metrics is not None:
        metrics.start()
    if config.embedded_workers > 0:
        running.embedded_token = security.mint_embedded_token()
    running.start_background_tasks()
    return running


async def _serve(config: ServerConfig) -> None:
    running = await start(config)
    print(f"prebake serving on {running.address} ({describe(config)})", file=sys.stderr, flush=True)
    if running.metrics is not None:
        where = f"{running.metrics.scheme}://{running.metrics_address}"
        print(f"prebake status page on {where}/, metrics on {where}/metrics", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    workers_stop = threading.Event()
    workers: list[threading.Thread] = []
    if config.embedded_workers > 0:
        from prebake.compiler.embedded import join_embedded_workers, run_embedded_workers

        # Off the loop: the backend probe is a child process that takes seconds, and the
        # workers' rpcs are answered by this very loop.
        workers = await asyncio.to_thread(
            run_embedded_workers,
            running.local_target,
            workers_stop,
            config.data_dir / "work",
            per_kind=config.embedded_workers,
            token=running.embedded_token,
            model_roots=running.state.model_sources.worker_roots(),
            signing_key=Path(config.signing_key) if config.signing_key else None,
        )
    await stop.wait()
    print("prebake shutting down", file=sys.stderr, flush=True)
    if workers:
        # Before the server stops, so that a compile in progress is released, not lost.
        workers_stop.set()
        await asyncio.to_thread(join_embedded_workers, workers)
    await running.stop()


def serve(config: ServerConfig) -> None:
    """Run the server until SIGINT or SIGTERM. Raises DataDirInUse or CannotListen (both
    OSError) if another server has the data directory or the address."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve(config))


class BackgroundServer:
    """The real server on a background thread with its own event loop (tests, demo, bench).

    `address` is valid after `start()`; `stop()` shuts it down gracefully. Not for use
    from inside an event loop thread.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.address = ""
        # The metrics port and status page's HOST:PORT after `start()` ("" when off).
        self.metrics_address = ""
        self.running: RunningServer | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="prebake-server", daemon=True)

    def start(self) -> BackgroundServer:
        self._thread.start()
        self.running = asyncio.run_coroutine_threadsafe(start(self.config), self._loop).result()
        self.address = self.running.address
        self.metrics_address = self.running.metrics_address
        return self

    def call(self, fn: object, *args: object) -> object:
        """Run a function (or coroutine function) on the server's loop thread and return
        its result (for tests poking at state)."""

        async def run() -> object:
            result = fn(*args)  # type: ignore[operator]
            return await result if inspect.isawaitable(result) else result

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result()

    def stop(self, grace: float = 1.0) -> None:
        if self.running is not None:
            asyncio.run_coroutine_threadsafe(self.running.stop(grace), self._loop).result()
            self.running = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def background_server(data_dir: Path, **overrides: object) -> Iterator[BackgroundServer]:
    """A BackgroundServer on a free loopback port with `data_dir` as its data directory."""
    config = replace(ServerConfig(listen="127.0.0.1:0", data_dir=data_dir), **overrides)  # type: ignore[arg-type]
    with BackgroundServer(config) as server:
        yield server
