"""The contract between the worker runtime and a compile backend.

A backend turns (normalised key, model source directory) into a directory of artifact
files. The worker runs it in a child process (`python -m prebake.compiler.run`), so a
cancelled or lost job can be stopped by killing the child; the child reports progress
as JSON lines on stdout and its outcome through its exit status:

  0  success: `output_dir` holds the artifact, `result.json` beside it the metrics
  3  deterministic failure (the compiler rejected this configuration): not retried
  anything else: transient failure (crash, out of memory, killed): retried

Backends never talk to the server and never publish: the worker uploads and publishes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

EXIT_OK = 0
EXIT_DETERMINISTIC = 3

# progress(fraction 0..1, message)
ProgressFn = Callable[[float, str], None]


class CompileError(Exception):
    """The compile failed. `deterministic` failures are not retried by the service."""

    def __init__(self, message: str, deterministic: bool) -> None:
        super().__init__(message)
        self.deterministic = deterministic


def is_environmental(exc: BaseException) -> bool:
    """Failures of the worker's machine rather than of the job: out of memory, disk full, I/O.

    Backends classify these as transient. transformers reports a missing checkpoint file as
    a bare OSError (no errno); that is about the job's input, so it is not environmental.
    """
    return isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno is not None)


def positive_int(key: Mapping[str, Any], name: str, product: str) -> int:
    """`key[name]` as a positive int, else a deterministic CompileError naming `product`
    ("inductor packages", "neuron artifacts")."""
    value = key.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CompileError(f"{product} need a positive {name}; the key has {value!r}", True)
    return value


def read_manifest(directory: Path, name: str, format_name: str, version: int) -> dict[str, Any]:
    """The manifest a backend wrote beside its artifact (`name` inside `directory`).

    Raises ValueError if the file is absent, or is another format or version than this
    prebake reads.
    """
    path = directory / name
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{directory} has no {name}; it is not a {format_name} artifact") from None
    if manifest.get("format") != format_name or manifest.get("format_version") != version:
        raise ValueError(
            f"{path}: format {manifest.get('format')!r} version {manifest.get('format_version')!r}; "
            f"this prebake reads {format_name} version {version}"
        )
    return manifest


@dataclass(frozen=True)
class CompileRequest:
    """Everything a backend needs; serialisable to JSON for the child process.

    `key` holds the normalised key's fields as the server resolved them (kind, model,
    model_revision, instance_type, compile_target, sequence_length, batch_size,
    tensor_parallel_degree, precision, toolchain, options as a dict, digest).
    """

    job_id: str
    key: Mapping[str, Any]
    model_source: Path
    output_dir: Path

    def to_json(self) -> str:
        data = asdict(self)
        data["model_source"] = str(self.model_source)
        data["output_dir"] = str(self.output_dir)
        data["key"] = dict(self.key)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CompileRequest:
        data = json.loads(text)
        return cls(
            job_id=data["job_id"],
            key=data["key"],
            model_source=Path(data["model_source"]),
            output_dir=Path(data["output_dir"]),
        )


@dataclass(frozen=True)
class CompileResult:
    """What a successful compile reports besides its files."""

    toolchain_versions: Mapping[str, str] = field(default_factory=dict)
    # e.g. {"export_seconds": 3.1, "compile_seconds": 9.8, "canary_max_abs_diff": 1e-5}
    metrics: Mapping[str, float] = field(default_factory=dict)


class Backend(Protocol):
    """One compiler family. Implementations live one per module in this package.

    `available()` must be cheap and must not import heavy toolchains at module import
    time of the package (import them inside methods), so that a worker without the
    toolchain can still load the module and report why it is unavailable.
    """

    kind: str  # "inductor" | "awq" | "neuron"

    def available(self) -> tuple[bool, str]:
        """(True, "") when the toolchain is installed and usable here, else (False, why)."""
        ...

    def toolchain(self) -> str:
        """The toolchain string this host produces, as it appears in keys (`torch-2.13.0`)."""
        ...

    def compile_targets(self) -> list[str]:
        """Compile targets this host can build and verify (e.g. ["cpu-avx2"])."""
        ...

    def compile(self, request: CompileRequest, progress: ProgressFn) -> CompileResult:
        """Build the artifact into `request.output_dir` (which exists and is empty).

        Raises CompileError on failure (deterministic or not). Must verify the artifact
        (a canary) before returning; never returns an unverified artifact.
        """
        ...
