"""A TCP proxy on loopback that injects network faults between a client and a server.

    with FaultProxy(server.address) as proxy:
        cut = proxy.cut_after(4 << 20)            # RST the next connection after 4 MiB downstream
        with Client(proxy.address) as client:
            client.fetch(artifact_id, dest)       # the client must survive the reset
        assert cut.fired == 1

The proxy works on bytes, not on gRPC: it cannot see streams, only the TCP connection
that carries all of a channel's HTTP/2 streams. So a fault hits every rpc on that
connection at once, which is what real failures do (a server restart, a load balancer
dropping a flow, a NAT entry expiring).

* `cut_after(n)`: after n more bytes have flowed in the given direction on a connection,
  both of its sockets are closed with SO_LINGER 0, so each peer gets a TCP RST.
* `stall_after(n)`: after n more bytes, the connection forwards nothing more in either
  direction, but both sockets stay open (a black-holed flow) until the proxy closes.

A fault applies to the first `times` connections that reach its threshold (counted from
when the fault was armed, for connections that were already open); after that, traffic
passes untouched, so the client's retry over a new connection succeeds.

One daemon thread runs every socket with `select`; nothing in it blocks for long (the
upstream connect is bounded by `connect_timeout`), and `close()` closes every socket and
joins the thread within a bound. Only loopback upstreams are accepted.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

Direction = Literal["down", "up"]
FaultKind = Literal["cut", "stall"]

_RECV_BYTES = 64 << 10
# Stop reading a side while this much is waiting to be written to the other (backpressure).
_MAX_BUFFERED = 256 << 10
_POLL_SECONDS = 0.2


@dataclass(eq=False)
class Fault:
    """One armed fault plan. `fired` counts the connections it has hit so far."""

    kind: FaultKind
    direction: Direction
    after: int
    times: int
    fired: int = 0
    # Connections this plan has chosen (it may still be flushing up to the threshold).
    claimed: int = 0
    # Bytes already forwarded (per connection id, in `direction`) when the plan was armed.
    baseline: dict[int, int] = field(default_factory=dict)
    _done: threading.Condition = field(default_factory=threading.Condition)

    def wait(self, timeout: float = 10.0) -> bool:
        """Block until the fault has hit `times` connections; False if `timeout` passed first."""
        with self._done:
            return self._done.wait_for(lambda: self.fired >= self.times, timeout)

    def _record_fired(self) -> None:
        with self._done:
            self.fired += 1
            self._done.notify_all()


class _Pipe:
    """One direction of one connection: bytes read from `src`, waiting to go to `dst`."""

    def __init__(self, direction: Direction, src: socket.socket, dst: socket.socket) -> None:
        self.direction = direction
        self.src = src
        self.dst = dst
        self.buffer = bytearray()
        # Bytes read from `src` (and so committed to be forwarded) on this connection.
        self.taken = 0
        self.eof = False
        self.shut = False


class _Connection:
    def __init__(self, ident: int, client: socket.socket, upstream: socket.socket) -> None:
        self.ident = ident
        self.client = client
        self.upstream = upstream
        self.down = _Pipe("down", upstream, client)
        self.up = _Pipe("up", client, upstream)
        self.stalled = False
        # A cut fault hit this connection: reset it once `cut_pipe` has flushed its buffer.
        self.cut: Fault | None = None
        self.cut_pipe: _Pipe | None = None
        self.closed = False

    def pipes(self) -> tuple[_Pipe, _Pipe]:
        return self.down, self.up


def _check_loopback(host: str) -> None:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve {host!r}: {exc}") from None
    for info in infos:
        if not ipaddress.ip_address(info[4][0]).is_loopback:
            raise ValueError(f"FaultProxy only forwards to loopback addresses, not {host!r}")


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, not {address!r}")
    return host.strip("[]"), int(port)


def _reset(sock: socket.socket) -> None:
    """Close `sock` so that the peer sees a TCP RST, not an orderly FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class FaultProxy:
    """A threaded TCP proxy from 127.0.0.1:<ephemeral> to the loopback `upstream` "HOST:PORT".

    Use as a context manager (or call `close()`). `address` is what clients dial. The
    counters `bytes_down` (server to client), `bytes_up` and `connections` cover the
    proxy's whole life.
    """

    def __init__(self, upstream: str, *, connect_timeout: float = 5.0) -> None:
        host, port = _split_address(upstream)
        _check_loopback(host)
        self._upstream = (host, port)
        self._connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._conns: dict[int, _Connection] = {}
        self._ids = itertools.count(1)
        self._bytes = {"down": 0, "up": 0}
        self._connections = 0
        self._closing = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()

    # Test-facing API -------------------------------------------------------------------

    def cut_after(self, n_bytes: int, direction: Direction = "down", times: int = 1) -> Fault:
        """Reset the next `times` connections once `n_bytes` more have flowed in `direction`."""
        return self._arm("cut", n_bytes, direction, times)

    def stall_after(self, n_bytes: int, direction: Direction = "down", times: int = 1) -> Fault:
        """Freeze the next `times` connections once `n_bytes` more have flowed in `direction`."""
        return self._arm("stall", n_bytes, direction, times)

    def clear_faults(self) -> None:
        """Disarm every fault not yet spent: new traffic flows normally again.

        Connections already stalled stay stalled (as a dead NAT entry would); clients
        recover by opening new ones.
        """
        with self._lock:
            self._faults.clear()

    @property
    def bytes_down(self) -> int:
        with self._lock:
            return self._bytes["down"]

    @property
    def bytes_up(self) -> int:
        with self._lock:
            return self._bytes["up"]

    @property
    def connections(self) -> int:
        """Connections accepted so far."""
        with self._lock:
            return self._connections

    def close(self) -> None:
        """Close the listener and every connection (with a reset) and stop the thread."""
        with self._lock:
            self._closing = True
        self._wake()
        self._thread.join(timeout=5.0)
        if self._thread.is_alive():  # pragma: no cover - the loop polls every 0.2 s
            raise RuntimeError("the fault proxy thread did not stop")
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FaultProxy({self.address} -> {self._upstream[0]}:{self._upstream[1]})"

    def _arm(self, kind: FaultKind, n_bytes: int, direction: Direction, times: int) -> Fault:
        if n_bytes < 0 or times < 1:
            raise ValueError("n_bytes must be >= 0 and times >= 1")
        if direction not in ("down", "up"):
            raise ValueError(f"direction must be 'down' or 'up', not {direction!r}")
        fault = Fault(kind=kind, direction=direction, after=n_bytes, times=times)
        with self._lock:
            for conn in self._conns.values():
                pipe = conn.down if direction == "down" else conn.up
                fault.baseline[conn.ident] = pipe.taken
            self._faults.append(fault)
        return fault

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    # The event loop (proxy thread only) ------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._closing:
                        return
                    conns = list(self._conns.values())
                readers: list[socket.socket] = [self._listener, self._wake_r]
                writers: list[socket.socket] = []
                for conn in conns:
                    for pipe in conn.pipes():
                        if pipe.buffer:
                            writers.append(pipe.dst)
                        elif not conn.stalled and not pipe.eof and conn.cut is None:
                            readers.append(pipe.src)
                readable, writable, _ = select.select(readers, writers, [], _POLL_SECONDS)
                if self._wake_r in readable:
                    self._drain_wake()
                if self._listener in readable:
                    self._accept()
                for conn in conns:
                    self._service(conn, readable, writable)
        finally:
            self._shutdown()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        try:
            upstream = socket.create_connection(self._upstream, timeout=self._connect_timeout)
        except OSError:
            _reset(client)
            return
        for sock in (client, upstream):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            conn = _Connection(next(self._ids), client, upstream)
            self._conns[conn.ident] = conn
            self._connections += 1

    def _service(
        self, conn: _Connection, readable: list[socket.socket], writable: list[socket.socket]
    ) -> None:
        try:
            for pipe in conn.pipes():
                if conn.closed:
                    return
                if pipe.buffer and pipe.dst in writable:
                    self._send(pipe)
                if not pipe.buffer and conn.cut is not None and conn.cut_pipe is pipe:
                    self._abort(conn)
                    return
                if pipe.src in readable and not conn.stalled and conn.cut is None:
                    self._receive(conn, pipe)
                if pipe.eof and not pipe.buffer and not pipe.shut:
                    pipe.shut = True
                    pipe.dst.shutdown(socket.SHUT_WR)
            if conn.down.shut and conn.up.shut:
                self._discard(conn)
                conn.client.close()
                conn.upstream.close()
        except OSError:
            # A peer reset or vanished: pass the reset on to the other side.
            self._abort(conn)

    def _send(self, pipe: _Pipe) -> None:
        try:
            sent = pipe.dst.send(pipe.buffer)
        except (BlockingIOError, InterruptedError):
            return
        del pipe.buffer[:sent]
        with self._lock:
            self._bytes[pipe.direction] += sent

    def _receive(self, conn: _Connection, pipe: _Pipe) -> None:
        if len(pipe.buffer) >= _MAX_BUFFERED:
            return
        try:
            data = pipe.src.recv(_RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            pipe.eof = True
            return
        fault, allowed = self._due_fault(conn, pipe, len(data))
        if fault is None:
            pipe.buffer += data
            pipe.taken += len(data)
            return
        # Forward exactly up to the threshold, then fault.
        pipe.buffer += data[:allowed]
        pipe.taken += allowed
        if fault.kind == "stall":
            conn.stalled = True
            fault._record_fired()
        else:
            conn.cut = fault
            conn.cut_pipe = pipe

    def _due_fault(self, conn: _Connection, pipe: _Pipe, incoming: int) -> tuple[Fault | None, int]:
        """The first armed fault this read reaches, and how many of its bytes may pass first."""
        with self._lock:
            for fault in self._faults:
                if fault.direction != pipe.direction or fault.claimed >= fault.times:
                    continue
                done = pipe.taken - fault.baseline.get(conn.ident, 0)
                allowed = max(0, fault.after - done)
                if incoming > allowed:
                    fault.claimed += 1
                    return fault, allowed
        return None, incoming

    def _abort(self, conn: _Connection) -> None:
        if conn.closed:
            return
        self._discard(conn)
        _reset(conn.client)
        _reset(conn.upstream)
        if conn.cut is not None:
            conn.cut._record_fired()

    def _discard(self, conn: _Connection) -> None:
        conn.closed = True
        with self._lock:
            self._conns.pop(conn.ident, None)

    def _shutdown(self) -> None:
        with self._lock:
            conns = list(self._conns.values())
            self._conns.clear()
        for conn in conns:
            conn.closed = True
            _reset(conn.client)
            _reset(conn.upstream)
        self._listener.close()


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.01) -> bool:
    """Poll `predicate()` until it is true or `timeout` passes; returns its last verdict."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
