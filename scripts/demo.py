"""The main job on the embedded default, as a deployer and an operator would run it.

Starts `prebake serve` (no configuration but a scratch data directory and a free port),
then drives the real CLI: a validation error, a miss that enqueues one compile job, a
second deployer joining it, an operator importing an artifact compiled elsewhere (which
completes the job), a deployer's `ensure` (verified download placed atomically), a warm
`ensure`, a near miss with its explanation, and the service statistics.

The "artifact compiled elsewhere" is a synthetic directory (a 48 MiB weight shard plus
config files): real compile backends arrive with the worker issue.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(args: list[str], env: dict[str, str], expect: int | None = 0) -> subprocess.CompletedProcess[str]:
    shown = " ".join(shlex.quote(a) for a in args)
    print(f"\n$ prebake {shown}", flush=True)
    proc = subprocess.run([str(BIN / "prebake"), *args], env=env, text=True, capture_output=True, check=False)
    out = (proc.stdout + proc.stderr).rstrip()
    if out:
        print("  " + out.replace("\n", "\n  "), flush=True)
    print(f"  [exit {proc.returncode}]", flush=True)
    if expect is not None and proc.returncode != expect:
        raise SystemExit(f"demo: expected exit {expect} from `prebake {shown}`, got {proc.returncode}")
    return proc


def make_artifact(root: Path) -> None:
    root.mkdir(parents=True)
    (root / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 4096})
    )
    (root / "neuron_config.json").write_text(
        json.dumps({"n_positions": 8192, "batch_size": 8, "tp_degree": 24})
    )
    shards = root / "compiled"
    shards.mkdir()
    (shards / "model.neff").write_bytes(os.urandom(48 << 20))


def wait_for_server(address: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"demo: prebake serve exited with {proc.returncode}")
        try:
            socket.create_connection((host, int(port)), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("demo: server did not start")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="prebake-demo-") as tmp:
        work = Path(tmp)
        address = f"127.0.0.1:{free_port()}"
        env = {**os.environ, "PREBAKE_SERVER": address}
        print(f"$ prebake serve --listen {address} --data-dir {work / 'data'}")
        server = subprocess.Popen(
            [str(BIN / "prebake"), "serve", "--listen", address, "--data-dir", str(work / "data")], env=env
        )
        try:
            wait_for_server(address, server)
            key = [
                "--kind", "neuron", "--model", "meta-llama/Meta-Llama-3-8B",
                "--instance-type", "ml.inf2.48xlarge", "--sequence-length", "8192",
                "--batch-size", "8", "--tp", "24", "--precision", "bf16",
            ]  # fmt: skip
            too_wide = [*key[:-4], "--tp", "32", "--precision", "bf16"]
            run(["lookup", *too_wide], env, expect=1)
            run(["lookup", *key], env, expect=3)
            run(["lookup", *key], env, expect=4)
            make_artifact(work / "compiled-llama3-8b")
            run(
                ["publish", str(work / "compiled-llama3-8b"), *key, "--note", "imported from a build host"],
                env,
            )
            started = time.perf_counter()
            run(["ensure", *key, "--dest", str(work / "deploy" / "llama3-8b")], env)
            cold = time.perf_counter() - started
            started = time.perf_counter()
            run(["ensure", *key, "--dest", str(work / "deploy" / "llama3-8b")], env)
            warm = time.perf_counter() - started
            smaller_batch = [*key[:-6], "--batch-size", "4", "--tp", "24", "--precision", "bf16"]
            run(["lookup", "--no-enqueue", *smaller_batch], env, expect=3)
            run(["ls"], env)
            run(["stats"], env)
            print(f"\nensure with download: {cold:.2f} s; ensure already in place: {warm:.2f} s")
        finally:
            server.terminate()
            server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
