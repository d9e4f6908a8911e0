"""The `neuron` backend: a Hugging Face causal LM compiled ahead of time for AWS Neuron.

It drives optimum-neuron's exporter, the command-line front of the Neuron SDK's decoder
compile (optimum-neuron builds the graphs with NxD Inference and compiles them with
neuronx-cc), for exactly the key's shapes:

    optimum-cli export neuron --model MODEL_DIR --task text-generation
        --instance_type {inf2|trn1|trn2} --batch_size B --sequence_length S
        --num_cores TP --auto_cast_type {bf16|fp16} [-O1|-O2|-O3] OUTPUT_DIR

Flag names were checked against optimum-neuron's `optimum/commands/export/neuronx.py`
(`parse_args_neuronx`) and `optimum/exporters/neuron/__main__.py`
(`maybe_export_from_neuron_model_class`): for text generation `--num_cores` is the
tensor-parallel degree, `--auto_cast_type` the decoder's dtype and `--sequence_length`
Neuron's n_positions. Why optimum-neuron rather than NxD Inference directly: its exporter
picks the NxD model class for the architecture, writes a self-describing directory
(`config.json`, `neuron_config.json`, the compiled model) that `NeuronModelForCausalLM.
from_pretrained` and TGI/vLLM-neuron load, and is a subprocess with a stable command line,
which keeps the SDK out of this process and makes the configuration unit-testable.

What the key maps to, and what it cannot:

  precision   bf16, fp16 -> `--auto_cast_type`. fp32 is refused: the CLI's `--auto_cast_type`
              accepts bf16, fp16, tf32 and fp8_e4m3 (default bf16), so an fp32 key would
              silently compile in bf16. int8 and fp8 are refused too (not supported by this
              backend yet: no validated flag set). All deterministic CompileErrors.
  options     whitelisted (`COMPILER_OPTIONS`): `optlevel` 1|2|3 -> `-O1|-O2|-O3`. Anything
              else is a deterministic CompileError, never dropped, because options are
              part of the key. Caveat: the optimum-neuron source read pops -O1/-O2/-O3 on
              the text-generation path (its decoder classes set their own compiler flags),
              so today `optlevel` splits the key without changing the compiled graph.
  target      the key's compile target must be this host's own family (`host_targets`):
              inf2 and trn1 share NeuronCore-v2, but AWS documents inf2-compiled models as
              deployable on inf2, so cross-family reuse is the server's opt-in policy, not
              something a worker builds; trn2 (NeuronCore-v3) never shares with v2.
  toolchain   `neuronx-cc-<major>.<minor>` of the installed compiler. Artifacts built by
              one neuronx-cc version do not load on another, so the compiler version is
              part of the key and a key naming another version is refused (deterministic).

Output (`request.output_dir`): what the exporter writes (config.json, neuron_config.json,
the compiled model: `*.pt` and/or `*.neff` files, tokenizer files when the source has
them) plus `prebake-neuron.json`, the manifest (key fields, neuronx-cc version, the exact
command line). After the export a load check runs in a child: `NeuronModelForCausalLM.
from_pretrained(output_dir)` and a one-token generate on the NeuronCores (the canary needs
Neuron hardware, which `available()` guarantees here).

Failure classification (deterministic failures are cached by the service and not retried):
`classify_failure` reads the exporter's output: environmental signatures (out of memory,
killed, disk full, device or runtime trouble, a command-line flag this optimum-neuron does
not know) are transient and win; neuronx-cc diagnostics (`[NCC_...]` codes, `ERROR ...
[neuronx-cc]`), unsupported architectures and invalid configurations are deterministic;
anything unrecognised is transient (retrying costs a compile; caching a wrong verdict
blocks the key until the negative cache expires).

Nothing here imports torch, optimum or the Neuron SDK: everything runs in subprocesses, so
a worker without the SDK can load this module and report why the backend is unavailable.
The exporter is run with HF_HUB_OFFLINE=1: model sources are local directories, and
nothing is fetched from a model hub.
"""

from __future__ import annotations

