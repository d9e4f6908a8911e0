"""Shared fixtures: a real prebake server on a loopback port, and a client for it."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from prebake.client import ArtifactKey, Client
from prebake.server.app import BackgroundServer, background_server
from prebake.v1 import key_pb2, workers_pb2
from tests.aws_emulator import Emulator, running_emulator
from tests.plugin_cli import PrebakeCli

# Hypothesis profiles (tests/test_fuzz.py): "ci" within `make test`, the same cases every
# run; "fuzz" (`make fuzz`, --hypothesis-profile=fuzz) with fresh random cases, at least
# 10,000 in all. No deadlines: speed is measured in bench/, never asserted.
FUZZ_EXAMPLES = 250
_SLOW_IS_FINE = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]
settings.register_profile(
    "ci", max_examples=20, deadline=None, database=None, derandomize=True, suppress_health_check=_SLOW_IS_FINE
)
settings.register_profile(
    "fuzz", max_examples=FUZZ_EXAMPLES, deadline=None, database=None, suppress_health_check=_SLOW_IS_FINE
)
settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _root_logger_restored() -> Iterator[None]:
    """The root logger's handlers and level as they were before each test: a test that runs
    `prebake serve` or a worker in-process sets up logging (`setup_logging`), and without this
    every later test's rpc lines would reach the terminal, outside pytest's capture."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `compile` every test that needs the tiny checkpoint, the input of every real
    compile here (AOTInductor, AWQ): derived from the fixtures a test uses, directly or
    through another fixture, so a new compile test cannot miss the mark that
    `make test-fast` deselects."""
    for item in items:
        if "tiny_model" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.compile)


LLAMA3_8B_INF2 = ArtifactKey(
    kind="neuron",
    model="meta-llama/Meta-Llama-3-8B",
    instance_type="ml.inf2.48xlarge",
    sequence_length=8192,
    batch_size=8,
    tensor_parallel_degree=24,
    precision="bf16",
)
# A key the inductor workers of the worker-protocol tests lease, and their capability.
INDUCTOR_KEY = dataclasses.replace(
    LLAMA3_8B_INF2,
    kind="inductor",
    instance_type="ml.c6a.4xlarge",
    sequence_length=32,
    batch_size=1,
    tensor_parallel_degree=1,
    precision="fp32",
)
INDUCTOR = workers_pb2.Capability(
    kind=key_pb2.ARTIFACT_KIND_INDUCTOR, toolchain="torch-2.13.0", compile_targets=["cpu-avx2"]
)


@pytest.fixture(autouse=True, scope="session")
def digest_memo_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Clients (and the workers and CLIs tests start) keep their digest memo in this session's
    temporary directory, not in the user's cache (`prebake.client.digest_memo`)."""
    path = tmp_path_factory.mktemp("digest-memo") / "digests.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREBAKE_DIGEST_MEMO", str(path))
        yield path


@pytest.fixture
def model_source_roots(tmp_path_factory: pytest.TempPathFactory) -> str:
    """What lookups to the `server` fixture may name as model sources (its
    `model_source_roots`): anything under this session's temporary directories, and the
    made-up bucket `s3://bucket` some tests name with a revision. Override it in a module
    for other buckets."""
    return f"{tmp_path_factory.getbasetemp()},s3://bucket"


# The registries a server-level test can run against: the embedded default (SQLite and local
# disk) and the shared one (DynamoDB and S3, on the serial moto server). Run a test on both with
# `@pytest.mark.parametrize("server", REGISTRY_BACKENDS, indirect=True)`.
REGISTRY_BACKENDS = ("sqlite", "dynamodb")


