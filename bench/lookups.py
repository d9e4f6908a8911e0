"""Lookups and registry reads: latency at concurrency 1, throughput at 64, scale 1k vs 1M,
a stampede of misses, GetStats and deep pages.

Latency rows alternate subject and baseline call by call (ABAB...) through the public
`prebake.client.Client`; a round's figure is the median of its calls. The throughput row
alternates windows of a few seconds, each driven by `LoadProcess`es (grpc.aio, serialised
requests) so that the load generator is cheap and the same for both sides.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.common import ServerProcess, tree_cpu_seconds
from bench.load import LoadProcess
from bench.registry_scale import BASE_TIME, Registry, hot_key, key_at, miss_key
from bench.report import Row
from prebake.client import ArtifactKey, Client
from prebake.server.instance_catalog import InstanceCatalog
from prebake.server.key_normalization import KeyRequest, normalize_key
from prebake.server.storage import page_tokens
from prebake.server.storage.sqlite.artifact_index import TOKEN_TAG
from prebake.v1 import registry_pb2

CHECK = health_pb2.HealthCheckRequest()
LOOKUP_METHOD = "/prebake.v1.Registry/Lookup"
CHECK_METHOD = "/grpc.health.v1.Health/Check"


def artifact_key(request: KeyRequest) -> ArtifactKey:
    return ArtifactKey(
        kind=request.kind,
        model=request.model,
        instance_type=request.instance_type,
        sequence_length=request.sequence_length,
        batch_size=request.batch_size,
        precision=request.precision,
    )


def _ms(fn: Callable[[int], object], i: int) -> float:
    started = time.perf_counter()
    fn(i)
    return (time.perf_counter() - started) * 1e3


# Each latency row gets at most this many seconds in all (beyond a first few pairs per
# round), so that a slow subject (a miss at 1M) bounds its own sample instead of the run's time.
ROW_SECONDS = 15.0
MIN_PAIRS = 3


def alternate(
    row: Row, subject: Callable[[int], object], baseline: Callable[[int], object], rounds: int, calls: int
) -> Row:
    """Call subject(i) and baseline(i) alternately up to `calls` times a round (fewer once the
    round has used its share of `ROW_SECONDS`, never fewer than `MIN_PAIRS`); add each
    round's medians (ms)."""
    subject(-1)
    baseline(-1)  # warm both paths
    i = 0
    for r in range(rounds):
        a: list[float] = []
        b: list[float] = []
        deadline = time.perf_counter() + ROW_SECONDS / rounds
        while len(a) < calls and (len(a) < MIN_PAIRS or time.perf_counter() < deadline):
            # Who goes first alternates by round, so neither always follows the other.
            if r % 2:
                b.append(_ms(baseline, i))
                a.append(_ms(subject, i))
            else:
                a.append(_ms(subject, i))
                b.append(_ms(baseline, i))
            i += 1
        row.add(statistics.median(a), statistics.median(b))
    row.extra["pairs"] = i
    return row


def hit_vs_check(client: Client, registry: Registry, rounds: int, calls: int) -> Row:
    health = health_pb2_grpc.HealthStub(client._conn.stubs.channel)  # the channel the lookups use
    keys = [artifact_key(registry.hot_key(i)) for i in range(min(100, registry.hot_count))]
    row = Row(
        "hit-c1",
        f"lookup hit p50, c=1, {registry.size:,} artifacts",
        "health Check, same server and channel",
        "ms",
    )
    return alternate(
        row, lambda i: client.lookup(keys[i % len(keys)]), lambda i: health.Check(CHECK), rounds, calls
    )


def across(
    name: str,
    what: str,
    clients: tuple[Client, Client],
    call: Callable[[Client, int], object],
    *,
    rounds: int,
    calls: int,
) -> Row:
    big, small = clients
    row = Row(name, what, "the same at 1k artifacts", "ms")
    return alternate(row, lambda i: call(big, i), lambda i: call(small, i), rounds, calls)


def hit_scale(big: Client, small: Client, rounds: int, calls: int, size: int) -> Row:
    keys = [artifact_key(hot_key(i)) for i in range(100)]
    return across(
        "hit-scale",
        f"lookup hit p50 at {size:,}",
        (big, small),
        lambda c, i: c.lookup(keys[i % 100]),
        rounds=rounds,
        calls=calls,
    )


def miss_scale(big: Client, small: Client, rounds: int, calls: int, size: int) -> Row:
    # A fresh key per call (and the same one on both servers): every miss computes its near
    # misses, none is answered from the memo that merges simultaneous misses of one key.
    return across(
        "miss-scale",
        f"miss p50 at {size:,}, hot model (10%)",
        (big, small),
        lambda c, i: c.lookup(artifact_key(miss_key(i + 1)), on_miss="report"),
        rounds=rounds,
        calls=calls,
    )


def stats_scale(big: Client, small: Client, rounds: int, calls: int, size: int) -> Row:
    return across(
        "getstats",
        f"GetStats p50 at {size:,}",
        (big, small),
        lambda c, i: c.get_stats(),
        rounds=rounds,
        calls=calls,
    )


def deep_token(registry: Registry, offset: int) -> str:
    """The token the server would hand out after walking `offset` artifacts newest first
    (made with the server's own token codec, since walking there would take minutes)."""
    index = registry.size - offset  # the last artifact of the previous page: created at BASE_TIME + index
    request = key_at(index)
    key = normalize_key(request, InstanceCatalog.load_default())
    tag = page_tokens.list_tag(TOKEN_TAG, ["", "", False])
    return page_tokens.encode(tag, [BASE_TIME + index, key.digest])