import collections
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prebake.compiler.backend import CompileError, CompileRequest, CompileResult, ProgressFn, positive_int
from prebake.compiler.model_source import checked_source
from prebake.core.key_fields import KEY_FIELDS

KIND = "neuron"
COMPILER_DIST = "neuronx-cc"
COMPILER_EXE = "neuronx-cc"
OPTIMUM_NEURON_DIST = "optimum-neuron"
EXPORT_EXE = "optimum-cli"
TASK = "text-generation"
MANIFEST_NAME = "prebake-neuron.json"
MANIFEST_FORMAT = "prebake-neuron"
MANIFEST_VERSION = 1
NOT_INSTALLED = (
    "Neuron SDK not installed: neuronx-cc not found (install the AWS Neuron SDK on an inf2/trn1/trn2 host)"
)
# The form of revision_of()'s digests (xxh3-128 hex); other revisions are not verifiable here.

# key precision -> optimum-neuron `--auto_cast_type`. Only what the CLI can express exactly.
PRECISIONS: Mapping[str, str] = {"bf16": "bf16", "fp16": "fp16"}
# Precisions the key schema allows for neuron but this backend refuses, and why.
REFUSED_PRECISIONS: Mapping[str, str] = {
    "fp32": (
        "optimum-neuron's export CLI has no fp32 for decoders (--auto_cast_type takes bf16, fp16, "
        "tf32 or fp8_e4m3 and defaults to bf16); use bf16 or fp16"
    ),
    "int8": "int8 is not supported by this backend yet; use bf16 or fp16",
    "fp8": "fp8 is not supported by this backend yet; use bf16 or fp16",
}

# compile target -> optimum-neuron `--instance_type` (its choices: inf2, trn1, trn1n, trn2).
COMPILE_TARGETS: Mapping[str, str] = {"inf2": "inf2", "trn1": "trn1", "trn2": "trn2"}

# Instance family prefix (after an optional "ml.") -> compile target. trn1n is trn1 with
# more network bandwidth: same NeuronCore-v2 and the same artifacts.
_FAMILY_TARGETS: tuple[tuple[str, str], ...] = (
    ("inf2", "inf2"),
    ("trn1n", "trn1"),
    ("trn1", "trn1"),
    ("trn2", "trn2"),  # also trn2n, trn2u
)


@dataclass(frozen=True)
class CompilerOption:
    """A key option the backend understands: its allowed values and the flags each becomes."""

    values: Mapping[str, tuple[str, ...]]
    help: str


# The whitelist of key options. Keys carry options as canonical strings.
COMPILER_OPTIONS: Mapping[str, CompilerOption] = {
    "optlevel": CompilerOption(
        values={"1": ("-O1",), "2": ("-O2",), "3": ("-O3",)},
        help="neuronx-cc optimisation level (1: fastest compile, 2: default, 3: best performance)",
    ),
}


# -- pure helpers (unit-tested without the SDK) ---------------------------------------------------


def compiler_args(options: Mapping[str, Any]) -> list[str]:
    """The exporter flags for the key's `options`, in sorted option order.

    Raises CompileError(deterministic) for an option outside `COMPILER_OPTIONS` or a value
    it does not allow: options are part of the key, so one that cannot be honoured must
    not be silently dropped.
    """
    args: list[str] = []
    for name in sorted(options):
        spec = COMPILER_OPTIONS.get(name)
        if spec is None:
            known = ", ".join(sorted(COMPILER_OPTIONS)) or "none"
            raise CompileError(f"neuron option {name!r} is not supported (supported options: {known})", True)
        value = str(options[name]).strip().lower()
        flags = spec.values.get(value)
        if flags is None:
            allowed = ", ".join(spec.values)
            raise CompileError(
                f"neuron option {name}={options[name]!r} is not allowed ({spec.help}; one of {allowed})", True
            )
        args.extend(flags)
    return args


@dataclass(frozen=True)
class ExportPlan:
    """A validated key: everything the export needs, in typed form."""

    compile_target: str
    batch_size: int
    sequence_length: int
    tensor_parallel_degree: int
    precision: str
    options: Mapping[str, str]


def _positive_int(key: Mapping[str, Any], name: str) -> int:
    return positive_int(key, name, "neuron artifacts")


