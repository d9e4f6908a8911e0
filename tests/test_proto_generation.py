"""The contract generates for other languages with nothing but `protoc` and its plugins.

Go: `protoc --go_out --go-grpc_out` over proto/ with no `M` flags writes every file into
the `go_package` path, one Go package. Java: `--java_out` writes one class per message
into `java_package`, no `*OuterClass` wrapper. Both skip, saying why, where the tool is
missing (.ci/run installs them: Debian's protobuf-compiler, protoc-gen-go, protoc-gen-go-grpc).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from google.protobuf.descriptor import FileDescriptor

from prebake.v1 import (
    admin_pb2,
    blobs_pb2,
    catalog_pb2,
    evaluations_pb2,
    jobs_pb2,
    key_pb2,
    registry_pb2,
    workers_pb2,
)

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTOS = sorted(p.relative_to(PROTO_ROOT).as_posix() for p in (PROTO_ROOT / "prebake" / "v1").glob("*.proto"))
MODULES = (admin_pb2, blobs_pb2, catalog_pb2, evaluations_pb2, jobs_pb2, key_pb2, registry_pb2, workers_pb2)
FILES: list[FileDescriptor] = [m.DESCRIPTOR for m in MODULES]
# Per file by design: the outer class of each file, named so it never collides with a message.
PER_FILE_OPTIONS = {"java_outer_classname"}


def _options(descriptor: FileDescriptor) -> dict[str, object]:
    return {f.name: value for f, value in descriptor.GetOptions().ListFields()}


def test_every_file_states_the_same_package_options() -> None:
    assert len(FILES) == len(PROTOS)
    first = {k: v for k, v in _options(FILES[0]).items() if k not in PER_FILE_OPTIONS}
    assert {"go_package", "java_package", "java_multiple_files", "csharp_namespace"} <= set(first)
    for descriptor in FILES:
        options = _options(descriptor)
        assert {k: v for k, v in options.items() if k not in PER_FILE_OPTIONS} == first, descriptor.name
        stem = Path(descriptor.name).stem
        assert options["java_outer_classname"] == stem.capitalize() + "Proto"


def _protoc(*plugins: str) -> str:
    protoc = shutil.which("protoc")
    if protoc is None:
        pytest.skip("protoc is not installed (Debian: apt-get install protobuf-compiler)")
    for plugin in plugins:
        if shutil.which(plugin) is None:
            pytest.skip(f"{plugin} is not installed (Debian: apt-get install {plugin})")
    return protoc


def _run(protoc: str, *args: str) -> None:
    result = subprocess.run(
        [protoc, f"--proto_path={PROTO_ROOT}", *args, *PROTOS],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_go_stubs_generate_without_m_flags(tmp_path: Path) -> None:
    protoc = _protoc("protoc-gen-go", "protoc-gen-go-grpc")
    _run(protoc, f"--go_out={tmp_path}", f"--go-grpc_out={tmp_path}")
    import_path, _, package = key_pb2.DESCRIPTOR.GetOptions().go_package.partition(";")
    folder = tmp_path / import_path
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.go"))
    stems = [Path(p).stem for p in PROTOS]
    services = [Path(f.name).stem for f in FILES if f.services_by_name]
    expected = [f"{import_path}/{s}.pb.go" for s in stems]
    expected += [f"{import_path}/{s}_grpc.pb.go" for s in services]
    assert written == sorted(expected)
    for path in folder.iterdir():
        assert f"\npackage {package}\n" in path.read_text(), path.name


def test_java_stubs_have_one_class_per_message_and_no_outer_class(tmp_path: Path) -> None:
    protoc = _protoc()
    _run(protoc, f"--java_out={tmp_path}")
    folder = tmp_path.joinpath(*key_pb2.DESCRIPTOR.GetOptions().java_package.split("."))
    names = {p.stem for p in tmp_path.rglob("*.java")}
    assert names and all(p.parent == folder for p in tmp_path.rglob("*.java"))
    assert not [n for n in names if n.endswith("OuterClass")]
    messages = {name for f in FILES for name in (*f.message_types_by_name, *f.enum_types_by_name)}
    assert messages <= names