def deep_page(client: Client, registry: Registry, rounds: int, calls: int) -> Row:
    offset = registry.size * 9 // 10
    token = deep_token(registry, offset)
    page = client.list_artifacts(page_token=token)
    row = Row("list-deep", f"ListArtifacts page at offset {offset:,}", "first page", "ms")
    if not page.artifacts:
        row.note = "the deep page came back empty: the page token format changed"
    return alternate(
        row,
        lambda i: client.list_artifacts(page_token=token),
        lambda i: client.list_artifacts(),
        rounds,
        calls,
    )


def throughput(server: ServerProcess, rounds: int, seconds: float, processes: int, concurrency: int) -> Row:
    """Hit QPS vs Check QPS at `concurrency` calls in flight, from `processes` load processes."""
    body = registry_pb2.LookupRequest(
        key=artifact_key(hot_key(0)).to_proto(), on_miss=registry_pb2.ON_MISS_REPORT, direct_download=True
    ).SerializeToString()
    row = Row(
        "hit-c64",
        f"lookup hit throughput, c={concurrency}",
        "health Check QPS, same server",
        "qps",
        note=f"load from {processes} grpc.aio processes; window {seconds:g} s",
    )
    per = concurrency // processes
    loads = [LoadProcess() for _ in range(processes)]
    cores: dict[str, list[float]] = {"lookup": [], "check": []}
    client_cores: dict[str, list[float]] = {"lookup": [], "check": []}
    errors: Counter[str] = Counter()
    try:
        for r in range(rounds + 1):  # round 0 warms up
            qps: dict[str, float] = {}
            order = [("lookup", LOOKUP_METHOD, body), ("check", CHECK_METHOD, CHECK.SerializeToString())]
            for name, method, request in order if r % 2 == 0 else order[::-1]:
                cpu0 = server.cpu_seconds()
                ccpu0 = sum(tree_cpu_seconds(load.pid) for load in loads)
                wall0 = time.perf_counter()
                for load in loads:
                    load.rate_begin(server.address, method, request, per, seconds)
                results = [load.rate_end() for load in loads]
                wall = time.perf_counter() - wall0
                ok = sum(res["codes"].get("OK", 0) for res in results)
                for res in results:
                    errors.update({k: v for k, v in res["codes"].items() if k != "OK"})
                qps[name] = ok / max(res["seconds"] for res in results)
                cores[name].append((server.cpu_seconds() - cpu0) / wall)
                client_cores[name].append((sum(tree_cpu_seconds(load.pid) for load in loads) - ccpu0) / wall)
            if r:
                row.add(qps["lookup"], qps["check"])
    finally:
        for load in loads:
            load.close()
    row.extra = {
        "server_cores_lookup": statistics.median(cores["lookup"]),
        "server_cores_check": statistics.median(cores["check"]),
        "client_cores_lookup": statistics.median(client_cores["lookup"]),
        "client_cores_check": statistics.median(client_cores["check"]),
        "errors": dict(errors),
    }
    row.note += (
        f"; server used {row.extra['server_cores_lookup']:.2f} cores on hits, "
        f"{row.extra['server_cores_check']:.2f} on Checks; the load processes "
        f"{row.extra['client_cores_lookup']:.2f} / {row.extra['client_cores_check']:.2f}"
    )
    return row


async def _burst(address: str, method: str, bodies: list[bytes], extra: bytes | None) -> dict[str, object]:
    """Send all `bodies` at once; the time until the last answer, codes, and the latency of
    `extra` (an unrelated hit) sent just after."""
    codes: Counter[str] = Counter()
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(method, None, None)
        hit = channel.unary_unary(LOOKUP_METHOD, None, None)

        async def one(body: bytes) -> None:
            try:
                await call(body, timeout=60)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] += 1

        async def unrelated() -> float:
            await asyncio.sleep(0.01)
            started = time.perf_counter()
            if extra is not None:
                await hit(extra, timeout=60)
            return time.perf_counter() - started

        started = time.perf_counter()
        results = await asyncio.gather(unrelated(), *(one(b) for b in bodies))
        return {"seconds": time.perf_counter() - started, "codes": dict(codes), "hit_seconds": results[0]}


def stampede(address: str, rounds: int, n: int, size: int) -> Row:
    row = Row("stampede", f"{n} concurrent misses of one key at {size:,}", f"{n} concurrent Checks", "s")
    hit_body = registry_pb2.LookupRequest(key=artifact_key(hot_key(1)).to_proto()).SerializeToString()
    failures = 0
    hit_waits: list[float] = []
    codes: Counter[str] = Counter()
    for r in range(rounds):
        # A new key each round: its first lookup enqueues the job, the rest join it.
        body = registry_pb2.LookupRequest(
            key=artifact_key(miss_key(50_000 + r)).to_proto()
        ).SerializeToString()
        # Who goes first alternates by round, as in the latency rows.
        if r % 2:
            misses = asyncio.run(_burst(address, LOOKUP_METHOD, [body] * n, hit_body))
        checks = asyncio.run(_burst(address, CHECK_METHOD, [CHECK.SerializeToString()] * n, None))
        if not r % 2:
            misses = asyncio.run(_burst(address, LOOKUP_METHOD, [body] * n, hit_body))
        miss_codes = misses["codes"]
        assert isinstance(miss_codes, dict)
        codes.update(miss_codes)
        failures += n - miss_codes.get("OK", 0)
        hit_waits.append(float(misses["hit_seconds"]))  # type: ignore[arg-type]
        row.add(float(misses["seconds"]), float(checks["seconds"]))  # type: ignore[arg-type]
    row.extra = {"failures": failures, "codes": dict(codes), "unrelated_hit_seconds": hit_waits}
    row.note = (
        f"{failures} of {n * rounds} misses failed; an unrelated hit during it took {max(hit_waits):.3f} s"
    )
    return row
