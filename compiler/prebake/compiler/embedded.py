"""In-process compile workers for `prebake serve` (`embedded_workers`): one thread per worker.

Contract:
* `run_embedded_workers` blocks for the backend probe (a child process, seconds), then
  starts daemon threads and returns them. It never raises for a missing toolchain or a
  failed probe: the server then runs without workers, and says so in the log.
* Setting the `stop` event stops every worker without a drain (a running compile is
  killed and its job released); `join_embedded_workers` then waits for them, bounded, so
  that the releases reach the server before it stops. Both are thread-safe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from prebake.client.credentials import Credentials
from prebake.compiler.probe import ProbeError, probe_backends
from prebake.compiler.worker import Worker, WorkerConfig, default_worker_id
from prebake.core.names import kind_names

log = logging.getLogger("prebake.worker")

# Embedded workers are joined for at most this long when `prebake serve` stops.
EMBEDDED_JOIN_SECONDS = 20.0


def _local_target(address: str) -> str:
    """A dialable address for a server listening on `address` (wildcards become loopback)."""
    if address.startswith("unix:"):
        return address
    host, _, port = address.rpartition(":")
    if host in ("", "0.0.0.0", "[::]", "::"):
        return f"127.0.0.1:{port}"
    return address


def run_embedded_workers(
    address: str,
    stop: threading.Event,
    work_dir: Path,
    per_kind: int = 1,
    *,
    token: str | None = None,
    model_roots: tuple[Path, ...] | None = None,
    signing_key: Path | None = None,
) -> list[threading.Thread]:
    """Start `per_kind` daemon worker threads per kind whose toolchain is installed here.

    For `prebake serve`: probes the backends (a child process), logs which kinds are
    served and why the others are not, and starts the workers against the server at
    `address`. Setting `stop` stops them without a drain (a running compile is killed
    and released); join the returned threads (bounded) before stopping the server so
    that the release reaches it. Never raises for a missing toolchain or a failed probe:
    the server then runs without workers, and says so. `token` is the one the server
    minted for them when it authenticates (`address` may be its private `unix:` socket).
    `model_roots`: the local
    directories the workers may read model sources from (the server's policy, re-checked
    before reading; see `WorkerConfig.model_roots`).
    With `signing_key` (the server's `signing_key` setting, checked when the configuration
    was loaded) every artifact they complete is signed with it.
    """
    if per_kind <= 0:
        return []
    try:
        probed = probe_backends()
    except ProbeError as exc:
        log.warning("no embedded compile workers: %s", exc)
        return []
    for status in probed.values():
        if not status.available:
            log.info("embedded workers: not serving %s", status.describe())
    for kind in kind_names():
        if kind not in probed:
            log.info("embedded workers: not serving %s: no %s backend in this installation", kind, kind)
    available = [s for s in probed.values() if s.available and s.toolchain]
    if not available:
        log.warning("no embedded compile workers: no compile toolchain is installed here")
        return []
    target = _local_target(address)
    workers: list[Worker] = []
    for status in available:
        for i in range(per_kind):
            config = WorkerConfig(
                server=target,
                work_dir=work_dir,
                kinds=(status.kind,),
                worker_id=f"{default_worker_id()}/embedded-{status.kind}-{i + 1}",
                drain_seconds=0.0,
                credentials=Credentials(token=token),
                model_roots=model_roots,
                signing_key=signing_key,
            )
            workers.append(Worker(config, backends={status.kind: status}))
        log.info("embedded workers: serving %s with %d worker(s)", status.describe(), per_kind)

    def stop_all() -> None:
        stop.wait()
        for worker in workers:
            worker.stop(drain=False)

    threads = [
        threading.Thread(target=w.run, name=f"prebake-worker-{w.config.worker_id}", daemon=True)
        for w in workers
    ]
    threads.append(threading.Thread(target=stop_all, name="prebake-worker-stopper", daemon=True))
    for thread in threads:
        thread.start()
    return threads


def join_embedded_workers(
    threads: Sequence[threading.Thread], timeout: float = EMBEDDED_JOIN_SECONDS
) -> None:
    """Join threads from `run_embedded_workers` (after setting its stop event), within `timeout`."""
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    alive = [t.name for t in threads if t.is_alive()]
    if alive:
        log.warning("embedded workers still running after %g s: %s", timeout, ", ".join(alive))
