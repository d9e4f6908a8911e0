"""Artifact key normalisation: from a key as a deployer states it to its identity.

`normalize_key` validates a `KeyRequest`, resolves aliases and the instance type, fills
per-kind defaults and keeps only the fields that matter for the kind. The result's
`canonical` text (compact, sorted JSON carrying SCHEMA_VERSION) is hashed with xxh3-128;
that digest is the key's identity. Two requests share an artifact exactly when their
digests are equal; the rest of a NormalizedKey (e.g. which instance type of a compile
target was named) is informational.

Changing any rule that changes `canonical` for an existing key is a schema change:
bump SCHEMA_VERSION rather than silently turning hits into misses. One exception, made
without a bump: a model is named by its canonical name (`ModelCatalog.canonical_name`: the
Hugging Face id of a catalog model, whichever of its names the request used). Keys stored
before that under another name of a catalog model are still found, by `with_model` on
read (see RegistryService._match), so no hit turned into a miss; a bump would have
re-keyed every artifact instead of the few that named a JumpStart id.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType

from prebake.core.digests import hash_bytes
from prebake.core.errors import InvalidKey
from prebake.core.key_fields import KEY_FIELDS as CONTRACT_KEY_FIELDS
from prebake.core.key_fields import KINDS as CONTRACT_KINDS
from prebake.core.key_fields import require_fields, require_kinds
from prebake.core.names import kind_values
from prebake.core.suggest import did_you_mean, unknown
from prebake.server.instance_catalog import InstanceCatalog, InstanceType
from prebake.server.model_catalog import ModelCatalog
from prebake.server.records import NormalizedKey
from prebake.server.sizing import check_fits

SCHEMA_VERSION = 1
KINDS = CONTRACT_KINDS
PRECISIONS = ("bf16", "fp16", "fp32", "int8", "fp8", "int4-awq")
PRECISION_ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "bfloat16": "bf16",
        "float16": "fp16",
        "half": "fp16",
        "float32": "fp32",
        "float": "fp32",
        "full": "fp32",
        "float8": "fp8",
        "fp8_e4m3": "fp8",
        "f8e4m3": "fp8",
        "int4": "int4-awq",
        "awq": "int4-awq",
        "w4a16": "int4-awq",
        "int4_awq": "int4-awq",
    }
)
DEFAULT_TOOLCHAINS: Mapping[str, str] = MappingProxyType(
    {"neuron": "neuronx-cc-2", "awq": "llmcompressor-0.14", "inductor": "torch-2.13.0"}
)

MAX_MODEL = 256
MAX_REVISION = 128
MAX_INSTANCE_TYPE = 64
MAX_SEQUENCE_LENGTH = 1_048_576
MAX_BATCH_SIZE = 4096
MAX_TENSOR_PARALLEL = 1024
MAX_TOOLCHAIN = 64
MAX_OPTIONS = 32
MAX_OPTION_NAME = 64
MAX_OPTION_VALUE = 256

# ArtifactKey field order (from the contract), used for relevant_fields and for diffs.
KEY_FIELDS = CONTRACT_KEY_FIELDS

_MODEL_RE = re.compile(r"[A-Za-z0-9._\-/:@+]+")
_REVISION_RE = re.compile(r"[A-Za-z0-9._\-:+]+")
_TOOLCHAIN_RE = re.compile(r"[a-z0-9._+\-]+")
_OPTION_NAME_RE = re.compile(r"[a-z0-9_.\-]+")
_INT_RE = re.compile(r"[+-]?[0-9]+")
_BOOLEANS = {"true": "true", "yes": "true", "on": "true", "false": "false", "no": "false", "off": "false"}
_FAMILY_LABELS = {"neuron": "Neuron", "gpu": "GPU", "cpu": "CPU"}


@dataclass(frozen=True)
class _KindRules:
    precisions: tuple[str, ...]  # the first one is the default
    family: str  # the instance family the kind compiles for
    instance_example: str  # "" when instance_type is optional
    shaped: bool  # sequence_length and batch_size are required key fields
    relevant: tuple[str, ...]  # KEY_FIELDS that are part of the key
    wrong_family: str  # message template: {name}, {family}
    option_defaults: Mapping[str, str] = field(default_factory=dict)


_RULES: Mapping[str, _KindRules] = MappingProxyType(
    {
        "neuron": _KindRules(
            precisions=("bf16", "fp16", "fp32", "int8", "fp8"),
            family="neuron",
            instance_example="ml.inf2.48xlarge",
            shaped=True,
            relevant=KEY_FIELDS,
            wrong_family=(
                "neuron artifacts need an Inferentia/Trainium instance type "
                "(ml.inf2.*, ml.trn1.*, ml.trn2.*); {name} is a {family} instance"
            ),
        ),
        "inductor": _KindRules(
            precisions=("fp32", "bf16"),
            family="cpu",
            instance_example="ml.c7i.4xlarge",
            shaped=True,
            # One CPU process: the tensor-parallel degree is always 1.
            relevant=tuple(f for f in KEY_FIELDS if f != "tensor_parallel_degree"),
            wrong_family=(
                "inductor packages need a CPU instance type (ml.c7i.*, ml.m7i.*, ml.c6a.*); "
                "{name} is a {family} instance"
            ),
        ),
        "awq": _KindRules(
            precisions=("int4-awq",),
            family="gpu",
            instance_example="",
            shaped=False,
            # Weight-only quantization: shapes, instance and tensor parallelism do not change the weights.
            relevant=("kind", "model", "model_revision", "precision", "toolchain", "options"),
            wrong_family=(
                "AWQ checkpoints run on GPU instances; {name} is a {family} instance. Name a GPU "
                "instance type (ml.g5.*, ml.g6.*, ml.p4d.*, ...) or leave instance_type empty"
            ),
            # The Hugging Face quantization_config defaults, so stating them changes nothing.
            option_defaults=MappingProxyType({"group_size": "128", "zero_point": "true", "version": "gemm"}),
        ),
    }
)


@dataclass(frozen=True)
class KeyRequest:
    """A key as the caller states it: unset strings are "", unset numbers 0 (as in proto3)."""

    kind: str
    model: str
    model_revision: str = ""
    instance_type: str = ""
    sequence_length: int = 0
    batch_size: int = 0
    tensor_parallel_degree: int = 0
    precision: str = ""
    toolchain: str = ""
    options: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


ToolchainResolver = Callable[[str, str], str]


# The tables above are per kind and per field: a kind or key field added to the contract
# must be given its rules here, so fail at import rather than normalise it wrongly.
require_kinds(_RULES, "key_normalization._RULES")
require_fields((f.name for f in fields(KeyRequest)), "key_normalization.KeyRequest")
if any(not set(rules.relevant) <= set(KEY_FIELDS) for rules in _RULES.values()):
    raise RuntimeError("key_normalization._RULES: a kind's relevant fields name a field the key lacks")


def normalize_key(
    req: KeyRequest,
    catalog: InstanceCatalog,
    default_toolchains: Mapping[str, str] | ToolchainResolver = DEFAULT_TOOLCHAINS,
    models: ModelCatalog | None = None,
) -> NormalizedKey:
    """Validate and normalise `req`; raises InvalidKey(field, message) for the first problem.

    `default_toolchains` fills an unset toolchain: a mapping per kind, or a function of
    (kind, compile target) (the server's: configured default, else the newest toolchain
    a live worker serves, else the built-in default). `models` (default: the packaged
    catalog) gives the model's canonical name. Pure and thread-safe (the catalogs are
    only read). Equal digests <=> same artifact.
    """
    kind = _kind(req.kind)
    rules = _RULES[kind]
    model = (models or ModelCatalog.load_default()).canonical_name(_model(req.model))
    revision = _revision(req.model_revision)
    precision = _precision(req.precision, kind)
    instance = _instance(req.instance_type, kind, catalog)
    sequence_length = _shape("sequence_length", req.sequence_length, MAX_SEQUENCE_LENGTH, kind)
    batch_size = _shape("batch_size", req.batch_size, MAX_BATCH_SIZE, kind)
    tp = _tensor_parallel(req.tensor_parallel_degree, kind, instance)
    check_fits(model, precision, kind, tp, instance)
    compile_target = instance.compile_target if instance else ""
    if req.toolchain:
        toolchain = _toolchain(req.toolchain, kind)
    elif callable(default_toolchains):
        toolchain = _toolchain(default_toolchains(kind, compile_target), kind)
    else:
        toolchain = _toolchain(default_toolchains.get(kind, ""), kind)
    options = _options(req.options, kind)

    values: dict[str, object] = {
        "kind": kind,
        "model": model,
        "model_revision": revision,
        "instance_type": compile_target,  # the artifact depends on the target, not the size
        "sequence_length": sequence_length,
        "batch_size": batch_size,
        "tensor_parallel_degree": tp,
        "precision": precision,
        "toolchain": toolchain,
        "options": dict(options),
    }
    document: dict[str, object] = {"v": SCHEMA_VERSION}
    for name in rules.relevant:
        document["compile_target" if name == "instance_type" else name] = values[name]
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    stated = {
        "instance_type": instance is not None,
        "sequence_length": req.sequence_length != 0,
        "batch_size": req.batch_size != 0,
        "tensor_parallel_degree": tp != 1,
    }
    ignored = tuple(
        sorted(name for name, was_set in stated.items() if was_set and name not in rules.relevant)
    )
    return NormalizedKey(
        schema_version=SCHEMA_VERSION,
        kind=kind,
        model=model,
        model_revision=revision,
        instance_type=instance.name if instance else "",
        compile_target=compile_target,
        sequence_length=sequence_length if rules.shaped else 0,
        batch_size=batch_size if rules.shaped else 0,
        tensor_parallel_degree=0 if kind == "awq" else tp,
        precision=precision,
        toolchain=toolchain,
        options=options,
        relevant_fields=rules.relevant,
        ignored_fields=ignored,
        canonical=canonical,
        digest=hash_bytes(canonical.encode()),
    )


def with_model(key: NormalizedKey, model: str) -> NormalizedKey:
    """`key` as it was normalised before model names were canonical, had it named `model`
    (another name of its model): what an artifact stored then is keyed by."""
    document = json.loads(key.canonical)
    document["model"] = model
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return replace(key, model=model, canonical=canonical, digest=hash_bytes(canonical.encode()))


def key_to_dict(key: NormalizedKey) -> dict[str, object]:
    """Every field of `key` as JSON-ready values (options as an object, tuples as lists)."""
    out: dict[str, object] = {f.name: getattr(key, f.name) for f in fields(key)}
    out["options"] = dict(key.options)
    out["relevant_fields"] = list(key.relevant_fields)
    out["ignored_fields"] = list(key.ignored_fields)
    return out


def diff_keys(a: NormalizedKey, b: NormalizedKey) -> list[tuple[str, str, str]]:
    """(field, a's value, b's value) for each key field where `a` and `b` differ.

    Covers the fields relevant to either key's kind, with the instance compared by
    compile target (reported as "compile_target") and options per entry
    ("options.<name>"). Empty or unset values read "(unset)". Order: schema version,
    then ArtifactKey field order, then option names sorted.
    """
    diffs: list[tuple[str, str, str]] = []
    if a.schema_version != b.schema_version:
        diffs.append(("schema_version", str(a.schema_version), str(b.schema_version)))
    names = dict.fromkeys((*_relevant(a.kind), *_relevant(b.kind)))
    for name in names:
        if name == "options":
            continue
        attr = "compile_target" if name == "instance_type" else name
        value_a, value_b = getattr(a, attr), getattr(b, attr)
        if value_a != value_b:
            diffs.append((attr, _text(value_a), _text(value_b)))
    if "options" in names:
        options_a, options_b = dict(a.options), dict(b.options)
        for option in sorted(options_a.keys() | options_b.keys()):
            value_a, value_b = options_a.get(option), options_b.get(option)
            if value_a != value_b:
                diffs.append((f"options.{option}", _option_text(value_a), _option_text(value_b)))
    return diffs


def _relevant(kind: str) -> tuple[str, ...]:
    # A key read back from storage may carry a kind this version does not know.
    rules = _RULES.get(kind)
    return rules.relevant if rules else KEY_FIELDS


def _text(value: object) -> str:
    return "(unset)" if value in ("", 0) else str(value)


def _option_text(value: str | None) -> str:
    if value is None:
        return "(unset)"
    return value if value else '""'


def _show(value: str, limit: int = 80) -> str:
    """`value` quoted for a message, shortened so a huge input cannot flood a log."""
    return repr(value if len(value) <= limit else f"{value[:limit]}...")


def _check_chars(name: str, value: str, pattern: re.Pattern[str], allowed: str) -> None:
    if not pattern.fullmatch(value):
        bad = next((c for c in value if not pattern.fullmatch(c)), "")
        raise InvalidKey(name, f"{name} {_show(value)} contains {bad!r}; allowed characters are {allowed}")


def _kind(raw: str) -> str:
    kind = raw.strip().lower().removeprefix("artifact_kind_")
    if kind in ("", "unspecified"):
        # Said in the contract's spelling: a caller in another language that sent a short
        # name ('neuron') by JSON or proto-loader had it dropped and arrives here unset.
        raise InvalidKey(
            "kind",
            f"kind is required: one of {kind_values()}; a client that sends enums by name must "
            "use these full names (most drop an unknown name such as 'neuron' and send kind unset)",
        )
    if kind not in KINDS:
        raise InvalidKey("kind", unknown("kind", raw, KINDS))
    return kind


def _model(model: str) -> str:
    if not model:
        raise InvalidKey("model", "model is required: a Hugging Face repo id or a JumpStart model id")
    if len(model) > MAX_MODEL:
        raise InvalidKey("model", f"model is {len(model)} characters long; the limit is {MAX_MODEL}")
    _check_chars("model", model, _MODEL_RE, "letters, digits and . _ - / : @ +")
    if model.startswith("/") or model.endswith("/"):
        raise InvalidKey("model", f"model {_show(model)} must not start or end with '/'")
    parts = model.split("/")
    if ".." in parts or "" in parts:
        raise InvalidKey("model", f"model {_show(model)} has an empty or '..' path component")
    return model


def check_model(model: str) -> str:
    """`model` if a key may name it (required, length, characters, path components); else
    InvalidKey("model", ...). For requests that name a model outside a key (`Recommend`)."""
    return _model(model)


def _revision(revision: str) -> str:
    if len(revision) > MAX_REVISION:
        raise InvalidKey(
            "model_revision",
            f"model_revision is {len(revision)} characters long; the limit is {MAX_REVISION}",
        )
    if revision:
        _check_chars("model_revision", revision, _REVISION_RE, "letters, digits and . _ - : +")
    return revision


def _instance(raw: str, kind: str, catalog: InstanceCatalog) -> InstanceType | None:
    rules = _RULES[kind]
    name = raw.strip()
    if not name:
        if rules.instance_example:
            raise InvalidKey(
                "instance_type", f"instance_type is required for {kind} keys (e.g. {rules.instance_example})"
            )
        return None
    if len(name) > MAX_INSTANCE_TYPE:
        raise InvalidKey("instance_type", f"instance_type {_show(name)} is too long to be an instance type")
    instance = catalog.get(name)
    if instance.family != rules.family:
        family = _FAMILY_LABELS.get(instance.family, instance.family)
        raise InvalidKey("instance_type", rules.wrong_family.format(name=instance.name, family=family))
    return instance


def _precision(raw: str, kind: str) -> str:
    allowed = _RULES[kind].precisions
    text = raw.strip().lower()
    if not text:
        return allowed[0]
    precision = text if text in PRECISIONS else PRECISION_ALIASES.get(text)
    if precision is None:
        hint = did_you_mean(text, [*PRECISIONS, *PRECISION_ALIASES])
        raise InvalidKey(
            "precision",
            f"unknown precision {_show(raw)}{hint} (use one of {', '.join(allowed)} for kind {kind})",
        )
    if precision in allowed:
        return precision
    if kind == "awq":
        message = (
            f"awq produces int4-awq checkpoints only; precision {precision} is not available for kind awq"
        )
    elif precision == "int4-awq":
        message = f"{kind} cannot produce int4-awq (AWQ is GPU-only); use kind awq with a GPU instance type"
    else:
        message = (
            f"{kind} supports {', '.join(allowed)}; precision {precision} is not available for kind {kind}"
        )
    raise InvalidKey("precision", message)


def _shape(name: str, value: int, limit: int, kind: str) -> int:
    required = _RULES[kind].shaped
    if value < 0:
        unset = "" if required else " (or 0 to leave it unset)"
        raise InvalidKey(name, f"{name} must be positive{unset}; got {value}")
    if value == 0 and required:
        # 0 is also what an omitted field reads as: say both what is wrong and that it is needed.
        raise InvalidKey(name, f"{name} must be positive for {kind} keys (it is required); got 0")
    if value > limit:
        raise InvalidKey(name, f"{name}={value} is above the limit of {limit}")
    return value


def _tensor_parallel(value: int, kind: str, instance: InstanceType | None) -> int:
    """The effective degree (0 means 1), checked against the kind and the instance."""
    name = "tensor_parallel_degree"
    if value < 0:
        raise InvalidKey(name, f"{name} must be positive (0 means 1); got {value}")
    if value > MAX_TENSOR_PARALLEL:
        raise InvalidKey(name, f"{name}={value} is above the limit of {MAX_TENSOR_PARALLEL}")
    tp = value or 1
    if kind == "inductor" and tp != 1:
        raise InvalidKey(name, f"inductor packages run on one CPU process; {name} must be 1")
    if instance is not None and instance.family in ("neuron", "gpu") and tp > instance.total_cores:
        unit = "NeuronCore" if instance.family == "neuron" else "GPU"
        count = f"{instance.total_cores} {unit}{'' if instance.total_cores == 1 else 's'}"
        raise InvalidKey(name, f"{instance.name} has {count}; {name}={tp} does not fit")
    return tp


def _toolchain(raw: str, kind: str) -> str:
    # "torch 2.13.0", "torch==2.13.0" and "Torch-2.13.0" name the same toolchain.
    toolchain = re.sub(r"\s*==\s*|\s+", "-", raw.strip().lower())
    if not toolchain:
        return DEFAULT_TOOLCHAINS[kind]
    if len(toolchain) > MAX_TOOLCHAIN:
        raise InvalidKey(
            "toolchain", f"toolchain is {len(toolchain)} characters long; the limit is {MAX_TOOLCHAIN}"
        )
    _check_chars("toolchain", toolchain, _TOOLCHAIN_RE, "lowercase letters, digits and . _ + -")
    return toolchain


def check_option_count(count: int) -> None:
    """`InvalidKey` for more than MAX_OPTIONS options; cheap, so callers check it before
    copying a request's options."""
    if count > MAX_OPTIONS:
        raise InvalidKey("options", f"{count} options given; the limit is {MAX_OPTIONS}")


