"""Prewarm matrices: the configurations a platform team wants compiled before launch.

A matrix file is YAML or JSON (JSON needs nothing beyond the standard library; YAML
needs PyYAML, `pip install 'prebake[prewarm]'`). The document is either a mapping::

    kind: neuron                     # default kind of every entry (overridable per model/key)
    toolchain: neuronx-cc-2          # optional default toolchain
    options: {optlevel: "2"}         # optional default compiler options (merged, entry wins)
    models:                          # a model id string, or a mapping:
      - model: meta-llama/Meta-Llama-3-8B
        revision: abc123             # optional (alias: model_revision)
        model_source: s3://bucket/llama3-8b   # optional: weights for a compile job
        kind: neuron                 # optional: overrides the default kind
        toolchain: neuronx-cc-2      # optional: overrides the default toolchain
        options: {optlevel: "3"}     # optional: merged over the default options
      - mistralai/Mistral-7B-v0.3
    instance_types: [ml.inf2.48xlarge, ml.trn1.32xlarge]
    shapes:                          # sequence_length x batch_size pairs
      - {sequence_length: 8192, batch_size: 8}
      - {sequence_length: 4096, batch_size: 4}
    tensor_parallel_degrees: [24, 32]   # optional; default [1]
    precisions: [bf16]
    keys:                            # optional explicit keys, added after the product
      - {kind: awq, model: my/model, precision: int4-awq, instance_type: ml.g5.12xlarge}

or a list of key mappings (the same as a document holding only `keys:`). Key mappings
take the `ArtifactKey` field names (`kind`, `model`, `model_revision` or `revision`,
`instance_type`, `sequence_length`, `batch_size`, `tensor_parallel_degree` or `tp`,
`precision`, `toolchain`, `options`) plus `model_source`; the top-level `kind`,
`toolchain` and `options` are their defaults too.

The product is models x instance_types x shapes x tensor_parallel_degrees x precisions,
in that nesting order, followed by `keys`. Every axis but `models` is optional: an
omitted `instance_types`, `shapes` or `precisions` leaves that field unset (the server
applies the kind's default, or says the field is required); an omitted
`tensor_parallel_degrees` means [1]. Entries with identical key fields are listed once.

Only the *shape* of the file is checked here (unknown fields, wrong types): whether a
combination makes sense (tensor-parallel degree 32 on a 24-core ml.inf2.48xlarge, an
unknown precision) is the server's call, so a prewarm reports those cells as invalid
with the server's message instead of silently dropping them. Errors are `MatrixError`,
whose message names the file and the field ("matrix.yaml: shapes[1].batch_size: ...").
"""

from __future__ import annotations

import importlib
import itertools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prebake.client.artifact_key import ArtifactKey
from prebake.core.key_fields import INT_FIELDS, KEY_FIELDS, STRING_FIELDS

# A product larger than this is almost certainly a mistake in the file (and would
# enqueue that many compile jobs); split it into several files if it is really meant.
MAX_ENTRIES = 10_000
YAML_HINT = "reading YAML needs PyYAML: pip install 'prebake[prewarm]' (or write the matrix as JSON)"

_TOP_LEVEL = frozenset(
    {
        "kind",
        "toolchain",
        "options",
        "models",
        "instance_types",
        "shapes",
        "tensor_parallel_degrees",
        "precisions",
        "keys",
    }
)
_MODEL_FIELDS = frozenset(
    {"model", "revision", "model_revision", "model_source", "kind", "toolchain", "options"}
)
_SHAPE_FIELDS = frozenset({"sequence_length", "batch_size"})
# Accepted spellings -> the ArtifactKey field they stand for.
_ALIASES = {"revision": "model_revision", "tp": "tensor_parallel_degree"}
# What an explicit key may state: the contract's key fields, their aliases, and where the weights are.
_KEY_FIELDS = frozenset({*KEY_FIELDS, *_ALIASES, "model_source"})


