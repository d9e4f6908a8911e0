"""Load generators in their own processes (spawned: no GIL shared with the measuring client,
none with the server).

A `LoadProcess` runs grpc.aio calls of prepared request bytes: `rate` keeps `concurrency`
calls of one method in flight for a while and counts answers (throughput rows); `start` /
`stop` loop one request (or a stream of fresh ones) until told to stop (the "while a slow
rpc runs" rows). Requests are serialised protobufs, the very messages `prebake.client.Client`
would send, so the load costs the client as little as possible and the same for the subject
and its baseline.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import grpc

# Send limit of load channels: the "1M-entry" lookup is about 13 MB (refused by the server).
_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
# Connections per load process of a throughput window, each its own (no shared subchannel).
RATE_CHANNELS = 4
_SPREAD_OPTIONS = [*_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]


def fresh_misses(start: int) -> Callable[[int], bytes]:
    """Lookups (report-only) of keys nobody holds, a new one per call: each a real near-miss
    computation (a repeated key would be answered from the near-miss memo)."""
    from bench.registry_scale import HOT_MODEL, INSTANCE
    from prebake.v1 import key_pb2, registry_pb2

    def make(i: int) -> bytes:
        key = key_pb2.ArtifactKey(
            kind=key_pb2.ARTIFACT_KIND_INDUCTOR,
            model=HOT_MODEL,
            instance_type=INSTANCE,
            sequence_length=start + i,
            batch_size=1,
            precision="fp32",
        )
        return registry_pb2.LookupRequest(key=key, on_miss=registry_pb2.ON_MISS_REPORT).SerializeToString()

    return make


async def _rate(address: str, method: str, body: bytes, concurrency: int, seconds: float) -> dict[str, Any]:
    codes: Counter[str] = Counter()
    # Several connections, as many deployers make: the kernel spreads connections (not rpcs)
    # over a server's processes (`serve --processes N`).
    channels = [grpc.aio.insecure_channel(address, options=_SPREAD_OPTIONS) for _ in range(RATE_CHANNELS)]
    try:
        calls = [channel.unary_unary(method, None, None) for channel in channels]
        deadline = time.perf_counter() + seconds

        async def one(i: int) -> None:
            call = calls[i % len(calls)]
            while time.perf_counter() < deadline:
                try:
                    await call(body, timeout=30)
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code().name] += 1

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(concurrency)))
        return {"codes": dict(codes), "seconds": time.perf_counter() - started}
    finally:
        for channel in channels:
            await channel.close(None)


async def _loop(
    address: str,
    method: str,
    body: bytes | Callable[[int], bytes],
    conn: multiprocessing.connection.Connection,
) -> dict[str, Any]:
    codes: Counter[str] = Counter()
    times: list[float] = []
    async with grpc.aio.insecure_channel(address, options=_OPTIONS) as channel:
        call = channel.unary_unary(method, None, None)
        i = 0
        while not conn.poll():
            request = body(i) if callable(body) else body
            i += 1
            started = time.perf_counter()
            try:
                await call(request, timeout=120)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] += 1
            times.append(time.perf_counter() - started)
    conn.recv()
    return {"codes": dict(codes), "seconds": times}


def _main(conn: multiprocessing.connection.Connection) -> None:
    while True:
        command = conn.recv()
        if command[0] == "exit":
            return
        if command[0] == "rate":
            conn.send(asyncio.run(_rate(*command[1:])))
        elif command[0] == "loop":
            _, address, method, body = command
            if isinstance(body, tuple):  # ("fresh_misses", start)
                body = fresh_misses(body[1])
            conn.send("started")
            conn.send(asyncio.run(_loop(address, method, body, conn)))


class LoadProcess:
    """One spawned load process; use as a context manager."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_main, args=(child,), daemon=True)
        self._proc.start()

    @property
    def pid(self) -> int:
        assert self._proc.pid is not None
        return self._proc.pid

    def rate_begin(self, address: str, method: str, body: bytes, concurrency: int, seconds: float) -> None:
        self._conn.send(("rate", address, method, body, concurrency, seconds))

    def rate_end(self) -> dict[str, Any]:
        result: dict[str, Any] = self._conn.recv()
        return result

    def start(self, address: str, method: str, body: bytes | tuple[str, int]) -> None:
        """Loop `method` with `body` (or ("fresh_misses", start): a fresh miss per call) until `stop`."""
        self._conn.send(("loop", address, method, body))
        assert self._conn.recv() == "started"

    def stop(self) -> dict[str, Any]:
        self._conn.send("stop")
        result: dict[str, Any] = self._conn.recv()
        return result

    def close(self) -> None:
        self._conn.send(("exit",))
        self._proc.join(timeout=30)

    def __enter__(self) -> LoadProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
