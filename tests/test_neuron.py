"""The neuron backend: command and configuration generation without the SDK, a real compile with it.

Everything but the last test is pure (the Neuron SDK is not installed on CI machines, and
nothing here stubs it): the export command a key becomes, option whitelisting, host target
detection from neuron-ls output, failure classification, and how the backend reports
itself unavailable. The end-to-end compile runs only where `NeuronBackend().available()`
says the SDK is installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from prebake.compiler import tiny_llama
from prebake.compiler.backend import CompileError, CompileRequest
from prebake.compiler.neuron import (
    MANIFEST_NAME,
    NOT_INSTALLED,
    NeuronBackend,
    classify_failure,
    compiler_args,
    expected_outputs,
    export_command,
    host_targets,
    target_for_instance_type,
    toolchain_for,
    validate_key,
)
from prebake.compiler.run import available_backends

REPO = Path(__file__).resolve().parent.parent
CC_VERSION = "2.21.18209.0+043b1bf7"
TOOLCHAIN = "neuronx-cc-2.21"


def neuron_key(**overrides: Any) -> dict[str, Any]:
    key: dict[str, Any] = {
        "kind": "neuron",
        "model": "meta-llama/Meta-Llama-3-8B",
        "model_revision": "0" * 40,
        "instance_type": "ml.inf2.48xlarge",
        "compile_target": "inf2",
        "sequence_length": 8192,
        "batch_size": 8,
        "tensor_parallel_degree": 24,
        "precision": "bf16",
        "toolchain": TOOLCHAIN,
        "options": {},
        "digest": "f" * 32,
    }
    key.update(overrides)
    return key


def deterministic_error(key: Mapping[str, Any], match: str) -> None:
    with pytest.raises(CompileError, match=match) as info:
        export_command(key, Path("/models/llama"), Path("/out"), CC_VERSION)
    assert info.value.deterministic


# -- the export command ---------------------------------------------------------------------------


def test_export_command_carries_every_key_field() -> None:
    argv = export_command(neuron_key(), Path("/models/llama"), Path("/out/artifact"), CC_VERSION)
    assert argv == [
        "optimum-cli",
        "export",
        "neuron",
        "--model",
        "/models/llama",
        "--task",
        "text-generation",
        "--instance_type",
        "inf2",
        "--batch_size",
        "8",
        "--sequence_length",
        "8192",
        "--num_cores",
        "24",
        "--auto_cast_type",
        "bf16",
        "/out/artifact",
    ]


def test_export_command_for_trn1_fp16_with_optlevel() -> None:
    key = neuron_key(
        instance_type="ml.trn1.32xlarge",
        compile_target="trn1",
        tensor_parallel_degree=32,
        batch_size=1,
        sequence_length=4096,
        precision="fp16",
        options={"optlevel": "3"},
    )
    argv = export_command(key, Path("/m"), Path("/o"), CC_VERSION)
    assert argv[argv.index("--instance_type") + 1] == "trn1"
    assert argv[argv.index("--num_cores") + 1] == "32"
    assert argv[argv.index("--auto_cast_type") + 1] == "fp16"
    assert argv[argv.index("--sequence_length") + 1] == "4096"
    assert argv[-2:] == ["-O3", "/o"]


def test_export_command_for_trn2() -> None:
    key = neuron_key(instance_type="ml.trn2.48xlarge", compile_target="trn2", tensor_parallel_degree=64)
    argv = export_command(key, Path("/m"), Path("/o"), CC_VERSION)
    assert argv[argv.index("--instance_type") + 1] == "trn2"


@pytest.mark.parametrize("precision", ["fp32", "int8", "fp8", "int4-awq", ""])
def test_precisions_the_cli_cannot_express_are_refused(precision: str) -> None:
    deterministic_error(neuron_key(precision=precision), "precision")


@pytest.mark.parametrize("field", ["batch_size", "sequence_length", "tensor_parallel_degree"])
@pytest.mark.parametrize("value", [0, -1, None, "8", True])
def test_shapes_and_degree_must_be_positive_integers(field: str, value: Any) -> None:
    deterministic_error(neuron_key(**{field: value}), f"positive {field}")


def test_other_kinds_and_targets_are_refused() -> None:
    deterministic_error(neuron_key(kind="inductor"), "cannot build 'inductor'")
    deterministic_error(neuron_key(compile_target="cpu-avx2"), "not a Neuron target")
    deterministic_error(neuron_key(compile_target="inf1"), "not a Neuron target")


def test_toolchain_must_be_this_compiler() -> None:
    deterministic_error(neuron_key(toolchain="neuronx-cc-2.20"), "only load on the neuronx-cc version")
    # The key's toolchain is the compiler's major.minor.
    assert toolchain_for(CC_VERSION) == TOOLCHAIN
    assert toolchain_for("2.5.0") == "neuronx-cc-2.5"
    assert toolchain_for("") == ""
    assert toolchain_for("dev") == ""


def test_the_host_must_be_of_the_keys_family() -> None:
    with pytest.raises(CompileError, match="needs a worker on a trn1 host") as info:
        validate_key(neuron_key(compile_target="trn1"), ["inf2"], TOOLCHAIN)
    assert info.value.deterministic
    with pytest.raises(CompileError, match="none detected"):
        validate_key(neuron_key(), [], TOOLCHAIN)
    plan = validate_key(neuron_key(), ["inf2"], TOOLCHAIN)
    assert (plan.compile_target, plan.tensor_parallel_degree, plan.precision) == ("inf2", 24, "bf16")


# -- options --------------------------------------------------------------------------------------


def test_optlevel_becomes_a_compiler_flag() -> None:
    assert compiler_args({}) == []
    assert compiler_args({"optlevel": "1"}) == ["-O1"]
    assert compiler_args({"optlevel": 2}) == ["-O2"]
    assert compiler_args({"optlevel": " 3 "}) == ["-O3"]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"optlevel": "4"}, "not allowed"),
        ({"optlevel": "fast"}, "not allowed"),
        ({"group_size": "128"}, "'group_size' is not supported"),
        ({"optlevel": "2", "fast_math": "true"}, "'fast_math' is not supported"),
    ],
)
def test_unknown_options_and_values_are_deterministic_errors(options: dict[str, Any], match: str) -> None:
    with pytest.raises(CompileError, match=match) as info:
        compiler_args(options)
    assert info.value.deterministic
    deterministic_error(neuron_key(options=options), match)


# -- host targets ---------------------------------------------------------------------------------


def neuron_ls_devices(count: int, cores: int, memory_gib: int) -> list[dict[str, Any]]:
    """Devices as `neuron-ls --json-output` lists them."""
    return [
        {
            "neuron_device": i,
            "bdf": f"{0x10 + i:02x}:1e.0",
            "connected_to": [(i - 1) % count, (i + 1) % count] if count > 1 else None,
            "nc_count": cores,
            "memory_size": memory_gib * 2**30,
            "neuron_processes": [],
        }
        for i in range(count)
    ]


INF2_48XL = neuron_ls_devices(12, 2, 32)
TRN1_32XL = neuron_ls_devices(16, 2, 32)
TRN2_48XL = {
    "instance_type": "trn2.48xlarge",
    "instance_id": "i-0123456789abcdef0",
    "logical_neuroncore_config": 2,
    "neuron_devices": neuron_ls_devices(16, 4, 96),
}


def test_host_targets_from_neuron_ls() -> None:
    # Devices alone cannot tell inf2 from trn1: the instance type (DMI product name) does.
    assert host_targets(json.dumps(INF2_48XL), "inf2.48xlarge") == ["inf2"]
    assert host_targets(json.dumps(TRN1_32XL), "trn1.32xlarge") == ["trn1"]
    assert host_targets(json.dumps(TRN1_32XL), "trn1n.32xlarge") == ["trn1"]
    # neuron-ls naming the instance type itself wins over the product name.
    assert host_targets(json.dumps(TRN2_48XL), "") == ["trn2"]
    assert host_targets(json.dumps(TRN2_48XL), "inf2.xlarge") == ["trn2"]


def test_host_targets_are_empty_when_unknown() -> None:
    assert host_targets(json.dumps(INF2_48XL), "") == []  # v2 devices, family unknown
    assert host_targets(json.dumps(INF2_48XL), "c7i.4xlarge") == []
    assert host_targets("[]", "inf2.48xlarge") == []  # no devices: nothing to verify on
    assert host_targets("", "inf2.48xlarge") == []
    assert host_targets("not json", "inf2.48xlarge") == []
    assert host_targets(json.dumps({"instance_type": "inf2.xlarge", "neuron_devices": []})) == []


def test_instance_types_resolve_to_compile_targets() -> None:
    assert target_for_instance_type("ml.inf2.48xlarge") == "inf2"
    assert target_for_instance_type("inf2.xlarge") == "inf2"
    assert target_for_instance_type("ml.trn1n.32xlarge") == "trn1"
    assert target_for_instance_type("ml.trn2.48xlarge") == "trn2"
    assert target_for_instance_type("trn2u.48xlarge") == "trn2"
    assert target_for_instance_type("ml.inf1.xlarge") == ""
    assert target_for_instance_type("ml.g5.12xlarge") == ""


# -- failure classification -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "output",
    [
        "2025-01-01 INFO compiling\nERROR 1234 [neuronx-cc]: Compilation failed for model\n",
        "[NCC_EVRF009] Tensor shape exceeds the supported limit\n",
        "ValueError: Model mamba is not supported\n",
        "ValueError: num_attention_heads (14) must be divisible by tensor_parallel_size (4)\n",
        "ValueError: Unrecognized configuration class <class 'FooConfig'>\n",
    ],
)
def test_compiler_rejections_are_deterministic(output: str) -> None:
    assert classify_failure(output) is True


@pytest.mark.parametrize(
    "output",
    [
        "",
        "Traceback ...\nRuntimeError: something odd\n",
        "Killed\n",
        "ERROR 1 [neuronx-cc]: std::bad_alloc\n",  # environmental beats a compiler error line
        "[NCC_EXTP004] ... MemoryError\n",
        "OSError: [Errno 28] No space left on device\n",
        "NRT: nrt_init failed: Failed to initialize Neuron device\n",
        "optimum-cli: error: unrecognized arguments: --instance_type trn2\n",
    ],
)
def test_environmental_or_unknown_failures_are_transient(output: str) -> None:
    assert classify_failure(output) is False


def test_expected_outputs(tmp_path: Path) -> None:
    assert expected_outputs(tmp_path) == [
        "config.json",
        "neuron_config.json",
        "compiled model (*.neff or *.pt)",
    ]
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "neuron_config.json").write_text("{}")
    (tmp_path / "model.pt").write_bytes(b"x")
    assert expected_outputs(tmp_path) == []


# -- availability ---------------------------------------------------------------------------------

needs_neuron = pytest.mark.skipif(
    not NeuronBackend().available()[0],
    reason=f"needs the AWS Neuron SDK and a Neuron device: {NeuronBackend().available()[1]}",
)
without_neuron = pytest.mark.skipif(NeuronBackend().available()[0], reason="the Neuron SDK is installed here")


@without_neuron
def test_unavailable_without_the_sdk() -> None:
    backend = NeuronBackend()
    assert backend.available() == (False, NOT_INSTALLED)
    assert "Neuron SDK" in NOT_INSTALLED
    assert backend.toolchain() == ""
    assert backend.compile_targets() == []
    assert available_backends()["neuron"] == (False, NOT_INSTALLED)


@without_neuron
def test_compile_refuses_without_the_sdk(tmp_path: Path) -> None:
    request = CompileRequest("job", neuron_key(), tmp_path / "model", tmp_path / "out")
    with pytest.raises(CompileError, match="Neuron SDK not installed") as info:
        NeuronBackend().compile(request, lambda fraction, message: None)
    assert not info.value.deterministic  # another worker may have the SDK


@without_neuron
def test_probe_lists_neuron_as_unavailable() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "prebake.compiler.run", "--probe"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    neuron = json.loads(proc.stdout)["neuron"]
    assert neuron == {
        "available": False,
        "reason": NOT_INSTALLED,
        "toolchain": "",
        "compile_targets": [],
        # Nor does it evaluate neuron artifacts (evaluation jobs of neuron keys wait for a host that does).
        "evaluates": False,
    }


# -- a real compile (Neuron hosts only) -----------------------------------------------------------


@needs_neuron
def test_compiles_a_tiny_llama_for_this_host(tmp_path: Path) -> None:
    backend = NeuronBackend()
    targets = backend.compile_targets()
    assert targets, "the SDK is installed but no Neuron device/instance family was detected"
    model = tiny_llama.build_tiny_llama(tmp_path / "model", max_position_embeddings=256)
    key = neuron_key(
        instance_type=f"ml.{targets[0]}.xlarge",
        compile_target=targets[0],
        sequence_length=128,
        batch_size=1,
        tensor_parallel_degree=1,
        toolchain=backend.toolchain(),
    )
    out = tmp_path / "out"
    out.mkdir()
    updates: list[tuple[float, str]] = []
    result = backend.compile(CompileRequest("job", key, model, out), lambda f, m: updates.append((f, m)))
    assert expected_outputs(out) == []
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["key"]["compile_target"] == targets[0]
    assert manifest["command"][:3] == ["optimum-cli", "export", "neuron"]
    assert toolchain_for(result.toolchain_versions["neuronx-cc"]) == backend.toolchain()
    assert updates[-1][0] == 1.0
