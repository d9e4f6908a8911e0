"""The compile child process: one job, one fresh interpreter.

    python -m prebake.compiler.run --kind inductor --request REQUEST.json --result RESULT.json
    python -m prebake.compiler.run --probe

The worker runs every compile in a child so that a cancelled or lost job is stopped by
killing it, a crash (or an abort inside a compiler) takes down only the child, and
environment that a toolchain reads once at start-up (ATEN_CPU_CAPABILITY for torch) can be
set per job before the toolchain is imported. Nothing heavy is imported at module level.

Protocol (see backend.py):
  stdout  only JSON lines, one per progress update, flushed: {"progress": 0.4, "message": "..."}.
          Anything else that writes to file descriptor 1 (a library's print, a C++ runtime's
          printf) is redirected to stderr, so every stdout line parses.
  stderr  the human log; on failure its last line is the error message.
  RESULT  written atomically whenever the child ends by itself:
          {"ok": true, "toolchain_versions": {...}, "metrics": {...}} or
          {"ok": false, "deterministic": bool, "error": "..."}.
          Absent if the child crashed or was killed.
  scratch RESULT's directory gets a `compile-scratch/` directory for the job's caches
          (TORCHINDUCTOR_CACHE_DIR), removed when the child ends; a killed child leaves it
          behind for the worker's clean-up of that directory.
  exit    EXIT_OK (0) success; EXIT_DETERMINISTIC (3) the configuration is rejected, do not
          retry; EXIT_TRANSIENT (1) anything else; 2 for a command-line error.

`--probe` prints {kind: {"available", "reason", "toolchain", "compile_targets", "evaluates"}} as
one JSON object, so a worker learns its capabilities without importing torch itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TextIO, runtime_checkable

from prebake.compiler.awq import AwqBackend
from prebake.compiler.backend import (
    EXIT_DETERMINISTIC,
    EXIT_OK,
    Backend,
    CompileError,
    CompileRequest,
    CompileResult,
)
from prebake.compiler.inductor import CPU_CAPABILITY_ENV, InductorBackend
from prebake.compiler.neuron import NeuronBackend

EXIT_TRANSIENT = 1
SCRATCH_NAME = "compile-scratch"

# kind -> backend factory.
BACKENDS: Mapping[str, Callable[[], Backend]] = {
    "inductor": InductorBackend,
    "awq": AwqBackend,
    "neuron": NeuronBackend,
}


@runtime_checkable
class NeedsChildEnvironment(Protocol):
    """A backend that needs environment variables set before its toolchain is imported.

    `scratch` is an empty per-job directory the backend may point caches or temporary
    files at; `run_job` deletes it when the compile ends.
    """

    def child_environment(self, request: CompileRequest, scratch: Path) -> dict[str, str]: ...


def available_backends() -> dict[str, tuple[bool, str]]:
    """kind -> (available, why not) for every registered backend; imports no toolchain."""
    return {kind: factory().available() for kind, factory in BACKENDS.items()}


def probe() -> dict[str, dict[str, Any]]:
    """What this host can build: per kind, availability, toolchain and compile targets.

    May import toolchains (compile targets come from torch's CPU detection): run it in a
    child (`--probe`), not in the worker process.
    """
    from prebake.compiler.evaluation_run import EVALUATORS  # it imports this module

    report: dict[str, dict[str, Any]] = {}
    for kind, factory in BACKENDS.items():
        backend = factory()
        ok, reason = backend.available()
        report[kind] = {
            "available": ok,
            "reason": reason,
            "toolchain": backend.toolchain() if ok else "",
            "compile_targets": backend.compile_targets() if ok else [],
            # Whether this host also runs evaluation jobs of the kind (evaluation_run.py).
            "evaluates": ok and kind in EVALUATORS,
        }
    return report


def result_to_dict(result: CompileResult) -> dict[str, Any]:
    return {
        "ok": True,
        "toolchain_versions": dict(result.toolchain_versions),
        "metrics": dict(result.metrics),
    }


def result_from_dict(data: Mapping[str, Any]) -> CompileResult:
    """The CompileResult a successful child wrote (the worker's side of RESULT)."""
    return CompileResult(
        toolchain_versions={str(k): str(v) for k, v in data.get("toolchain_versions", {}).items()},
        metrics={str(k): float(v) for k, v in data.get("metrics", {}).items()},
    )


def _write_json_atomically(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


class JsonLinesProgress:
    """ProgressFn writing {"progress", "message"} lines to `stream`; safe from any thread."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def __call__(self, fraction: float, message: str) -> None:
        line = json.dumps({"progress": round(min(max(fraction, 0.0), 1.0), 4), "message": message})
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


def _private_stdout() -> TextIO:
    """A stream on the real stdout for progress; fd 1 (and sys.stdout) then point at stderr."""
    sys.stdout.flush()
    progress_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(progress_fd, "w", buffering=1, encoding="utf-8")


def _log(message: str) -> None:
    print(f"prebake.compiler.run: {message}", file=sys.stderr, flush=True)


# How often an orphaned compile notices that its worker is gone.
ORPHAN_POLL_SECONDS = 1.0


def exit_when_orphaned(parent_pid: int, poll_seconds: float = ORPHAN_POLL_SECONDS) -> threading.Thread:
    """Exit this process (transient failure) as soon as `parent_pid` is no longer its parent.

    The worker starts compiles in their own session so it can kill their whole process
    group; a worker that is itself SIGKILLed cannot, and its compile would otherwise burn
    the host's cores for a result no one can publish (the lease is gone).
    """

    def watch() -> None:
        while os.getppid() == parent_pid:
            threading.Event().wait(poll_seconds)
        _log(f"the worker (pid {parent_pid}) is gone; abandoning the compile")
        os._exit(EXIT_TRANSIENT)

    thread = threading.Thread(target=watch, name="orphan-watch", daemon=True)
    thread.start()
    return thread


def run_job(kind: str, request_path: Path, result_path: Path) -> int:
    """Run one compile; returns the exit status (see the module docstring)."""
    exit_when_orphaned(os.getppid())
    request = CompileRequest.from_json(request_path.read_text())
    backend = BACKENDS[kind]()
    # Beside the result, i.e. in the worker's job directory: if this child is killed, the
    # worker's clean-up of that directory takes the scratch space with it.
    scratch = result_path.parent / SCRATCH_NAME
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        if isinstance(backend, NeedsChildEnvironment):
            # Before anything imports the toolchain: this is why compiles run in a fresh child.
            env = backend.child_environment(request, scratch)
            os.environ.update(env)
            if env:
                _log(f"environment: {' '.join(f'{k}={v}' for k, v in sorted(env.items()))}")
        return _run_backend(kind, backend, request, result_path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run_backend(kind: str, backend: Backend, request: CompileRequest, result_path: Path) -> int:
    progress = JsonLinesProgress(_private_stdout())
    _log(f"job {request.job_id}: {kind} compile of {request.model_source} into {request.output_dir}")
    try:
        ok, why = backend.available()
        if not ok:
            # Another worker may have the toolchain: not this configuration's fault.
            raise CompileError(f"the {kind} backend is not available here: {why}", False)
        request.output_dir.mkdir(parents=True, exist_ok=True)
        result = backend.compile(request, progress)
    except CompileError as exc:
        if exc.__cause__ is not None:
            traceback.print_exception(exc.__cause__, file=sys.stderr)
        _write_json_atomically(
            result_path, {"ok": False, "deterministic": exc.deterministic, "error": str(exc)}
        )
        _log(f"{'deterministic' if exc.deterministic else 'transient'} failure: {exc}")
        return EXIT_DETERMINISTIC if exc.deterministic else EXIT_TRANSIENT
    except Exception as exc:
        # Backends wrap what they expect; anything reaching here is a bug or the environment.
        traceback.print_exc(file=sys.stderr)
        _write_json_atomically(
            result_path, {"ok": False, "deterministic": False, "error": f"{type(exc).__name__}: {exc}"}
        )
        _log(f"transient failure: {type(exc).__name__}: {exc}")
        return EXIT_TRANSIENT
    _write_json_atomically(result_path, result_to_dict(result))
    _log(f"job {request.job_id}: done; metrics {json.dumps(dict(result.metrics), sort_keys=True)}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m prebake.compiler.run", description="Run one compile job (or probe this host)."
    )
    parser.add_argument("--probe", action="store_true", help="print what this host can build, as JSON")
    parser.add_argument("--kind", choices=sorted(BACKENDS), help="the backend to run")
    parser.add_argument("--request", type=Path, help="CompileRequest as JSON")
    parser.add_argument("--result", type=Path, help="where to write the result JSON")
    args = parser.parse_args(argv)
    if args.probe:
        # The hardware's capabilities, not whatever this environment forces on torch.
        os.environ.pop(CPU_CAPABILITY_ENV, None)
        print(json.dumps(probe(), sort_keys=True), flush=True)
        return EXIT_OK
    if not (args.kind and args.request and args.result):
        parser.error("--kind, --request and --result are required (or --probe)")
    return run_job(args.kind, args.request, args.result)


if __name__ == "__main__":
    sys.exit(main())
