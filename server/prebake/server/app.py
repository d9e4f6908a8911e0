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
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # re-exported at run time

from prebake.core.errors import FailedPrecondition, PrebakeError
from prebake.core.logs import setup_logging
from prebake.server import integrity, metrics, reflection
from prebake.server.auth.server_security import ServerSecurity
from prebake.server.backends import describe, keeps_local_state, open_backends
from prebake.server.blob_http import BlobHttpServer
from prebake.server.blobs.blob_urls import BlobUrlSigner, load_or_create_secret
from prebake.server.blobs.cas import ContentAddressedStore
from prebake.server.blobs.local_objects import LocalObjectStore
from prebake.server.config import ServerConfig
from prebake.server.data_dir_lock import DataDirLock
from prebake.server.exclusive_bind import (
    NO_PORT_SHARING,
    PORT_SHARING,
    CannotListen,
    bind_exclusively,
    bind_shared,
)
from prebake.server.hit_history import HitHistory
from prebake.server.http_endpoint import MetricsEndpoint, check_metrics_listen
from prebake.server.instance_catalog import InstanceCatalog
from prebake.server.request_limits import REQUEST_LIMIT, add_service
from prebake.server.rpc_observer import RpcObserver
from prebake.server.services.admin_service import AdminService
from prebake.server.services.blobs_service import BlobsService
from prebake.server.services.catalog_service import CatalogService
from prebake.server.services.jobs_service import JobsService
from prebake.server.services.registry_service import RegistryService
from prebake.server.services.workers_service import WorkersService
from prebake.server.serving_processes import ServingProcesses, ServingProcessFailed
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


def _serve_blob_urls(
    config: ServerConfig, blobs: ContentAddressedStore, primary: bool
) -> BlobHttpServer | None:
    """With `blob_http_listen`: sign download URLs for the local store, and (the primary)
    serve them. A serving process is given the primary's bound address and only signs."""
    if not config.blob_http_listen:
        return None
    if not isinstance(blobs.objects, LocalObjectStore):
        raise FailedPrecondition("blob_http_listen needs blobs on local disk")
    host, _, port = config.blob_http_listen.rpartition(":")
    endpoint = None
    address = config.blob_http_listen
    if primary:
        try:
            endpoint = BlobHttpServer(host, int(port), blobs.objects)
        except OSError as exc:
            raise CannotListen(f"cannot serve blob downloads on {config.blob_http_listen}: {exc}") from exc
        address = endpoint.address
    signer = BlobUrlSigner(load_or_create_secret(config.data_dir), f"http://{address}")
    blobs.urls = signer
    if endpoint is not None:
        endpoint.start(signer)
    return endpoint


def open_state(config: ServerConfig, primary: bool = True) -> ServerState:
    """Open the configured registry and blob store (local ones created if needed; see
    `prebake.server.backends`); the primary also removes stale partial uploads. Raises what
    opening them raises: `FailedPrecondition` for a missing bucket, tables or AWS extra,
    `Unavailable` for an unreachable S3 or DynamoDB."""
    storage, blobs = open_backends(config)
    try:
        blob_http = _serve_blob_urls(config, blobs, primary)
    except BaseException:
        storage.close()
        raise
    if primary:
        try:
            swept = blobs.sweep_uploads(config.stale_upload_seconds)
        except BaseException:
            if blob_http is not None:
                blob_http.stop()
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
        blob_http=blob_http,
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
                s.metrics.jobs_finished(expired)
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

    def start_background_tasks(self, primary: bool = True) -> None:
        """Flushing access times, in every process; the once-only duties (leases, sweeps,
        GC) in the primary only (see `prebake.server.serving_processes`)."""
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._flush_periodically())]
        if not primary:
            return
        self._tasks.append(loop.create_task(self._expire_leases_periodically()))
        # The storage gauges of the metrics: read by the primary, which serves the scrapes.
        self._tasks.append(loop.create_task(metrics.refresh_periodically(self.state)))
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
        if self.state.blob_http is not None:
            self.state.blob_http.stop()
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


async def start_serving_process(config: ServerConfig) -> RunningServer:
    """Start one serving process of a primary (see `prebake.server.serving_processes`): no
    lock (the primary holds it), the primary's port shared, no once-only duties."""
    return await _start_locked(config, primary=False)


