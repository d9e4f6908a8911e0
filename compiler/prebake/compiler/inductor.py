"""The `inductor` backend: a Hugging Face causal LM as a CPU AOTInductor package.

What it builds, for one key (batch B, sequence length S, precision fp32|bf16, compile target
cpu-avx2|cpu-avx512):

    output_dir/model.pt2              the AOTInductor package (code and weights embedded)
    output_dir/prebake-inductor.json  the manifest: how to call it, what it was built from

The package takes exactly one positional argument, `input_ids`: an int64 tensor of shape
(B, S), and returns the logits, shape (B, S, vocab) in the key's precision (no KV cache:
the model is exported with `use_cache=False`). Load it with `load_package(dir)` (or
`torch._inductor.aoti_load_package(dir / "model.pt2")` after setting
`AOTI_RUNTIME_CHECK_INPUTS=1`: without it a call with another shape aborts the process).

Steps: load the model from the local model source (offline), `torch.export` a wrapper that
returns the logits, `aoti_compile_and_package`, then a canary: load the package, run one
forward on a fresh seeded input and compare it with eager. A mismatch fails the job.

The CPU ISA is baked into the package, by two settings that must agree with the target:
`ATEN_CPU_CAPABILITY` (which vector ISA Inductor generates kernels for; read by ATen's
dispatcher once, at torch start-up, which is why `run.py` sets it in a fresh child process
before importing torch) and `-march` for the C++ compiler (Inductor's default is
`-march=native`, which would let an AVX-512 build host leak AVX-512 instructions into a
cpu-avx2 package).

Failure classification (CompileError.deterministic; deterministic failures are cached by
the service and not retried, so only failures that would recur for the same key and model
bytes on any healthy worker are deterministic):

  deterministic  the key (kind, precision, tensor-parallel degree, shapes, compile target
                 or toolchain this host cannot build); the model source (missing, no
                 config.json, unsupported architecture, incomplete weights, sequence
                 length beyond its position embeddings, files that no longer match the
                 key's content revision); torch.export rejecting the model;
                 the package raising on its own example shape or disagreeing with eager
                 beyond tolerance (the canary).
  transient      MemoryError; OS errors with an errno (disk full, I/O error); the C++
                 compile step (a broken toolchain or a full disk on this worker); failure
                 to load the built package; anything unexpected.

Importing this module does not import torch or transformers (they are imported inside
functions), so a worker without the `inductor` extra can still ask why it is unavailable.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import math
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prebake.compiler import backend
from prebake.compiler.backend import (
    CompileError,
    CompileRequest,
    CompileResult,
    ProgressFn,
    is_environmental,
    positive_int,
)
from prebake.compiler.model_source import checked_source

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

KIND = "inductor"
TORCH_PIN = "2.13.0"
PACKAGE_NAME = "model.pt2"
MANIFEST_NAME = "prebake-inductor.json"
MANIFEST_FORMAT = "prebake-inductor"
MANIFEST_VERSION = 1
CHECK_INPUTS_ENV = "AOTI_RUNTIME_CHECK_INPUTS"
CPU_CAPABILITY_ENV = "ATEN_CPU_CAPABILITY"
CACHE_DIR_ENV = "TORCHINDUCTOR_CACHE_DIR"
# The form of revision_of()'s digests (xxh3-128 hex); other revisions are not verifiable here.

# key precision -> torch dtype name
PRECISIONS: Mapping[str, str] = {"fp32": "float32", "bf16": "bfloat16"}

# key precision -> (atol, rtol) for the canary, as in torch.testing.assert_close:
# |package - eager| <= atol + rtol * |eager| elementwise. fp32 differs only by the order of
# reductions; bf16 keeps 8 mantissa bits, and fused kernels round at different points.
TOLERANCES: Mapping[str, tuple[float, float]] = {"fp32": (1e-4, 1e-4), "bf16": (2e-2, 2e-2)}

# Seeds of the export example and of the canary input: different, so that the canary is not
# run on the very tensor the graph was traced with.
EXAMPLE_SEED = 0
CANARY_SEED = 1


@dataclass(frozen=True)
class CpuTarget:
    """A CPU compile target: the ISA its package may use and how to make Inductor use it."""

    name: str
    aten_capability: str  # ATEN_CPU_CAPABILITY value
    march: str  # the C++ compiler's -march: the baseline every host of the target has
    features: tuple[str, ...]  # torch.cpu.get_capabilities() flags a host needs to run it


# Best first. The feature sets are those ATen requires before it dispatches to the ISA.
CPU_TARGETS: Mapping[str, CpuTarget] = {
    "cpu-avx512": CpuTarget(
        "cpu-avx512", "avx512", "x86-64-v4", ("avx512_f", "avx512_bw", "avx512_dq", "avx512_vl", "fma3")
    ),
    "cpu-avx2": CpuTarget("cpu-avx2", "avx2", "x86-64-v3", ("avx2", "fma3")),
}


def targets_supported_by(capabilities: Mapping[str, object]) -> list[str]:
    """The compile targets a CPU with these `torch.cpu.get_capabilities()` flags can run."""
    if capabilities.get("architecture") not in (None, "x86_64"):
        return []
    return [name for name, t in CPU_TARGETS.items() if all(capabilities.get(f) for f in t.features)]


def host_compile_targets() -> list[str]:
    """Compile targets this host's hardware can run (imports torch).

    Not `torch.backends.cpu.get_cpu_capability()`: that reports whatever
    ATEN_CPU_CAPABILITY says, unchecked (ATEN_CPU_CAPABILITY=avx512 on an AVX2 host reads
    "AVX512", then dies of SIGILL), and this is asked in processes that set it.
    """
    import torch

    return targets_supported_by(torch.cpu.get_capabilities())


def child_environment_for(key: Mapping[str, Any], scratch: Path | None = None) -> dict[str, str]:
    """Environment a compile child needs before torch starts.

    ATEN_CPU_CAPABILITY for the key's target, and, given a per-job `scratch` directory,
    TORCHINDUCTOR_CACHE_DIR inside it unless the operator set one: Inductor caches every
    compiled library, and these embed the weights (a 7B model leaves gigabytes per job in
    /tmp/torchinductor_<user>). Precompiled headers stay shared: Inductor keeps them in the
    default cache directory whatever TORCHINDUCTOR_CACHE_DIR says.
    """
    env: dict[str, str] = {}
    target = CPU_TARGETS.get(str(key.get("compile_target", "")))
    if target is not None:
        env[CPU_CAPABILITY_ENV] = target.aten_capability
    if scratch is not None and CACHE_DIR_ENV not in os.environ:
        env[CACHE_DIR_ENV] = str(scratch / "torchinductor")
    return env


def _torch_version() -> str:
    """The installed torch version without the local tag ("2.13.0+cpu" -> "2.13.0"), or ""."""
    try:
        return importlib.metadata.version("torch").split("+")[0]
    except importlib.metadata.PackageNotFoundError:
        return ""


@dataclass(frozen=True)
class _Plan:
    """A validated key: everything the compile needs, in typed form."""

    precision: str
    batch_size: int
    sequence_length: int
    target: CpuTarget


def _positive_int(key: Mapping[str, Any], name: str) -> int:
    return positive_int(key, name, "inductor packages")


def validate_key(key: Mapping[str, Any], host_targets: list[str], toolchain: str) -> _Plan:
    """Check the key against what this backend builds on this host; CompileError(deterministic)."""
    kind = key.get("kind")
    if kind != KIND:
        raise CompileError(f"the inductor backend cannot build {kind!r} artifacts", True)
    tp = key.get("tensor_parallel_degree", 0)
    if tp not in (0, 1):
        raise CompileError(
            f"inductor packages run in one CPU process; tensor_parallel_degree must be 1, not {tp!r}", True
        )
    precision = str(key.get("precision", ""))
    if precision not in PRECISIONS:
        raise CompileError(
            f"inductor packages are built in {' or '.join(PRECISIONS)}; precision {precision!r} "
            "is not supported on CPU",
            True,
        )
    batch_size = _positive_int(key, "batch_size")
    sequence_length = _positive_int(key, "sequence_length")
    name = str(key.get("compile_target", ""))
    if name not in CPU_TARGETS:
        raise CompileError(
            f"compile target {name!r} is not a CPU target this backend knows ({', '.join(CPU_TARGETS)})", True
        )
    if name not in host_targets:
        have = ", ".join(host_targets) or "none"
        raise CompileError(
            f"this host cannot build or verify {name} packages (its CPU supports: {have}); "
            f"an instance type resolving to {name} needs a worker on such a CPU",
            True,
        )
    wanted = str(key.get("toolchain", ""))
    if wanted and wanted != toolchain:
        raise CompileError(f"the key asks for toolchain {wanted!r}; this host builds {toolchain!r}", True)
    return _Plan(precision, batch_size, sequence_length, CPU_TARGETS[name])


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore them."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


class _Progress:
    """Serialises progress reports (the compile ticker reports from a second thread)."""

    def __init__(self, report: ProgressFn) -> None:
        self._report = report
        self._lock = threading.Lock()

    def __call__(self, fraction: float, message: str) -> None:
        with self._lock:
            self._report(fraction, message)

    @contextlib.contextmanager
    def ticking(
        self, start: float, end: float, message: str, time_constant: float = 15.0, interval: float = 2.0
    ) -> Iterator[None]:
        """Report start..end while the block runs (AOTInductor has no progress hook of its own).

        The fraction approaches `end` as 1 - exp(-elapsed / time_constant): it keeps moving,
        which is what a heartbeat needs, and never claims to be done.
        """
        stop = threading.Event()
        began = time.monotonic()

        def tick() -> None:
            while not stop.wait(interval):
                elapsed = time.monotonic() - began
                fraction = start + (end - start) * (1 - math.exp(-elapsed / time_constant))
                self(round(fraction, 3), f"{message} ({elapsed:.0f} s)")

        self(start, message)
        thread = threading.Thread(target=tick, name="inductor-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
        self(end, f"{message}: done in {time.monotonic() - began:.1f} s")


class InductorBackend:
    """CPU AOTInductor packages of Hugging Face causal LMs (see the module docstring)."""

    kind: str = KIND

    def available(self) -> tuple[bool, str]:
        """Without importing torch: torch==2.13.0 and transformers installed."""
        version = _torch_version()
        if not version or importlib.util.find_spec("torch") is None:
            return False, "torch is not installed (install prebake[inductor])"
        if version != TORCH_PIN:
            return (
                False,
                f"torch {version} is installed; the inductor backend is pinned to torch=={TORCH_PIN}",
            )
        if importlib.util.find_spec("transformers") is None:
            return False, "transformers is not installed (install prebake[inductor])"
        return True, ""

    def toolchain(self) -> str:
        """`torch-<version>` as it appears in keys ("torch-2.13.0"), "" without torch."""
        version = _torch_version()
        return f"torch-{version}" if version else ""

    def compile_targets(self) -> list[str]:
        """CPU targets this host can build and verify, best first; [] without the toolchain."""
        if not self.available()[0]:
            return []
        return host_compile_targets()

    def child_environment(self, request: CompileRequest, scratch: Path) -> dict[str, str]:
        """Variables `run.py` sets before importing torch (see `child_environment_for`)."""
        return child_environment_for(request.key, scratch)

    def compile(self, request: CompileRequest, progress: ProgressFn) -> CompileResult:
        """Export, compile, verify and describe the package in `request.output_dir`.

        Raises CompileError, deterministic or not as the module docstring classifies.
        `progress` may be called from a helper thread (never concurrently).
        """
        ok, why = self.available()
        if not ok:
            raise CompileError(why, False)
        plan = validate_key(request.key, self.compile_targets(), self.toolchain())
        report = _Progress(progress)
        try:
            # Inductor reads ATEN_CPU_CAPABILITY when it generates code, so setting it here also
            # covers in-process callers; the ATen dispatcher only reads it at start-up (run.py).
            with _environ(**{CPU_CAPABILITY_ENV: plan.target.aten_capability}):
                return self._compile(request, plan, report)
        except CompileError:
            raise
        except Exception as exc:
            raise CompileError(f"inductor compile failed: {type(exc).__name__}: {exc}", False) from exc

    def _compile(self, request: CompileRequest, plan: _Plan, progress: _Progress) -> CompileResult:
        import torch
        import transformers

        metrics: dict[str, float] = {}
        out_dir = request.output_dir
        package = out_dir / PACKAGE_NAME
        dtype = getattr(torch, PRECISIONS[plan.precision])

        progress(0.05, f"loading {request.model_source} ({plan.precision})")
        began = time.perf_counter()
        model = _load_model(request.model_source, str(request.key.get("model_revision", "")), dtype)
        metrics["load_seconds"] = time.perf_counter() - began
        limit = getattr(model.config, "max_position_embeddings", None)
        if isinstance(limit, int) and plan.sequence_length > limit:
            raise CompileError(
                f"sequence_length {plan.sequence_length} exceeds the model's max_position_embeddings {limit}",
                True,
            )
        embeddings = model.get_input_embeddings()
        vocab_size = (
            embeddings.num_embeddings
            if isinstance(embeddings, torch.nn.Embedding)
            else int(model.config.vocab_size)
        )
        wrapper = logits_only(model).eval()
        shape = (plan.batch_size, plan.sequence_length)
        example = _input_ids(shape, vocab_size, EXAMPLE_SEED)

        progress(0.2, f"exporting for input_ids {list(shape)}")
        began = time.perf_counter()
        try:
            with torch.no_grad():
                exported = torch.export.export(wrapper, (example,))
        except Exception as exc:
            if is_environmental(exc):
                raise
            # torch.export is a pure function of the model code and the example shapes.
            raise CompileError(
                f"torch.export cannot export this model: {type(exc).__name__}: {exc}", True
            ) from exc
        metrics["export_seconds"] = time.perf_counter() - began

        began = time.perf_counter()
        with progress.ticking(0.4, 0.85, f"compiling with AOTInductor for {plan.target.name}"):
            torch._inductor.aoti_compile_and_package(
                exported,
                package_path=str(package),
                inductor_configs={"cpp.march": plan.target.march},
            )
        metrics["compile_seconds"] = time.perf_counter() - began
        metrics["package_bytes"] = float(package.stat().st_size)
        del exported

        progress(0.9, "verifying: one forward pass of the package against eager")
        began = time.perf_counter()
        canary = _input_ids(shape, vocab_size, CANARY_SEED)
        with torch.no_grad():
            expected = wrapper(canary)
        with _environ(**{CHECK_INPUTS_ENV: "1"}):
            runner = torch._inductor.aoti_load_package(str(package))
            try:
                with torch.no_grad():
                    actual = runner(canary)
            except Exception as exc:
                if is_environmental(exc):
                    raise
                raise CompileError(f"the package fails on its own input shape: {exc}", True) from exc
        metrics["canary_max_abs_diff"] = compare_logits(actual, expected, plan.precision)
        metrics["canary_seconds"] = time.perf_counter() - began

        versions = {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__}
        atol, rtol = TOLERANCES[plan.precision]
        manifest = {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "package": PACKAGE_NAME,
            "key": {
                name: request.key.get(name)
                for name in (
                    "kind",
                    "model",
                    "model_revision",
                    "compile_target",
                    "batch_size",
                    "sequence_length",
                    "precision",
                    "toolchain",
                    "digest",
                )
            },
            "compile_target": plan.target.name,
            "aten_cpu_capability": plan.target.aten_capability,
            "march": plan.target.march,
            "inputs": [{"name": "input_ids", "shape": list(shape), "dtype": "int64"}],
            "outputs": [
                {"name": "logits", "shape": list(expected.shape), "dtype": PRECISIONS[plan.precision]}
            ],
            "versions": versions,
            "canary": {"max_abs_diff": metrics["canary_max_abs_diff"], "atol": atol, "rtol": rtol},
            "load": (
                f"set {CHECK_INPUTS_ENV}=1, then torch._inductor.aoti_load_package(path to {PACKAGE_NAME}) "
                "and call it with input_ids, an int64 tensor of the input shape; it returns the logits"
            ),
        }
        (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        progress(1.0, f"done: {package.stat().st_size / 2**20:.1f} MiB package verified")
        return CompileResult(toolchain_versions=versions, metrics=metrics)


def _load_model(source: Path, revision: str, dtype: torch.dtype) -> PreTrainedModel:
    """The causal LM in `source`, in eval mode, never touching a model hub.

    Problems with the checkpoint (including a revision mismatch, see `checked_source`) are
    deterministic CompileErrors; environmental failures (memory, disk) propagate and end up
    transient.
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = checked_source(source, revision)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, dtype=dtype, trust_remote_code=False
        )
    except Exception as exc:
        if is_environmental(exc):
            raise
        # Unsupported architecture (ValueError/KeyError), missing or truncated weight files
        # (OSError without errno, safetensors errors): a property of these model bytes.
        raise CompileError(f"cannot load a causal LM from {path}: {type(exc).__name__}: {exc}", True) from exc
    # Through nn.Module: transformers overrides eval() without annotations.
    torch.nn.Module.eval(model).requires_grad_(False)
    return model


