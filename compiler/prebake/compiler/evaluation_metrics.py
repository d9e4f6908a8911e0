"""What the worker adds to the evaluation records (`prebake.core.evaluation_records`, shared with
the server): nearest-rank percentiles of measured samples, the check that a workload can run,
this machine as an `EvaluationHost`, and the result of one evaluation run.

The metrics are those of SageMaker's inference optimization toolkit (see the records); the
prices come from `prebake.core.pricing`.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from prebake.core.evaluation_records import (
    Distribution,
    EvaluationHost,
    EvaluationWorkload,
    LevelMetrics,
    PriceInputs,
)

# Runtimes whose versions a result records (read from package metadata: nothing is imported).
RUNTIME_PACKAGES = ("torch", "transformers", "compressed-tensors", "neuronx-cc", "torch-neuronx")


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


def check_workload(workload: EvaluationWorkload) -> None:
    """ValueError unless the load driver can run `workload`: every count a positive int, the
    levels a non-empty tuple of unique positive ints in ascending order."""
    for name in ("prompt_tokens", "output_tokens", "requests"):
        value = getattr(workload, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"workload {name} must be a positive integer, not {value!r}")
    levels = workload.concurrency_levels
    if not isinstance(levels, tuple) or not levels:
        raise ValueError(f"workload concurrency_levels must be a non-empty tuple, not {levels!r}")
    if any(isinstance(c, bool) or not isinstance(c, int) or c <= 0 for c in levels):
        raise ValueError(f"workload concurrency levels must be positive integers, not {levels!r}")
    if len(set(levels)) != len(levels):
        raise ValueError(f"workload concurrency levels must be unique, not {levels!r}")
    if list(levels) != sorted(levels):
        raise ValueError(f"workload concurrency levels must be in ascending order, not {levels!r}")


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


def current_host(instance_type: str = "", cpuinfo: Path = Path("/proc/cpuinfo")) -> EvaluationHost:
    """This machine: hostname, the CPU model from /proc/cpuinfo, os.cpu_count() and the versions
    of the installed RUNTIME_PACKAGES (from metadata, without importing them). `instance_type`
    is what the caller knows of it ("" when unknown)."""
    return EvaluationHost(
        hostname=socket.gethostname(),
        cpu_model=_cpu_model(cpuinfo),
        cpu_count=os.cpu_count() or 0,
        instance_type=instance_type,
        runtime_versions=tuple(sorted(_versions(RUNTIME_PACKAGES).items())),
    )


@dataclass(frozen=True)
class EvaluationResult:
    """One evaluation: what was sent, where, at what price, and one LevelMetrics per level
    (in the workload's order). `price` is None when no price was known."""

    workload: EvaluationWorkload
    host: EvaluationHost
    price: PriceInputs | None
    levels: tuple[LevelMetrics, ...]
