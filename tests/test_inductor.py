"""The inductor backend, for real: tiny Llama checkpoints compiled with AOTInductor on this CPU.

Two real compiles (fp32 through the run.py child, bf16 in-process), shared by module-scoped
fixtures; everything else is validation that fails before compiling. Also: model revisions,
model sources and the tiny-Llama builder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from prebake.client.model_revision import revision_of
from prebake.compiler import tiny_llama
from prebake.compiler.backend import EXIT_DETERMINISTIC, EXIT_OK, CompileError, CompileRequest
from prebake.compiler.inductor import (
    CPU_TARGETS,
    MANIFEST_NAME,
    PACKAGE_NAME,
    InductorBackend,
    child_environment_for,
    compare_logits,
    load_and_run,
    load_package,
    read_manifest,
    targets_supported_by,
    validate_key,
)
from prebake.compiler.model_source import resolve_model_source
from prebake.compiler.probe import BackendStatus
from prebake.compiler.run import SCRATCH_NAME, available_backends, probe, result_from_dict

BACKEND = InductorBackend()
needs_inductor = pytest.mark.skipif(not BACKEND.available()[0], reason=BACKEND.available()[1])
SEQ = 32


def inductor_key(**overrides: Any) -> dict[str, Any]:
    key: dict[str, Any] = {
        "kind": "inductor",
        "model": "test/tiny-llama",
        "model_revision": "r1",
        "instance_type": "ml.c6a.4xlarge",
        "compile_target": "cpu-avx2",
        "sequence_length": SEQ,
        "batch_size": 2,
        "tensor_parallel_degree": 1,
        "precision": "fp32",
        "toolchain": "torch-2.13.0",
        "options": {},
        "digest": "0" * 32,
    }
    key.update(overrides)
    return key


def run_child(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "prebake.compiler.run", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@dataclass(frozen=True)
class ChildRun:
    proc: subprocess.CompletedProcess[str]
    out_dir: Path
    result_path: Path

    @property
    def progress(self) -> list[dict[str, Any]]:
        # Every stdout line must be JSON: that is the protocol.
        return [json.loads(line) for line in self.proc.stdout.splitlines()]


def compile_in_child(tmp: Path, source: Path, key: Mapping[str, Any]) -> ChildRun:
    out_dir = tmp / "out"
    out_dir.mkdir(parents=True)
    request = CompileRequest(job_id="job-1", key=key, model_source=source, output_dir=out_dir)
    request_path = tmp / "request.json"
    request_path.write_text(request.to_json())
    result_path = tmp / "result.json"
    proc = run_child("--kind", "inductor", "--request", str(request_path), "--result", str(result_path))
    return ChildRun(proc, out_dir, result_path)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama.build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), hidden_size=64, num_layers=2)


@pytest.fixture(scope="module")
def fp32_child(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> ChildRun:
    """The fp32 compile, end to end through `python -m prebake.compiler.run` (batch 2)."""
    if not BACKEND.available()[0]:
        pytest.skip(BACKEND.available()[1])
    # The key names the checkpoint by its content revision, as the client computes it.
    key = inductor_key(model_revision=revision_of(tiny_model))
    return compile_in_child(tmp_path_factory.mktemp("fp32-job"), tiny_model, key)


@pytest.fixture(scope="module")
def bf16_package(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> tuple[Path, Any, list[float]]:
    """The bf16 compile, in-process (batch 1): (output dir, CompileResult, progress fractions)."""
    if not BACKEND.available()[0]:
        pytest.skip(BACKEND.available()[1])
    out_dir = tmp_path_factory.mktemp("bf16-out")
    request = CompileRequest(
        job_id="job-2",
        key=inductor_key(precision="bf16", batch_size=1),
        model_source=tiny_model,
        output_dir=out_dir,
    )
    fractions: list[float] = []
    with pytest.MonkeyPatch.context() as patch:
        # Keep Inductor's cache (compiled libraries with the weights inside) out of /tmp.
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor-cache")))
        result = BACKEND.compile(request, lambda fraction, _message: fractions.append(fraction))
    return out_dir, result, fractions


def eager_logits(model_dir: Path, input_ids: Any, dtype_name: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), local_files_only=True, dtype=getattr(torch, dtype_name)
    )
    torch.nn.Module.eval(model)
    with torch.no_grad():
        return model(input_ids=input_ids, use_cache=False).logits


# -- the compile, end to end ------------------------------------------------------------------


@pytest.mark.slow
@needs_inductor
def test_child_compiles_reports_progress_and_writes_the_result(fp32_child: ChildRun) -> None:
    assert fp32_child.proc.returncode == EXIT_OK, fp32_child.proc.stderr[-3000:]
    progress = fp32_child.progress
    fractions = [p["progress"] for p in progress]
    assert fractions == sorted(fractions), fractions
    assert fractions[0] <= 0.05
    assert fractions[-1] == 1.0
    assert all(isinstance(p["message"], str) and p["message"] for p in progress)
    assert any("compiling" in p["message"] for p in progress)

    data = json.loads(fp32_child.result_path.read_text())
    assert data["ok"] is True
    result = result_from_dict(data)
    assert result.toolchain_versions["torch"] == "2.13.0"
    assert "transformers" in result.toolchain_versions
    for name in (
        "load_seconds",
        "export_seconds",
        "compile_seconds",
        "canary_seconds",
        "canary_max_abs_diff",
    ):
        assert name in result.metrics, name
    assert 0 <= result.metrics["canary_max_abs_diff"] < 1e-4

    assert sorted(p.name for p in fp32_child.out_dir.iterdir()) == sorted([MANIFEST_NAME, PACKAGE_NAME])
    assert not (fp32_child.result_path.parent / SCRATCH_NAME).exists()
    manifest = read_manifest(fp32_child.out_dir)
    assert manifest["compile_target"] == "cpu-avx2"
    assert manifest["inputs"] == [{"name": "input_ids", "shape": [2, SEQ], "dtype": "int64"}]
    assert manifest["outputs"] == [{"name": "logits", "shape": [2, SEQ, 512], "dtype": "float32"}]
    assert manifest["key"]["precision"] == "fp32"
    assert manifest["versions"]["torch"] == "2.13.0"


@pytest.mark.slow
@needs_inductor
def test_fp32_package_matches_eager(fp32_child: ChildRun, tiny_model: Path) -> None:
    import torch

    assert fp32_child.proc.returncode == EXIT_OK, fp32_child.proc.stderr[-3000:]
    input_ids = torch.randint(0, 512, (2, SEQ), generator=torch.Generator().manual_seed(42))
    logits = load_and_run(fp32_child.out_dir, input_ids)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, eager_logits(tiny_model, input_ids, "float32"), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@needs_inductor
def test_loaded_package_rejects_another_shape_with_a_clear_error(fp32_child: ChildRun) -> None:
    import torch

    package = load_package(fp32_child.out_dir)
    with pytest.raises(ValueError, match=r"compiled for input_ids torch.int64 \[2, 32\]"):
        package(torch.zeros((1, SEQ), dtype=torch.int64))


@pytest.mark.slow
@needs_inductor
def test_wrong_shape_raises_instead_of_aborting_with_runtime_checks(fp32_child: ChildRun) -> None:
    # A fresh process, bypassing prebake's own shape check: the package itself must raise
    # (not abort) once AOTI_RUNTIME_CHECK_INPUTS=1. If it aborted, the child would die of SIGABRT.
    code = textwrap.dedent(
        f"""
        import torch
        runner = torch._inductor.aoti_load_package({str(fp32_child.out_dir / PACKAGE_NAME)!r})
        try:
            runner(torch.zeros((2, {SEQ + 1}), dtype=torch.int64))
        except RuntimeError as exc:
            print("raised:", exc)
        else:
            print("no error")
        """
    )
    env = {**os.environ, "AOTI_RUNTIME_CHECK_INPUTS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "raised:" in proc.stdout
    assert f"expected: {SEQ}, but got: {SEQ + 1}" in proc.stdout


@pytest.mark.slow
@needs_inductor
def test_bf16_compile_in_process(bf16_package: tuple[Path, Any, list[float]], tiny_model: Path) -> None:
    import torch

    out_dir, result, fractions = bf16_package
    assert fractions == sorted(fractions)
    assert fractions[-1] == 1.0
    assert result.metrics["canary_max_abs_diff"] < 2e-2
    manifest = read_manifest(out_dir)
    assert manifest["outputs"][0] == {"name": "logits", "shape": [1, SEQ, 512], "dtype": "bfloat16"}

    input_ids = torch.randint(0, 512, (1, SEQ), generator=torch.Generator().manual_seed(7))
    logits = load_and_run(out_dir, input_ids)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits, eager_logits(tiny_model, input_ids, "bfloat16"), atol=2e-2, rtol=2e-2)


# -- failures -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"tensor_parallel_degree": 2}, "tensor_parallel_degree must be 1"),
        ({"precision": "fp16"}, "precision 'fp16' is not supported on CPU"),
        ({"kind": "neuron"}, "cannot build 'neuron' artifacts"),
        ({"batch_size": 0}, "positive batch_size"),
        ({"compile_target": "inf2"}, "not a CPU target"),
        ({"compile_target": "cpu-avx512"}, "this host cannot build or verify cpu-avx512"),
        ({"toolchain": "torch-2.12.0"}, "this host builds 'torch-2.13.0'"),
    ],
)
def test_keys_this_backend_cannot_build_are_deterministic_failures(
    override: dict[str, Any], message: str
) -> None:
    with pytest.raises(CompileError, match=message) as info:
        validate_key(inductor_key(**override), ["cpu-avx2"], "torch-2.13.0")
    assert info.value.deterministic


@needs_inductor
def test_child_exits_deterministic_with_the_message_on_stderr(tmp_path: Path, tiny_model: Path) -> None:
    run = compile_in_child(tmp_path, tiny_model, inductor_key(tensor_parallel_degree=2))
    assert run.proc.returncode == EXIT_DETERMINISTIC
    assert "tensor_parallel_degree must be 1" in run.proc.stderr.strip().splitlines()[-1]
    assert json.loads(run.result_path.read_text()) == {
        "ok": False,
        "deterministic": True,
        "error": "inductor packages run in one CPU process; tensor_parallel_degree must be 1, not 2",
    }
    assert list(run.out_dir.iterdir()) == []
    assert all(json.loads(line) for line in run.proc.stdout.splitlines())


@needs_inductor
@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"weights.bin": "x"}, "has no config.json"),
        ({"config.json": '{"model_type": "no-such-architecture"}'}, "cannot load a causal LM"),
        ({"config.json": '{"model_type": "llama"}'}, "cannot load a causal LM"),  # no weights
    ],
)
def test_bad_model_sources_are_deterministic_failures(
    tmp_path: Path, files: dict[str, str], message: str
) -> None:
    source = tmp_path / "model"
    source.mkdir()
    for name, text in files.items():
        (source / name).write_text(text)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    request = CompileRequest(job_id="j", key=inductor_key(), model_source=source, output_dir=out_dir)
    with pytest.raises(CompileError, match=message) as info:
        BACKEND.compile(request, lambda _f, _m: None)
    assert info.value.deterministic


@needs_inductor
def test_sequence_length_beyond_the_model_is_deterministic(tmp_path: Path, tiny_model: Path) -> None:
    request = CompileRequest(
        job_id="j", key=inductor_key(sequence_length=4096), model_source=tiny_model, output_dir=tmp_path
    )
    with pytest.raises(CompileError, match="exceeds the model's max_position_embeddings 2048") as info:
        BACKEND.compile(request, lambda _f, _m: None)
    assert info.value.deterministic


@needs_inductor
def test_a_model_source_that_no_longer_matches_its_content_revision_is_rejected(
    tmp_path: Path, tiny_model: Path
) -> None:
    request = CompileRequest(
        job_id="j", key=inductor_key(model_revision="f" * 32), model_source=tiny_model, output_dir=tmp_path
    )
    with pytest.raises(CompileError, match="the checkpoint changed since the key was made") as info:
        BACKEND.compile(request, lambda _f, _m: None)
    assert info.value.deterministic


@needs_inductor
def test_canary_mismatch_is_deterministic() -> None:
    import torch

    expected = torch.zeros((1, 4, 8))
    assert compare_logits(expected + 5e-5, expected, "fp32") == pytest.approx(5e-5)
    with pytest.raises(CompileError, match="canary failed") as info:
        compare_logits(expected + 1e-3, expected, "fp32")
    assert info.value.deterministic
    with pytest.raises(CompileError, match="eager returns"):
        compare_logits(torch.zeros((1, 5, 8)), expected, "fp32")
    assert compare_logits(expected.bfloat16() + 0.01, expected.bfloat16(), "bf16") < 2e-2


# -- capabilities -------------------------------------------------------------------------------


@needs_inductor
def test_probe_reports_toolchain_and_targets() -> None:
    proc = run_child("--probe")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    inductor = report["inductor"]
    assert inductor["available"] is True
    assert inductor["reason"] == ""
    assert inductor["toolchain"] == "torch-2.13.0"
    assert inductor["compile_targets"] == BACKEND.compile_targets()
    assert "cpu-avx2" in inductor["compile_targets"]
    assert inductor["evaluates"] is True  # evaluation jobs of inductor artifacts run here too
    assert available_backends()["inductor"] == (True, "")


def test_targets_follow_the_cpu_features_not_the_env_override() -> None:
    avx2 = {"architecture": "x86_64", "avx2": True, "fma3": True}
    avx512 = {**avx2, "avx512_f": True, "avx512_bw": True, "avx512_dq": True, "avx512_vl": True}
    assert targets_supported_by(avx512) == ["cpu-avx512", "cpu-avx2"]
    assert targets_supported_by(avx2) == ["cpu-avx2"]
    assert targets_supported_by({**avx2, "avx512_f": True}) == ["cpu-avx2"]
    assert targets_supported_by({"architecture": "arm64", "neon": True}) == []
    assert child_environment_for({"compile_target": "cpu-avx512"}) == {"ATEN_CPU_CAPABILITY": "avx512"}
    assert child_environment_for({"compile_target": "cpu-avx2"}) == {"ATEN_CPU_CAPABILITY": "avx2"}
    assert child_environment_for({"compile_target": "inf2"}) == {}


AVX2_FLAGS = {"architecture": "x86_64", "avx2": True, "fma3": True}
AVX512_FLAGS = {**AVX2_FLAGS, "avx512_f": True, "avx512_bw": True, "avx512_dq": True, "avx512_vl": True}


@needs_inductor
@pytest.mark.parametrize(
    ("flags", "advertised"),
    [(AVX512_FLAGS, ("cpu-avx512", "cpu-avx2")), (AVX2_FLAGS, ("cpu-avx2",))],
    ids=["avx512-host", "avx2-host"],
)
def test_a_worker_builds_for_every_isa_its_cpu_can_run_and_verify(
    flags: dict[str, object], advertised: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The CPU-flag reader patched, the rest real: what the probe reports is what the worker
    # advertises (BackendStatus.capability), and what compile() accepts (validate_key on the
    # same targets). An AVX-512 host builds AVX2 packages for -march=x86-64-v3 with ATen on
    # AVX2, and can run them to verify; an AVX2 host refuses AVX-512 keys.
    import torch

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: dict(flags))
    entry = probe()["inductor"]
    status = BackendStatus(
        "inductor", entry["available"], entry["reason"], entry["toolchain"], tuple(entry["compile_targets"])
    )
    assert tuple(status.capability().compile_targets) == advertised
    for target in CPU_TARGETS:
        key = inductor_key(compile_target=target)
        if target in advertised:
            plan = validate_key(key, BACKEND.compile_targets(), BACKEND.toolchain())
            assert plan.target is CPU_TARGETS[target]
            assert child_environment_for(key) == {"ATEN_CPU_CAPABILITY": CPU_TARGETS[target].aten_capability}
        else:
            with pytest.raises(CompileError, match=f"this host cannot build or verify {target}"):
                validate_key(key, BACKEND.compile_targets(), BACKEND.toolchain())
    assert CPU_TARGETS["cpu-avx2"].march == "x86-64-v3"


def test_child_environment_keeps_inductor_caches_in_the_job_scratch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    env = child_environment_for({"compile_target": "cpu-avx2"}, tmp_path)
    assert env == {"ATEN_CPU_CAPABILITY": "avx2", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "torchinductor")}
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/operator/choice")
    assert "TORCHINDUCTOR_CACHE_DIR" not in child_environment_for({"compile_target": "cpu-avx2"}, tmp_path)


# -- model sources, revisions and the tiny-Llama builder ---------------------------------------


@needs_inductor
def test_tiny_llama_is_deterministic_per_seed(tmp_path: Path, tiny_model: Path) -> None:
    again = tiny_llama.build_tiny_llama(tmp_path / "again")
    other_seed = tiny_llama.build_tiny_llama(tmp_path / "seed1", seed=1)
    assert revision_of(again) == revision_of(tiny_model)
    assert revision_of(other_seed) != revision_of(tiny_model)
    assert {"config.json", "model.safetensors"} <= {p.name for p in again.iterdir()}
    config = json.loads((again / "config.json").read_text())
    assert config["hidden_size"] == 64
    assert config["num_hidden_layers"] == 2
    assert config["intermediate_size"] == tiny_llama.default_intermediate_size(64) == 192


@needs_inductor
def test_tiny_llama_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert tiny_llama.main([str(out), "--hidden-size", "32", "--num-layers", "1", "--seed", "3"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (32, 1)
    with pytest.raises(SystemExit):
        tiny_llama.main([str(tmp_path / "bad"), "--hidden-size", "30"])  # not divisible by 4 heads


def write_files(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


CHECKPOINT = {"config.json": b"{}", "model.safetensors": b"\x00" * 1000, "sub/tokenizer.json": b"tok"}


def test_revision_depends_only_on_names_and_bytes(tmp_path: Path) -> None:
    a = write_files(tmp_path / "a", CHECKPOINT)
    b = write_files(tmp_path / "b", dict(reversed(CHECKPOINT.items())))  # created in another order
    os.utime(b / "config.json", (0, 0))
    assert revision_of(a) == revision_of(b)
    assert len(revision_of(a)) == 32


def test_revision_changes_with_any_file(tmp_path: Path) -> None:
    base = revision_of(write_files(tmp_path / "base", CHECKPOINT))
    one_byte = {**CHECKPOINT, "model.safetensors": b"\x00" * 999 + b"\x01"}
    added = {**CHECKPOINT, "extra.txt": b""}
    removed = {k: v for k, v in CHECKPOINT.items() if k != "sub/tokenizer.json"}
    renamed = {("other.json" if k == "config.json" else k): v for k, v in CHECKPOINT.items()}
    moved = {**removed, "tokenizer.json": b"tok"}
    variants = {"one_byte": one_byte, "added": added, "removed": removed, "renamed": renamed, "moved": moved}
    revisions = {name: revision_of(write_files(tmp_path / name, files)) for name, files in variants.items()}
    assert base not in revisions.values()
    assert len(set(revisions.values())) == len(revisions)


def test_revision_ignores_hidden_files_and_follows_file_symlinks(tmp_path: Path) -> None:
    plain = revision_of(write_files(tmp_path / "plain", CHECKPOINT))
    hidden = write_files(tmp_path / "hidden", CHECKPOINT)
    write_files(hidden, {".gitattributes": b"x", ".cache/huggingface/x.lock": b"", "sub/.DS_Store": b"y"})
    assert revision_of(hidden) == plain

    blobs = write_files(tmp_path / "blobs", {"blob1": b"\x00" * 1000})
    linked = write_files(
        tmp_path / "linked", {k: v for k, v in CHECKPOINT.items() if k != "model.safetensors"}
    )
    (linked / "model.safetensors").symlink_to(blobs / "blob1")
    assert revision_of(linked) == plain


def test_revision_of_an_empty_or_missing_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(NotADirectoryError):
        revision_of(tmp_path / "missing")
    (tmp_path / "empty" / ".git").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no files"):
        revision_of(tmp_path / "empty")


def test_resolve_model_source(tmp_path: Path) -> None:
    model = write_files(tmp_path / "model", CHECKPOINT)
    assert resolve_model_source(str(model)) == model.resolve()
    with pytest.raises(CompileError, match="read by workers"):  # needs a worker's download cache
        resolve_model_source("s3://bucket/llama/")
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model_source("meta-llama/Meta-Llama-3-8B")
    with pytest.raises(ValueError, match=r"no config\.json"):
        resolve_model_source(str(write_files(tmp_path / "weights-only", {"model.safetensors": b""})))
    with pytest.raises(ValueError, match="not a directory"):
        resolve_model_source(str(model / "config.json"))
    with pytest.raises(ValueError, match="only local directories"):
        resolve_model_source("https://example.com/model")


def _alive(pid: int) -> bool:
    """Running and not a zombie (an orphan's exit may wait for a reaper that never comes)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


@needs_inductor
def test_a_compile_whose_worker_died_exits_instead_of_running_on(tmp_path: Path, tiny_model: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    request = CompileRequest(job_id="job-1", key=inductor_key(), model_source=tiny_model, output_dir=out_dir)
    (tmp_path / "request.json").write_text(request.to_json())
    child_cmd = [sys.executable, "-m", "prebake.compiler.run", "--kind", "inductor"]
    child_cmd += ["--request", str(tmp_path / "request.json"), "--result", str(tmp_path / "result.json")]
    # A stand-in worker: starts the compile in its own session, as the worker does, then waits.
    worker_code = (
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen({child_cmd!r}, start_new_session=True,"
        " stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    worker = subprocess.Popen([sys.executable, "-c", worker_code], stdout=subprocess.PIPE, text=True)
    assert worker.stdout is not None
    child_pid = int(worker.stdout.readline())
    deadline = time.monotonic() + 60
    while not (tmp_path / "compile-scratch").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _alive(child_pid), "the compile is running"
    worker.kill()
    worker.wait()
    deadline = time.monotonic() + 15
    while _alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(child_pid), "the orphaned compile exited by itself"
    assert not (out_dir / "model.pt2").exists()
