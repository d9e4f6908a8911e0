"""The `awq` backend: 4-bit activation-aware weight quantization (W4A16) with llm-compressor.

What it builds, for one key (precision int4-awq; options group_size, zero_point, version):

    output_dir/config.json, model.safetensors, ...   a Hugging Face checkpoint whose
                                                     quantization_config is compressed-tensors
                                                     `pack-quantized` (what vLLM loads)
    output_dir/tokenizer.json, ...                   the source's tokenizer, or the minimal
                                                     one built for calibration (see below)
    output_dir/prebake-awq.json                      the manifest: format, group size, zero
                                                     point, quantizer versions, metrics
    output_dir/autoawq/                              (version "gemm") the same quantized weights
                                                     in AutoAWQ's GEMM layout: config.json with
                                                     quant_method awq, version gemm; per layer
                                                     qweight/qzeros (int32, 8 nibbles along the
                                                     outputs in AWQ_PACK_ORDER) and fp16 scales

Steps: load the model from the local model source (offline); compute its logits on a seeded
canary input (fp) and those of round-to-nearest quantization of the same weights with the
same quantizer arguments (RTN, the baseline AWQ is measured against); run llm-compressor's
`oneshot` with `AWQModifier` + `QuantizationModifier` (W4A16, group size from the key,
asymmetric when zero_point is true, `lm_head` left in full precision) on a small seeded
synthetic calibration set; take the fake-quantized model's logits; write the AutoAWQ layout
and check that it dequantizes to the fake-quantized weights within fp16 rounding of the
scales; save the compressed checkpoint; reload it with transformers and compare its logits
with the fake-quantized ones (must match: a mismatch fails the job deterministically). The
relative logit errors of AWQ and RTN against fp are reported in the result's metrics
(`awq_rel_error`, `rtn_rel_error`; ||logits - fp logits|| / ||fp logits||).

The key is weight-only: sequence length, batch size and instance type are not part of it, and
the compile target is empty (any GPU family the key resolves to: cuda-sm80/86/89/90), so
`compile_targets()` advertises [] ("any"). A tensor-parallel degree, when the key carries one
(>1), is a validity check: each row-parallel partition's input size must be divisible by the
group size.

Known llm-compressor 0.14 pitfalls handled here:
  - a calibration dataset requires a tokenizer/processor, even for pre-tokenized data: if the
    model source has none, a minimal WordLevel tokenizer over the model's vocabulary is built
    (token ids are what calibration uses; the tokenizer only satisfies the pre-processing) and
    saved with the checkpoint so that it loads like any other;
  - without an accelerator, AWQ's smoothing pins CPU memory (`pin_memory()`), which fails with
    "Cannot access accelerator device": the pinning is disabled for the duration of the job;
  - it pins transformers <=5.17.

Failure classification (CompileError.deterministic): the key (kind, precision, options,
group size not dividing a quantized layer's input size, tensor-parallel partitions, toolchain)
and the model source (missing, unloadable, revision mismatch) are deterministic, as is the
reloaded checkpoint disagreeing with the fake-quantized model. Memory, OS errors with an
errno and anything unexpected are transient.

Importing this module imports neither torch nor llm-compressor.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prebake.compiler import backend
from prebake.compiler.backend import CompileError, CompileRequest, CompileResult, ProgressFn, is_environmental
from prebake.compiler.model_source import checked_source

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

KIND = "awq"
PRECISION = "int4-awq"
MANIFEST_NAME = "prebake-awq.json"
MANIFEST_FORMAT = "prebake-awq"
MANIFEST_VERSION = 1
CHECKPOINT_FORMAT = "pack-quantized"
NUM_BITS = 4
# Options the server fills in for every awq key, with their defaults.
DEFAULT_OPTIONS: Mapping[str, str] = {"group_size": "128", "zero_point": "true", "version": "gemm"}
# AutoAWQ kernel packing versions this backend knows.
VERSIONS = ("gemm",)
# The GPU families AWQ keys resolve to (informational: keys drop the instance type).
GPU_FAMILIES = ("cuda-sm80", "cuda-sm86", "cuda-sm89", "cuda-sm90")
# Layers whose input is split across tensor-parallel ranks (row-parallel in vLLM).
ROW_PARALLEL_SUFFIXES = ("o_proj", "down_proj", "out_proj", "dense_4h_to_h", "fc2", "w2")
IGNORED_LAYERS = ("lm_head",)

# Synthetic calibration set: seeded random token ids.
CALIBRATION_SEED = 0
CALIBRATION_SAMPLES = 16
CALIBRATION_TOKENS = 64
CANARY_SEED = 1
CANARY_SHAPE = (2, 32)
# The reloaded checkpoint against the fake-quantized model: |a - b| <= atol + rtol * |b|.
RELOAD_TOLERANCES: Mapping[str, tuple[float, float]] = {
    "float32": (1e-4, 1e-4),
    "float16": (2e-2, 2e-2),
    "bfloat16": (5e-2, 5e-2),
}

_REQUIRED_DISTRIBUTIONS = ("llmcompressor", "compressed-tensors", "torch", "transformers")


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution).split("+")[0]
    except importlib.metadata.PackageNotFoundError:
        return ""


def _major_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


@dataclass(frozen=True)
class _Plan:
    """A validated key in typed form."""

    group_size: int
    zero_point: bool
    version: str
    tensor_parallel_degree: int


def validate_key(key: Mapping[str, Any], toolchain: str) -> _Plan:
    """Check the key against what this backend builds; CompileError(deterministic) if not."""
    kind = key.get("kind")
    if kind != KIND:
        raise CompileError(f"the awq backend cannot build {kind!r} artifacts", True)
    precision = str(key.get("precision", ""))
    if precision != PRECISION:
        raise CompileError(f"awq checkpoints are {PRECISION}; precision {precision!r} is not supported", True)
    raw = key.get("options") or {}
    if not isinstance(raw, Mapping):
        raise CompileError(f"options must be a map, not {type(raw).__name__}", True)
    options = {**DEFAULT_OPTIONS, **{str(k): str(v) for k, v in raw.items()}}
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
    if unknown:
        raise CompileError(
            f"unknown awq option(s) {', '.join(unknown)}; known: {', '.join(sorted(DEFAULT_OPTIONS))}", True
        )
    try:
        group_size = int(options["group_size"])
    except ValueError:
        group_size = 0
    if group_size <= 0:
        raise CompileError(f"group_size must be a positive integer, not {options['group_size']!r}", True)
    zero_point_text = options["zero_point"].lower()
    if zero_point_text not in ("true", "false"):
        raise CompileError(f"zero_point must be true or false, not {options['zero_point']!r}", True)
    version = options["version"].lower()
    if version not in VERSIONS:
        raise CompileError(
            f"unknown AWQ kernel version {options['version']!r}; this backend builds {', '.join(VERSIONS)}",
            True,
        )
    tp = key.get("tensor_parallel_degree", 0) or 0
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 0:
        raise CompileError(f"tensor_parallel_degree must be a non-negative integer, not {tp!r}", True)
    wanted = str(key.get("toolchain", ""))
    if wanted and wanted != toolchain:
        raise CompileError(f"the key asks for toolchain {wanted!r}; this host builds {toolchain!r}", True)
    return _Plan(group_size, zero_point_text == "true", version, max(tp, 1))


def check_layer_shapes(in_features: Mapping[str, int], group_size: int, tensor_parallel_degree: int) -> None:
    """Every quantized layer's input (per tensor-parallel partition) divisible by the group size.

    `in_features` maps layer names to their input sizes. Row-parallel layers (o_proj,
    down_proj, ...) have their input split across the ranks; CompileError(deterministic).
    """
    for name, size in sorted(in_features.items()):
        parts = tensor_parallel_degree if name.endswith(ROW_PARALLEL_SUFFIXES) else 1
        if size % parts:
            raise CompileError(
                f"{name}: input size {size} does not split into {parts} tensor-parallel partitions", True
            )
        if (size // parts) % group_size:
            where = f" per partition at tensor_parallel_degree {parts}" if parts > 1 else ""
            raise CompileError(
                f"{name}: input size {size // parts}{where} is not divisible by group_size {group_size}", True
            )


class AwqBackend:
    """W4A16 AWQ checkpoints of Hugging Face causal LMs (see the module docstring)."""

    kind: str = KIND

    def available(self) -> tuple[bool, str]:
        """Without importing anything: llmcompressor, compressed-tensors, torch, transformers."""
        missing = [name for name in _REQUIRED_DISTRIBUTIONS if not _version(name)]
        if missing:
            return False, f"{', '.join(missing)} not installed (install prebake[awq])"
        return True, ""

    def toolchain(self) -> str:
        """`llmcompressor-<major.minor>` as in keys ("llmcompressor-0.14"), "" without it."""
        version = _version("llmcompressor")
        return f"llmcompressor-{_major_minor(version)}" if version else ""

    def compile_targets(self) -> list[str]:
        """[]: any. AWQ keys drop the instance type, so their compile target is empty.

        The checkpoint is weight-only and identical for every GPU family the key may resolve
        to (cuda-sm80/86/89/90); it is built and verified on CPU or any GPU.
        """
        return []

    def compile(self, request: CompileRequest, progress: ProgressFn) -> CompileResult:
        """Quantize, save, verify and describe the checkpoint in `request.output_dir`."""
        ok, why = self.available()
        if not ok:
            raise CompileError(why, False)
        plan = validate_key(request.key, self.toolchain())
        try:
            with tempfile.TemporaryDirectory(prefix="prebake-awq-") as scratch:
                return self._compile(request, plan, progress, Path(scratch))
        except CompileError:
            raise
        except Exception as exc:
            raise CompileError(f"awq compile failed: {type(exc).__name__}: {exc}", False) from exc

    def _compile(
        self, request: CompileRequest, plan: _Plan, progress: ProgressFn, scratch: Path
    ) -> CompileResult:
        import torch
        import transformers

        metrics: dict[str, float] = {}
        out_dir = request.output_dir
        device = "cuda" if torch.cuda.is_available() else "cpu"

        progress(0.05, f"loading {request.model_source}")
        began = time.perf_counter()
        source = checked_source(request.model_source, str(request.key.get("model_revision", "")))
        model = _load_model(source, device)
        metrics["load_seconds"] = time.perf_counter() - began
        dtype_name = str(next(model.parameters()).dtype).removeprefix("torch.")
        vocab_size = _vocab_size(model)
        linears = _quantized_linears(model)
        if not linears:
            raise CompileError("the model has no linear layers to quantize", True)
        check_layer_shapes(
            {name: int(m.in_features) for name, m in linears.items()},
            plan.group_size,
            plan.tensor_parallel_degree,
        )

        progress(0.15, "reference logits: full precision and round-to-nearest")
        canary = _token_ids(CANARY_SHAPE, vocab_size, CANARY_SEED).to(device)
        fp_logits = _logits(model, canary)
        _round_to_nearest(linears, plan)
        rtn_logits = _logits(model, canary)
        del model, linears
        metrics["rtn_rel_error"] = _relative_error(rtn_logits, fp_logits)

        progress(0.25, "preparing calibration data")
        tokenizer, made_tokenizer = _tokenizer_for(source, vocab_size, scratch)
        model = _load_model(source, device)
        calibration = _token_ids((CALIBRATION_SAMPLES, CALIBRATION_TOKENS), vocab_size, CALIBRATION_SEED)

        progress(
            0.3,
            f"AWQ W{NUM_BITS}A16 group_size {plan.group_size} zero_point {str(plan.zero_point).lower()} "
            f"on {CALIBRATION_SAMPLES}x{CALIBRATION_TOKENS} calibration tokens ({device})",
        )
        began = time.perf_counter()
        model = _run_awq(model, tokenizer, calibration, plan, scratch)
        metrics["quantize_seconds"] = time.perf_counter() - began
        awq_logits = _logits(model, canary)
        metrics["awq_rel_error"] = _relative_error(awq_logits, fp_logits)

        if plan.version == "gemm":
            progress(0.7, f"writing the AutoAWQ GEMM layout into {AUTOAWQ_DIR}/")
            began = time.perf_counter()
            metrics["autoawq_max_abs_diff"] = export_autoawq(model, plan, out_dir / AUTOAWQ_DIR)
            tokenizer.save_pretrained(str(out_dir / AUTOAWQ_DIR))
            metrics["autoawq_seconds"] = time.perf_counter() - began

        progress(0.75, f"saving the {CHECKPOINT_FORMAT} checkpoint")
        began = time.perf_counter()
        model.save_pretrained(str(out_dir), save_compressed=True)
        tokenizer.save_pretrained(str(out_dir))
        del model
        metrics["save_seconds"] = time.perf_counter() - began
        metrics["artifact_bytes"] = float(sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file()))

        progress(0.85, "verifying: reload with transformers, compare with the fake-quantized model")
        began = time.perf_counter()
        reloaded = _reload(out_dir, device)
        reload_logits = _logits(reloaded, canary)
        del reloaded
        metrics["reload_max_abs_diff"] = _compare(reload_logits, awq_logits, dtype_name)
        metrics["verify_seconds"] = time.perf_counter() - began

        versions = {
            "llmcompressor": _version("llmcompressor"),
            "compressed-tensors": _version("compressed-tensors"),
            "torch": torch.__version__.split("+")[0],
            "transformers": transformers.__version__,
        }
        manifest = {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "checkpoint_format": CHECKPOINT_FORMAT,
            "quant_method": "compressed-tensors",
            "scheme": f"W{NUM_BITS}A16" + ("_ASYM" if plan.zero_point else ""),
            "bits": NUM_BITS,
            "group_size": plan.group_size,
            "zero_point": plan.zero_point,
            "version": plan.version,
            "ignore": list(IGNORED_LAYERS),
            "dtype": dtype_name,
            "calibration": {
                "source": "synthetic",
                "seed": CALIBRATION_SEED,
                "samples": CALIBRATION_SAMPLES,
                "tokens": CALIBRATION_TOKENS,
            },
            "tokenizer": "synthetic-wordlevel" if made_tokenizer else "model-source",
            "key": {
                name: request.key.get(name)
                for name in ("kind", "model", "model_revision", "precision", "toolchain", "options", "digest")
            },
            "versions": versions,
            "metrics": metrics,
            "autoawq": AUTOAWQ_DIR if plan.version == "gemm" else None,
            "load": "transformers.AutoModelForCausalLM.from_pretrained(dir) or vLLM (compressed-tensors); "
            f"AutoAWQ GEMM layout (quant_method awq) in {AUTOAWQ_DIR}/",
        }
        (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        progress(
            1.0,
            f"done: AWQ rel error {metrics['awq_rel_error']:.4f} (RTN {metrics['rtn_rel_error']:.4f}), "
            "checkpoint verified",
        )
        return CompileResult(toolchain_versions=versions, metrics=metrics)


def _load_model(path: Path, device: str) -> PreTrainedModel:
    """The causal LM in `path` in its own dtype, eval mode; problems with it are deterministic."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, dtype="auto", trust_remote_code=False
        )
    except Exception as exc:
        if is_environmental(exc):
            raise
        raise CompileError(f"cannot load a causal LM from {path}: {type(exc).__name__}: {exc}", True) from exc
    torch.nn.Module.eval(model).requires_grad_(False)
    torch.nn.Module.to(model, device)
    return model


