"""prebake benchmarks: every row of issue 10's table as a ratio against a baseline measured in
the same run, subject and baseline interleaved, ending with one line per target.

Machines here are shared and noisy: absolute figures move 2-4x with load, ratios of
interleaved measurements much less. Every row's subject and baseline alternate (call by call
for latencies, window by window for throughput, transfer by transfer for bulk), over rounds;
the table shows the medians, their ratio and the spread of the per-round ratios.

Rows (`--only` takes row names or their prefixes):
  startup                     start-up at 1M artifacts vs at 1k (`prebake serve` until health answers)
  hit-c1                      lookup hit p50 at concurrency 1 vs health Check on the same channel
  hit-scale                   lookup hit p50 at 1M vs at 1k
  miss-scale                  miss p50 at 1M (hot model with 10% of the registry) vs at 1k
  getstats                    GetStats p50 at 1M vs at 1k
  list-deep                   ListArtifacts page at offset 90% vs the first page (1M)
  hit-c64                     hit QPS at 64 in flight vs Check QPS (`serve --processes <cores>`)
  stampede                    500 concurrent misses of one key vs 500 concurrent Checks (1M); failures
  block-*                     Check p99 from a second client while a slow rpc runs vs idle (1M)
  ttfb, resume                first byte / last MiB of a large blob vs a bare grpc.aio stream
  publish-cp, publish-bare,   publish vs cp + sync and vs a bare grpc.aio upload; bytes of the
  publish-reads               source read per byte published vs the bare upload's
  fetch-{1,32}-{nginx,bare}   fetch to tmpfs, 1 and 32 files, vs nginx and vs a bare grpc.aio stream
  fetch-memory                server peak RSS while 4 clients fetch the large blob at once vs idle
  cold-warm                   cold deploy (compile) over warm deploy (hit), `bench.cold_warm`

Usage: python -m bench.run [--quick] [--only ROW]... [--json PATH] [--artifacts N] [--blob-mib N]
                           [--rounds N] [--server-args "--processes 2"]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from bench import blocking, common, lookups, registry_scale
from bench.report import Row, Target, table, target_lines, write_json
from bench.transfers import Transfers
from prebake.client import Client
from prebake.server.app import background_server

# The figure for hit QPS at concurrency 64 over Check QPS before this work (0.54-0.61x);
# the target is 1.5x of it. The upper end is taken, so "met" means better than every run seen.
TODAY_C64_RATIO = 0.61

TARGETS = [
    Target("hit p50 c=1 vs Check", "hit-c1", "<=", 1.25),
    Target("hit QPS c=64 vs Check QPS", "hit-c64", ">=", 0.8),
    Target(
        f"hit QPS c=64 vs Check QPS, 1.5x today's {TODAY_C64_RATIO}x", "hit-c64", ">=", 1.5 * TODAY_C64_RATIO
    ),
    Target("miss p50 1M hot model vs 1k", "miss-scale", "<=", 1.2),
    Target("500 concurrent misses vs 500 Checks, none failing", "stampede", "<=", 2.0, extra_key="failures"),
    Target("Check p99 during GetStats vs idle", "block-stats", "<=", 5.0),
    Target("Check p99 during a deep page vs idle", "block-deep", "<=", 5.0),
    Target("Check p99 during a hot miss vs idle", "block-miss", "<=", 5.0),
    Target("Check p99 during a 10k-digest FindMissingBlobs vs idle", "block-find", "<=", 5.0),
    Target("Check p99 during a 1M-option Lookup vs idle", "block-huge", "<=", 5.0),
    Target("GetStats 1M vs 1k", "getstats", "<=", 1.2),
    Target("deep page vs first page", "list-deep", "<=", 1.2),
    Target("time to first byte vs bare", "ttfb", "<=", 2.0),
    Target("resume read vs bare", "resume", "<=", 2.0),
    Target("publish vs bare upload", "publish-bare", "<=", 1.2),
    Target("source reads per byte vs bare upload's", "publish-reads", "<=", 1.1),
    Target("fetch 1 file to tmpfs vs nginx (rate)", "fetch-1-nginx", ">=", 0.9),
    Target("fetch 32 files to tmpfs vs nginx (rate)", "fetch-32-nginx", ">=", 0.9),
    # What holds already and must keep holding.
    Target("keep: start-up 1M vs 1k", "startup", "<=", 1.5),
    Target("keep: hit p50 1M vs 1k", "hit-scale", "<=", 1.25),
    Target("keep: cold deploy over warm", "cold-warm", ">=", 10.0),
    # The issue saw +13 MiB over an idle ~130 MiB; 1.25x leaves room for noise, not for a buffered blob.
    Target("keep: server RSS while 4 clients fetch vs idle", "fetch-memory", "<=", 1.25),
]


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes and few rounds: a smoke run (~2 min)"
    )
    parser.add_argument("--only", action="append", default=[], help="run only rows with this name or prefix")
    parser.add_argument(
        "--json", type=Path, default=Path("bench/results.json"), help="where to write the results"
    )
    parser.add_argument(
        "--artifacts", type=int, help="size of the big registry (default 1,000,000; quick 20,000)"
    )
    parser.add_argument("--blob-mib", type=int, help="size of the transfer blobs (default 512; quick 32)")
    parser.add_argument("--rounds", type=int, help="rounds per row (default 5; quick 2)")
    parser.add_argument("--calls", type=int, help="calls per round of latency rows (default 300; quick 50)")
    parser.add_argument("--window", type=float, help="seconds per throughput window (default 2; quick 1)")
    parser.add_argument("--load-processes", type=int, default=2, help="client processes driving hit-c64")
    parser.add_argument(
        "--server-args", default="", help='extra `prebake serve` arguments, e.g. "--processes 2"'
    )
    parser.add_argument(
        "--no-cache", action="store_true", help="build the big registry afresh, not from the cache"
    )
    parser.add_argument("--cold-warm-rounds", type=int, help="rounds of cold-warm (default 1)")
    args = parser.parse_args()
    quick = args.quick
    args.artifacts = args.artifacts or (20_000 if quick else 1_000_000)
    args.blob_mib = args.blob_mib or (32 if quick else 512)
    args.rounds = args.rounds or (2 if quick else 5)
    args.calls = args.calls or (50 if quick else 300)
    args.window = args.window or (1.0 if quick else 2.0)
    args.cold_warm_rounds = args.cold_warm_rounds or 1
    return args


def cold_warm(rounds: int, quick: bool) -> Row:
    cmd = [sys.executable, "-m", "bench.cold_warm", "--json", "--rounds", str(rounds)]
    if quick:
        cmd += ["--hidden-size", "256", "--layers", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    row = Row("cold-warm", "cold deploy (miss, compile, fetch, load)", "warm deploy (hit, fetch, load)", "s")
    for cold, warm in zip(result["cold_s"], result["warm_s"], strict=True):
        row.add(cold, warm)
    row.note = "a ratio of cold over warm: higher is better; " + " ".join(cmd[2:])
    return row


def main() -> int:
    args = _parse()
    common.SERVER_ARGS[:] = shlex.split(args.server_args)

    def wanted(*names: str) -> bool:
        return not args.only or any(n.startswith(prefix) for n in names for prefix in args.only)

    rows: list[Row] = []
    started = time.perf_counter()

    def record(new: Row | list[Row]) -> None:
        for row in new if isinstance(new, list) else [new]:
            rows.append(row)
            print(f"# {row.name}: {row.ratio:.2f}x ({time.perf_counter() - started:.0f} s)", flush=True)

    def step(names: tuple[str, ...], fn: Callable[[], Row | list[Row]]) -> None:
        if wanted(*names):
            record(fn())

    big_n = args.artifacts
    print(f"# registries of 1,000 and {big_n:,} artifacts; server args {common.SERVER_ARGS}", flush=True)
    with tempfile.TemporaryDirectory(prefix="prebake-bench-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        small = registry_scale.prepare(1000, work / "small")
        big = registry_scale.prepare(big_n, work / "big", use_cache=not args.no_cache)

        def startup() -> Row:
            # `prebake serve` until its health service answers (Python's imports included: 2-5 s
            # here, noisy under load, the same for both), and the server's own start in this
            # process (`BackgroundServer.start`, imports done), reported in the note.
            row = Row("startup", f"start-up at {big_n:,} artifacts", "start-up at 1k", "s")
            inside: dict[Path, list[float]] = {big.data_dir: [], small.data_dir: []}
            for r in range(args.rounds):
                order = [big.data_dir, small.data_dir]
                times: dict[Path, float] = {}
                for d in order if r % 2 == 0 else order[::-1]:
                    with common.server_process(d) as s:
                        times[d] = s.startup_seconds
                    begun = time.perf_counter()
                    with background_server(d):
                        inside[d].append(time.perf_counter() - begun)
                row.add(times[big.data_dir], times[small.data_dir])
            big_ms, small_ms = (statistics.median(inside[d]) * 1e3 for d in (big.data_dir, small.data_dir))
            row.note = f"in-process start: {big_ms:.0f} ms at {big_n:,}, {small_ms:.0f} ms at 1k (medians)"
            return row

        step(("startup",), startup)

        def throughput() -> Row:
            # Its own server over the big registry, run as a deployment that wants throughput
            # runs it: a serving process per core (`--processes`), since one Python process
            # answers on one core.
            processes = os.cpu_count() or 1
            with common.server_process(big.data_dir, args=["--processes", str(processes)]) as server:
                row = lookups.throughput(server, args.rounds, args.window, args.load_processes, 64)
            row.note += f"; `serve --processes {processes}`"
            return row

        step(("hit-c64",), throughput)
        big_server = stack.enter_context(common.server_process(big.data_dir))
        small_server = stack.enter_context(common.server_process(small.data_dir))
        big_client = stack.enter_context(Client(big_server.address, timeout=120))
        small_client = stack.enter_context(Client(small_server.address, timeout=120))
        r, n = args.rounds, args.calls
        step(("hit-c1",), lambda: lookups.hit_vs_check(big_client, big, r, n))
        step(("hit-scale",), lambda: lookups.hit_scale(big_client, small_client, r, n, big_n))
        step(("miss-scale",), lambda: lookups.miss_scale(big_client, small_client, r, max(10, n // 6), big_n))
        step(("getstats",), lambda: lookups.stats_scale(big_client, small_client, r, max(10, n // 6), big_n))
        step(("list-deep",), lambda: lookups.deep_page(big_client, big, r, max(10, n // 10)))
        step(("stampede",), lambda: lookups.stampede(big_server.address, r, 500, big_n))
        block_names = ("block-stats", "block-deep", "block-miss", "block-find", "block-huge")
        if wanted(*block_names):
            token = lookups.deep_token(big, big_n * 9 // 10)
            measured = blocking.blocking(
                big_server.address,
                token,
                rounds=max(2, r // 2),
                calls=n,
                seconds=2.0,
                huge=wanted("block-huge"),
            )
            record([row for row in measured if wanted(row.name)])
        transfer_names = (
            "ttfb",
            "resume",
            "publish-cp",
            "publish-bare",
            "publish-reads",
            "fetch-1",
            "fetch-32",
            "fetch-memory",
        )
        if wanted(*transfer_names):
            # Its own server, with blob downloads over HTTP (`--blob-http-listen`), as a
            # deployment that wants fast fetches from local disk runs it.
            transfer_server = stack.enter_context(
                common.server_process(work / "transfer-data", args=["--blob-http-listen", "127.0.0.1:0"])
            )
            transfer_client = stack.enter_context(Client(transfer_server.address, timeout=120))
            transfers = Transfers(transfer_server, transfer_client, work / "transfers", args.blob_mib << 20)
            try:
                step(("ttfb", "resume"), lambda: transfers.ttfb(r))
                step(("publish-cp", "publish-bare", "publish-reads"), lambda: transfers.publish(r))
                step(("fetch-1", "fetch-32"), lambda: transfers.fetch(r))
                step(("fetch-memory",), lambda: transfers.memory(max(2, r // 2)))
            finally:
                transfers.close()
        stack.close()
        step(("cold-warm",), lambda: cold_warm(args.cold_warm_rounds, args.quick))

    by_name = {row.name: row for row in rows}
    elapsed = time.perf_counter() - started
    print()
    print(
        f"prebake bench, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {elapsed:.0f} s, "
        f"{big_n:,} artifacts, {args.blob_mib} MiB blobs, {args.rounds} rounds"
    )
    print(table(rows))
    print()
    chosen = [t for t in TARGETS if t.row in by_name]
    for line in target_lines(chosen, by_name):
        print(line)
    meta: dict[str, object] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": elapsed,
        "host": platform.node(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.json, rows, chosen, meta)
    print(f"# results in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
