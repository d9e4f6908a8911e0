"""Abuse limits under load: a lookup's latency while other clients flood the server, as a
ratio to the same lookup on an idle server, and the server's memory.

One `prebake serve` process. A measuring client looks the same key up again and again:
first with the server idle, then while `--flooders` processes send the issue's request
(a lookup with a million `options` entries, about 13 MB) as fast as they are answered,
and then while also `--stalled` uploads sit open without sending anything. Reported:
p50 and p99 of each phase, their ratios to idle, how the huge requests were answered,
and the server's resident memory after each phase.

Usage: python -m bench.limits [--lookups N] [--flooders N] [--stalled N] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import multiprocessing.synchronize
import os
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc

from bench.common import KEY, served
from prebake.client import Client
from prebake.core.digests import hash_bytes
from prebake.v1 import blobs_pb2, blobs_pb2_grpc, registry_pb2


def huge_lookup() -> bytes:
    request = registry_pb2.LookupRequest(key=KEY.to_proto())
    for i in range(1_000_000):
        request.key.options[f"o{i}"] = "x"
    return request.SerializeToString()


def flood(
    address: str, body: bytes, stop: multiprocessing.synchronize.Event, answers: multiprocessing.Queue[str]
) -> None:
    seen: Counter[str] = Counter()
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        call = channel.unary_unary("/prebake.v1.Registry/Lookup", None, None)
        while not stop.is_set():
            try:
                call(body, timeout=60)
                seen["OK"] += 1
            except grpc.RpcError as exc:
                seen[exc.code().name] += 1
    answers.put(json.dumps(seen))


def server_rss_mib(address: str) -> float:
    """Resident memory of the `prebake serve` process listening on `address`."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"serve" in cmdline and address.encode() in cmdline:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            continue
    return float("nan")


def latencies(client: Client, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        client.lookup(KEY, on_miss="report")
        out.append(time.perf_counter() - start)
    return out


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) >= 2 else values[0]


def stalled_uploads(
    address: str, n: int, release: threading.Event
) -> Iterator[grpc.Future[blobs_pb2.WriteResponse]]:
    channel = grpc.insecure_channel(address)
    stub = blobs_pb2_grpc.BlobsStub(channel)
    for i in range(n):
        data = f"stalled-{i}".encode() * 1000
        first = blobs_pb2.WriteRequest(
            upload_id=f"stalled-{i}",
            digest=blobs_pb2.Digest(hash=hash_bytes(data), size_bytes=len(data)),
            data=data[:4096],
        )

        def requests(first: blobs_pb2.WriteRequest = first) -> Iterator[blobs_pb2.WriteRequest]:
            yield first
            release.wait(600)

        yield stub.Write.future(requests(), timeout=600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lookups", type=int, default=300)
    parser.add_argument("--flooders", type=int, default=4)
    parser.add_argument("--stalled", type=int, default=300)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    body = huge_lookup()
    results: dict[str, object] = {"huge_request_bytes": len(body)}
    with (
        tempfile.TemporaryDirectory() as tmp,
        served(Path(tmp) / "data") as address,
        Client(address) as client,
    ):
        latencies(client, 20)  # warm up
        idle = latencies(client, args.lookups)
        results["rss_idle_mib"] = server_rss_mib(address)
        stop = multiprocessing.Event()
        answers: multiprocessing.Queue[str] = multiprocessing.Queue()
        flooders = [
            multiprocessing.Process(target=flood, args=(address, body, stop, answers))
            for _ in range(args.flooders)
        ]
        for f in flooders:
            f.start()
        time.sleep(2)  # the flood under way
        flooded = latencies(client, args.lookups)
        results["rss_flood_mib"] = server_rss_mib(address)
        release = threading.Event()
        uploads = list(stalled_uploads(address, args.stalled, release))
        time.sleep(2)
        both = latencies(client, args.lookups)
        results["rss_flood_and_stalled_mib"] = server_rss_mib(address)
        stop.set()
        release.set()
        huge_answers: Counter[str] = Counter()
        for f in flooders:
            huge_answers.update(json.loads(answers.get(timeout=120)))
            f.join()
        upload_answers: Counter[str] = Counter()
        for u in uploads:
            try:
                u.result(timeout=120)
                upload_answers["OK"] += 1
            except grpc.RpcError as exc:
                upload_answers[exc.code().name] += 1
    for name, values in (("idle", idle), ("flood", flooded), ("flood_and_stalled", both)):
        results[f"{name}_p50_ms"] = round(p(values, 50) * 1e3, 3)
        results[f"{name}_p99_ms"] = round(p(values, 99) * 1e3, 3)
        if name != "idle":
            results[f"{name}_p99_ratio"] = round(p(values, 99) / p(idle, 99), 2)
    results["huge_answers"] = dict(huge_answers)
    results["stalled_upload_answers"] = dict(upload_answers)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for k, v in results.items():
            print(f"{k:>32}: {v}")


if __name__ == "__main__":
    main()
