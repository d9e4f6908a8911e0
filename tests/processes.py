"""Real prebake processes for tests: `prebake worker` and `prebake serve` subprocesses, and waiting.

Each runs as `python -m prebake.client.cli ...` with its output in a log file, so that a test can
SIGKILL it like a lost host and show the log when something goes wrong.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
PREBAKE = [sys.executable, "-m", "prebake.client.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll `check` until it returns something truthy; fail the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def children_of(pid: int) -> list[int]:
    """Live processes whose parent is `pid` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Fields after the command name (which may hold spaces): state, ppid, ...
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class WorkerProcess:
    """One `prebake worker` subprocess; its log (stderr) goes to a file."""

    def __init__(self, address: str, tmp_path: Path, name: str, *args: str, work_dir: Path | None = None):
        self.worker_id = f"test-{name}"
        self.log_path = tmp_path / f"worker-{name}.log"
        self.work_dir = work_dir or tmp_path / f"work-{name}"
        command = [
            *PREBAKE, "--server", address, "worker", "--kind", "inductor",
            "--work-dir", str(self.work_dir), "--worker-id", self.worker_id, *args,
        ]  # fmt: skip
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, f"worker exited early:\n{self.log()}"
            return "leasing from" in self.log()

        wait_until(ready, timeout, "the worker to start leasing")

    def compile_processes(self) -> list[int]:
        """The backend child (a process group leader) of this worker."""
        return children_of(self.proc.pid)

    def kill_host(self) -> list[int]:
        """SIGKILL the worker and its compile, as when the whole machine is lost."""
        children = self.compile_processes()
        os.kill(self.proc.pid, signal.SIGKILL)
        for child in children:  # each child leads its own process group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child, signal.SIGKILL)
        self.proc.wait(timeout=10)
        return children

    def stop(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill_host()


def listening(address: str, proc: subprocess.Popen[bytes]) -> bool:
    """Whether `address` accepts connections; fails the test if `proc` died."""
    assert proc.poll() is None, "the server exited"
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=0.5).close()
    except OSError:
        return False
    return True


class ServerProcess:
    """One `prebake serve` subprocess on a free loopback port (no embedded workers by default).

    `address` reuses a port (a restart where clients already point); `program` runs another
    entry point with the `prebake` command line (e.g. `tests.crash_points`).
    """

    def __init__(
        self,
        tmp_path: Path,
        name: str,
        args: Sequence[str],
        env: dict[str, str] | None = None,
        *,
        address: str | None = None,
        program: Sequence[str] = PREBAKE,
    ):
        self.name = name
        self.address = address or f"127.0.0.1:{free_port()}"
        self.log_path = tmp_path / f"serve-{name}.log"
        command = [*program, "serve", "--listen", self.address, "--workers", "0", *args]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env={**os.environ, **(env or {})}
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> ServerProcess:
        def ready() -> bool:
            assert self.proc.poll() is None, f"server {self.name} exited:\n{self.log()}"
            return listening(self.address, self.proc)

        wait_until(ready, timeout, f"server {self.name} to listen")
        return self

    def kill(self) -> None:
        """SIGKILL, as when the replica's host is lost."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
