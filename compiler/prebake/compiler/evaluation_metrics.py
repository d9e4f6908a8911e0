"""What an evaluation of an artifact measures: the workload, the host, the metrics per concurrency level.

Frozen dataclasses, independent of gRPC and of the model runtime; the registry's evaluation
messages mirror these names field for field. The metrics are those of SageMaker's
inference optimization toolkit ("Evaluate the performance of optimized models",
https://docs.aws.amazon.com/sagemaker/latest/dg/model-optimize-evaluate.html), per level:
latencies as p50/p90/p99 distributions over requests (or over inter-token gaps), token
counts and rates, request counts, and prices from `prebake.core.pricing` (whose
`PriceInputs` is re-exported here: it is recorded with the evaluation).
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prebake.core.pricing import PriceInputs

__all__ = [
    "Distribution",
    "EvaluationResult",
    "HostInfo",
    "LevelMetrics",
    "PriceInputs",
    "Workload",
    "distribution",
]

# Runtimes whose versions a result records (read from package metadata: nothing is imported).
RUNTIME_PACKAGES = ("torch", "transformers", "compressed-tensors", "neuronx-cc", "torch-neuronx")


@dataclass(frozen=True)
class Distribution:
    """p50, p90 and p99 of a set of samples, nearest-rank (see `distribution`)."""

    p50: float
    p90: float
    p99: float


def _nearest_rank(ordered: Sequence[float], percent: float) -> float:
    # The smallest sample with at least `percent` % of the samples at or below it.
    rank = max(1, math.ceil(percent / 100.0 * len(ordered)))
    return ordered[rank - 1]


def distribution(samples: Sequence[float]) -> Distribution:
    """Nearest-rank percentiles of `samples`: every reported value is one of the samples.

    One sample gives that sample for all three; no samples give 0, 0, 0 (nothing was
    measured, e.g. a level whose every request failed). ValueError for a NaN or infinite sample.
    """
    if not samples:
        return Distribution(0.0, 0.0, 0.0)
    if not all(math.isfinite(s) for s in samples):
        raise ValueError("a distribution's samples must be finite numbers")
    ordered = sorted(float(s) for s in samples)
    return Distribution(*(_nearest_rank(ordered, p) for p in (50, 90, 99)))


@dataclass(frozen=True)
class Workload:
    """What the load driver sends: `requests` requests of `prompt_tokens` tokens each asking for
    `output_tokens` new tokens, at each concurrency level (requests in flight at once).

    ValueError unless every count is a positive int and the levels are unique and ascending.
    """

    prompt_tokens: int
    output_tokens: int
    requests: int
    concurrency_levels: tuple[int, ...]

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "output_tokens", "requests"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"workload {name} must be a positive integer, not {value!r}")
        levels = self.concurrency_levels
        if not isinstance(levels, tuple) or not levels:
            raise ValueError(f"workload concurrency_levels must be a non-empty tuple, not {levels!r}")
        if any(isinstance(c, bool) or not isinstance(c, int) or c <= 0 for c in levels):
            raise ValueError(f"workload concurrency levels must be positive integers, not {levels!r}")
        if len(set(levels)) != len(levels):
            raise ValueError(f"workload concurrency levels must be unique, not {levels!r}")
        if list(levels) != sorted(levels):
            raise ValueError(f"workload concurrency levels must be in ascending order, not {levels!r}")


@dataclass(frozen=True)
class LevelMetrics:
    """The measurements of one concurrency level (see `prebake.compiler.evaluation_workload`).

    Counts: `requests` the level was asked to send; `client_invocations` the calls made to the
    model (requests whose prompt could be built); `invocation_errors` calls that raised;
    `tokenizer_failures` prompts that could not be built plus responses that could not be
    decoded; `empty_responses` calls that returned no token. Latencies in ms over the
    requests that returned tokens (`itl_ms` over every gap between two streamed tokens).
    Rates: overall = total tokens / `duration_seconds` (the level's wall time); per request
    = that request's tokens / its client latency. Prices in USD per 1M tokens from
    `prebake.core.pricing`; 0 when no price is known (no price inputs, or nothing measured).
    """

    concurrency: int
    requests: int
    client_invocations: int
    invocation_errors: int
    tokenizer_failures: int
    empty_responses: int
    duration_seconds: float
    input_tokens: int
    output_tokens: int
    ttft_ms: Distribution
    itl_ms: Distribution
    client_latency_ms: Distribution
    input_tokens_per_second: float
    output_tokens_per_second: float
    input_tokens_per_second_per_request: Distribution
    output_tokens_per_second_per_request: Distribution
    price_per_million_input_tokens: float
    price_per_million_output_tokens: float
    blended_price_per_million_tokens: float


def _cpu_model(cpuinfo: Path) -> str:
    try:
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            label, sep, value = line.partition(":")
            if sep and label.strip() in ("model name", "Model", "cpu model"):
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions(packages: Sequence[str]) -> dict[str, str]:
    versions = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


@dataclass(frozen=True)
class HostInfo:
    """The machine an evaluation ran on. `instance_type` is "" off SageMaker/EC2 or when unknown;
    `runtime_versions` maps package names (torch, transformers, ...) to installed versions."""

    hostname: str
    cpu_model: str
    cpu_count: int
    instance_type: str = ""
    runtime_versions: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def current(cls, instance_type: str = "", cpuinfo: Path = Path("/proc/cpuinfo")) -> HostInfo:
        """This machine: hostname, the CPU model from /proc/cpuinfo, os.cpu_count() and the
        versions of the installed RUNTIME_PACKAGES (from metadata, without importing them)."""
        return cls(
            hostname=socket.gethostname(),
            cpu_model=_cpu_model(cpuinfo),
            cpu_count=os.cpu_count() or 0,
            instance_type=instance_type,
            runtime_versions=_versions(RUNTIME_PACKAGES),
        )


@dataclass(frozen=True)
class EvaluationResult:
    """One evaluation: what was sent, where, at what price, and one LevelMetrics per level
    (in the workload's order). `price` is None when no price was known."""

    workload: Workload
    host: HostInfo
    price: PriceInputs | None
    levels: tuple[LevelMetrics, ...]
