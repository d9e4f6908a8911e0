"""Presets: named, pre-optimised configurations per model (`llama-3-8b/low-latency`).

The catalog ships as package data, `prebake.server.data/presets.csv` (its header comments
document the columns). Loading validates every row and raises ValueError naming the file and
line for the first bad one, so a server never starts with a preset it would refuse to look up:

- `name`: `<model short name>/<goal>`, lowercase letters, digits, `.` and `-` on each side of
  one `/`; unique (case-insensitively).
- `objective`: one of `prebake.server.recommend.Objective` (latency, throughput, cost).
- the key (`kind` ... `precision`): normalises with the server's instance and model catalogs
  (`normalize_key`: the tensor-parallel degree fits the instance, the model fits its
  accelerator memory, the kind can produce the precision); the model is a catalog model
  (any of its names; kept as the canonical one) that supports the kind (`ModelCatalog.check`).

Immutable once loaded; safe to share between tasks.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources

from prebake.core.errors import InvalidKey, NotFound
from prebake.core.suggest import did_you_mean
from prebake.server.instance_catalog import InstanceCatalog
from prebake.server.key_normalization import DEFAULT_TOOLCHAINS, KeyRequest, normalize_key
from prebake.server.model_catalog import ModelCatalog
from prebake.server.recommend import Objective

SOURCE = "prebake.server.data/presets.csv"
COLUMNS = (
    "name",
    "objective",
    "kind",
    "model",
    "instance_type",
    "sequence_length",
    "batch_size",
    "tensor_parallel_degree",
    "precision",
    "description",
)
_NAME = re.compile(r"[a-z0-9][a-z0-9.-]*/[a-z0-9][a-z0-9.-]*")


@dataclass(frozen=True)
class Preset:
    name: str
    objective: Objective
    description: str
    # As a deployer states it (no toolchain: the server resolves it per lookup); model canonical.
    key: KeyRequest


class Presets:
    def __init__(self, presets: list[Preset]) -> None:
        self._by_name = {p.name: p for p in presets}

    @classmethod
    def load_default(cls, catalog: InstanceCatalog, models: ModelCatalog) -> Presets:
        text = resources.files("prebake.server.data").joinpath("presets.csv").read_text(encoding="utf-8")
        return cls.parse(text, SOURCE, catalog, models)

    @classmethod
    def parse(cls, text: str, source: str, catalog: InstanceCatalog, models: ModelCatalog) -> Presets:
        """The presets of CSV `text` (comment lines start with `#`); ValueError naming the line."""
        lines = text.splitlines(keepends=True)
        numbered = [(n, line) for n, line in enumerate(lines, 1) if not line.lstrip().startswith("#")]
        reader = csv.DictReader(io.StringIO("".join(line for _, line in numbered)))
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{source}: missing column(s) {', '.join(missing)}")
        presets: list[Preset] = []
        seen: set[str] = set()
        for row in reader:
            line = (
                numbered[reader.line_num - 1][0] if reader.line_num - 1 < len(numbered) else reader.line_num
            )
            try:
                preset = _preset(row, catalog, models)
            except (ValueError, InvalidKey) as exc:
                raise ValueError(f"{source}, line {line}: {exc}") from None
            if preset.name in seen:
                raise ValueError(f"{source}, line {line}: preset {preset.name!r} is listed twice")
            seen.add(preset.name)
            presets.append(preset)
        return cls(presets)

    def __iter__(self) -> Iterator[Preset]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def get(self, name: str) -> Preset:
        """The preset called `name` (case-insensitive); NotFound with the closest names."""
        found = self._by_name.get(name.strip().lower())
        if found is not None:
            return found
        known = list(self._by_name)
        shown = name if len(name) <= 80 else f"{name[:80]}..."
        raise NotFound(
            f"no preset {shown!r}{did_you_mean(name, known) or ';'} known presets: {', '.join(known)}"
        )

    def of_model(self, model: str) -> list[Preset]:
        """The presets of `model` (its canonical name), in file order."""
        return [p for p in self if p.key.model == model]


def _int(row: dict[str, str], column: str) -> int:
    text = (row.get(column) or "").strip()
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{column} {text!r} is not a whole number") from None


def _preset(row: dict[str, str], catalog: InstanceCatalog, models: ModelCatalog) -> Preset:
    name = (row.get("name") or "").strip()
    if not _NAME.fullmatch(name):
        raise ValueError(f"name {name!r} is not <model>/<goal> in lowercase letters, digits, '.' and '-'")
    objective_text = (row.get("objective") or "").strip()
    try:
        objective = Objective(objective_text)
    except ValueError:
        raise ValueError(
            f"objective {objective_text!r} is not one of {', '.join(o.value for o in Objective)}"
        ) from None
    model = (row.get("model") or "").strip()
    if models.named(model) is None:
        raise ValueError(f"model {model!r} is not in the model catalog (Catalog.ListModels)")
    key = KeyRequest(
        kind=(row.get("kind") or "").strip(),
        model=models.canonical_name(model),
        instance_type=(row.get("instance_type") or "").strip(),
        sequence_length=_int(row, "sequence_length"),
        batch_size=_int(row, "batch_size"),
        tensor_parallel_degree=_int(row, "tensor_parallel_degree"),
        precision=(row.get("precision") or "").strip(),
    )
    normalized = normalize_key(key, catalog, DEFAULT_TOOLCHAINS, models)
    models.check(normalized.model, normalized.kind)
    description = (row.get("description") or "").strip()
    if not description:
        raise ValueError(f"preset {name!r} has no description")
    return Preset(name, objective, description, key)
