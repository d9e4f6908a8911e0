"""The main job on the embedded default: a cold and a warm deploy of a tiny Llama.

1. Build a tiny Llama from a config with seeded random weights (nothing is downloaded).
2. Start `prebake serve` with no configuration but a scratch data directory and a free
   port: SQLite, local blobs and one in-process worker per installed backend.
3. Cold deploy (host A): `prebake ensure` misses, the worker compiles the model with
   torch.export + AOTInductor and publishes it, the deployer downloads it (verified,
   placed atomically), loads the package and runs one forward pass.
4. Warm deploy (host B): the same `prebake ensure` hits and downloads; load; forward.
5. Print both times and their ratio, check both deploys compute the same logits, and
   show a miss explanation and the service statistics.

Options: --hidden-size, --layers, --sequence-length (defaults keep the run short).
"""

from __future__ import annotations

import argparse
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


def run(args: list[str], env: dict[str, str], expect: int = 0) -> subprocess.CompletedProcess[str]:
    print(f"\n$ prebake {' '.join(shlex.quote(a) for a in args)}", flush=True)
    proc = subprocess.run([str(BIN / "prebake"), *args], env=env, text=True, capture_output=True, check=False)
    out = (proc.stdout + proc.stderr).rstrip()
    if out:
        print("  " + out.replace("\n", "\n  "), flush=True)
    if proc.returncode != expect:
        raise SystemExit(f"demo: expected exit {expect} from `prebake {args[0]}`, got {proc.returncode}")
    return proc


def wait_for_server(address: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
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
    raise SystemExit("demo: the server did not start")


# Where torch keeps what it compiled, by the variable that moves it. Inductor's own cache
# (FX graphs, kernels, AOT autograd results) follows TORCHINDUCTOR_CACHE_DIR; its
# precompiled headers and a few other files stay under tempfile.gettempdir() whatever that
# says, hence TMPDIR. Left in the system temp directory, a second `make demo` found them
# warm and its "cold" deploy took 23 s instead of 39 s.
CACHE_VARIABLES = {
    "TORCHINDUCTOR_CACHE_DIR": "torchinductor",
    "TRITON_CACHE_DIR": "triton",
    "XDG_CACHE_HOME": "xdg",
    "TMPDIR": "tmp",
}


def fresh_compile_caches(work: Path) -> Path:
    """Point every torch compile cache of this process and its children (the server, its
    worker's compile child) into `work`/compile-caches, empty: each run's cold deploy
    is as cold as the first. Before torch is imported (it reads them at import)."""
    root = work / "compile-caches"
    for variable, name in CACHE_VARIABLES.items():
        (root / name).mkdir(parents=True)
        os.environ[variable] = str(root / name)
    tempfile.tempdir = None  # re-read TMPDIR
    return root


def deploy(key: list[str], dest: Path, env: dict[str, str]) -> tuple[float, object]:
    """`prebake ensure` + load + one forward, as a booting endpoint would; returns (seconds, logits)."""
    import torch

    from prebake.compiler.inductor import load_and_run

    started = time.perf_counter()
    run(["ensure", *key, "--dest", str(dest), "-q"], env)
    input_ids = torch.arange(int(key[key.index("--sequence-length") + 1])).remainder(256).unsqueeze(0)
    logits = load_and_run(dest, input_ids)
    return time.perf_counter() - started, logits


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--sequence-length", type=int, default=128)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="prebake-demo-") as tmp:
        work = Path(tmp)
        caches = fresh_compile_caches(work)
        print(f"torch compile caches: {caches} (fresh each run, so the cold deploy compiles from nothing)")

        import torch  # the deployer's runtime; imported once so neither deploy pays for it

        from prebake.compiler.tiny_llama import build_tiny_llama

        # Under DATA_DIR/models: the only place the embedded default lets a job read a
        # model source from (see `prebake serve --model-source-root`).
        model_dir = build_tiny_llama(
            work / "data" / "models" / "tiny-llama",
            hidden_size=args.hidden_size,
            num_layers=args.layers,
            seed=0,
        )
        size = sum(p.stat().st_size for p in model_dir.iterdir())
        print(f"built a tiny Llama (hidden {args.hidden_size}, {args.layers} layers, {size / 2**20:.1f} MiB)")
        print(f"in {model_dir}")

        address = f"127.0.0.1:{free_port()}"
        env = {**os.environ, "PREBAKE_SERVER": address}  # with the caches set above
        # Warnings and errors only: the per-rpc log lines would bury the walk-through.
        serve = ["serve", "--listen", address, "--data-dir", str(work / "data"), "--log-level", "warning"]
        print(f"\n$ prebake {' '.join(serve)}")
        server = subprocess.Popen([str(BIN / "prebake"), *serve], env=env)
        try:
            wait_for_server(address, server)
            key = [
                "--kind", "inductor", "--model", "demo/tiny-llama", "--model-source", str(model_dir),
                "--instance-type", "ml.c6a.4xlarge", "--sequence-length", str(args.sequence_length),
                "--batch-size", "1", "--precision", "fp32",
            ]  # fmt: skip
            print("\n== cold deploy (host A): miss -> compile -> fetch -> load -> forward")
            cold, cold_logits = deploy(key, work / "host-a" / "model", env)
            print("\n== warm deploy (host B): hit -> fetch -> load -> forward")
            warm, warm_logits = deploy(key, work / "host-b" / "model", env)
            same = torch.equal(cold_logits, warm_logits)  # type: ignore[arg-type]

            other_batch = [*key[: key.index("--batch-size") + 1], "2", "--precision", "fp32"]
            print("\n== a configuration nobody compiled yet, explained")
            run(["lookup", "--no-enqueue", *other_batch], env, expect=3)
            run(["stats"], env)
        finally:
            server.terminate()
            server.wait(timeout=60)
    print(f"\ncold deploy {cold:6.2f} s   (lookup miss, compile, download, load, forward)")
    print(f"warm deploy {warm:6.2f} s   (lookup hit, download, load, forward)")
    print(f"warm / cold {warm / cold:6.2f}     ({(1 - warm / cold) * 100:.0f}% less deploy time)")
    print(f"both deploys computed identical logits: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