def _options(raw: Mapping[str, str], kind: str) -> tuple[tuple[str, str], ...]:
    """Sorted (name, value) pairs: names lowercased, values canonicalised, kind defaults filled."""
    check_option_count(len(raw))
    options: dict[str, str] = {}
    stated_as: dict[str, str] = {}
    for raw_name, raw_value in raw.items():
        name = raw_name.strip().lower()
        if not name:
            raise InvalidKey("options", "an option name is empty")
        if len(name) > MAX_OPTION_NAME:
            raise InvalidKey(
                "options", f"option name {_show(name)} is longer than {MAX_OPTION_NAME} characters"
            )
        _check_chars("options", name, _OPTION_NAME_RE, "lowercase letters, digits and _ . - in option names")
        if name in options:
            raise InvalidKey(
                "options",
                f"options {stated_as[name]!r} and {raw_name!r} collide; option names are case-insensitive",
            )
        options[name] = _option_value(name, raw_value)
        stated_as[name] = raw_name
    if kind == "awq":
        _check_awq_options(options)
    return tuple(sorted({**_RULES[kind].option_defaults, **options}.items()))


def _option_value(name: str, raw: str) -> str:
    value = raw.strip()
    if len(value) > MAX_OPTION_VALUE:
        raise InvalidKey("options", f"option {name} is longer than {MAX_OPTION_VALUE} characters")
    if not value.isprintable():
        bad = next(c for c in value if not c.isprintable())
        raise InvalidKey("options", f"option {name} contains {bad!r}; control characters are not allowed")
    # Spellings of one number or one boolean must not split the key.
    if _INT_RE.fullmatch(value):
        return str(int(value))
    return _BOOLEANS.get(value.lower(), value)


def _check_awq_options(options: dict[str, str]) -> None:
    """Validate and canonicalise (in place) the options the AWQ quantizer interprets."""
    group_size = options.get("group_size")
    if group_size is not None and not (_INT_RE.fullmatch(group_size) and int(group_size) > 0):
        raise InvalidKey("options", f"option group_size must be a positive integer; got {group_size!r}")
    zero_point = options.get("zero_point")
    if zero_point is not None and zero_point not in ("true", "false"):
        raise InvalidKey("options", f"option zero_point must be true or false; got {zero_point!r}")
    if "version" in options:
        # Kernel packing names (gemm, gemv, ...) are case-insensitive in the quantizers.
        options["version"] = options["version"].lower()
