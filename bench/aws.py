"""The S3 + DynamoDB backends, as ratios against baselines measured in the same run.

Against moto in server mode on loopback (started here, threaded), so these figures measure
prebake's code paths, not AWS: S3's and DynamoDB's own latency and bandwidth are not in them.

- download of one blob (default 1 GiB), interleaved rounds of:
  presigned (`Client.fetch` reading the presigned S3 URL, verified, fsynced, placed),
  streaming (`Client.fetch` through the server: the replica reads S3 and streams over gRPC),
  and the baseline, boto3 `get_object` streaming the same object into a file (no verification,
  no fsync). Reported as throughput and as time over the baseline's.
- lookup hit latency: the same hit on a server with a DynamoDB registry (with the replica's
  hit cache, and without it: `PREBAKE_HIT_CACHE_SECONDS=0`) and on one with the embedded
  SQLite registry, each over the health `Check` floor of its own server, interleaved.

Usage: python -m bench.aws [--size-mib N] [--rounds N] [--lookups N] [--json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import boto3
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.common import KEY, per_call_us, served
from prebake.client import Client
from tests.aws_emulator import Emulator, running_emulator

CHUNK = 1 << 20


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@contextmanager
def aws_server(
    emulator: Emulator, work: Path, name: str, store: str, registry: str, **env: str
) -> Iterator[str]:
    """A server on the emulator's S3 bucket and DynamoDB tables (created if missing)."""
    args = ["--store", store, "--registry", registry, "--create-tables"]
    with served(work / name, args=args, env={**emulator.env, **env}) as address:
        yield address


def boto3_get(emulator: Emulator, bucket: str, key: str, dest: Path) -> None:
    s3 = boto3.client("s3", endpoint_url=emulator.endpoint)
    body = s3.get_object(Bucket=bucket, Key=key)["Body"]
    with open(dest, "wb") as out:
        for chunk in body.iter_chunks(CHUNK):
            out.write(chunk)


def lookup_over_floor(address: str, n: int) -> tuple[float, float]:
    with Client(address) as client, grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest(service="")
        floor = per_call_us(lambda: health.Check(check), n)
        hit = per_call_us(lambda: client.lookup(KEY, on_miss="report"), n)
        return hit, floor


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="blob size for the download benchmark")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--lookups", type=int, default=1000, help="lookups per round and server")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="prebake-bench-aws-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        emulator = stack.enter_context(running_emulator(serial=False))
        emulator.apply()
        bucket = emulator.create_bucket("prebake-bench")
        store, tables = f"s3://{bucket}/bench", f"dynamodb://{emulator.unique_name('bench')}"
        src = work / "src"
        src.mkdir()
        with open(src / "model.neff", "wb") as out:
            for _ in range(args.size_mib):
                out.write(os.urandom(CHUNK))
        aws = stack.enter_context(aws_server(emulator, work, "aws", store, tables))
        uncached = stack.enter_context(
            aws_server(emulator, work, "uncached", store, tables, PREBAKE_HIT_CACHE_SECONDS="0")
        )
        local = stack.enter_context(served(work / "local"))
        with Client(aws) as client:
            artifact = client.publish(src, KEY).artifact
        with Client(local) as client:
            client.publish(src, KEY)
        digest = artifact.files[0].digest
        blob_key = f"bench/blobs/{digest.hash[:2]}/{digest.hash}-{digest.size_bytes}"

        direct: list[float] = []
        streamed: list[float] = []
        baseline: list[float] = []
        with Client(aws, direct_download=True) as d, Client(aws, direct_download=False) as s:
            for i in range(args.rounds):
                baseline.append(
                    timed(functools.partial(boto3_get, emulator, bucket, blob_key, work / f"b{i}"))
                )
                (work / f"b{i}").unlink()
                fetched = d.fetch(d.get_artifact(artifact.artifact_id), work / f"d{i}")
                assert fetched.bytes_direct == fetched.total_bytes, "the presigned path was not taken"
                direct.append(fetched.seconds)
                shutil.rmtree(work / f"d{i}")
                fetched = s.fetch(s.get_artifact(artifact.artifact_id), work / f"s{i}")
                assert fetched.bytes_direct == 0
                streamed.append(fetched.seconds)
                shutil.rmtree(work / f"s{i}")
        mib = float(args.size_mib)
        b, d_, s_ = statistics.median(baseline), statistics.median(direct), statistics.median(streamed)
        results.update(
            {
                "boto3_get_object_mib_s": mib / b,
                "presigned_fetch_mib_s": mib / d_,
                "streamed_fetch_mib_s": mib / s_,
                "presigned_over_boto3_time": d_ / b,
                "streamed_over_boto3_time": s_ / b,
                "streamed_over_presigned_time": s_ / d_,
            }
        )

        servers = {"dynamodb": aws, "dynamodb_uncached": uncached, "sqlite": local}
        for address in servers.values():
            lookup_over_floor(address, 100)  # warm
        hits: dict[str, list[float]] = {name: [] for name in servers}
        ratios: dict[str, list[float]] = {name: [] for name in servers}
        for _ in range(args.rounds):
            for name, address in servers.items():
                hit, floor = lookup_over_floor(address, args.lookups)
                hits[name].append(hit)
                ratios[name].append(hit / floor)
        for name in servers:
            results[f"lookup_hit_us_{name}"] = statistics.median(hits[name])
            results[f"lookup_over_floor_{name}"] = statistics.median(ratios[name])
        results["lookup_dynamodb_over_sqlite"] = statistics.median(hits["dynamodb"]) / statistics.median(
            hits["sqlite"]
        )
        results["lookup_dynamodb_uncached_over_sqlite"] = statistics.median(
            hits["dynamodb_uncached"]
        ) / statistics.median(hits["sqlite"])
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        width = max(map(len, results))
        for name, value in results.items():
            print(f"{name:<{width}}  {value:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
