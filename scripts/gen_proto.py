"""Generate the Python stubs for proto/prebake/v1 and check them for drift.

`python scripts/gen_proto.py` rewrites the committed *_pb2*.py/.pyi files beside the
.proto files; `--check` generates into a temporary directory and exits 1 if anything
differs from what is committed. Both need the pinned grpcio-tools and mypy-protobuf
from the `dev` extra, so that every machine generates byte-identical output.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PACKAGE_DIR = PROTO_ROOT / "prebake" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
PINNED = {"grpcio-tools": "1.85.1", "mypy-protobuf": "5.1.0"}


def _check_pins() -> None:
    from importlib.metadata import version

    for dist, wanted in PINNED.items():
        have = version(dist)
        if have != wanted:
            sys.exit(f"{dist}=={have} is installed; stubs are generated with {dist}=={wanted}")


def _plugin(name: str) -> str:
    scripts = Path(sysconfig.get_path("scripts"))
    found = shutil.which(name, path=str(scripts)) or shutil.which(name)
    if not found:
        sys.exit(f"{name} not found; install the dev extra (pip install -e '.[dev]')")
    return found


def generate(out: Path) -> None:
    protos = sorted(p.relative_to(PROTO_ROOT).as_posix() for p in PACKAGE_DIR.glob("*.proto"))
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out}",
        f"--mypy_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    # protoc's plugins narrate every file they write; show that only when protoc fails.
    result = subprocess.run(cmd, cwd=PROTO_ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"protoc failed:\n{result.stdout}{result.stderr}")


def generated_files(base: Path) -> list[Path]:
    folder = base / "prebake" / "v1"
    return sorted(p for p in folder.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed stubs drift")
    args = parser.parse_args()
    _check_pins()
    if not args.check:
        for stale in generated_files(PROTO_ROOT):
            stale.unlink()
        generate(PROTO_ROOT)
        print(f"generated {len(generated_files(PROTO_ROOT))} files in {PACKAGE_DIR}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = {p.name: p for p in generated_files(Path(tmp))}
        committed = {p.name: p for p in generated_files(PROTO_ROOT)}
        drift = sorted(set(fresh) ^ set(committed))
        drift += [
            n
            for n in sorted(set(fresh) & set(committed))
            if not filecmp.cmp(fresh[n], committed[n], shallow=False)
        ]
        if drift:
            print("generated stubs drift from the .proto files: " + ", ".join(drift), file=sys.stderr)
            print("run `make proto` and commit the result", file=sys.stderr)
            return 1
    print("generated stubs match the .proto files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
