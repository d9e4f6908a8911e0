"""Cold vs warm deploy of a small Llama through prebake, as a ratio measured in one run.

Each round deploys a model that nobody compiled yet twice, as two hosts booting would:
cold (lookup miss -> the server's worker compiles it with AOTInductor -> download ->
load -> one forward) and warm (lookup hit -> download -> load -> one forward). Every
round uses a new model id, so every cold deploy really compiles. Reported: the median
of each and warm/cold (SageMaker reports a 40-60% shorter load time from precompiled
artifacts; DESIGN.md measured about 15 s cold and 1 s warm for this model size).

Usage: python -m bench.cold_warm [--rounds N] [--hidden-size 768] [--layers 8] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import served
from prebake.client import ArtifactKey, Client
from prebake.compiler.inductor import load_and_run
from prebake.compiler.tiny_llama import build_tiny_llama


def deploy(client: Client, key: ArtifactKey, source: Path, dest: Path, sequence_length: int) -> float:
    started = time.perf_counter()
    client.ensure(key, dest, model_source=str(source), timeout=1800)
    input_ids = torch.arange(sequence_length).remainder(256).unsqueeze(0)
    load_and_run(dest, input_ids)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hidden-size", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    cold: list[float] = []
    warm: list[float] = []
    with tempfile.TemporaryDirectory(prefix="prebake-bench-") as tmp:
        work = Path(tmp)
        # Under DATA_DIR/models: where the embedded default lets jobs read model sources.
        source = build_tiny_llama(
            work / "data" / "models" / "model", hidden_size=args.hidden_size, num_layers=args.layers, seed=0
        )
        with served(work / "data", workers=1) as address, Client(address, timeout=60) as client:
            for i in range(args.rounds):
                key = ArtifactKey(
                    kind="inductor",
                    model=f"bench/llama-{args.hidden_size}x{args.layers}-round{i}",
                    instance_type="ml.c6a.4xlarge",
                    sequence_length=args.sequence_length,
                    batch_size=1,
                    precision="fp32",
                )
                cold.append(deploy(client, key, source, work / f"host-a-{i}", args.sequence_length))
                warm.append(deploy(client, key, source, work / f"host-b-{i}", args.sequence_length))
    results = {
        "cold_median_s": statistics.median(cold),
        "warm_median_s": statistics.median(warm),
        "warm_over_cold": statistics.median(warm) / statistics.median(cold),
        "rounds": args.rounds,
        "cold_s": cold,
        "warm_s": warm,
    }
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"cold deploy  median {results['cold_median_s']:7.2f} s  {[round(c, 2) for c in cold]}")
        print(f"warm deploy  median {results['warm_median_s']:7.2f} s  {[round(w, 2) for w in warm]}")
        ratio = results["warm_over_cold"]
        print(f"warm / cold  {ratio:.3f}  ({(1 - ratio) * 100:.0f}% less deploy time)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
