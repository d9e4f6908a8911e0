"""Does one slow rpc block the others? Check p99 from a second client while another process
repeats a slow rpc, against Check p99 with the server idle, in alternating phases.

The slow rpcs: GetStats, a deep ListArtifacts page, a hot miss (a fresh key of the model
holding 10% of the registry, so its near misses are computed each time), and the largest
request the contract allows: FindMissingBlobs with its limit of 10,000 digests (about 640 kB).
A literal 1M-entry request is not legal in any rpc: every per-method limit is far below it;
the issue's million-option Lookup (about 13 MB) is measured too, as `block-huge`, and is
refused by gRPC on its length before Python sees it.
"""

from __future__ import annotations

import os
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.load import LoadProcess
from bench.report import Row
from prebake.core.digests import hash_bytes
from prebake.server.services.blobs_service import MAX_FIND
from prebake.v1 import admin_pb2, blobs_pb2, registry_pb2


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def _checks(stub: health_pb2_grpc.HealthStub, calls: int, seconds: float) -> list[float]:
    out: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(out) < calls and time.perf_counter() < deadline:
        started = time.perf_counter()
        stub.Check(health_pb2.HealthCheckRequest(), timeout=120)
        out.append((time.perf_counter() - started) * 1e3)
    return out


def slow_requests(deep_token: str, huge: bool) -> dict[str, tuple[str, str, bytes | tuple[str, int]]]:
    """name -> (what, method, request bytes or a fresh-miss generator)."""
    digests = [blobs_pb2.Digest(hash=hash_bytes(os.urandom(16)), size_bytes=1 + i) for i in range(MAX_FIND)]
    out: dict[str, tuple[str, str, bytes | tuple[str, int]]] = {
        "block-stats": (
            "GetStats",
            "/prebake.v1.Admin/GetStats",
            admin_pb2.GetStatsRequest().SerializeToString(),
        ),
        "block-deep": (
            "a deep ListArtifacts page",
            "/prebake.v1.Admin/ListArtifacts",
            admin_pb2.ListArtifactsRequest(page_token=deep_token).SerializeToString(),
        ),
        "block-miss": ("a hot miss", "/prebake.v1.Registry/Lookup", ("fresh_misses", 200_000)),
        "block-find": (
            f"FindMissingBlobs of {MAX_FIND:,} digests",
            "/prebake.v1.Blobs/FindMissingBlobs",
            blobs_pb2.FindMissingBlobsRequest(digests=digests).SerializeToString(),
        ),
    }
    if huge:
        request = registry_pb2.LookupRequest()
        request.key.model = "bench/hot-model"
        for i in range(1_000_000):
            request.key.options[f"o{i}"] = "x"
        out["block-huge"] = (
            "a 1M-option Lookup (13 MB, refused)",
            "/prebake.v1.Registry/Lookup",
            request.SerializeToString(),
        )
    return out


def blocking(
    address: str, deep_token: str, *, rounds: int, calls: int, seconds: float, huge: bool
) -> list[Row]:
    rows = []
    with grpc.insecure_channel(address) as channel, LoadProcess() as load:
        stub = health_pb2_grpc.HealthStub(channel)
        _checks(stub, 50, 5)  # warm up
        for name, (what, method, body) in slow_requests(deep_token, huge).items():
            row = Row(name, f"Check p99 while {what} runs", "idle Check p99", "ms")
            slow: list[float] = []
            codes: dict[str, int] = {}
            for _ in range(rounds):
                idle = _checks(stub, calls, seconds)
                load.start(address, method, body)
                time.sleep(0.2)  # the slow rpc under way
                busy = _checks(stub, calls, seconds)
                result = load.stop()
                slow.extend(result["seconds"])
                for code, n in result["codes"].items():
                    codes[code] = codes.get(code, 0) + n
                row.add(_p99(busy), _p99(idle))
            slow.sort()
            row.extra = {
                "slow_rpc_codes": codes,
                "slow_rpc_median_ms": slow[len(slow) // 2] * 1e3 if slow else None,
            }
            row.note = (
                f"the slow rpc took {row.extra['slow_rpc_median_ms']:.1f} ms (median), answers {codes}"
                if slow
                else "the slow rpc never completed"
            )
            rows.append(row)
    return rows
