"""What the benchmarks share: a real `prebake serve` process on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import grpc


@contextmanager
def served(
    data_dir: Path, workers: int = 0, args: Sequence[str] = (), env: Mapping[str, str] | None = None
) -> Iterator[str]:
    """`prebake serve` in its own process, as deployed (client and server must not share a
    GIL), with extra `args` and environment; yields its address and stops it gracefully
    afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    cmd = [
        sys.executable,
        "-m",
        "prebake.client.cli",
        "serve",
        "--listen",
        address,
        "--data-dir",
        str(data_dir),
    ]
    proc = subprocess.Popen(
        [*cmd, "--workers", str(workers), *args], stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})}
    )
    try:
        with grpc.insecure_channel(address) as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
        yield address
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