def validate_key(key: Mapping[str, Any], host_targets: Sequence[str], toolchain: str) -> ExportPlan:
    """Check the key against what this backend builds on this host; CompileError(deterministic).

    Checks the kind, compile target (known and this host's own family), shapes and
    tensor-parallel degree (positive integers), precision, options (whitelisted) and
    toolchain (the installed neuronx-cc's, when the key names one). That the degree fits
    the instance's NeuronCores and the model its memory is the server's validation.
    """
    kind = key.get("kind")
    if kind != KIND:
        raise CompileError(f"the neuron backend cannot build {kind!r} artifacts", True)
    target = str(key.get("compile_target", ""))
    if target not in COMPILE_TARGETS:
        raise CompileError(
            f"compile target {target!r} is not a Neuron target this backend knows "
            f"({', '.join(COMPILE_TARGETS)})",
            True,
        )
    if target not in host_targets:
        have = ", ".join(host_targets) or "none detected"
        raise CompileError(
            f"this host cannot build or verify {target} artifacts (its Neuron family: {have}); "
            f"an instance type resolving to {target} needs a worker on a {target} host",
            True,
        )
    batch_size = _positive_int(key, "batch_size")
    sequence_length = _positive_int(key, "sequence_length")
    tp = _positive_int(key, "tensor_parallel_degree")
    precision = str(key.get("precision", ""))
    if precision in REFUSED_PRECISIONS:
        raise CompileError(f"precision {precision}: {REFUSED_PRECISIONS[precision]}", True)
    if precision not in PRECISIONS:
        raise CompileError(
            f"precision {precision!r} is not a Neuron precision this backend builds "
            f"({', '.join(PRECISIONS)})",
            True,
        )
    raw_options = key.get("options") or {}
    if not isinstance(raw_options, Mapping):
        raise CompileError(f"the key's options must be a map, not {type(raw_options).__name__}", True)
    compiler_args(raw_options)  # validates; the flags themselves are built by export_command
    wanted = str(key.get("toolchain", ""))
    if wanted and wanted != toolchain:
        raise CompileError(
            f"the key asks for toolchain {wanted!r}; this host builds {toolchain!r} "
            "(Neuron artifacts only load on the neuronx-cc version that compiled them)",
            True,
        )
    return ExportPlan(
        compile_target=target,
        batch_size=batch_size,
        sequence_length=sequence_length,
        tensor_parallel_degree=tp,
        precision=precision,
        options={str(k): str(v) for k, v in raw_options.items()},
    )


def export_command(
    key: Mapping[str, Any], model_dir: Path, output_dir: Path, neuronx_cc_version: str
) -> list[str]:
    """The optimum-neuron export command line for `key` (argv; the first element is `optimum-cli`).

    Validates the key first (`validate_key` with the key's own target as the host's, and
    the toolchain `neuronx-cc-<major.minor>` of `neuronx_cc_version`), so a command is only
    ever built for a key this backend can honour; raises CompileError(deterministic)
    otherwise. Pure: runs nothing, imports nothing.
    """
    target = str(key.get("compile_target", ""))
    plan = validate_key(key, [target], toolchain_for(neuronx_cc_version))
    return [
        EXPORT_EXE,
        "export",
        "neuron",
        "--model",
        str(model_dir),
        "--task",
        TASK,
        "--instance_type",
        COMPILE_TARGETS[plan.compile_target],
        "--batch_size",
        str(plan.batch_size),
        "--sequence_length",
        str(plan.sequence_length),
        "--num_cores",
        str(plan.tensor_parallel_degree),
        "--auto_cast_type",
        PRECISIONS[plan.precision],
        *compiler_args(plan.options),
        str(output_dir),
    ]


def toolchain_for(neuronx_cc_version: str) -> str:
    """`neuronx-cc-<major>.<minor>` for a neuronx-cc version ("2.21.18209.0+043b1bf7" -> "neuronx-cc-2.21").

    "" for an empty or unparsable version.
    """
    match = re.match(r"(\d+)\.(\d+)", neuronx_cc_version.strip())
    return f"neuronx-cc-{match.group(1)}.{match.group(2)}" if match else ""