class MatrixError(ValueError):
    """A prewarm file that cannot be read or does not have the documented shape."""


@dataclass(frozen=True)
class PrewarmEntry:
    """One configuration to prewarm: the key, and where its weights are for a compile."""

    key: ArtifactKey
    model_source: str = ""


def load_matrix(path: Path | str) -> list[PrewarmEntry]:
    """Read a prewarm file (see the module doc) into its entries, in order, without duplicates.

    `.json` files are parsed as JSON; anything else is tried as JSON first and then as
    YAML (PyYAML imported only then). Raises MatrixError naming the file and the field.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MatrixError(f"{path}: cannot read the prewarm file: {exc}") from None
    return parse_matrix(decode(text, path), source=str(path))


def decode(text: str, path: Path) -> object:
    """Parse a JSON or YAML document (see `load_matrix`); raises MatrixError."""
    try:
        return json.loads(text)
    except ValueError as exc:
        if path.suffix.lower() == ".json":
            raise MatrixError(f"{path}: not valid JSON: {exc}") from None
    try:
        # Imported here so that the client needs PyYAML only for YAML matrices; through
        # importlib because the yaml stubs are not a dependency of the client either.
        yaml: Any = importlib.import_module("yaml")
    except ImportError:
        raise MatrixError(f"{path}: {YAML_HINT}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MatrixError(f"{path}: not valid YAML: {exc}") from None


def parse_matrix(data: object, source: str = "<matrix>") -> list[PrewarmEntry]:
    """Turn a decoded document (mapping or list, see the module doc) into entries.

    `source` names the document in error messages (usually the file name).
    """
    parser = _Parser(source)
    if isinstance(data, list):
        entries = parser.keys(data, _Defaults(kind="", toolchain="", options={}), "")
    elif isinstance(data, dict):
        entries = parser.document(data)
    else:
        raise MatrixError(
            f"{source}: expected a mapping (kind, models, instance_types, ...) or a list of keys, "
            f"got {_type_name(data)}"
        )
    return _dedup(entries, source)


def _dedup(entries: list[PrewarmEntry], source: str) -> list[PrewarmEntry]:
    by_key: dict[ArtifactKey, PrewarmEntry] = {}
    for entry in entries:
        seen = by_key.get(entry.key)
        if seen is None:
            by_key[entry.key] = entry
        elif entry.model_source and seen.model_source and entry.model_source != seen.model_source:
            # Which weights to compile from would depend on the order of the file.
            raise MatrixError(
                f"{source}: {entry.key.describe()} is listed twice with different model sources "
                f"({seen.model_source!r} and {entry.model_source!r})"
            )
        elif entry.model_source and not seen.model_source:
            by_key[entry.key] = entry
    if len(by_key) > MAX_ENTRIES:
        raise MatrixError(f"{source}: the matrix has {len(by_key)} entries; the limit is {MAX_ENTRIES}")
    return list(by_key.values())


@dataclass(frozen=True)
class _Defaults:
    """Top-level `kind`, `toolchain` and `options`: defaults of every model and key."""

    kind: str
    toolchain: str
    options: Mapping[str, str]


@dataclass(frozen=True)
class _Model:
    """One `models` entry: the key fields a model fixes, and its weights."""

    kind: str
    model: str
    model_revision: str
    toolchain: str
    options: Mapping[str, str]
    model_source: str


class _Parser:
    """Type checks with error messages that point at the offending field."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, problem: str) -> MatrixError:
        return MatrixError(f"{self.source}: {where}: {problem}" if where else f"{self.source}: {problem}")

    def document(self, data: dict[Any, Any]) -> list[PrewarmEntry]:
        self.unknown(data, _TOP_LEVEL, "")
        defaults = _Defaults(
            kind=self.string(data.get("kind", ""), "kind"),
            toolchain=self.string(data.get("toolchain", ""), "toolchain"),
            options=self.options(data.get("options", {}), "options"),
        )
        entries: list[PrewarmEntry] = []
        axes = ("instance_types", "shapes", "tensor_parallel_degrees", "precisions")
        if "models" in data:
            models = self.models(data["models"], defaults)
            instance_types = [
                self.string(v, f"instance_types[{i}]")
                for i, v in enumerate(self.axis(data, "instance_types", [""]))
            ]
            shapes = [self.shape(v, f"shapes[{i}]") for i, v in enumerate(self.axis(data, "shapes", [{}]))]
            degrees = [
                self.integer(v, f"tensor_parallel_degrees[{i}]")
                for i, v in enumerate(self.axis(data, "tensor_parallel_degrees", [1]))
            ]
            precisions = [
                self.string(v, f"precisions[{i}]") for i, v in enumerate(self.axis(data, "precisions", [""]))
            ]
            sizes = [len(models), len(instance_types), len(shapes), len(degrees), len(precisions)]
            if math.prod(sizes) > MAX_ENTRIES:
                raise self.fail(
                    "",
                    f"the product {' x '.join(map(str, sizes))} = {math.prod(sizes)} entries "
                    f"is above the limit of {MAX_ENTRIES}; split the matrix",
                )
            for model, instance, (seq, batch), tp, precision in itertools.product(
                models, instance_types, shapes, degrees, precisions
            ):
                key = ArtifactKey(
                    kind=model.kind,
                    model=model.model,
                    model_revision=model.model_revision,
                    instance_type=instance,
                    sequence_length=seq,
                    batch_size=batch,
                    tensor_parallel_degree=tp,
                    precision=precision,
                    toolchain=model.toolchain,
                    options=model.options,
                )
                entries.append(PrewarmEntry(key, model.model_source))
        elif given := [a for a in axes if a in data]:
            raise self.fail(given[0], "an axis of the product needs `models` to multiply with")
        if "keys" in data:
            entries += self.keys(data["keys"], defaults, "keys")
        if not entries:
            raise self.fail("", "the matrix lists no configuration (give `models` and/or `keys`)")
        return entries

    def axis(self, data: dict[Any, Any], name: str, default: list[Any]) -> list[Any]:
        if name not in data:
            return default
        values = data[name]
        if not isinstance(values, list) or not values:
            raise self.fail(name, f"expected a non-empty list, got {_type_name(values)}")
        return values

    def models(self, value: object, defaults: _Defaults) -> list[_Model]:
        if not isinstance(value, list) or not value:
            raise self.fail("models", f"expected a non-empty list, got {_type_name(value)}")
        out: list[_Model] = []
        for i, raw in enumerate(value):
            where = f"models[{i}]"
            item = {"model": raw} if isinstance(raw, str) else raw
            if not isinstance(item, dict):
                raise self.fail(where, f"expected a model id or a mapping, got {_type_name(item)}")
            self.unknown(item, _MODEL_FIELDS, where)
            fields = self.aliased(item, where)
            model = _Model(
                kind=self.string(fields.get("kind", defaults.kind), f"{where}.kind"),
                model=self.string(fields.get("model", ""), f"{where}.model"),
                model_revision=self.string(fields.get("model_revision", ""), f"{where}.revision"),
                toolchain=self.string(fields.get("toolchain", defaults.toolchain), f"{where}.toolchain"),
                options={**defaults.options, **self.options(fields.get("options", {}), f"{where}.options")},
                model_source=self.string(fields.get("model_source", ""), f"{where}.model_source"),
            )
            if not model.model:
                raise self.fail(f"{where}.model", "`model` is required")
            if not model.kind:
                raise self.fail(f"{where}.kind", "no kind: set `kind` at the top level or for this model")
            out.append(model)
        return out

    def keys(self, value: object, defaults: _Defaults, where: str) -> list[PrewarmEntry]:
        if not isinstance(value, list):
            raise self.fail(where, f"expected a list of keys, got {_type_name(value)}")
        if not value:
            raise self.fail(where, "the list of keys is empty")
        out: list[PrewarmEntry] = []
        for i, item in enumerate(value):
            at = f"{where}[{i}]"
            if not isinstance(item, dict):
                raise self.fail(at, f"expected a mapping of key fields, got {_type_name(item)}")
            self.unknown(item, _KEY_FIELDS, at)
            out.append(self.key_entry(self.aliased(item, at), defaults, at))
        return out

    def key_entry(self, fields: dict[str, Any], defaults: _Defaults, at: str) -> PrewarmEntry:
        """One explicit key (aliases already resolved) over the top-level defaults."""

        def text(name: str, default: str = "") -> str:
            return self.string(fields.get(name, default), f"{at}.{name}")

        def number(name: str) -> int:
            return self.integer(fields.get(name, 0), f"{at}.{name}")

        values: dict[str, Any] = {name: number(name) for name in INT_FIELDS}
        values.update({name: text(name) for name in STRING_FIELDS})
        values["kind"] = text("kind", defaults.kind)
        values["toolchain"] = text("toolchain", defaults.toolchain)
        values["options"] = {**defaults.options, **self.options(fields.get("options", {}), f"{at}.options")}
        key = ArtifactKey(**values)
        if not key.kind:
            raise self.fail(f"{at}.kind", "no kind: set `kind` at the top level or in this key")
        if not key.model:
            raise self.fail(f"{at}.model", "`model` is required")
        return PrewarmEntry(key, text("model_source"))

    def aliased(self, item: dict[Any, Any], where: str) -> dict[str, Any]:
        """`item` with aliases replaced by the field they stand for; both at once is an error."""
        fields: dict[str, Any] = {}
        for name, value in item.items():
            field = _ALIASES.get(name, name)
            if field in fields:
                raise self.fail(where, f"`{field}` is given twice (as {field} and as its alias)")
            fields[field] = value
        return fields

    def unknown(self, item: dict[Any, Any], allowed: frozenset[str], where: str) -> None:
        extra = sorted(str(k) for k in item if k not in allowed)
        if extra:
            field = f"{where}.{extra[0]}" if where else extra[0]
            raise self.fail(field, f"unknown field; expected one of {', '.join(sorted(allowed))}")

    def shape(self, value: object, where: str) -> tuple[int, int]:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected {{sequence_length: N, batch_size: N}}, got {_type_name(value)}")
        self.unknown(value, _SHAPE_FIELDS, where)
        return (
            self.integer(value.get("sequence_length", 0), f"{where}.sequence_length"),
            self.integer(value.get("batch_size", 0), f"{where}.batch_size"),
        )

    def string(self, value: object, where: str) -> str:
        if isinstance(value, str):
            return value.strip()
        hint = " (quote it)" if isinstance(value, int | float) else ""
        raise self.fail(where, f"expected a string, got {_type_name(value)}{hint}")

    def integer(self, value: object, where: str) -> int:
        # bool is an int in Python, but `batch_size: true` is surely a mistake.
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise self.fail(where, f"expected an integer, got {_type_name(value)}")

    def options(self, value: object, where: str) -> dict[str, str]:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected a mapping of option names to values, got {_type_name(value)}")
        out: dict[str, str] = {}
        for name, option in value.items():
            if not isinstance(name, str):
                raise self.fail(where, f"option names are strings, got {_type_name(name)}")
            # `optlevel: 2` is what people write in YAML; integers are unambiguous as text.
            as_text = str(option) if isinstance(option, int) and not isinstance(option, bool) else option
            out[name] = self.string(as_text, f"{where}.{name}")
        return out


def _type_name(value: object) -> str:
    if value is None:
        return "nothing (null)"
    text = repr(value)
    shown = text if len(text) <= 40 else text[:37] + "..."
    return f"{type(value).__name__} {shown}"