def _input_ids(shape: tuple[int, int], vocab_size: int, seed: int) -> torch.Tensor:
    """Seeded token ids in [0, vocab_size): the same tensor on every run."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, shape, generator=generator, dtype=torch.int64)


def compare_logits(actual: Any, expected: torch.Tensor, precision: str) -> float:
    """Max |actual - expected|; CompileError(deterministic) beyond the precision's tolerance."""
    import torch

    if not isinstance(actual, torch.Tensor):
        raise CompileError(f"the package returned {type(actual).__name__}, not a logits tensor", True)
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        raise CompileError(
            f"the package returned {actual.dtype} {list(actual.shape)}; "
            f"eager returns {expected.dtype} {list(expected.shape)}",
            True,
        )
    max_abs_diff = float((actual.float() - expected.float()).abs().nan_to_num(math.inf).max())
    atol, rtol = TOLERANCES[precision]
    try:
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, equal_nan=True)
    except AssertionError as exc:
        raise CompileError(
            f"canary failed: the package disagrees with eager ({precision}, atol={atol}, rtol={rtol}, "
            f"max abs diff {max_abs_diff:.3g}): {exc}",
            True,
        ) from exc
    return max_abs_diff


# torch is imported lazily, so the wrapper class is defined on first use.
_logits_only_class: type | None = None