@contextmanager
def registry_settings(request: pytest.FixtureRequest, backend: str, stem: str) -> Iterator[dict[str, str]]:
    """`background_server` settings of a fresh registry of `backend`, for fixtures of any scope.

    sqlite: none (the data directory holds everything). dynamodb: a new table set (created) and
    bucket on the serial emulator, with boto3 pointed at it while the context lasts; a second
    server given the same settings serves the same registry (a restart, another replica)."""
    if backend == "sqlite":
        yield {}
        return
    assert backend == "dynamodb", backend
    pytest.importorskip("prebake.server.storage.dynamodb")
    from prebake.server.storage.dynamodb import create_tables

    emulator: Emulator = request.getfixturevalue("moto_serial")
    with pytest.MonkeyPatch.context() as patch:
        point_boto3_at(emulator, patch)
        prefix = emulator.unique_name(stem)
        create_tables(prefix)
        yield {"store": f"s3://{emulator.create_bucket()}/p", "registry": f"dynamodb://{prefix}"}


@pytest.fixture
def server(
    request: pytest.FixtureRequest, tmp_path: Path, model_source_roots: str
) -> Iterator[BackgroundServer]:
    """A server on an empty registry: SQLite, or the backend named by an indirect parameter."""
    backend = getattr(request, "param", "sqlite")
    with (
        registry_settings(request, backend, "server") as settings,
        background_server(tmp_path / "data", model_source_roots=model_source_roots, **settings) as srv,
    ):
        yield srv


@pytest.fixture
def prebake(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> PrebakeCli:
    """The `prebake` command line in this process, with this tree's plugin commands."""
    return PrebakeCli(monkeypatch, capsys)


@pytest.fixture
def client(server: BackgroundServer) -> Iterator[Client]:
    with Client(server.address, timeout=30.0) as c:
        yield c


def make_artifact_dir(root: Path, sizes: dict[str, int], seed: int = 0) -> Path:
    """A directory of files with pseudo-random content (deterministic per seed and path)."""
    import random

    rng = random.Random(seed)
    for rel, size in sizes.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size))
    return root


def tree(root: Path) -> dict[str, bytes]:
    """Every regular file under root (relative path -> bytes), excluding prebake's marker."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".prebake.json"
    }


def data_files(data_dir: Path) -> list[str]:
    """Files under a server's blob directory (blobs + partial uploads), for no-side-effect checks."""
    cas = data_dir / "cas"
    return sorted(os.path.relpath(p, cas) for p in cas.rglob("*") if p.is_file())


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama checkpoint (hidden 64, 2 layers): compiles in seconds."""
    from prebake.compiler.tiny_llama import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("model") / "tiny-llama", hidden_size=64, num_layers=2)


@pytest.fixture(scope="session")
def moto_threaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    """moto's threaded server: bulk transfers, many clients. Not for race tests (see aws_emulator)."""
    with running_emulator(serial=False, log_dir=tmp_path_factory.mktemp("moto")) as emulator:
        yield emulator


@pytest.fixture(scope="session")
def moto_serial(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    """moto serving one request at a time, so its conditional writes are atomic: race tests."""
    with running_emulator(serial=True, log_dir=tmp_path_factory.mktemp("moto")) as emulator:
        yield emulator


def point_boto3_at(emulator: Emulator, patch: pytest.MonkeyPatch) -> None:
    """boto3 in this process (and the processes it starts) pointed at `emulator`, until `patch` undoes it."""
    for name, value in emulator.env.items():
        patch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL"):
        patch.delenv(name, raising=False)


@pytest.fixture
def aws_serial(moto_serial: Emulator, monkeypatch: pytest.MonkeyPatch) -> Emulator:
    """boto3 in this test (and the processes it starts) pointed at the serial emulator."""
    point_boto3_at(moto_serial, monkeypatch)
    return moto_serial


@pytest.fixture
def aws_threaded(moto_threaded: Emulator, monkeypatch: pytest.MonkeyPatch) -> Emulator:
    """boto3 in this test (and the processes it starts) pointed at the threaded emulator."""
    point_boto3_at(moto_threaded, monkeypatch)
    return moto_threaded