def target_for_instance_type(instance_type: str) -> str:
    """The compile target of an instance type ("ml.trn1n.32xlarge" -> "trn1"); "" if not Neuron v2/v3."""
    name = instance_type.strip().lower().removeprefix("ml.")
    family = name.split(".", 1)[0]
    for prefix, target in _FAMILY_TARGETS:
        if family.startswith(prefix):
            return target
    return ""


def _find_instance_type(data: Any) -> str:
    """An instance type named anywhere in neuron-ls JSON ("instance_type"/"instance-type")."""
    if isinstance(data, Mapping):
        for name in ("instance_type", "instance-type", "instanceType"):
            value = data.get(name)
            if isinstance(value, str) and value:
                return value
        for value in data.values():
            found = _find_instance_type(value)
            if found:
                return found
    elif isinstance(data, list):
        for item in data:
            found = _find_instance_type(item)
            if found:
                return found
    return ""


def _device_count(data: Any) -> int:
    """How many Neuron devices neuron-ls JSON lists (a list of devices, or one under a key)."""
    if isinstance(data, list):
        return sum(1 for d in data if isinstance(d, Mapping) and "neuron_device" in d)
    if isinstance(data, Mapping):
        for name in ("neuron_devices", "devices", "neuron_device"):
            value = data.get(name)
            if isinstance(value, list):
                return len(value)
    return 0


def host_targets(probe_json: str, product_name: str = "") -> list[str]:
    """This host's Neuron compile target as a one-element list, or [] when unknown.

    `probe_json` is `neuron-ls --json-output`: a list of devices (`neuron_device`,
    `nc_count`, `memory_size`, ...), possibly wrapped in an object that also names the
    instance type. Devices alone cannot tell inf2 from trn1 (both have two NeuronCore-v2 per
    device and 32 GiB), so the family comes from the instance type: neuron-ls's own field
    when it has one, else `product_name` (EC2 Nitro instances report their instance type as
    the DMI product name). No devices, no targets: a host without Neuron hardware cannot
    verify what it builds.
    """
    try:
        data = json.loads(probe_json) if probe_json.strip() else None
    except json.JSONDecodeError:
        return []
    if _device_count(data) == 0:
        return []
    target = target_for_instance_type(_find_instance_type(data) or product_name)
    return [target] if target else []


# (pattern, deterministic). Environmental signatures come first and win: a compiler that was
# killed for memory also prints errors, and those would look like the model's fault.
FAILURE_PATTERNS: tuple[tuple[re.Pattern[str], bool], ...] = (
    (re.compile(r"MemoryError|out of memory|Cannot allocate memory|std::bad_alloc", re.I), False),
    (re.compile(r"^Killed\b|\bSIGKILL\b|signal 9\b", re.M), False),
    (re.compile(r"No space left on device|Disk quota exceeded|Input/output error", re.I), False),
    (re.compile(r"\bNRT\b.*(error|fail)|nrt_init|Failed to (initialize|allocate).*Neuron", re.I), False),
    (re.compile(r"Connection (refused|reset)|Temporary failure in name resolution", re.I), False),
    # This optimum-neuron does not know a flag: the worker's install, not the key.
    (re.compile(r"unrecognized arguments|invalid choice", re.I), False),
    # neuronx-cc diagnostics: "[NCC_EVRF009] ..." and "ERROR 1234 [neuronx-cc]: ...".
    (re.compile(r"\[NCC_[A-Z0-9]+\]"), True),
    (re.compile(r"^ERROR\b.*\[neuronx-cc\]", re.M), True),
    (re.compile(r"Compilation failed|Compiler status ERROR", re.I), True),
    # optimum-neuron rejecting the model or the configuration.
    (
        re.compile(r"is not supported|not a causal language model|Unrecognized configuration class", re.I),
        True,
    ),
    (re.compile(r"must be (divisible|a multiple) by|should be divisible by|exceeds the maximum", re.I), True),
)


