"""The awq backend, for real: a tiny Llama quantized with llm-compressor AWQ (W4A16) on CPU.

One real compile through the run.py child (module-scoped fixture, a few seconds); the
checkpoint reloads with transformers and runs a forward pass. Everything else is validation
that fails before quantizing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from prebake.client.model_revision import revision_of
from prebake.compiler import tiny_llama
from prebake.compiler.awq import MANIFEST_NAME, AwqBackend, check_layer_shapes, read_manifest, validate_key
from prebake.compiler.backend import EXIT_DETERMINISTIC, EXIT_OK, CompileError

BACKEND = AwqBackend()
needs_awq = pytest.mark.skipif(not BACKEND.available()[0], reason=BACKEND.available()[1])
HIDDEN = 128


def awq_key(**overrides: Any) -> dict[str, Any]:
    key: dict[str, Any] = {
        "kind": "awq",
        "model": "test/tiny-llama",
        "model_revision": "r1",
        "instance_type": "",
        "compile_target": "",
        "sequence_length": 0,
        "batch_size": 0,
        "tensor_parallel_degree": 0,
        "precision": "int4-awq",
        "toolchain": "llmcompressor-0.14",
        "options": {"group_size": "128", "zero_point": "true", "version": "gemm"},
        "digest": "0" * 32,
    }
    key.update(overrides)
    return key


def run_child(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "prebake.compiler.run", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@dataclass(frozen=True)
class ChildRun:
    proc: subprocess.CompletedProcess[str]
    out_dir: Path
    result: dict[str, Any]

    @property
    def progress(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.proc.stdout.splitlines()]


def compile_in_child(tmp: Path, source: Path, key: Mapping[str, Any]) -> ChildRun:
    out_dir = tmp / "out"
    out_dir.mkdir(parents=True)
    request = {"job_id": "job-awq", "key": dict(key), "model_source": str(source), "output_dir": str(out_dir)}
    (tmp / "request.json").write_text(json.dumps(request))
    result_path = tmp / "result.json"
    proc = run_child("--kind", "awq", "--request", str(tmp / "request.json"), "--result", str(result_path))
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    return ChildRun(proc, out_dir, result)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama.build_tiny_llama(
        tmp_path_factory.mktemp("tiny-llama"), hidden_size=HIDDEN, num_layers=2, seed=0
    )


@pytest.fixture(scope="module")
def awq_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> ChildRun:
    if not BACKEND.available()[0]:
        pytest.skip(BACKEND.available()[1])
    key = awq_key(model_revision=revision_of(tiny_model))
    return compile_in_child(tmp_path_factory.mktemp("awq-job"), tiny_model, key)


@needs_awq
def test_child_compiles_a_verified_checkpoint(awq_run: ChildRun) -> None:
    assert awq_run.proc.returncode == EXIT_OK, awq_run.proc.stderr[-3000:]
    fractions = [line["progress"] for line in awq_run.progress]
    assert fractions == sorted(fractions)
    assert fractions[-1] == 1.0
    assert awq_run.result["ok"] is True
    metrics = awq_run.result["metrics"]
    for name in ("awq_rel_error", "rtn_rel_error", "reload_max_abs_diff", "quantize_seconds"):
        assert name in metrics
    # The reloaded checkpoint is the fake-quantized model (same dequantization, fp32).
    assert metrics["reload_max_abs_diff"] <= 1e-4
    # 4-bit weights move the logits, but not wildly; AWQ is no worse than round-to-nearest
    # beyond a little slack (random weights give AWQ's activation statistics little to use).
    assert 0.0 < metrics["rtn_rel_error"] < 1.0
    assert 0.0 < metrics["awq_rel_error"] <= metrics["rtn_rel_error"] * 1.25 + 0.02
    assert awq_run.result["toolchain_versions"]["llmcompressor"].startswith("0.14")


@needs_awq
def test_checkpoint_is_pack_quantized_and_described(awq_run: ChildRun) -> None:
    assert awq_run.proc.returncode == EXIT_OK, awq_run.proc.stderr[-3000:]
    config = json.loads((awq_run.out_dir / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["format"] == "pack-quantized"
    weights = qc["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, 128, False)
    assert weights["strategy"] == "group"
    assert "lm_head" in qc["ignore"]
    manifest = read_manifest(awq_run.out_dir)
    assert manifest["group_size"] == 128
    assert manifest["zero_point"] is True
    assert manifest["version"] == "gemm"
    assert manifest["versions"]["llmcompressor"].startswith("0.14")
    assert manifest["metrics"]["awq_rel_error"] == awq_run.result["metrics"]["awq_rel_error"]
    # A tokenizer travels with the checkpoint (the tiny model has none: a synthetic one).
    assert (awq_run.out_dir / "tokenizer.json").is_file()
    assert manifest["tokenizer"] == "synthetic-wordlevel"


@needs_awq
def test_checkpoint_loads_with_transformers_and_runs(awq_run: ChildRun) -> None:
    assert awq_run.proc.returncode == EXIT_OK, awq_run.proc.stderr[-3000:]
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(awq_run.out_dir), local_files_only=True)
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, 16, 512)
    assert torch.isfinite(logits).all()
    # Run compressed (as loaded) or decompressed on load: the same model.
    from transformers import CompressedTensorsConfig

    decompressed = AutoModelForCausalLM.from_pretrained(
        str(awq_run.out_dir),
        local_files_only=True,
        quantization_config=CompressedTensorsConfig(run_compressed=False),
    )
    with torch.no_grad():
        torch.testing.assert_close(decompressed(input_ids=ids).logits, logits, atol=1e-4, rtol=1e-4)


@needs_awq
def test_group_size_not_dividing_the_hidden_size_is_deterministic(tmp_path: Path, tiny_model: Path) -> None:
    options = {"group_size": "96", "zero_point": "true", "version": "gemm"}
    run = compile_in_child(tmp_path, tiny_model, awq_key(options=options))
    assert run.proc.returncode == EXIT_DETERMINISTIC, run.proc.stderr[-3000:]
    assert run.result["deterministic"] is True
    assert "not divisible by group_size 96" in run.result["error"]


@needs_awq
def test_wrong_precision_in_child_is_deterministic(tmp_path: Path, tiny_model: Path) -> None:
    run = compile_in_child(tmp_path, tiny_model, awq_key(precision="bf16"))
    assert run.proc.returncode == EXIT_DETERMINISTIC
    assert "int4-awq" in run.result["error"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"precision": "fp16"}, "precision 'fp16'"),
        ({"kind": "inductor"}, "cannot build 'inductor'"),
        ({"options": {"group_size": "128", "zero_point": "true", "version": "gemv"}}, "kernel version"),
        ({"options": {"group_size": "128", "zero_point": "true", "version": "exllama"}}, "kernel version"),
        ({"options": {"group_size": "0", "zero_point": "true", "version": "gemm"}}, "positive integer"),
        ({"options": {"group_size": "abc", "zero_point": "true", "version": "gemm"}}, "positive integer"),
        ({"options": {"group_size": "128", "zero_point": "maybe", "version": "gemm"}}, "zero_point"),
        ({"options": {"group_size": "128", "zero_point": "true", "version": "gemm", "x": "1"}}, "unknown"),
        ({"toolchain": "llmcompressor-0.9"}, "toolchain"),
        ({"tensor_parallel_degree": -1}, "tensor_parallel_degree"),
    ],
)
def test_bad_keys_are_deterministic(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(CompileError, match=message) as info:
        validate_key(awq_key(**overrides), "llmcompressor-0.14")
    assert info.value.deterministic


def test_key_defaults_and_symmetric() -> None:
    plan = validate_key(awq_key(options={}), "llmcompressor-0.14")
    assert (plan.group_size, plan.zero_point, plan.version, plan.tensor_parallel_degree) == (
        128,
        True,
        "gemm",
        1,
    )
    options = {"group_size": "64", "zero_point": "false", "version": "GEMM"}
    plan = validate_key(awq_key(options=options, tensor_parallel_degree=2), "llmcompressor-0.14")
    assert (plan.group_size, plan.zero_point, plan.version, plan.tensor_parallel_degree) == (
        64,
        False,
        "gemm",
        2,
    )


def test_tensor_parallel_partitions_must_hold_whole_groups() -> None:
    # Llama 2 7B: intermediate size 11008 = 86 groups of 128; halves hold 43, quarters 21.5.
    layers = {"model.layers.0.self_attn.q_proj": 4096, "model.layers.0.mlp.down_proj": 11008}
    check_layer_shapes(layers, 128, 1)
    check_layer_shapes(layers, 128, 2)
    with pytest.raises(CompileError, match="2752 per partition at tensor_parallel_degree 4") as info:
        check_layer_shapes(layers, 128, 4)
    assert info.value.deterministic
    with pytest.raises(CompileError, match="does not split"):
        check_layer_shapes({"model.layers.0.self_attn.o_proj": 100}, 4, 3)
    # Column-parallel layers keep their whole input on every rank.
    check_layer_shapes({"model.layers.0.self_attn.q_proj": 128}, 128, 8)


def test_probe_reports_awq() -> None:
    proc = run_child("--probe")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)["awq"]
    if not BACKEND.available()[0]:
        assert report["available"] is False
        return
    assert report == {
        "available": True,
        "reason": "",
        "toolchain": "llmcompressor-0.14",
        "compile_targets": [],
        "evaluates": True,
    }


def test_read_manifest_rejects_other_directories(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=MANIFEST_NAME):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"format": "other", "format_version": 1}))
    with pytest.raises(ValueError, match="prebake-awq"):
        read_manifest(tmp_path)


# AutoAWQ's own unpacking (awq/utils/packing_utils.py): nibbles low to high, then this order.
AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]


def reference_unpack(packed: Any) -> Any:
    import torch

    shifts = torch.arange(0, 32, 4)
    nibbles = (packed[:, :, None] >> shifts[None, None, :]).to(torch.int8).view(packed.shape[0], -1)
    nibbles = nibbles.view(-1, 8)[:, AWQ_REVERSE_ORDER].view(packed.shape[0], -1)
    return torch.bitwise_and(nibbles, 0xF).to(torch.int64)


def test_awq_gemm_packing_order() -> None:
    import torch

    from prebake.compiler.awq import pack_awq_gemm, unpack_awq_gemm

    values = torch.arange(8).reshape(1, 8)
    assert int(pack_awq_gemm(values)[0, 0]) == 0x75316420
    values = torch.randint(0, 16, (5, 32), generator=torch.Generator().manual_seed(3))
    packed = pack_awq_gemm(values)
    assert packed.dtype == torch.int32
    assert packed.shape == (5, 4)
    assert torch.equal(unpack_awq_gemm(packed), values)
    assert torch.equal(reference_unpack(packed), values)


@needs_awq
def test_autoawq_export_dequantizes_to_the_compressed_tensors_weights(awq_run: ChildRun) -> None:
    assert awq_run.proc.returncode == EXIT_OK, awq_run.proc.stderr[-3000:]
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    export = awq_run.out_dir / "autoawq"
    config = json.loads((export / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "awq",
        "bits": 4,
        "group_size": 128,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": ["lm_head"],
    }
    tensors = load_file(str(export / "model.safetensors"))
    from transformers import CompressedTensorsConfig

    # Decompressed on load: every Linear holds its dequantized weight.
    reloaded = AutoModelForCausalLM.from_pretrained(
        str(awq_run.out_dir),
        local_files_only=True,
        quantization_config=CompressedTensorsConfig(run_compressed=False),
    )
    layers = {
        name: module
        for name, module in reloaded.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
    }
    assert len(layers) == 2 * 7
    group = 128
    for name, module in layers.items():
        qweight, qzeros, scales = (tensors[f"{name}.{part}"] for part in ("qweight", "qzeros", "scales"))
        n_out, n_in = module.weight.shape
        assert qweight.dtype == torch.int32 and qweight.shape == (n_in, n_out // 8)
        assert qzeros.dtype == torch.int32 and qzeros.shape == (n_in // group, n_out // 8)
        assert scales.dtype == torch.float16 and scales.shape == (n_in // group, n_out)
        q = reference_unpack(qweight)
        z = reference_unpack(qzeros).repeat_interleave(group, dim=0)
        weight = ((q - z).float() * scales.float().repeat_interleave(group, dim=0)).t()
        # fp16 scales: each weight is (q - z) * scale, so the rounding is relative (2^-11).
        torch.testing.assert_close(weight, module.weight.float(), rtol=1e-3, atol=1e-7)
    assert "lm_head.weight" in tensors and tensors["lm_head.weight"].dtype == torch.float16
    assert awq_run.result["metrics"]["autoawq_max_abs_diff"] < 1e-3
