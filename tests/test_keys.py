"""Key normalisation: which requests share an artifact, and what is refused with which message."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
import xxhash

from prebake.core.errors import InvalidArgument, InvalidKey
from prebake.server.instance_catalog import InstanceCatalog
from prebake.server.key_normalization import (
    DEFAULT_TOOLCHAINS,
    PRECISION_ALIASES,
    PRECISIONS,
    SCHEMA_VERSION,
    KeyRequest,
    diff_keys,
    key_to_dict,
    normalize_key,
)
from prebake.server.records import NormalizedKey

CATALOG = InstanceCatalog.load_default()
MODEL = "meta-llama/Meta-Llama-3-8B"
BASE: dict[str, dict[str, Any]] = {
    "neuron": {
        "kind": "neuron",
        "model": MODEL,
        "instance_type": "ml.inf2.48xlarge",
        "sequence_length": 8192,
        "batch_size": 8,
        "tensor_parallel_degree": 24,
    },
    "inductor": {
        "kind": "inductor",
        "model": MODEL,
        "instance_type": "ml.c7i.4xlarge",
        "sequence_length": 2048,
        "batch_size": 1,
    },
    "awq": {"kind": "awq", "model": MODEL},
}


def key(base: str, /, **changes: Any) -> NormalizedKey:
    """Normalise BASE[base] with `changes` applied (which may change the kind itself)."""
    return normalize_key(KeyRequest(**{**BASE[base], **changes}), CATALOG)


def refused(base: str, /, **changes: Any) -> InvalidKey:
    with pytest.raises(InvalidKey) as info:
        key(base, **changes)
    return info.value


# --- which requests share an artifact --------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "a", "b"),
    [
        # Aliases and spellings.
        ("neuron", {"precision": "bf16"}, {"precision": "bfloat16"}),
        ("neuron", {"precision": "bf16"}, {"precision": " BF16 "}),
        ("neuron", {"precision": "fp16"}, {"precision": "Float16"}),
        ("neuron", {"precision": "fp16"}, {"precision": "half"}),
        ("neuron", {"precision": "fp32"}, {"precision": "float"}),
        ("neuron", {"precision": "fp8"}, {"precision": "FP8_E4M3"}),
        ("awq", {"precision": "int4-awq"}, {"precision": "W4A16"}),
        ("awq", {"precision": "int4-awq"}, {"precision": "int4_awq"}),
        ("neuron", {"kind": "neuron"}, {"kind": "ARTIFACT_KIND_NEURON"}),
        ("awq", {"kind": "awq"}, {"kind": "AWQ"}),
        ("neuron", {"instance_type": "ml.inf2.48xlarge"}, {"instance_type": " INF2.48XLarge "}),
        ("inductor", {"toolchain": "torch-2.13.0"}, {"toolchain": "torch==2.13.0"}),
        ("inductor", {"toolchain": "torch-2.13.0"}, {"toolchain": "Torch  2.13.0"}),
        ("inductor", {"toolchain": "torch-2.13.0"}, {"toolchain": "torch == 2.13.0"}),
        # Explicit defaults.
        ("neuron", {}, {"precision": "bf16"}),
        ("inductor", {}, {"precision": "fp32"}),
        ("awq", {}, {"precision": "int4-awq"}),
        ("neuron", {}, {"toolchain": DEFAULT_TOOLCHAINS["neuron"]}),
        ("awq", {}, {"toolchain": DEFAULT_TOOLCHAINS["awq"]}),
        ("awq", {}, {"options": {"group_size": "128", "zero_point": "true", "version": "gemm"}}),
        ("awq", {}, {"options": {"Group_Size": "0128", "zero_point": "Yes", "version": "GEMM"}}),
        ("neuron", {"tensor_parallel_degree": 0}, {"tensor_parallel_degree": 1}),
        ("inductor", {"tensor_parallel_degree": 0}, {"tensor_parallel_degree": 1}),
        # Options: names case-insensitive, values canonical.
        ("neuron", {"options": {"optlevel": "2"}}, {"options": {" OptLevel ": " 02 "}}),
        ("neuron", {"options": {"fast": "true"}}, {"options": {"fast": "ON"}}),
        ("neuron", {"options": {"fast": "false"}}, {"options": {"fast": "No"}}),
        ("neuron", {"options": {"a": "1", "b": "2"}}, {"options": {"b": "2", "a": "1"}}),
        # AWQ is weight-only: shapes, instance and tensor parallelism do not matter.
        ("awq", {"batch_size": 1}, {"batch_size": 8}),
        ("awq", {"sequence_length": 2048}, {"sequence_length": 8192}),
        ("awq", {"instance_type": "ml.g5.12xlarge"}, {"instance_type": "ml.g6.12xlarge"}),
        ("awq", {}, {"instance_type": "ml.p4d.24xlarge", "tensor_parallel_degree": 8}),
        # Neuron: the compile target matters, not the instance size.
        (
            "neuron",
            {"instance_type": "ml.inf2.24xlarge", "tensor_parallel_degree": 8},
            {"tensor_parallel_degree": 8},
        ),
        ("neuron", {"instance_type": "ml.trn1.32xlarge"}, {"instance_type": "ml.trn1n.32xlarge"}),
        # Inductor: the ISA matters, not the instance.
        ("inductor", {"instance_type": "ml.c7i.xlarge"}, {"instance_type": "ml.m7i.2xlarge"}),
    ],
)
def test_same_artifact(kind: str, a: dict[str, Any], b: dict[str, Any]) -> None:
    assert key(kind, **a).digest == key(kind, **b).digest


@pytest.mark.parametrize(
    ("kind", "a", "b"),
    [
        ("neuron", {"batch_size": 4}, {"batch_size": 8}),
        ("neuron", {"sequence_length": 4096}, {"sequence_length": 8192}),
        ("neuron", {"tensor_parallel_degree": 12}, {"tensor_parallel_degree": 24}),
        ("neuron", {"precision": "bf16"}, {"precision": "fp16"}),
        ("neuron", {"toolchain": "neuronx-cc-2.15"}, {"toolchain": "neuronx-cc-2.16"}),
        ("neuron", {"model_revision": "abc"}, {"model_revision": "abd"}),
        ("neuron", {"model_revision": ""}, {"model_revision": "abc"}),
        ("neuron", {"model": "org/Model"}, {"model": "org/model"}),
        ("neuron", {"options": {}}, {"options": {"optlevel": "3"}}),
        ("neuron", {"instance_type": "ml.inf2.48xlarge"}, {"instance_type": "ml.trn1.32xlarge"}),
        ("neuron", {"instance_type": "ml.trn1.32xlarge"}, {"instance_type": "ml.trn2.48xlarge"}),
        ("inductor", {"instance_type": "ml.c7i.4xlarge"}, {"instance_type": "ml.c6a.4xlarge"}),
        ("inductor", {"batch_size": 1}, {"batch_size": 2}),
        ("awq", {"options": {"group_size": "128"}}, {"options": {"group_size": "64"}}),
        ("awq", {"options": {}}, {"options": {"version": "gemv"}}),
        ("awq", {"toolchain": "llmcompressor-0.14"}, {"toolchain": "llmcompressor-0.15"}),
    ],
)
def test_different_artifact(kind: str, a: dict[str, Any], b: dict[str, Any]) -> None:
    assert key(kind, **a).digest != key(kind, **b).digest


def test_kinds_never_share_a_digest() -> None:
    digests = {key(kind).digest for kind in BASE}
    assert len(digests) == 3


@pytest.mark.parametrize(("alias", "canonical"), sorted(PRECISION_ALIASES.items()))
def test_every_alias_names_a_canonical_precision(alias: str, canonical: str) -> None:
    assert canonical in PRECISIONS
    kind = "awq" if canonical == "int4-awq" else "neuron"
    assert key(kind, precision=alias.upper()).precision == canonical


# --- the normalised key ----------------------------------------------------------------------


def test_neuron_key_keeps_every_field() -> None:
    k = key("neuron", precision="bfloat16", options={"OptLevel": "3"})
    assert (k.kind, k.instance_type, k.compile_target) == ("neuron", "ml.inf2.48xlarge", "inf2")
    assert (k.sequence_length, k.batch_size, k.tensor_parallel_degree) == (8192, 8, 24)
    assert (k.precision, k.toolchain, k.options) == ("bf16", "neuronx-cc-2", (("optlevel", "3"),))
    assert k.relevant_fields == (
        "kind",
        "model",
        "model_revision",
        "instance_type",
        "sequence_length",
        "batch_size",
        "tensor_parallel_degree",
        "precision",
        "toolchain",
        "options",
    )
    assert k.ignored_fields == ()


def test_awq_key_clears_and_lists_ignored_fields() -> None:
    k = key("awq", instance_type="g5.12xlarge", batch_size=8, sequence_length=8192, tensor_parallel_degree=4)
    assert (k.sequence_length, k.batch_size, k.tensor_parallel_degree) == (0, 0, 0)
    assert (k.instance_type, k.compile_target) == ("ml.g5.12xlarge", "cuda-sm86")
    assert k.precision == "int4-awq"
    assert dict(k.options) == {"group_size": "128", "zero_point": "true", "version": "gemm"}
    assert k.ignored_fields == ("batch_size", "instance_type", "sequence_length", "tensor_parallel_degree")
    assert k.relevant_fields == ("kind", "model", "model_revision", "precision", "toolchain", "options")


def test_awq_without_instance() -> None:
    k = key("awq")
    assert (k.instance_type, k.compile_target, k.ignored_fields) == ("", "", ())


def test_inductor_key() -> None:
    k = key("inductor", instance_type="c6a.4xlarge")
    assert (k.compile_target, k.tensor_parallel_degree, k.precision) == ("cpu-avx2", 1, "fp32")
    assert "tensor_parallel_degree" not in k.relevant_fields
    assert k.ignored_fields == ()


@pytest.mark.parametrize("kind", sorted(BASE))
def test_canonical_form_and_digest(kind: str) -> None:
    k = key(kind, options={"x": "1"})
    document = json.loads(k.canonical)
    assert document["v"] == SCHEMA_VERSION == k.schema_version == 1
    expected = {"compile_target" if f == "instance_type" else f for f in k.relevant_fields}
    assert set(document) == expected | {"v"}
    assert "instance_type" not in document
    assert k.canonical == json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert re.fullmatch(r"[0-9a-f]{32}", k.digest)
    assert k.digest == xxhash.xxh3_128_hexdigest(k.canonical.encode())


def test_awq_canonical_has_no_shape_or_instance() -> None:
    canonical = key("awq", instance_type="ml.g5.12xlarge", batch_size=8, sequence_length=8192).canonical
    for name in (
        "batch_size",
        "sequence_length",
        "compile_target",
        "instance_type",
        "tensor_parallel_degree",
    ):
        assert f'"{name}"' not in canonical


def test_non_ascii_option_value_is_kept_verbatim() -> None:
    k = key("neuron", options={"note": "größe"})
    assert '"note":"größe"' in k.canonical


def test_key_to_dict_is_json_ready() -> None:
    k = key("awq", batch_size=8)
    d = key_to_dict(k)
    assert d["options"] == {"group_size": "128", "version": "gemm", "zero_point": "true"}
    assert d["ignored_fields"] == ["batch_size"]
    assert d["digest"] == k.digest
    assert set(d) == {f.name for f in dataclasses.fields(NormalizedKey)}
    json.dumps(d)


# --- diffs -----------------------------------------------------------------------------------


def test_diff_keys_names_differences() -> None:
    a = key("neuron", batch_size=4, options={"optlevel": "2"})
    b = key("neuron", batch_size=8, instance_type="ml.trn1.32xlarge", options={"fast": "1"})
    assert diff_keys(a, b) == [
        ("compile_target", "inf2", "trn1"),
        ("batch_size", "4", "8"),
        ("options.fast", "(unset)", "1"),
        ("options.optlevel", "2", "(unset)"),
    ]


def test_diff_keys_equal_keys_and_ignored_fields() -> None:
    assert diff_keys(key("neuron"), key("neuron")) == []
    assert diff_keys(key("awq", batch_size=1), key("awq", batch_size=8)) == []
    assert diff_keys(
        key("neuron"), key("neuron", instance_type="ml.inf2.24xlarge", tensor_parallel_degree=12)
    ) == [("tensor_parallel_degree", "24", "12")]


def test_diff_keys_across_kinds_and_models() -> None:
    diffs = dict((name, (x, y)) for name, x, y in diff_keys(key("neuron"), key("awq", model="other/model")))
    assert diffs["kind"] == ("neuron", "awq")
    assert diffs["model"] == (MODEL, "other/model")
    assert diffs["batch_size"] == ("8", "(unset)")
    assert diffs["options.group_size"] == ("(unset)", "128")


# --- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "changes", "field", "message"),
    [
        # kind
        ("awq", {"kind": ""}, "kind", "kind is required"),
        ("awq", {"kind": "ARTIFACT_KIND_UNSPECIFIED"}, "kind", "kind is required"),
        ("awq", {"kind": "tensorrt"}, "kind", "unknown kind 'tensorrt' (one of neuron, awq, inductor)"),
        # model
        ("awq", {"model": ""}, "model", "model is required"),
        ("awq", {"model": "a" * 257}, "model", "257 characters long; the limit is 256"),
        ("awq", {"model": "my model"}, "model", "contains ' '"),
        ("awq", {"model": " org/model"}, "model", "contains ' '"),
        ("awq", {"model": "org/model\n"}, "model", r"contains '\n'"),
        ("awq", {"model": "org\x00model"}, "model", r"contains '\x00'"),
        ("awq", {"model": "org/mödel"}, "model", "contains 'ö'"),
        ("awq", {"model": "/org/model"}, "model", "must not start or end with '/'"),
        ("awq", {"model": "org/model/"}, "model", "must not start or end with '/'"),
        ("awq", {"model": "org/../model"}, "model", "'..' path component"),
        ("awq", {"model": ".."}, "model", "'..' path component"),
        ("awq", {"model": "org//model"}, "model", "empty or '..' path component"),
        # model_revision
        ("awq", {"model_revision": "a" * 129}, "model_revision", "129 characters long; the limit is 128"),
        ("awq", {"model_revision": "main/x"}, "model_revision", "contains '/'"),
        ("awq", {"model_revision": "ab cd"}, "model_revision", "contains ' '"),
        ("awq", {"model_revision": "ab\tcd"}, "model_revision", r"contains '\t'"),
        # precision
        (
            "neuron",
            {"precision": "bf32"},
            "precision",
            "unknown precision 'bf32'; did you mean 'fp32'? (use one of bf16, fp16, fp32, int8, fp8 for kind "
            "neuron)",
        ),
        ("inductor", {"precision": "fp64"}, "precision", "use one of fp32, bf16 for kind inductor"),
        (
            "awq",
            {"precision": "bfloat16"},
            "precision",
            "awq produces int4-awq checkpoints only; precision bf16 is not available for kind awq",
        ),
        (
            "neuron",
            {"precision": "int4-awq"},
            "precision",
            "neuron cannot produce int4-awq (AWQ is GPU-only); use kind awq with a GPU instance type",
        ),
        ("inductor", {"precision": "awq"}, "precision", "inductor cannot produce int4-awq"),
        ("inductor", {"precision": "fp16"}, "precision", "precision fp16 is not available for kind inductor"),
        # instance_type
        ("neuron", {"instance_type": ""}, "instance_type", "instance_type is required for neuron keys"),
        ("inductor", {"instance_type": "  "}, "instance_type", "instance_type is required for inductor keys"),
        ("neuron", {"instance_type": "ml.inf2.96xlarge"}, "instance_type", "did you mean"),
        ("neuron", {"instance_type": "x" * 65}, "instance_type", "too long"),
        (
            "neuron",
            {"instance_type": "ml.g5.12xlarge"},
            "instance_type",
            "neuron artifacts need an Inferentia/Trainium instance type (ml.inf2.*, ml.trn1.*, ml.trn2.*); "
            "ml.g5.12xlarge is a GPU instance",
        ),
        ("neuron", {"instance_type": "ml.c7i.xlarge"}, "instance_type", "ml.c7i.xlarge is a CPU instance"),
        ("inductor", {"instance_type": "ml.inf2.xlarge"}, "instance_type", "need a CPU instance type"),
        ("inductor", {"instance_type": "ml.g5.xlarge"}, "instance_type", "ml.g5.xlarge is a GPU instance"),
        (
            "awq",
            {"instance_type": "ml.inf2.48xlarge"},
            "instance_type",
            "AWQ checkpoints run on GPU instances; ml.inf2.48xlarge is a Neuron instance",
        ),
        ("awq", {"instance_type": "ml.c7i.xlarge"}, "instance_type", "ml.c7i.xlarge is a CPU instance"),
        # shapes
        (
            "neuron",
            {"sequence_length": 0},
            "sequence_length",
            "sequence_length must be positive for neuron keys",
        ),
        (
            "neuron",
            {"batch_size": 0},
            "batch_size",
            "batch_size must be positive for neuron keys (it is required)",
        ),
        (
            "inductor",
            {"sequence_length": 0},
            "sequence_length",
            "sequence_length must be positive for inductor keys (it is required); got 0",
        ),
        ("inductor", {"batch_size": 0}, "batch_size", "batch_size must be positive for inductor keys"),
        ("neuron", {"sequence_length": -1}, "sequence_length", "sequence_length must be positive; got -1"),
        ("neuron", {"batch_size": -8}, "batch_size", "batch_size must be positive; got -8"),
        ("awq", {"sequence_length": -1}, "sequence_length", "must be positive"),
        ("awq", {"batch_size": -1}, "batch_size", "must be positive"),
        ("neuron", {"sequence_length": 1_048_577}, "sequence_length", "above the limit of 1048576"),
        ("neuron", {"batch_size": 4097}, "batch_size", "above the limit of 4096"),
        # tensor_parallel_degree
        (
            "neuron",
            {"tensor_parallel_degree": 32},
            "tensor_parallel_degree",
            "ml.inf2.48xlarge has 24 NeuronCores; tensor_parallel_degree=32 does not fit",
        ),
        (
            "neuron",
            {"instance_type": "ml.inf2.24xlarge", "tensor_parallel_degree": 24},
            "tensor_parallel_degree",
            "ml.inf2.24xlarge has 12 NeuronCores; tensor_parallel_degree=24 does not fit",
        ),
        ("neuron", {"tensor_parallel_degree": -1}, "tensor_parallel_degree", "must be positive"),
        ("awq", {"tensor_parallel_degree": -1}, "tensor_parallel_degree", "must be positive"),
        ("awq", {"tensor_parallel_degree": 1025}, "tensor_parallel_degree", "above the limit of 1024"),
        (
            "inductor",
            {"tensor_parallel_degree": 2},
            "tensor_parallel_degree",
            "inductor packages run on one CPU process; tensor_parallel_degree must be 1",
        ),
        (
            "awq",
            {"instance_type": "ml.g5.12xlarge", "tensor_parallel_degree": 8},
            "tensor_parallel_degree",
            "ml.g5.12xlarge has 4 GPUs; tensor_parallel_degree=8 does not fit",
        ),
        (
            "awq",
            {"instance_type": "ml.g5.xlarge", "tensor_parallel_degree": 2},
            "tensor_parallel_degree",
            "ml.g5.xlarge has 1 GPU; tensor_parallel_degree=2 does not fit",
        ),
        # toolchain
        ("awq", {"toolchain": "x" * 65}, "toolchain", "the limit is 64"),
        ("awq", {"toolchain": "torch/2.13"}, "toolchain", "contains '/'"),
        ("awq", {"toolchain": "torch\x002"}, "toolchain", r"contains '\x00'"),
        # options
        (
            "neuron",
            {"options": {f"o{i}": "1" for i in range(33)}},
            "options",
            "33 options given; the limit is 32",
        ),
        ("neuron", {"options": {"": "1"}}, "options", "an option name is empty"),
        ("neuron", {"options": {"  ": "1"}}, "options", "an option name is empty"),
        ("neuron", {"options": {"o" * 65: "1"}}, "options", "longer than 64 characters"),
        ("neuron", {"options": {"opt level": "1"}}, "options", "contains ' '"),
        ("neuron", {"options": {"opt=level": "1"}}, "options", "contains '='"),
        ("neuron", {"options": {"OptLevel": "1", "optlevel": "2"}}, "options", "case-insensitive"),
        ("neuron", {"options": {"flags": "x" * 257}}, "options", "longer than 256 characters"),
        ("neuron", {"options": {"flags": "a\nb"}}, "options", r"contains '\n'"),
        ("neuron", {"options": {"flags": "a\x1bb"}}, "options", r"contains '\x1b'"),
        ("awq", {"options": {"group_size": "0"}}, "options", "group_size must be a positive integer"),
        ("awq", {"options": {"group_size": "-128"}}, "options", "group_size must be a positive integer"),
        ("awq", {"options": {"group_size": "big"}}, "options", "group_size must be a positive integer"),
        ("awq", {"options": {"zero_point": "maybe"}}, "options", "zero_point must be true or false"),
    ],
)
def test_refused(kind: str, changes: dict[str, Any], field: str, message: str) -> None:
    error = refused(kind, **changes)
    assert error.field == field
    assert message in str(error)
    assert isinstance(error, InvalidArgument)


def test_unknown_instance_suggests_and_lists() -> None:
    message = str(refused("neuron", instance_type="ml.inf2.96xlarge"))
    assert message.startswith("unknown instance type 'ml.inf2.96xlarge'; did you mean ")
    assert "ml.inf2.48xlarge" in message.partition("Known:")[0]
    assert "Known: ml.inf2.xlarge, " in message


def test_limits_are_inclusive() -> None:
    k = key(
        "neuron",
        model="m" * 256,
        model_revision="r" * 128,
        sequence_length=1_048_576,
        instance_type="ml.trn2.48xlarge",
        batch_size=4096,
        tensor_parallel_degree=64,
        toolchain="t" * 64,
        options={f"{i:0>64}": "v" * 256 for i in range(32)},
    )
    assert len(k.options) == 32


def test_accepted_model_charset() -> None:
    assert (
        key("awq", model="jumpstart:huggingface-llm_v2.1@main+x").model
        == "jumpstart:huggingface-llm_v2.1@main+x"
    )


def test_catalog_from_csv_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "instances.csv"
    rows = [
        "instance_type,accelerator,accelerator_count,cores_per_accelerator,total_cores,core_generation,"
        "compile_target,accelerator_memory_gib,vcpus,host_memory_gib",
        "ml.inf2.xlarge,Inferentia2,1,2,2,NeuronCore-v2,inf2,32,4,16",
    ]
    path.write_text("\n".join(rows) + "\n")
    catalog = InstanceCatalog.from_csv(path)
    assert catalog.names() == ("ml.inf2.xlarge",)
    assert "INF2.xlarge" in catalog and "ml.inf2.48xlarge" not in catalog
    k = normalize_key(
        KeyRequest("neuron", "m", instance_type="inf2.xlarge", sequence_length=1, batch_size=1), catalog
    )
    assert k.compile_target == "inf2"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("ml.x.large,X,1,1,1,x,tpu-v5,16,4,16", "compile target 'tpu-v5'"),
        ("ml.x.large,X,one,1,1,x,inf2,16,4,16", "line 2"),
        ("ml.x.large,X,1,1", "fewer cells"),
        ("ml.x.large,X,-1,1,1,x,inf2,16,4,16", "negative"),
        ("ML.X.large,X,1,1,1,x,inf2,16,4,16", "normalised form"),
    ],
)
def test_catalog_rejects_bad_rows(tmp_path: Path, row: str, message: str) -> None:
    path = tmp_path / "instances.csv"
    header = (
        "instance_type,accelerator,accelerator_count,cores_per_accelerator,total_cores,core_generation,"
        "compile_target,accelerator_memory_gib,vcpus,host_memory_gib"
    )
    path.write_text(f"{header}\n{row}\n")
    with pytest.raises(ValueError, match=re.escape(message)):
        InstanceCatalog.from_csv(path)


def test_catalog_families() -> None:
    families = {i.name: i.family for i in CATALOG}
    assert families["ml.trn2.48xlarge"] == "neuron"
    assert families["ml.p5.48xlarge"] == "gpu"
    assert families["ml.c6a.4xlarge"] == "cpu"
    assert set(families.values()) == {"neuron", "gpu", "cpu"}
    assert len(CATALOG) == len(CATALOG.names()) == 22