def classify_failure(output_text: str) -> bool:
    """Whether a failed export's output shows a deterministic failure (see FAILURE_PATTERNS).

    The first matching pattern decides; no match is transient.
    """
    for pattern, deterministic in FAILURE_PATTERNS:
        if pattern.search(output_text):
            return deterministic
    return False


def expected_outputs(output_dir: Path) -> list[str]:
    """What a finished export must contain but `output_dir` lacks (relative names); [] if complete.

    config.json and neuron_config.json (what `from_pretrained` reads), and at least one
    compiled file: a `*.neff` (neuronx-cc's output) or a `*.pt` (the traced NxD model that
    embeds the NEFFs).
    """
    missing = [name for name in ("config.json", "neuron_config.json") if not (output_dir / name).is_file()]
    compiled = [p for pattern in ("*.neff", "*.pt") for p in output_dir.rglob(pattern) if p.is_file()]
    if not compiled:
        missing.append("compiled model (*.neff or *.pt)")
    return missing


# -- host probing ---------------------------------------------------------------------------------


def _neuronx_cc_version() -> str:
    try:
        return importlib.metadata.version(COMPILER_DIST)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _dist_installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _executable(name: str) -> str:
    """`name` beside this interpreter (a venv's bin/) or on PATH; "" if neither."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name) or ""


def _probe_host() -> list[str]:
    """Run neuron-ls and read the DMI product name; host_targets() of what they say."""
    neuron_ls = _executable("neuron-ls")
    if not neuron_ls:
        return []
    try:
        proc = subprocess.run(
            [neuron_ls, "--json-output"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    if proc.returncode != 0:
        return []
    try:
        product = Path("/sys/devices/virtual/dmi/id/product_name").read_text().strip()
    except OSError:
        product = ""
    return host_targets(proc.stdout, product)


def _offline_env() -> dict[str, str]:
    """The exporter's environment: this one, with model hubs switched off."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    return env


class _Ticker:
    """Progress from start to end while a subprocess runs (the exporter has no progress hook).

    The fraction approaches `end` as 1 - exp(-elapsed / time_constant): it keeps moving,
    which is what a heartbeat needs, and never claims to be done. Reports carry the last
    line the subprocess printed.
    """

    def __init__(self, report: ProgressFn, start: float, end: float, time_constant: float) -> None:
        self._report = report
        self._start, self._end, self._tc = start, end, time_constant
        self._began = time.monotonic()
        self._last_line = ""
        self._last_report = 0.0
        self._lock = threading.Lock()

    def line(self, text: str, interval: float = 2.0) -> None:
        with self._lock:
            if text.strip():
                self._last_line = text.strip()[:200]
            now = time.monotonic()
            if now - self._last_report < interval:
                return
            self._last_report = now
            elapsed = now - self._began
            fraction = self._start + (self._end - self._start) * (1 - math.exp(-elapsed / self._tc))
            self._report(round(fraction, 3), f"compiling ({elapsed:.0f} s): {self._last_line}")


