"""`prebake serve --processes N`: serving processes sharing one port over one store.

Real `prebake serve` subprocesses on loopback; which process holds a connection is read
from /proc (the kernel spreads connections over the SO_REUSEPORT group).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from prebake.client import Client
from tests.conftest import LLAMA3_8B_INF2
from tests.processes import PREBAKE, ServerProcess, alive, children_of, free_port, wait_until

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT groups and /proc are Linux's")

KEY = LLAMA3_8B_INF2
ESTABLISHED = "01"


def started(server: ServerProcess) -> ServerProcess:
    """Wait until the primary says all its serving processes serve."""
    server.wait_ready()
    wait_until(lambda: "processes on one port" in server.log(), 60, "the serving processes to start")
    return server


def serving_pids(server: ServerProcess) -> list[int]:
    return [pid for pid in children_of(server.proc.pid) if "serving_process" in _cmdline(pid)]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def connected_pids(port: int, pids: list[int]) -> set[int]:
    """Those of `pids` holding an established connection accepted on `port`."""
    inodes = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == ESTABLISHED and int(fields[1].rpartition(":")[2], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    found = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) in inodes:
                    found.add(pid)
            except OSError:
                continue
    return found


def test_every_process_answers_from_the_one_store(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, "pair", ["--processes", "2", "--data-dir", str(tmp_path / "d")])
    try:
        started(server)
        (child,) = wait_until(lambda: serving_pids(server), 30, "the serving process")
        src = tmp_path / "artifact"
        src.mkdir()
        (src / "model.neff").write_bytes(os.urandom(4096))
        port = int(server.address.rpartition(":")[2])
        clients = [Client(server.address) for _ in range(16)]
        try:
            published = clients[0].publish(src, KEY).artifact.artifact_id
            # Every client its own connection; whichever process accepted it answers a hit
            # for what was published through another.
            for client in clients:
                hit = client.lookup(KEY)
                assert hit.artifact.artifact_id == published
            assert connected_pids(port, [server.proc.pid, child]) == {server.proc.pid, child}
        finally:
            for client in clients:
                client.close()
    finally:
        assert server.stop() == 0, server.log()
    assert not alive(child), "the serving process outlived its primary"


def test_a_port_anything_listens_on_is_refused_even_when_it_shares(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as squatter:
        # The dangerous case: a listener that would let a SO_REUSEPORT bind join it.
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        server = ServerProcess(
            tmp_path,
            "taken",
            ["--processes", "2", "--data-dir", str(tmp_path / "d")],
            address=f"127.0.0.1:{port}",
        )
        assert server.proc.wait(timeout=60) != 0
    assert f"port {port} is in use by pid {os.getpid()}" in server.log()


@pytest.mark.slow
def test_a_dead_serving_process_is_replaced_and_none_outlives_a_killed_primary(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, "restart", ["--processes", "2", "--data-dir", str(tmp_path / "d")])
    try:
        started(server)
        (first,) = wait_until(lambda: serving_pids(server), 30, "the serving process")
        os.kill(first, signal.SIGKILL)
        (second,) = wait_until(
            lambda: [p for p in serving_pids(server) if p != first and alive(p)], 30, "a replacement"
        )
        with Client(server.address) as client:
            assert client.get_stats() is not None
        server.kill()  # no chance to stop its serving processes: they notice on their own
        wait_until(lambda: not alive(second), 15, "the orphaned serving process to stop")
    finally:
        if server.proc.poll() is None:
            server.stop()
    assert "restarting it" in server.log()


def test_processes_must_be_positive(tmp_path: Path) -> None:
    done = subprocess.run(
        [*PREBAKE, "serve", "--processes", "0", "--data-dir", str(tmp_path / "d")],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 10 and "--processes" in done.stderr  # an invalid value
