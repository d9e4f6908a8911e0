"""The instance catalog: SageMaker instance types and the compile target each one resolves to.

The facts come from a CSV table (one row per instance type); the server ships its own copy
as package data (`prebake.server.data/instances.csv`). A catalog is immutable once loaded,
so one instance can be shared by every request handler and thread without locking.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path

from prebake.core.errors import InvalidKey
from prebake.core.suggest import did_you_mean

NEURON_TARGETS = frozenset({"inf2", "trn1", "trn2"})
FAMILIES = ("neuron", "gpu", "cpu")
_INT_COLUMNS = (
    "accelerator_count",
    "cores_per_accelerator",
    "total_cores",
    "accelerator_memory_gib",
    "vcpus",
    "host_memory_gib",
)


def target_family(compile_target: str) -> str:
    """The family ("neuron", "gpu" or "cpu") of a compile target; "" if it belongs to none."""
    if compile_target in NEURON_TARGETS:
        return "neuron"
    if compile_target.startswith("cuda-"):
        return "gpu"
    if compile_target.startswith("cpu-"):
        return "cpu"
    return ""


@dataclass(frozen=True)
class InstanceType:
    """One instance type. For GPU instances a "core" is a GPU; CPU instances have 0 cores.

    Construction fails with ValueError if the compile target belongs to no family or a
    count is negative, so `family` is always one of FAMILIES.
    """

    name: str
    accelerator: str
    accelerator_count: int
    cores_per_accelerator: int
    total_cores: int
    core_generation: str
    compile_target: str
    accelerator_memory_gib: int
    vcpus: int
    host_memory_gib: int

    def __post_init__(self) -> None:
        if not target_family(self.compile_target):
            raise ValueError(
                f"instance type {self.name!r}: compile target {self.compile_target!r} is not "
                f"one of {', '.join(sorted(NEURON_TARGETS))}, cuda-*, cpu-*"
            )
        for column in _INT_COLUMNS:
            if getattr(self, column) < 0:
                raise ValueError(f"instance type {self.name!r}: {column} is negative")

    @property
    def family(self) -> str:
        """Derived from the compile target: "neuron" (Inferentia/Trainium), "gpu" (CUDA) or "cpu"."""
        return target_family(self.compile_target)


# The CSV says "instance_type" where the record says "name".
_COLUMNS = ("instance_type", *(f.name for f in fields(InstanceType) if f.name != "name"))


def _instance_from_row(row: dict[str, str]) -> InstanceType:
    if any(row.get(c) is None for c in _COLUMNS):
        raise ValueError("row has fewer cells than the header")
    cell = {c: row[c].strip() for c in _COLUMNS}
    number = {c: int(cell[c]) for c in _INT_COLUMNS}
    return InstanceType(
        name=cell["instance_type"],
        accelerator=cell["accelerator"],
        accelerator_count=number["accelerator_count"],
        cores_per_accelerator=number["cores_per_accelerator"],
        total_cores=number["total_cores"],
        core_generation=cell["core_generation"],
        compile_target=cell["compile_target"],
        accelerator_memory_gib=number["accelerator_memory_gib"],
        vcpus=number["vcpus"],
        host_memory_gib=number["host_memory_gib"],
    )


def normalize_instance_name(name: str) -> str:
    """Strip, lowercase and add a missing "ml." prefix: " Inf2.48XLarge" -> "ml.inf2.48xlarge"."""
    name = name.strip().lower()
    return name if name.startswith("ml.") else f"ml.{name}"


class InstanceCatalog:
    """Instance types by normalised name, in the order they were loaded.

    Immutable after construction: every method only reads, so one catalog is safe to
    share between threads and asyncio tasks.
    """

    def __init__(self, instances: Iterable[InstanceType]) -> None:
        """Build a catalog; raises ValueError on a duplicate or non-normalised name."""
        by_name: dict[str, InstanceType] = {}
        for instance in instances:
            if instance.name != normalize_instance_name(instance.name):
                raise ValueError(
                    f"instance type {instance.name!r} is not in normalised form (ml.*, lowercase)"
                )
            if instance.name in by_name:
                raise ValueError(f"instance type {instance.name!r} is listed twice")
            by_name[instance.name] = instance
        self._by_name = by_name

    @classmethod
    def load_default(cls) -> InstanceCatalog:
        """The catalog shipped with the server (package data `prebake.server.data/instances.csv`)."""
        text = resources.files("prebake.server.data").joinpath("instances.csv").read_text(encoding="utf-8")
        return cls._parse(text, "prebake.server.data/instances.csv")

    @classmethod
    def from_csv(cls, path: str | Path) -> InstanceCatalog:
        """Load a catalog from a CSV file with the packaged file's columns (extra columns are ignored).

        Raises ValueError naming the file and line for a missing column or a malformed row.
        """
        return cls._parse(Path(path).read_text(encoding="utf-8"), str(path))

    @classmethod
    def _parse(cls, text: str, source: str) -> InstanceCatalog:
        reader = csv.DictReader(io.StringIO(text))
        missing = [c for c in _COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{source}: missing column(s) {', '.join(missing)}")
        instances = []
        for row in reader:
            try:
                instances.append(_instance_from_row(row))
            except ValueError as exc:
                raise ValueError(f"{source}, line {reader.line_num}: {exc}") from None
        try:
            return cls(instances)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None

    def get(self, name: str) -> InstanceType:
        """The instance type called `name` (case-insensitive, "ml." optional).

        Raises InvalidKey("instance_type", ...) for an unknown name, suggesting close
        matches and listing the known names.
        """
        key = normalize_instance_name(name)
        instance = self._by_name.get(key)
        if instance is not None:
            return instance
        hint = did_you_mean(key, list(self._by_name))
        raise InvalidKey(
            "instance_type",
            f"unknown instance type {name.strip()!r}{hint or ';'} Known: {', '.join(self._by_name)}",
        )

    def names(self) -> tuple[str, ...]:
        """All normalised names, in load order."""
        return tuple(self._by_name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and normalize_instance_name(name) in self._by_name

    def __iter__(self) -> Iterator[InstanceType]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)
