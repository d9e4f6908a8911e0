"""What the benchmarks share: a real `prebake serve` process on a free loopback port, and
the CPU time of a process tree."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from prebake.client import ArtifactKey

# Extra `prebake serve` arguments every benchmark server gets (`bench.run --server-args`),
# e.g. "--processes 2" once the server has it.
SERVER_ARGS: list[str] = []
_TICKS = os.sysconf("SC_CLK_TCK")


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@dataclass
class ServerProcess:
    address: str
    proc: subprocess.Popen[bytes]
    startup_seconds: float  # from spawn to the health service answering

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.proc.pid)


@contextmanager
def server_process(
    data_dir: Path, workers: int = 0, args: Sequence[str] = (), env: Mapping[str, str] | None = None
) -> Iterator[ServerProcess]:
    """`prebake serve` in its own process, as deployed (client and server must not share a
    GIL), with `SERVER_ARGS` and extra `args` and environment; stopped gracefully afterwards."""
    address = free_address()
    cmd = [
        sys.executable,
        "-m",
        "prebake.client.cli",
        "serve",
        "--listen",
        address,
        "--data-dir",
        str(data_dir),
        "--workers",
        str(workers),
        *SERVER_ARGS,
        *args,
    ]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    try:
        with grpc.insecure_channel(address) as channel:
            grpc.channel_ready_future(channel).result(timeout=120)
        yield ServerProcess(address, proc, time.perf_counter() - started)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def served(
    data_dir: Path, workers: int = 0, args: Sequence[str] = (), env: Mapping[str, str] | None = None
) -> Iterator[str]:
    """`server_process`, yielding only its address."""
    with server_process(data_dir, workers, args, env) as server:
        yield server.address


def descendants(pid: int) -> list[int]:
    """`pid` and its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                text = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(text[text.rindex(")") + 2 :].split()[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_rss_mib(pid: int) -> float:
    """Resident memory of `pid` and its live descendants, in MiB."""
    total = 0
    for p in descendants(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` and its live descendants (several server processes)."""
    total = 0.0
    for p in descendants(pid):
        try:
            text = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        # Fields after the command: state is 0, utime 11, stime 12.
        fields = text[text.rindex(")") + 2 :].split()
        total += (int(fields[11]) + int(fields[12])) / _TICKS
    return total


# The key limits.py and aws.py look up (a Neuron key: any server accepts it without a worker).
KEY = ArtifactKey(
    kind="neuron",
    model="meta-llama/Meta-Llama-3-8B",
    instance_type="ml.inf2.48xlarge",
    sequence_length=8192,
    batch_size=8,
    tensor_parallel_degree=24,
    precision="bf16",
)


def per_call_us(fn: Callable[[], object], n: int) -> float:
    """Mean microseconds of `n` calls of `fn`."""
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6
