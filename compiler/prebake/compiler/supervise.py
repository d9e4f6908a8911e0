"""Running one compile child (`python -m prebake.compiler.run`) for a leased job and watching over it.

The child's protocol is described in run.py: JSON progress lines on stdout, the human log
on stderr, `result.json` when it ends by itself, exit 0 / 3 (deterministic) / other.

Contract:
* `run_compile` blocks the calling thread until the child has ended and returns its exit
  status with the reason it was stopped (None if it ended by itself). It starts the child
  in its own session and, whatever happens, leaves no process of that session behind
  (inductor's compile pool included): SIGTERM, `kill_grace_seconds`, then SIGKILL.
* The child is stopped when the run is lost (cancelled or lease gone: reason None, the
  caller checks `run.gone`), or when the worker is stopping and the drain ran out, or it
  is abandoned (reason "worker shutting down").
* Progress lines become `run.report(...)` on a reader thread (JobRun is thread-safe);
  every other stdout line, and all of stderr, is appended to the job's log file.
* `read_result` never raises: a missing or unreadable result.json reads as {}.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, Any

from prebake.compiler.job_run import JobRun
from prebake.core.names import kind_name
from prebake.v1 import key_pb2

log = logging.getLogger("prebake.worker")

RUN_MODULE = "prebake.compiler.run"
# How often the job thread looks at the child, the cancel flag and the stop request.
POLL_SECONDS = 0.1


def key_fields(resolved: key_pb2.ResolvedKey) -> dict[str, Any]:
    """The normalised key as `CompileRequest.key` carries it."""
    key = resolved.key
    return {
        "kind": kind_name(key.kind),
        "model": key.model,
        "model_revision": key.model_revision,
        "instance_type": key.instance_type,
        "compile_target": resolved.compile_target,
        "sequence_length": key.sequence_length,
        "batch_size": key.batch_size,
        "tensor_parallel_degree": key.tensor_parallel_degree,
        "precision": key.precision,
        "toolchain": key.toolchain,
        "options": dict(key.options),
        "digest": resolved.digest,
    }


def read_result(path: Path) -> dict[str, Any]:
    """The backend's result.json; {} if it is missing or unreadable (never fatal)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _parse_progress(line: bytes) -> tuple[float, str] | None:
    """(fraction, message) from a `{"progress": 0.4, "message": "..."}` line, else None."""
    try:
        data = json.loads(line)
        progress = float(data["progress"])
    except (ValueError, TypeError, KeyError, IndexError):
        return None
    return progress, str(data.get("message", ""))  # data["progress"] worked: a dict


def _pump_stdout(stream: IO[bytes], run: JobRun, log_path: Path) -> None:
    """Turn the child's progress lines into `run` progress; anything else goes to the log."""
    with stream, open(log_path, "ab") as log_file:
        for line in stream:
            update = _parse_progress(line)
            if update is None:
                log_file.write(line)
                log_file.flush()
                continue
            run.report(*update)
            log.info("job %s: %3.0f%% %s", run.job_id, 100 * update[0], update[1])


def kill_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the child's process group, then SIGKILL it after `grace` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    # Also reaps helpers the child started (inductor's compile pool) that outlived it.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_compile(
    run: JobRun,
    job_dir: Path,
    log_path: Path,
    *,
    python: str,
    stopping: threading.Event,
    abandon: threading.Event,
    drain_seconds: float,
    kill_grace_seconds: float,
    module: str = RUN_MODULE,
) -> tuple[int, str | None]:
    """Run the backend on `job_dir/request.json`; (exit status, why we stopped it or None).

    `stopping` starts the drain (`drain_seconds`), `abandon` ends it at once. `module` is the
    child's module: the compile child, or the evaluation child (`prebake.compiler.evaluation_run`),
    which speaks the same protocol.
    """
    kind = kind_name(run.lease.job.key.key.kind)
    command = [
        python,
        "-m",
        module,
        "--kind",
        kind,
        "--request",
        str(job_dir / "request.json"),
        "--result",
        str(job_dir / "result.json"),
    ]
    with open(log_path, "ab") as log_file:
        # Its own session: the whole process group can be killed on cancel/shutdown.
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log_file,
            cwd=job_dir,
            start_new_session=True,
        )
    assert proc.stdout is not None
    # In a copy of this context: its progress lines carry the job's request id.
    reader = threading.Thread(
        target=contextvars.copy_context().run,
        args=(_pump_stdout, proc.stdout, run, log_path),
        name=f"stdout-{run.job_id}",
        daemon=True,
    )
    reader.start()
    try:
        stopped_because = _supervise(
            proc,
            run,
            stopping=stopping,
            abandon=abandon,
            drain_seconds=drain_seconds,
            kill_grace_seconds=kill_grace_seconds,
        )
    finally:
        if proc.poll() is None:
            kill_group(proc, kill_grace_seconds)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # stray helpers of a finished child
        reader.join(timeout=10)
    return proc.returncode, stopped_because


def _supervise(
    proc: subprocess.Popen[bytes],
    run: JobRun,
    *,
    stopping: threading.Event,
    abandon: threading.Event,
    drain_seconds: float,
    kill_grace_seconds: float,
) -> str | None:
    """Wait for the child; kill it if the job is gone or the drain ran out."""
    drain_until: float | None = None
    while True:
        try:
            proc.wait(timeout=POLL_SECONDS)
            return None
        except subprocess.TimeoutExpired:
            pass
        if run.gone.is_set():
            log.info("job %s: %s; stopping the compile", run.job_id, run.gone_reason)
            kill_group(proc, kill_grace_seconds)
            return None
        if not stopping.is_set():
            continue
        now = time.monotonic()
        if drain_until is None:
            drain_until = now + drain_seconds
            if drain_seconds > 0 and not abandon.is_set():
                log.info(
                    "job %s: stopping; letting the compile finish for up to %g s", run.job_id, drain_seconds
                )
        if abandon.is_set() or now >= drain_until:
            kill_group(proc, kill_grace_seconds)
            return "worker shutting down"
