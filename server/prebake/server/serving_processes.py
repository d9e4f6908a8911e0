"""Several server processes on one port, so that rpcs use every core (`serve --processes N`).

One Python process answers rpcs on one core (the GIL): on 2 cores a single server used 1.1
of them under load. With `processes = N` the server `prebake serve` starts (the primary)
binds its port with SO_REUSEPORT and starts N-1 serving processes that bind the same port;
the kernel spreads incoming connections over all of them (per connection, so one client
channel stays on one process). Each serving process opens the same registry and blob store
and answers every rpc; what must happen once stays with the primary: the data directory
lock, the embedded workers (which reach it over a socket of its own), the stale-upload
sweep at start-up, expiring leases, garbage collection and the integrity sweep.

Who may share the port: Linux lets a socket join a SO_REUSEPORT group only if it has the
option too and belongs to the same user. Before binding, the primary refuses a port on
which anything already listens (naming it, as without sharing), so the group is the
primary and the processes it starts. A process of the same user could still join later;
that user can stop or replace the server anyway.

What differs from one process (all documented with the settings): GetStats's counters since
start-up and rate limits are per process; a job created on one process is leased by a worker
long-polling on another within `workers_service.RECHECK_SECONDS`; watchers see changes made
through another process within `jobs_service.WATCH_POLL_SECONDS` (the same as replicas).

A serving process stops when told (SIGTERM) or when its primary is gone; the primary
restarts one that dies, with a growing pause, and stops them all when it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from prebake.server.config import ServerConfig

log = logging.getLogger("prebake.server.processes")

# The environment variable a serving process reads its configuration from (JSON).
CONFIG_ENV = "PREBAKE_SERVING_PROCESS_CONFIG"
READY = "ready"
START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 20.0
PARENT_CHECK_SECONDS = 1.0
RESTART_PAUSE_SECONDS = (1.0, 30.0)  # first and longest pause before restarting a dead one


def config_text(config: ServerConfig) -> str:
    """The configuration as a serving process receives it."""
    return json.dumps(
        {
            f.name: str(v) if isinstance(v, Path) else v
            for f in fields(config)
            for v in [getattr(config, f.name)]
        }
    )


def config_from_text(text: str) -> ServerConfig:
    data: dict[str, Any] = json.loads(text)
    kinds = {f.name: f.type for f in fields(ServerConfig)}
    values: dict[str, Any] = {k: Path(v) if kinds[k] in ("Path", Path) else v for k, v in data.items()}
    return ServerConfig(**values)


def serving_config(config: ServerConfig, address: str) -> ServerConfig:
    """What a serving process of a primary bound to `address` runs with: the exact port,
    and none of the primary's once-only duties."""
    return dataclasses.replace(
        config,
        listen=address,
        processes=1,
        embedded_workers=0,
        gc_interval_seconds=0,
        integrity_sweep_seconds=0,
    )


class ServingProcessFailed(RuntimeError):
    """A serving process did not come up; its own error is on the server's stderr."""


class ServingProcesses:
    """The N-1 serving processes of a primary bound to `address`. Event-loop only.

    `start` raises ServingProcessFailed if one does not come up within
    START_TIMEOUT_SECONDS; `supervise` restarts any that dies until `stop`.
    """

    def __init__(self, config: ServerConfig, address: str) -> None:
        self.count = config.processes - 1
        self._env = {**os.environ, CONFIG_ENV: config_text(serving_config(config, address))}
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * self.count
        self._stopping = False

    async def start(self) -> None:
        await asyncio.gather(*(self._start_one(i) for i in range(self.count)))

    async def _start_one(self, i: int) -> None:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prebake.server.serving_process", str(os.getpid())],
            env=self._env,
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        self._procs[i] = proc
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), START_TIMEOUT_SECONDS)
        except TimeoutError:
            line = b""
        if line.decode().strip() != READY:
            proc.kill()
            proc.wait()
            raise ServingProcessFailed(
                f"serving process {i + 1} of {self.count} did not start (exit code {proc.returncode}); "
                "its error is above"
            )

    async def supervise(self) -> None:
        pause = RESTART_PAUSE_SECONDS[0]
        while not self._stopping:
            await asyncio.sleep(PARENT_CHECK_SECONDS)
            for i, proc in enumerate(self._procs):
                if self._stopping or proc is None or proc.poll() is None:
                    continue
                log.warning(
                    "serving process %d exited with code %s; restarting it", proc.pid, proc.returncode
                )
                await asyncio.sleep(pause)
                pause = min(pause * 2, RESTART_PAUSE_SECONDS[1])
                try:
                    await self._start_one(i)
                except ServingProcessFailed as exc:
                    log.error("%s", exc)

    def stop(self) -> None:
        """SIGTERM each (a graceful stop), then SIGKILL what is left after STOP_TIMEOUT_SECONDS."""
        self._stopping = True
        running = [p for p in self._procs if p is not None and p.poll() is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        for proc in running:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
