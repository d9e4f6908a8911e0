"""Which backends this host can run, learned from a child process, and which of them a worker serves.

`python -m prebake.compiler.run --probe` answers in a child so that the worker process
itself never imports torch or any other toolchain.

Contract:
* `probe_backends` blocks for the child (seconds; at most `timeout`) and raises
  ProbeError if it fails, times out or prints anything but the documented JSON object.
* `select_backends` is pure; it raises WorkerSetupError naming the reason when a
  requested kind cannot run here, or when nothing can.
* `BackendStatus` is immutable; thread-safe like any value.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from prebake.compiler.reports import tail_text
from prebake.compiler.supervise import RUN_MODULE
from prebake.core.names import kind_to_proto
from prebake.v1 import jobs_pb2, workers_pb2


class ProbeError(RuntimeError):
    """`python -m prebake.compiler.run --probe` failed or printed something unreadable."""


class WorkerSetupError(RuntimeError):
    """The worker cannot start: e.g. a requested kind's toolchain is not installed here."""


@dataclass(frozen=True)
class BackendStatus:
    """What the probe reported for one kind."""

    kind: str
    available: bool
    reason: str = ""
    toolchain: str = ""
    compile_targets: tuple[str, ...] = ()
    # Whether this host also runs evaluation jobs of the kind (see evaluation_run.py).
    evaluates: bool = False

    def capability(self) -> workers_pb2.Capability:
        purposes = [jobs_pb2.JOB_PURPOSE_COMPILE]
        if self.evaluates:
            purposes.append(jobs_pb2.JOB_PURPOSE_EVALUATE)
        return workers_pb2.Capability(
            kind=kind_to_proto(self.kind),
            toolchain=self.toolchain,
            compile_targets=self.compile_targets,
            purposes=purposes,
        )

    def describe(self) -> str:
        if not self.available:
            return f"{self.kind}: {self.reason or 'not available'}"
        targets = ", ".join(self.compile_targets) or "any target"
        return f"{self.kind}: {self.toolchain} ({targets}{'; evaluates' if self.evaluates else ''})"


def probe_backends(python: str = sys.executable, timeout: float = 300.0) -> dict[str, BackendStatus]:
    """Ask every backend whether it can run here, in a child process (toolchains stay out of ours).

    Raises ProbeError if the probe exits non-zero, times out or prints anything but the
    documented JSON object.
    """
    command = [python, "-m", RUN_MODULE, "--probe"]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ProbeError(f"`{' '.join(command)}` failed: {exc}") from exc
    if done.returncode != 0:
        raise ProbeError(
            f"`{' '.join(command)}` exited with status {done.returncode}: {tail_text(done.stderr, 20)}"
        )
    try:
        data = json.loads(done.stdout)
        return {
            str(kind): BackendStatus(
                kind=str(kind),
                available=bool(entry.get("available")),
                reason=str(entry.get("reason") or ""),
                toolchain=str(entry.get("toolchain") or ""),
                compile_targets=tuple(str(t) for t in entry.get("compile_targets") or ()),
                evaluates=bool(entry.get("evaluates")),
            )
            for kind, entry in data.items()
        }
    except (ValueError, AttributeError, TypeError) as exc:
        raise ProbeError(
            f"the backend probe printed unreadable output ({exc}): {done.stdout[:500]!r}"
        ) from exc


def select_backends(probed: Mapping[str, BackendStatus], kinds: Sequence[str]) -> list[BackendStatus]:
    """The backends to serve: every available one, or exactly `kinds`.

    Raises WorkerSetupError naming the reason when a requested kind cannot run here, or
    when nothing can.
    """
    if kinds:
        chosen = []
        for kind in dict.fromkeys(kinds):
            status = probed.get(kind)
            if status is None:
                known = ", ".join(probed) or "none"
                raise WorkerSetupError(
                    f"cannot serve {kind} jobs: this installation has no {kind} backend (it has: {known})"
                )
            if not status.available:
                raise WorkerSetupError(f"cannot serve {kind} jobs here: {status.reason or 'not available'}")
            if not status.toolchain:
                raise WorkerSetupError(f"cannot serve {kind} jobs: the probe reported no toolchain")
            chosen.append(status)
        return chosen
    chosen = [s for s in probed.values() if s.available and s.toolchain]
    if not chosen:
        reasons = "; ".join(s.describe() for s in probed.values()) or "no backends"
        raise WorkerSetupError(f"no compile toolchain is installed here ({reasons})")
    return chosen