async def _start_locked(config: ServerConfig, primary: bool = True) -> RunningServer:
    # Before anything is opened: a bad token or certificate file, or an anonymous
    # non-loopback address, is refused at once.
    security = ServerSecurity.from_config(config)
    check_metrics_listen(config, security.authenticator is not None)
    state = open_state(config, primary)
    shared = config.processes > 1 or not primary
    options = (
        [*(o for o in SERVER_OPTIONS if o != NO_PORT_SHARING), PORT_SHARING] if shared else SERVER_OPTIONS
    )
    # The observer first: it sees every rpc once, authentication refusals included.
    server = grpc.aio.server(
        options=options, interceptors=[RpcObserver(state.metrics), *security.interceptors()]
    )
    # Registered from the descriptors with per-method request limits (request_limits).
    registry = RegistryService(state)
    for servicer, module in (
        (registry, registry_pb2),
        (BlobsService(state), blobs_pb2),
        (JobsService(state, registry), jobs_pb2),
        (AdminService(state), admin_pb2),
        (WorkersService(state), workers_pb2),
        (CatalogService(state, registry), catalog_pb2),
    ):
        (service,) = module.DESCRIPTOR.services_by_name.values()
        add_service(server, servicer, service, config.max_request_bytes)
    health_servicer = health_aio.HealthServicer()
    health_service = health_pb2.DESCRIPTOR.services_by_name["Health"]
    add_service(server, health_servicer, health_service, config.max_request_bytes, foreign=True)
    for reflection_servicer, reflection_service in reflection.servicers(
        (*SERVICE_NAMES, health_service.full_name)
    ):
        add_service(server, reflection_servicer, reflection_service, config.max_request_bytes, foreign=True)
    host, _, _ = config.listen.rpartition(":")
    endpoint: MetricsEndpoint | None = None
    try:
        # A serving process joins the port its primary bound (and checked) already.
        bind = bind_shared if primary and shared else bind_exclusively
        port = bind(server, config.listen, security.credentials)
        local_target = f"{host}:{port}"
        if config.embedded_workers > 0:
            local_target = security.add_local_port(server, local_target, private=shared)
        if config.metrics_listen and primary:
            endpoint = MetricsEndpoint.bind(
                config, state, HitHistory(), asyncio.get_running_loop(), security.authenticator
            )
    except (OSError, RuntimeError, PrebakeError):
        if state.blob_http is not None:
            state.blob_http.stop()
        state.storage.close()
        security.close()
        raise
    await server.start()
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    running = RunningServer(server, state, f"{host}:{port}", health_servicer)
    running.security = security
    running.local_target = local_target
    running.metrics = endpoint
    if endpoint is not None:
        endpoint.start()
    if config.embedded_workers > 0:
        running.embedded_token = security.mint_embedded_token()
    running.start_background_tasks(primary)
    return running


async def _serve(config: ServerConfig) -> None:
    running = await start(config)
    log.info("prebake serving on %s (%s)", running.address, describe(config))
    if running.state.blob_http is not None:
        log.info("prebake serving blob downloads on http://%s", running.state.blob_http.address)
    if running.metrics is not None:
        where = f"{running.metrics.scheme}://{running.metrics_address}"
        log.info("prebake status page on %s/, metrics on %s/metrics", where, where)
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
    processes: ServingProcesses | None = None
    supervisor: asyncio.Task[None] | None = None
    if config.processes > 1:
        blob_http = running.state.blob_http
        shared = replace(config, blob_http_listen=blob_http.address) if blob_http is not None else config
        processes = ServingProcesses(shared, running.address)
        try:
            await processes.start()
        except ServingProcessFailed:
            await asyncio.to_thread(processes.stop)
            await running.stop()
            raise
        supervisor = loop.create_task(processes.supervise())
        log.info("prebake serving with %d processes on one port", config.processes)
    await stop.wait()
    log.info("prebake shutting down")
    if processes is not None:
        if supervisor is not None:
            supervisor.cancel()
        await asyncio.to_thread(processes.stop)
    if workers:
        # Before the server stops, so that a compile in progress is released, not lost.
        workers_stop.set()
        await asyncio.to_thread(join_embedded_workers, workers)
    await running.stop()


# How long a thread may hold the GIL while another waits (Python's default is 5 ms). Large
# reads decode beside the loop (`Database.read_off_loop`); with the default, every rpc the
# loop answers meanwhile would wait up to 5 ms per turn for the GIL (at 0.5 ms a second
# client's Check p99 was still 6x its idle figure behind a deep page; bench block-* rows).
SWITCH_INTERVAL_SECONDS = 0.0001


def setup_process(config: ServerConfig) -> None:
    """What `prebake serve` and each serving process set up once: logging, GIL hand-over."""
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    setup_logging(config.log_format, config.log_level)


def serve(config: ServerConfig) -> None:
    """Run the server until SIGINT or SIGTERM. Raises DataDirInUse or CannotListen (both
    OSError) if another server has the data directory or the address, ServingProcessFailed
    if a serving process (`processes` > 1) does not start."""
    setup_process(config)
    if config.processes <= 1:
        asyncio.run(_serve(config))
        return
    # Every serving process (started later, inheriting the environment) counts its metrics
    # in files of one fresh directory, which any process's exposition sums.
    directory = Path(tempfile.mkdtemp(prefix="prebake-metrics-"))
    metrics.enable_multiprocess(directory)
    try:
        asyncio.run(_serve(config))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


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
