"""One server per port and per data directory, with real `prebake serve` processes.

A second server on a port in use, or on a data directory in use, must exit at once with a
message naming the first, which keeps serving; a server killed with SIGKILL must not leave
anything behind that blocks the next one.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from prebake.server.app import background_server
from prebake.server.data_dir_lock import LOCK_FILE, DataDirInUse, DataDirLock
from prebake.server.exclusive_bind import CannotListen, listening_owners
from tests.test_cli import free_port, wait_listening

PREBAKE = [sys.executable, "-m", "prebake.client.cli"]
# Bounds, not speed assertions: a refused server exits during start-up, long before these.
REFUSAL_TIMEOUT = 30.0


def serve(data_dir: Path, address: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*PREBAKE, "serve", "--workers", "0", "--listen", address, "--data-dir", str(data_dir)],
        text=True,
        stderr=subprocess.PIPE,
    )


def refused(data_dir: Path, address: str) -> tuple[int, str]:
    """Run a second server that must give up on its own; its exit code and stderr."""
    proc = serve(data_dir, address)
    try:
        _, err = proc.communicate(timeout=REFUSAL_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"a second server on {address} / {data_dir} kept running")
    return proc.returncode, err


def answers(address: str) -> bool:
    """The server at `address` says SERVING and `prebake stats` works against it."""
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    stats = subprocess.run(
        [*PREBAKE, "--server", address, "stats", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return health.status == health_pb2.HealthCheckResponse.SERVING and stats.returncode == 0


@pytest.fixture
def first(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, Path]]:
    address, data_dir = f"127.0.0.1:{free_port()}", tmp_path / "first"
    proc = serve(data_dir, address)
    try:
        wait_listening(address, proc)
        yield proc, address, data_dir
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_a_second_server_on_a_used_port_exits_naming_the_first(
    first: tuple[subprocess.Popen[str], str, Path], tmp_path: Path
) -> None:
    proc, address, _ = first
    code, err = refused(tmp_path / "second", address)
    assert code == 1, err
    assert f"cannot listen on {address}" in err and f"pid {proc.pid} " in err, err
    assert "Traceback" not in err
    assert answers(address)


def test_a_second_server_on_a_used_data_dir_exits_naming_the_first(
    first: tuple[subprocess.Popen[str], str, Path],
) -> None:
    proc, address, data_dir = first
    other = f"127.0.0.1:{free_port()}"
    code, err = refused(data_dir, other)
    assert code == 1, err
    assert f"data directory {data_dir.resolve()} is in use" in err, err
    assert f"pid {proc.pid}," in err and f"address {address}" in err, err
    assert "Traceback" not in err
    # Refused before it bound anything, and the owner's record is intact.
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", int(other.rsplit(":", 1)[1])), 1):
        pass
    assert json.loads((data_dir / LOCK_FILE).read_text())["pid"] == proc.pid
    assert answers(address)


def test_a_killed_servers_data_dir_and_port_serve_the_next_server(tmp_path: Path) -> None:
    address, data_dir = f"127.0.0.1:{free_port()}", tmp_path / "data"
    killed = serve(data_dir, address)
    wait_listening(address, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    # The dead server's record is still in the file; only the kernel's lock is gone.
    assert json.loads((data_dir / LOCK_FILE).read_text())["pid"] == killed.pid

    proc = serve(data_dir, address)
    try:
        wait_listening(address, proc)
        assert answers(address)
        assert json.loads((data_dir / LOCK_FILE).read_text()) == {
            "pid": proc.pid,
            "host": socket.gethostname(),
            "address": address,
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""
    # A clean stop clears the record (and releases the lock).
    assert (data_dir / LOCK_FILE).read_text() == ""


# The same rules in one process (BackgroundServer), and the lock and port owner lookups ---------


def test_in_process_servers_refuse_a_used_port_or_data_dir(tmp_path: Path) -> None:
    with background_server(tmp_path / "a") as server:
        with pytest.raises(CannotListen, match=f"pid {os.getpid()} "):
            background_server(tmp_path / "b", listen=server.address).__enter__()
        with pytest.raises(DataDirInUse, match=f"pid {os.getpid()},"):
            background_server(tmp_path / "a").__enter__()
        assert answers(server.address)
    # Stopped: both are free again (the refused attempts released what they took).
    with background_server(tmp_path / "a", listen=server.address) as again:
        assert answers(again.address)


def test_the_lock_is_exclusive_per_open_and_released_by_release(tmp_path: Path) -> None:
    lock = DataDirLock.acquire(tmp_path / "d", "h:1")
    with pytest.raises(DataDirInUse, match=r"pid \d+, host .+, address h:1"):
        DataDirLock.acquire(tmp_path / "d", "h:2")
    lock.record("h:3")
    with pytest.raises(DataDirInUse, match="address h:3"):
        DataDirLock.acquire(tmp_path / "d", "h:2")
    lock.release()
    lock.release()  # idempotent
    again = DataDirLock.acquire(tmp_path / "d", "h:2")
    again.release()


def test_an_owner_that_has_not_written_its_record_is_reported_as_unknown(tmp_path: Path) -> None:
    import fcntl

    tmp_path.joinpath(LOCK_FILE).write_text("not json")
    with open(tmp_path / LOCK_FILE) as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(DataDirInUse, match="its owner is not recorded"):
            DataDirLock.acquire(tmp_path, "h:1")


def test_listening_owners_finds_the_process_behind_a_port() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        assert listening_owners(port) == []  # bound, not listening
        listener.listen()
        owners = listening_owners(port)
        assert [o.pid for o in owners] == [os.getpid()]
        assert owners[0].uid == os.getuid() and "python" in owners[0].command
    assert listening_owners(port) == []