def _reload(path: Path, device: str) -> PreTrainedModel:
    """The saved checkpoint, loaded back as a deployer would; failures are deterministic."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        if is_environmental(exc):
            raise
        raise CompileError(
            f"the saved checkpoint does not load with transformers: {type(exc).__name__}: {exc}", True
        ) from exc
    torch.nn.Module.eval(model).requires_grad_(False)
    torch.nn.Module.to(model, device)
    return model


def _vocab_size(model: PreTrainedModel) -> int:
    import torch

    embeddings = model.get_input_embeddings()
    if isinstance(embeddings, torch.nn.Embedding):
        return int(embeddings.num_embeddings)
    return int(model.config.vocab_size)


def _quantized_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The Linear layers the recipe quantizes (all but IGNORED_LAYERS)."""
    import torch

    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in IGNORED_LAYERS
    }


def _token_ids(shape: tuple[int, int], vocab_size: int, seed: int) -> torch.Tensor:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, shape, generator=generator, dtype=torch.int64)


def _logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    import torch

    with torch.no_grad():
        logits: torch.Tensor = model(input_ids=input_ids, use_cache=False).logits
    return logits.float().cpu()


def _relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """||actual - reference|| / ||reference|| (Frobenius)."""
    return float((actual - reference).norm() / reference.norm().clamp_min(1e-12))


