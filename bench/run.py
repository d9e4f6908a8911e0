"""prebake benchmarks, each a ratio against a baseline measured in the same run.

These machines are noisy, so absolute numbers mean little: every figure is paired with
the closest thing that does the same unavoidable work without prebake, run alternately
in the same process, and the median of several rounds is reported.

- lookup hit vs. the gRPC floor: `Registry.Lookup` (normalise the key, SQLite point
  query, manifest) against the standard health `Check` rpc on the same server.
- fetch vs. raw streaming: `Client.fetch` (verified read, hashing, fsync, atomic
  placement) against a bare `Blobs.Read` stream of the same blob written to the same
  disk without verification or fsync.
- publish vs. raw upload: `Client.publish` of a fresh artifact against a bare
  `Blobs.Write` of the same bytes under a new upload id.

Usage: python bench/run.py [--size-mib N] [--rounds N] [--lookups N] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.common import served
from prebake.client import ArtifactKey, Client
from prebake.core.digests import hash_file
from prebake.v1 import blobs_pb2, blobs_pb2_grpc

KEY = ArtifactKey(
    kind="neuron",
    model="meta-llama/Meta-Llama-3-8B",
    instance_type="ml.inf2.48xlarge",
    sequence_length=8192,
    batch_size=8,
    tensor_parallel_degree=24,
    precision="bf16",
)
CHUNK = 1 << 20


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def per_call_us(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def bench_lookup(client: Client, channel: grpc.Channel, n: int, rounds: int) -> dict[str, float]:
    health = health_pb2_grpc.HealthStub(channel)
    check = health_pb2.HealthCheckRequest(service="")
    for _ in range(200):  # warm both paths
        health.Check(check)
        client.lookup(KEY)
    floor, lookup = [], []
    for _ in range(rounds):
        floor.append(per_call_us(lambda: health.Check(check), n))
        lookup.append(per_call_us(lambda: client.lookup(KEY), n))
    f, m = statistics.median(floor), statistics.median(lookup)
    return {"grpc_floor_us": f, "lookup_hit_us": m, "lookup_over_floor": m / f}


def raw_read(stub: blobs_pb2_grpc.BlobsStub, digest: blobs_pb2.Digest, dest: Path) -> None:
    with open(dest, "wb") as out:
        for chunk in stub.Read(blobs_pb2.ReadRequest(digest=digest)):
            out.write(chunk.data)


def raw_write(stub: blobs_pb2_grpc.BlobsStub, digest: blobs_pb2.Digest, src: Path, upload_id: str) -> None:
    def messages():  # type: ignore[no-untyped-def]
        offset = 0
        with open(src, "rb") as f:
            while chunk := f.read(CHUNK):
                yield blobs_pb2.WriteRequest(upload_id=upload_id, digest=digest, offset=offset, data=chunk)
                offset += len(chunk)
        yield blobs_pb2.WriteRequest(offset=offset, finish_write=True)

    stub.Write(messages())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256, help="artifact size for transfer benchmarks")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--lookups", type=int, default=2000, help="lookups per round")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="prebake-bench-") as tmp:
        work = Path(tmp)
        src = work / "src"
        src.mkdir()
        (src / "model.neff").write_bytes(os.urandom(args.size_mib << 20))
        with served(work / "data") as address:
            run(args, work, src, address, results)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        width = max(map(len, results))
        for name, value in results.items():
            print(f"{name:<{width}}  {value:10.2f}")
    return 0


def run(args: argparse.Namespace, work: Path, src: Path, address: str, results: dict[str, float]) -> None:
    with Client(address) as client, grpc.insecure_channel(address) as channel:
        stub = blobs_pb2_grpc.BlobsStub(channel)
        artifact_id = client.publish(src, KEY).artifact.artifact_id
        h, size = hash_file(src / "model.neff")
        digest = blobs_pb2.Digest(hash=h, size_bytes=size)
        results.update(bench_lookup(client, channel, args.lookups, args.rounds))
        raw, fetched = [], []
        for i in range(args.rounds):
            raw.append(timed(lambda i=i: raw_read(stub, digest, work / f"raw{i}")))
            fetched.append(timed(lambda i=i: client.fetch(artifact_id, work / f"fetch{i}")))
            (work / f"raw{i}").unlink()
            shutil.rmtree(work / f"fetch{i}")
        mib = float(args.size_mib)
        results["raw_read_mib_s"] = mib / statistics.median(raw)
        results["fetch_mib_s"] = mib / statistics.median(fetched)
        results["fetch_over_raw_read_time"] = statistics.median(fetched) / statistics.median(raw)
        up_raw, up_pub = [], []
        for i in range(args.rounds):
            # Fresh bytes each round so neither path finds the blob already stored.
            (src / "model.neff").write_bytes(os.urandom(args.size_mib << 20))
            h, size = hash_file(src / "model.neff")
            fresh = blobs_pb2.Digest(hash=h, size_bytes=size)
            up_raw.append(timed(lambda f=fresh, i=i: raw_write(stub, f, src / "model.neff", f"bench-{i}")))
            (src / "model.neff").write_bytes(os.urandom(args.size_mib << 20))
            key = dataclasses.replace(KEY, batch_size=100 + i)
            up_pub.append(timed(lambda k=key: client.publish(src, k)))
        results["raw_write_mib_s"] = mib / statistics.median(up_raw)
        results["publish_mib_s"] = mib / statistics.median(up_pub)
        results["publish_over_raw_write_time"] = statistics.median(up_pub) / statistics.median(up_raw)


if __name__ == "__main__":
    sys.exit(main())