def logits_only(model: torch.nn.Module) -> torch.nn.Module:
    """`model` wrapped so that forward(input_ids) returns only the logits, without a KV cache.

    Exporting the model itself would trace its cache handling and return a ModelOutput;
    the deployed package should take token ids and return logits, nothing else.
    """
    global _logits_only_class  # noqa: PLW0603 - a lazily built class, cached once
    if _logits_only_class is None:
        import torch

        class _LogitsOnly(torch.nn.Module):
            def __init__(self, inner: torch.nn.Module) -> None:
                super().__init__()
                self.model = inner

            def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
                logits: torch.Tensor = self.model(input_ids=input_ids, use_cache=False).logits
                return logits

        _logits_only_class = _LogitsOnly
    wrapped: torch.nn.Module = _logits_only_class(model)
    return wrapped


def read_manifest(package_dir: Path) -> dict[str, Any]:
    """The manifest of an inductor artifact directory; ValueError if it is not one we can read."""
    return backend.read_manifest(package_dir, MANIFEST_NAME, MANIFEST_FORMAT, MANIFEST_VERSION)


class InductorPackage:
    """A loaded inductor artifact, callable with `input_ids` and returning the logits.

    Loading sets AOTI_RUNTIME_CHECK_INPUTS=1 in this process's environment first (the
    package reads it once, at its first call): a wrong shape then raises RuntimeError
    instead of aborting the process. Calls are also checked against the manifest, with a
    ValueError that names the expected shape.
    """

    def __init__(self, package_dir: Path) -> None:
        import torch

        self.manifest = read_manifest(package_dir)
        target = str(self.manifest.get("compile_target"))
        if target not in host_compile_targets():
            # Running it would die of SIGILL (an illegal instruction) at the first call.
            raise RuntimeError(f"{package_dir} is a {target} package; this CPU cannot run it")
        spec = self.manifest["inputs"][0]
        self.input_shape = tuple(int(n) for n in spec["shape"])
        self.input_dtype = getattr(torch, spec["dtype"])
        os.environ[CHECK_INPUTS_ENV] = "1"
        self._runner = torch._inductor.aoti_load_package(str(package_dir / self.manifest["package"]))

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits for `input_ids` (shape and dtype exactly as in the manifest)."""
        import torch

        if tuple(input_ids.shape) != self.input_shape or input_ids.dtype != self.input_dtype:
            raise ValueError(
                f"this package was compiled for input_ids {self.input_dtype} {list(self.input_shape)}; "
                f"got {input_ids.dtype} {list(input_ids.shape)}"
            )
        with torch.no_grad():
            logits: torch.Tensor = self._runner(input_ids)
        return logits


def load_package(package_dir: Path) -> InductorPackage:
    """Load the inductor artifact in `package_dir` (a published artifact's directory)."""
    return InductorPackage(package_dir)


def load_and_run(package_dir: Path, input_ids: torch.Tensor) -> torch.Tensor:
    """Load the artifact in `package_dir` and return its logits for `input_ids` (one-off use)."""
    return load_package(package_dir)(input_ids)