def _quantization_args(plan: _Plan) -> Any:
    from compressed_tensors.quantization import QuantizationArgs  # type: ignore[import-untyped] # no py.typed

    return QuantizationArgs(
        num_bits=NUM_BITS,
        type="int",
        symmetric=not plan.zero_point,
        strategy="group",
        group_size=plan.group_size,
    )


def _round_to_nearest(linears: Mapping[str, torch.nn.Linear], plan: _Plan) -> None:
    """Replace each layer's weight by its min-max round-to-nearest fake quantization, in place.

    Same quantizer arguments (and compressed-tensors' own qparams and rounding) as the AWQ
    recipe, without the activation-aware scaling: the baseline AWQ is measured against.
    """
    import torch
    from compressed_tensors.quantization.lifecycle.forward import (  # type: ignore[import-untyped] # no py.typed
        fake_quantize,
    )
    from compressed_tensors.quantization.utils import calculate_qparams  # type: ignore[import-untyped]

    args = _quantization_args(plan)
    with torch.no_grad():
        for module in linears.values():
            weight = module.weight
            out_features, in_features = weight.shape
            grouped = weight.reshape(out_features, in_features // plan.group_size, plan.group_size)
            scale, zero_point = calculate_qparams(grouped.amin(dim=-1), grouped.amax(dim=-1), args)
            weight.copy_(fake_quantize(weight, scale, zero_point, args))


def _tokenizer_for(source: Path, vocab_size: int, scratch: Path) -> tuple[Any, bool]:
    """The model source's tokenizer, or a minimal WordLevel one over its vocabulary.

    Returns (tokenizer, made): llm-compressor requires a processor whenever it is given a
    dataset, even one of token ids, and a checkpoint without a tokenizer cannot provide one.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    has_tokenizer = any(
        (source / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")
    )
    if has_tokenizer:
        try:
            return AutoTokenizer.from_pretrained(str(source), local_files_only=True), False
        except Exception as exc:
            if is_environmental(exc):
                raise
            # Fall through: calibration only needs token ids.
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"<t{i}>": i for i in range(vocab_size)}
    word_level = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<t0>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # type: ignore[assignment] # untyped setter
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call] # transformers leaves it unannotated
        tokenizer_object=word_level, unk_token="<t0>", pad_token="<t0>", bos_token="<t1>", eos_token="<t1>"
    )
    tokenizer.save_pretrained(str(scratch / "tokenizer"))
    return tokenizer, True


@contextlib.contextmanager
def _no_pinning_without_accelerator() -> Iterator[None]:
    """llm-compressor 0.14 pins cached activations for AWQ; without an accelerator that raises."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.cuda.is_available():
        yield
        return
    original = IntermediatesCache.pin_memory

    def no_pin(self: Any, batch_index: int, input_names: list[str] | None = None) -> None:
        return None

    IntermediatesCache.pin_memory = no_pin  # type: ignore[method-assign] # CPU-only patch, restored below
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original  # type: ignore[method-assign]


def _run_awq(
    model: PreTrainedModel, tokenizer: Any, calibration: torch.Tensor, plan: _Plan, scratch: Path
) -> PreTrainedModel:
    """oneshot(AWQModifier + QuantizationModifier) on `calibration`; the fake-quantized model."""
    import torch
    from compressed_tensors.quantization import QuantizationScheme
    from llmcompressor.entrypoints.oneshot import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    scheme = QuantizationScheme(targets=["Linear"], weights=_quantization_args(plan))
    recipe = [
        AWQModifier(),
        QuantizationModifier(config_groups={"group_0": scheme}, ignore=list(IGNORED_LAYERS)),
    ]
    samples = [
        {"input_ids": row.unsqueeze(0), "attention_mask": torch.ones_like(row).unsqueeze(0)}
        for row in calibration
    ]
    # A DataLoader is used as given (batch_size=None: each sample is already a batch of 1).
    loader = torch.utils.data.DataLoader(samples, batch_size=None)  # type: ignore[arg-type,var-annotated]
    try:
        with _no_pinning_without_accelerator():
            quantized = oneshot(
                model=model,
                recipe=recipe,
                dataset=loader,
                processor=tokenizer,
                num_calibration_samples=len(samples),
                log_dir=str(scratch / "logs"),
            )
    except Exception as exc:
        if is_environmental(exc) or (isinstance(exc, RuntimeError) and "CUDA" in str(exc)):
            raise
        # The recipe is a function of the key and the model: it fails the same way everywhere.
        raise CompileError(f"llm-compressor rejected the model: {type(exc).__name__}: {exc}", True) from exc
    result: PreTrainedModel = quantized
    return result


def _compare(actual: torch.Tensor, expected: torch.Tensor, dtype_name: str) -> float:
    """Max |actual - expected|; CompileError(deterministic) beyond the dtype's tolerance."""
    import torch

    if actual.shape != expected.shape:
        raise CompileError(
            f"the reloaded checkpoint returns logits {list(actual.shape)}, not {list(expected.shape)}", True
        )
    max_abs_diff = float((actual - expected).abs().nan_to_num(math.inf).max())
    atol, rtol = RELOAD_TOLERANCES.get(dtype_name, RELOAD_TOLERANCES["bfloat16"])
    try:
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
    except AssertionError as exc:
        raise CompileError(
            f"verification failed: the reloaded checkpoint disagrees with the fake-quantized model "
            f"(max abs diff {max_abs_diff:.3g}, atol={atol}, rtol={rtol}): {exc}",
            True,
        ) from exc
    return max_abs_diff


def read_manifest(checkpoint_dir: Path) -> dict[str, Any]:
    """The manifest of an awq artifact directory; ValueError if it is not one we can read."""
    return backend.read_manifest(checkpoint_dir, MANIFEST_NAME, MANIFEST_FORMAT, MANIFEST_VERSION)


# AutoAWQ GEMM layout: eight 4-bit values per int32 along the output dimension, in this order
# (value i of a word holds column ORDER[i] of its group of eight; bits 4*i .. 4*i+3).
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AUTOAWQ_DIR = "autoawq"


def pack_awq_gemm(values: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 4-bit values [rows, cols] (cols % 8 == 0) into int32 [rows, cols // 8]."""
    import torch

    rows, cols = values.shape
    grouped = values.to(torch.int64).reshape(rows, cols // 8, 8)[:, :, list(AWQ_PACK_ORDER)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    words = (grouped << shifts).sum(dim=-1)
    # Two's complement: the top nibble's high bit is the int32 sign bit.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_awq_gemm(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_awq_gemm`: int32 [rows, cols // 8] -> int64 [rows, cols] in 0..15."""
    import torch

    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    nibbles = (packed.to(torch.int64)[:, :, None] >> shifts) & 0xF
    inverse = [AWQ_PACK_ORDER.index(i) for i in range(8)]
    return nibbles[:, :, inverse].reshape(packed.shape[0], -1)


def dequantize_awq_gemm(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> torch.Tensor:
    """The [out, in] float32 weight an AutoAWQ GEMM layer (qweight [in, out/8]) stands for."""
    import torch

    q = unpack_awq_gemm(qweight)
    z = unpack_awq_gemm(qzeros).repeat_interleave(group_size, dim=0)
    s = scales.to(torch.float32).repeat_interleave(group_size, dim=0)
    return ((q - z).to(torch.float32) * s).t().contiguous()


def autoawq_layer(
    weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, args: Any
) -> dict[str, torch.Tensor]:
    """qweight, qzeros, scales (fp16) of one compressed-tensors group-quantized weight.

    `weight` [out, in] is the (smoothed) full-precision weight, `scale` and `zero_point`
    [out, in / group] its quantization parameters. compressed-tensors quantizes to signed
    -8..7 with a signed zero point; AutoAWQ stores unsigned 0..15: both shift by 8, and
    (q - z) is unchanged.
    """
    import torch
    from compressed_tensors.quantization.lifecycle.forward import quantize  # type: ignore[import-untyped]

    out_features = weight.shape[0]
    if out_features % 8:
        raise CompileError(f"AutoAWQ GEMM packs 8 outputs per word; a layer has {out_features}", True)
    q = quantize(weight.float(), scale.float(), zero_point, args).round().to(torch.int64) + 8
    z = zero_point.to(torch.int64) + 8
    if q.min() < 0 or q.max() > 15 or z.min() < 0 or z.max() > 15:
        raise CompileError("quantized values outside 4 bits: cannot write the AutoAWQ layout", True)
    return {
        "qweight": pack_awq_gemm(q.t().contiguous()),
        "qzeros": pack_awq_gemm(z.t().contiguous()),
        "scales": scale.t().contiguous().to(torch.float16),
    }


def _tensor_attribute(module: torch.nn.Module, name: str) -> torch.Tensor:
    """A tensor compressed-tensors attached to `module` (weight_scale, weight_zero_point)."""
    import torch

    value = getattr(module, name, None)
    if not isinstance(value, torch.Tensor):
        raise CompileError(f"{type(module).__name__} has no {name}: the layer was not quantized", True)
    return value.detach()


def export_autoawq(model: PreTrainedModel, plan: _Plan, dest: Path) -> float:
    """Write the fake-quantized `model` as an AutoAWQ GEMM checkpoint into `dest`; verify it.

    `dest` gets config.json (quantization_config quant_method awq, version gemm) and
    model.safetensors (qweight/qzeros/scales per quantized layer, every other tensor in
    fp16). Returns the largest |dequantized AutoAWQ weight - fake-quantized weight|, which
    only fp16 rounding of the scales may cause; beyond it, CompileError(deterministic).
    """
    import torch
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize  # type: ignore[import-untyped]
    from safetensors.torch import save_file

    args = _quantization_args(plan)
    linears = _quantized_linears(model)
    tensors: dict[str, torch.Tensor] = {}
    worst = 0.0
    with torch.no_grad():
        for name, module in linears.items():
            weight = module.weight.detach().float().cpu()
            scale = _tensor_attribute(module, "weight_scale").float().cpu()
            zero_point = _tensor_attribute(module, "weight_zero_point").cpu()
            layer = autoawq_layer(weight, scale, zero_point, args)
            for part, tensor in layer.items():
                tensors[f"{name}.{part}"] = tensor
            expected = fake_quantize(weight, scale, zero_point, args).float()
            actual = dequantize_awq_gemm(layer["qweight"], layer["qzeros"], layer["scales"], plan.group_size)
            worst = max(worst, float((actual - expected).abs().max()))
            # fp16 scales: relative rounding 2^-11 on a scale multiplied by |q - z| <= 15.
            bound = float(scale.abs().max()) * 15 * 2.0**-10 + 1e-6
            if not bool(((actual - expected).abs() <= bound).all()):
                raise CompileError(
                    f"AutoAWQ export of {name} does not dequantize to the quantized weights "
                    f"(max abs diff {float((actual - expected).abs().max()):.3g} > {bound:.3g})",
                    True,
                )
        skip = tuple(f"{name}.weight" for name in linears)
        for key, value in model.state_dict().items():
            if key.startswith(skip):
                continue  # weight, weight_scale, weight_zero_point of a quantized layer
            tensor = value.detach().cpu()
            if tensor.is_floating_point():
                tensor = tensor.to(torch.float16)
            # A fresh copy: tied parameters would otherwise share storage, which safetensors refuses.
            tensors[key] = tensor.contiguous().clone()
    dest.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "float16"
    config["quantization_config"] = {
        "quant_method": "awq",
        "bits": NUM_BITS,
        "group_size": plan.group_size,
        "zero_point": plan.zero_point,
        "version": plan.version,
        "modules_to_not_convert": list(IGNORED_LAYERS),
    }
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return worst