def _run_streamed(argv: Sequence[str], ticker: _Ticker | None, tail_lines: int = 400) -> tuple[int, str]:
    """Run `argv`, copying its output to our stderr line by line; (exit status, output tail)."""
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    with subprocess.Popen(
        list(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        env=_offline_env(),
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stderr.write(line)
            tail.append(line)
            if ticker is not None:
                ticker.line(line)
        sys.stderr.flush()
        status = proc.wait()
    return status, "".join(tail)


# A one-token generate with the exported model, in a child (it takes the NeuronCores).
_LOAD_CHECK = """
import sys, torch
from optimum.neuron import NeuronModelForCausalLM
model = NeuronModelForCausalLM.from_pretrained(sys.argv[1])
batch, sequence_length = int(sys.argv[2]), int(sys.argv[3])
prompt = max(1, min(4, sequence_length - 1))  # leave room for the generated token
ids = torch.ones((batch, prompt), dtype=torch.int64)
out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False)
assert out.shape[0] == batch and out.shape[1] >= prompt, tuple(out.shape)
print("prebake-neuron load check: ok", tuple(out.shape))
"""


class NeuronBackend:
    """Neuron decoder artifacts through optimum-neuron's exporter (see the module docstring)."""

    kind: str = KIND

    def available(self) -> tuple[bool, str]:
        """Without importing the SDK: neuronx-cc (distribution and executable) and optimum-neuron."""
        if not _neuronx_cc_version() or not _executable(COMPILER_EXE):
            return False, NOT_INSTALLED
        if not _dist_installed(OPTIMUM_NEURON_DIST) or importlib.util.find_spec("optimum") is None:
            return False, "optimum-neuron is not installed (pip install optimum-neuron[neuronx])"
        if not _executable(EXPORT_EXE):
            return False, f"optimum-neuron is installed but its {EXPORT_EXE} command is not on PATH"
        return True, ""

    def toolchain(self) -> str:
        """`neuronx-cc-<major>.<minor>` of the installed compiler ("" without it).

        The key's toolchain carries the compiler version because artifacts built by one
        neuronx-cc version do not load on another.
        """
        return toolchain_for(_neuronx_cc_version())

    def compile_targets(self) -> list[str]:
        """This host's own Neuron family (["inf2"], ["trn1"] or ["trn2"]); [] if unknown or no SDK."""
        if not self.available()[0]:
            return []
        return _probe_host()

    def compile(self, request: CompileRequest, progress: ProgressFn) -> CompileResult:
        """Export, check and describe the artifact in `request.output_dir`.

        Raises CompileError, deterministic or not as the module docstring classifies.
        """
        ok, why = self.available()
        if not ok:
            raise CompileError(why, False)
        version = _neuronx_cc_version()
        validate_key(request.key, self.compile_targets(), self.toolchain())
        model_dir = checked_source(request.model_source, str(request.key.get("model_revision", "")))
        out_dir = request.output_dir
        argv = export_command(request.key, model_dir, out_dir, version)
        argv[0] = _executable(EXPORT_EXE)
        metrics: dict[str, float] = {}

        progress(0.02, "exporting: " + " ".join(argv))
        began = time.perf_counter()
        try:
            status, output = _run_streamed(argv, _Ticker(progress, 0.05, 0.85, time_constant=300.0))
        except OSError as exc:
            raise CompileError(f"cannot run {argv[0]}: {exc}", False) from exc
        metrics["compile_seconds"] = time.perf_counter() - began
        if status != 0:
            deterministic = classify_failure(output)
            last = next((line for line in reversed(output.splitlines()) if line.strip()), "")
            raise CompileError(
                f"optimum-neuron export failed (exit status {status}; "
                f"{'the compiler rejected this configuration' if deterministic else 'transient'}): {last}",
                deterministic,
            )
        missing = expected_outputs(out_dir)
        if missing:
            # The exporter claimed success but wrote an incomplete artifact: a tool problem.
            raise CompileError(f"optimum-neuron export left no {', '.join(missing)} in {out_dir}", False)

        progress(0.88, "load check: loading the artifact onto the NeuronCores and generating one token")
        began = time.perf_counter()
        shape = [str(request.key.get("batch_size")), str(request.key.get("sequence_length"))]
        status, output = _run_streamed([sys.executable, "-c", _LOAD_CHECK, str(out_dir), *shape], None)
        if status != 0:
            raise CompileError(
                f"the exported artifact failed its load check (exit status {status}): "
                f"{output.strip().splitlines()[-1] if output.strip() else 'no output'}",
                classify_failure(output),
            )
        metrics["load_check_seconds"] = time.perf_counter() - began

        versions = {
            COMPILER_DIST: version,
            OPTIMUM_NEURON_DIST: importlib.metadata.version(OPTIMUM_NEURON_DIST),
        }
        manifest = {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "key": {name: request.key.get(name) for name in (*KEY_FIELDS, "compile_target", "digest")},
            "neuronx_cc_version": version,
            "versions": versions,
            # The argv as run, with the executable by name: paths of this worker mean nothing elsewhere.
            "command": [EXPORT_EXE, *argv[1:]],
            "load": "optimum.neuron.NeuronModelForCausalLM.from_pretrained(artifact directory)",
        }
        (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        progress(1.0, "done: exported and load-checked")
        return CompileResult(toolchain_versions=versions, metrics=metrics)
