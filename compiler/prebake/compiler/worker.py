"""The compile worker: lease jobs from a prebake server, compile them in a child process, publish.

A worker advertises what it can compile (kind, toolchain, compile targets, as reported by
`python -m prebake.compiler.run --probe` in a child process, so that the worker process
itself never imports torch or any other toolchain) and then loops:

1. long-poll `LeaseJob` (reconnecting with backoff while the server is unreachable);
2. prepare a fresh job directory (`request.json`, `out/`, `compile.log`);
3. run the backend as a child process in its own session, reading its JSON progress lines
   from stdout while its stderr goes to the log file;
4. heartbeat on a thread with the latest progress; a heartbeat answering `cancelled`, or
   refusing the lease (another worker owns the job now), kills the child's process group
   and drops the job without reporting anything;
5. on exit 0 upload the output (resumable) and the log, then `CompleteJob`; on exit 3
   report a deterministic failure; on any other exit a transient one;
6. remove the job directory, whatever the outcome (the log was uploaded as a blob).

`Worker.stop()` ends the loop gracefully: no new lease is taken, a running compile gets
`drain_seconds` to finish (and is then published as usual), after which it is killed and
its job released back to the queue without spending an attempt.

`run_embedded_workers` starts in-process worker threads for `prebake serve`.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import itertools
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import grpc

from prebake.client.channel import create_channel, status_of
from prebake.client.client import Client
from prebake.client.errors import (
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PrebakeError,
    Unavailable,
    from_rpc_error,
)
from prebake.compiler.backend import EXIT_DETERMINISTIC, EXIT_OK, CompileRequest
from prebake.compiler.model_source import resolve_model_source
from prebake.core.digests import hash_file
from prebake.core.names import kind_name, kind_names, kind_to_proto
from prebake.v1 import blobs_pb2, jobs_pb2, key_pb2, registry_pb2, workers_pb2, workers_pb2_grpc

T = TypeVar("T")
log = logging.getLogger("prebake.worker")

RUN_MODULE = "prebake.compiler.run"
# The contract's limits (workers.proto): FailJob.error and Heartbeat.message.
MAX_ERROR_CHARS = 16_384
MAX_MESSAGE_CHARS = 1_024
# How much of the compile log a failure report quotes.
ERROR_TAIL_LINES = 60
# Heartbeats go out at a third of the lease (the contract's advice), but at least this
# often, so that a cancellation reaches a compile within seconds even with long leases.
MAX_HEARTBEAT_INTERVAL = 10.0
# How often the job thread looks at the child, the cancel flag and the stop request.
POLL_SECONDS = 0.1
# Reconnect backoff while the server is unreachable (jittered, doubling).
RECONNECT_INITIAL = 0.5
RECONNECT_MAX = 10.0
# Embedded workers are joined for at most this long when `prebake serve` stops.
EMBEDDED_JOIN_SECONDS = 20.0

_worker_numbers = itertools.count(1)


def default_worker_id() -> str:
    """`hostname:pid`, unique among the live workers of a fleet."""
    return f"{socket.gethostname()}:{os.getpid()}"


def default_work_dir() -> Path:
    """Where a worker started without `--work-dir` keeps its job directories."""
    return Path(tempfile.gettempdir()) / "prebake-worker"


# Capabilities -----------------------------------------------------------------------------


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

    def capability(self) -> workers_pb2.Capability:
        return workers_pb2.Capability(
            kind=kind_to_proto(self.kind), toolchain=self.toolchain, compile_targets=self.compile_targets
        )

    def describe(self) -> str:
        if not self.available:
            return f"{self.kind}: {self.reason or 'not available'}"
        targets = ", ".join(self.compile_targets) or "any target"
        return f"{self.kind}: {self.toolchain} ({targets})"


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
            f"`{' '.join(command)}` exited with status {done.returncode}: {_tail_text(done.stderr, 20)}"
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


# Configuration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerConfig:
    """Settings of one worker. Immutable."""

    server: str
    work_dir: Path = field(default_factory=default_work_dir)
    # Kinds to serve; empty means every kind whose toolchain is installed.
    kinds: tuple[str, ...] = ()
    worker_id: str = field(default_factory=default_worker_id)
    # Jobs to take before `run` returns; None means until stopped.
    max_jobs: int | None = None
    # On stop, how long a running compile may go on before it is killed and released.
    drain_seconds: float = 60.0
    # LeaseJob long-poll length (the server allows up to 60 s).
    lease_wait_seconds: float = 20.0
    # Between SIGTERM and SIGKILL when a compile is stopped.
    kill_grace_seconds: float = 5.0
    # Deadline of each unary rpc.
    rpc_timeout: float = 30.0
    # The interpreter that runs the backend (one with the toolchain installed).
    python: str = sys.executable


# Per-job state shared by the job thread, the stdout reader and the heartbeat thread -------


class Outcome(enum.Enum):
    """How a leased job ended for this worker."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"  # reported with FailJob (deterministic or transient)
    RELEASED = "released"  # given back on shutdown
    DROPPED = "dropped"  # cancelled, or the lease was lost: nothing reported


@dataclass(frozen=True)
class _Lease:
    job: jobs_pb2.Job
    token: int
    lease_seconds: float


class _LeaseGone(Exception):
    """The job is no longer this worker's (cancelled, lease lost or surely expired)."""


class _JobRun:
    """One leased job: latest progress, last contact with the server, and the stop flag.

    Thread-safe: written by the stdout reader (progress) and the heartbeat thread (contact,
    loss), read by the job thread.
    """

    def __init__(self, lease: _Lease) -> None:
        self.lease = lease
        self.job_id = lease.job.job_id
        self._lock = threading.Lock()
        self._progress = 0.0
        self._message = "starting"
        self._last_contact = time.monotonic()
        self._gone_reason = ""
        self.gone = threading.Event()

    def report(self, progress: float, message: str) -> None:
        with self._lock:
            self._progress = min(1.0, max(0.0, progress))
            self._message = message[:MAX_MESSAGE_CHARS]

    def set_message(self, message: str) -> None:
        with self._lock:
            self._message = message[:MAX_MESSAGE_CHARS]

    def snapshot(self) -> tuple[float, str]:
        with self._lock:
            return self._progress, self._message

    def touch(self) -> None:
        """The server just accepted a call under this lease."""
        with self._lock:
            self._last_contact = time.monotonic()

    def surely_expired(self) -> bool:
        """No call was accepted for a whole lease: the job is (or, once the server is back,
        will be) another worker's."""
        with self._lock:
            return time.monotonic() - self._last_contact > self.lease.lease_seconds

    def lose(self, reason: str) -> None:
        with self._lock:
            if not self._gone_reason:
                self._gone_reason = reason
        self.gone.set()

    @property
    def gone_reason(self) -> str:
        with self._lock:
            return self._gone_reason


class _Outage:
    """Logs a lost server once per outage (and the reconnection), not once per retry."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._lock = threading.Lock()
        self._since: float | None = None

    def down(self, error: PrebakeError) -> None:
        with self._lock:
            if self._since is not None:
                return
            self._since = time.monotonic()
        log.warning(
            "cannot reach the prebake server at %s (%s); retrying until it is back", self.target, error
        )

    def up(self) -> None:
        with self._lock:
            since, self._since = self._since, None
        if since is not None:
            log.info("reconnected to %s after %.1f s", self.target, time.monotonic() - since)


def _backoff(failures: int) -> float:
    ceiling = min(RECONNECT_MAX, RECONNECT_INITIAL * 2**failures)
    return random.uniform(ceiling / 2, ceiling)


class _Heartbeat:
    """Extends a job's lease every `interval` seconds with the latest progress, on a thread.

    Marks the run gone when the server answers `cancelled` or refuses the lease
    (FAILED_PRECONDITION, NOT_FOUND). An unreachable server is not a reason to stop: the
    lease may well survive a server restart.
    """

    def __init__(self, client: Client, run: _JobRun, interval: float, outage: _Outage) -> None:
        self._client = client
        self._run = run
        self._interval = interval
        self._outage = outage
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{run.job_id}", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._done.wait(self._interval):
            self.beat()

    def beat(self) -> None:
        run = self._run
        progress, message = run.snapshot()
        try:
            reply = self._client.heartbeat(run.job_id, run.lease.token, progress, message)
        except (Unavailable, DeadlineExceeded) as exc:
            self._outage.down(exc)
            return
        except (FailedPrecondition, NotFound) as exc:
            run.lose(f"lease lost: {exc}")
            self._done.set()
            return
        except PrebakeError as exc:  # e.g. INVALID_ARGUMENT: a bug, but not a reason to stop
            log.warning("job %s: heartbeat refused: %s", run.job_id, exc)
            return
        except Exception:
            # The thread must survive: without heartbeats the lease would silently expire.
            log.exception("job %s: heartbeat failed", run.job_id)
            return
        self._outage.up()
        run.touch()
        if reply.cancelled:
            run.lose("cancelled")
            self._done.set()


class _LeasePoller:
    """LeaseJob as a cancellable call, so that `stop()` need not wait out a 20 s long poll.

    Thread-safe: `lease` runs on the worker's thread, `close` from any thread.
    """

    def __init__(self, target: str, timeout: float) -> None:
        self._target = target
        self._timeout = timeout
        self._channel = create_channel(target)
        self._stub = workers_pb2_grpc.WorkersStub(self._channel)
        self._lock = threading.Lock()
        self._future: grpc.Future[workers_pb2.LeaseJobResponse] | None = None
        self._closed = False

    def lease(self, request: workers_pb2.LeaseJobRequest) -> workers_pb2.LeaseJobResponse | None:
        """The server's answer; None when closed meanwhile. Raises PrebakeError."""
        with self._lock:
            if self._closed:
                return None
            future = self._stub.LeaseJob.future(request, timeout=request.wait_seconds + self._timeout)
            self._future = future
        try:
            response: workers_pb2.LeaseJobResponse = future.result()
            return response
        except grpc.FutureCancelledError:
            return None
        except grpc.RpcError as err:
            if self._closed and status_of(err) is grpc.StatusCode.CANCELLED:
                return None
            raise from_rpc_error(err, target=self._target) from None
        finally:
            with self._lock:
                self._future = None

    def cancel(self) -> None:
        """Abort the poll in flight (a lease already granted is still returned) and any later one."""
        with self._lock:
            self._closed = True
            if self._future is not None:
                self._future.cancel()

    def close(self) -> None:
        self.cancel()
        self._channel.close()


# Job directories ----------------------------------------------------------------------------


def _lock_path(path: Path) -> int:
    """An fd holding an exclusive flock on `path` (created if missing), which still names it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # a sweeper removed it between open and flock: take the new one


def sweep_work_dir(work_dir: Path) -> int:
    """Remove the directories of workers that died without cleaning up; return how many.

    Every live worker holds a flock on `<dir>.lock` beside its directory; the kernel drops
    it when the process dies (even by SIGKILL), so an unlockable file means a live owner.
    """
    removed = 0
    for lock in sorted(work_dir.glob("worker-*.lock")):
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            with contextlib.suppress(FileNotFoundError):
                if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                    shutil.rmtree(lock.with_suffix(""), ignore_errors=True)
                    lock.unlink()
                    removed += 1
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def _worker_dir(work_dir: Path) -> Iterator[Path]:
    """This worker's private, locked, initially empty directory under `work_dir`."""
    work_dir.mkdir(parents=True, exist_ok=True)
    swept = sweep_work_dir(work_dir)
    if swept:
        log.info("removed %d job director%s left by dead workers", swept, "y" if swept == 1 else "ies")
    path = work_dir / f"worker-{os.getpid()}-{next(_worker_numbers)}"
    fd = _lock_path(path.with_suffix(".lock"))
    try:
        shutil.rmtree(path, ignore_errors=True)  # a dead process with our pid may have left it
        path.mkdir()
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            path.with_suffix(".lock").unlink()
        os.close(fd)


# Helpers ------------------------------------------------------------------------------------


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


def _tail_text(text: str, lines: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _log_tail(path: Path, lines: int = ERROR_TAIL_LINES, limit: int = MAX_ERROR_CHARS) -> str:
    """The last `lines` lines of a log file, at most `limit` characters (reading only its end)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4 * limit))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return _tail_text(text, lines)[-limit:]


def error_report(headline: str, log_path: Path) -> str:
    """`headline`, then the end of the compile log, within the contract's 16 KiB."""
    headline = headline[: MAX_ERROR_CHARS // 2]
    tail = _log_tail(log_path)
    if not tail:
        return headline
    intro = f"{headline}\n\nend of the compile log:\n"
    return intro + tail[-(MAX_ERROR_CHARS - len(intro)) :]


def failure_report(kind: str, returncode: int, job_dir: Path) -> str:
    """What the job's waiters are told: the backend's own message first, then the log's end.

    The backend writes its error to result.json when it fails cleanly; a crash leaves
    only the log and the exit status.
    """
    error = str(_read_result(job_dir / "result.json").get("error") or "")
    if returncode == EXIT_DETERMINISTIC:
        headline = error or f"the {kind} compiler rejected this configuration"
    else:
        status = f"the {kind} compile {_exit_description(returncode)}"
        headline = f"{error} ({status})" if error else status
    return error_report(headline, job_dir / "compile.log")


def _exit_description(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with status {code}"


def _parse_progress(line: bytes) -> tuple[float, str] | None:
    """(fraction, message) from a `{"progress": 0.4, "message": "..."}` line, else None."""
    try:
        data = json.loads(line)
        progress = float(data["progress"])
    except (ValueError, TypeError, KeyError, IndexError):
        return None
    return progress, str(data.get("message", ""))  # data["progress"] worked: a dict


def _pump_stdout(stream: IO[bytes], run: _JobRun, log_path: Path) -> None:
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


def _read_result(path: Path) -> dict[str, Any]:
    """The backend's result.json; {} if it is missing or unreadable (never fatal)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _toolchain_versions(result: Mapping[str, Any]) -> dict[str, str]:
    versions = result.get("toolchain_versions")
    return {str(k): str(v) for k, v in versions.items()} if isinstance(versions, dict) else {}


def _kill_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the child's process group, then SIGKILL it after `grace` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    # Also reaps helpers the child started (inductor's compile pool) that outlived it.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# The worker ---------------------------------------------------------------------------------


class Worker:
    """Leases compile jobs from one prebake server and runs them until stopped.

    Contract:
    * `run()` blocks, processing one job at a time, until `stop()` is called or
      `max_jobs` jobs were taken; it returns the number of jobs taken. Call it from one
      thread, once.
    * `stop()` is thread-safe and may be called from a signal handler's thread at any
      time: leasing ends at once (a long poll in flight is cancelled), a running compile
      gets `drain_seconds` to finish and be published, after which it is killed and its
      job released (no attempt spent). `stop(drain=False)` skips the drain.
    * An unreachable server is waited for (reconnecting with backoff, logged once per
      outage), never a reason to exit: heartbeats keep trying while the lease may still be
      valid, and finishing a job (publish, fail, release) is retried until the lease has
      surely expired, after which another worker owns the job.
    * A cancelled job or a lost lease kills the compile and is dropped without a report;
      a zombie never publishes because the server checks the fencing token.
    * Failures are classified by the backend's exit status: 3 is deterministic (never
      retried by the server), anything else transient. A job without a usable model source
      fails deterministically, before anything is compiled.
    * The worker's files live in a private, flock-protected directory under `work_dir`,
      removed after each job and on exit; directories of dead workers are swept at start.

    Constructing a Worker probes the backends (a child process, a few seconds) unless
    `backends` is given, and raises WorkerSetupError if it can serve nothing it was asked to.
    A `client` passed in is used for every call but leasing (which needs a cancellable
    call on a channel of its own) and is left open; one the Worker creates, `run` closes.
    """

    def __init__(
        self,
        config: WorkerConfig,
        backends: Mapping[str, BackendStatus] | None = None,
        client: Client | None = None,
    ) -> None:
        self.config = config
        unknown = sorted(set(config.kinds) - set(kind_names()))
        if unknown:
            raise WorkerSetupError(f"unknown kind(s) {unknown}; known: {', '.join(kind_names())}")
        try:
            probed = dict(backends) if backends is not None else probe_backends(config.python)
        except ProbeError as exc:
            raise WorkerSetupError(f"cannot probe the compile backends: {exc}") from exc
        self.backends = select_backends(probed, config.kinds)
        self.capabilities = [b.capability() for b in self.backends]
        self._client = client or Client(config.server, timeout=config.rpc_timeout)
        self._owns_client = client is None
        self._poller = _LeasePoller(config.server, config.rpc_timeout)
        self._outage = _Outage(config.server)
        self._stopping = threading.Event()
        self._abandon = threading.Event()
        self._reconnects = 0

    def stop(self, drain: bool = True) -> None:
        """Stop leasing; let a running compile drain (or not); then return from `run`."""
        if not drain:
            self._abandon.set()
        self._stopping.set()
        self._poller.cancel()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def run(self) -> int:
        """Lease and process jobs until stopped or `max_jobs` were taken; return how many."""
        served = "; ".join(b.describe() for b in self.backends)
        log.info("worker %s leasing from %s: %s", self.config.worker_id, self.config.server, served)
        taken = 0
        try:
            with _worker_dir(self.config.work_dir) as directory:
                while not self.stopping and (self.config.max_jobs is None or taken < self.config.max_jobs):
                    lease = self._lease()
                    if lease is not None:
                        taken += 1
                        self._process(lease, directory / f"{lease.job.job_id}-{lease.token}")
        finally:
            self._poller.close()
            if self._owns_client:
                self._client.close()
        log.info("worker %s stopped after %d job(s)", self.config.worker_id, taken)
        return taken

    # Leasing --------------------------------------------------------------------------

    def _lease(self) -> _Lease | None:
        request = workers_pb2.LeaseJobRequest(
            worker_id=self.config.worker_id,
            capabilities=self.capabilities,
            wait_seconds=self.config.lease_wait_seconds,
        )
        try:
            response = self._poller.lease(request)
        except InvalidArgument:
            raise  # our own request is malformed (e.g. worker id): retrying cannot help
        except (Unavailable, DeadlineExceeded) as exc:
            self._outage.down(exc)
            self._stopping.wait(_backoff(self._reconnects))
            self._reconnects += 1
            return None
        except PrebakeError as exc:  # INTERNAL and the like: the server's problem, wait and retry
            log.warning("LeaseJob failed: %s", exc)
            self._stopping.wait(_backoff(self._reconnects))
            self._reconnects += 1
            return None
        self._reconnects = 0
        if response is None:
            return None
        self._outage.up()
        if not response.HasField("job"):
            return None
        lease = _Lease(response.job, response.fencing_token, response.lease_seconds)
        if self.stopping:
            # Granted just as we were told to stop: give it straight back.
            with contextlib.suppress(_LeaseGone):
                self._release(_JobRun(lease), "worker stopping")
            return None
        return lease

    # One job --------------------------------------------------------------------------

    def _process(self, lease: _Lease, job_dir: Path) -> Outcome:
        """Run one leased job in `job_dir` (created here, removed after) to its outcome."""
        job = lease.job
        log.info(
            "job %s: leased (%s, attempt %d/%d)",
            job.job_id,
            job.key.canonical or job.key.digest,
            job.attempts,
            job.max_attempts,
        )
        run = _JobRun(lease)
        interval = min(MAX_HEARTBEAT_INTERVAL, max(0.05, lease.lease_seconds / 3))
        started = time.monotonic()
        try:
            job_dir.mkdir()
            with _Heartbeat(self._client, run, interval, self._outage):
                outcome = self._attempt_or_report(run, job_dir)
        except _LeaseGone as exc:
            log.warning("job %s: dropped: %s", job.job_id, exc)
            outcome = Outcome.DROPPED
        except Exception:
            # Not even the failure could be reported: the lease expires and the job is
            # retried; this worker carries on with the next one.
            log.exception("job %s: abandoned after an unexpected error", job.job_id)
            outcome = Outcome.DROPPED
        finally:
            shutil.rmtree(job_dir, ignore_errors=True)
        log.info("job %s: %s after %.1f s", job.job_id, outcome.value, time.monotonic() - started)
        return outcome

    def _attempt_or_report(self, run: _JobRun, job_dir: Path) -> Outcome:
        """`_attempt`, reporting an unexpected error of the worker itself as transient."""
        try:
            return self._attempt(run, job_dir)
        except _LeaseGone:
            raise
        except Exception as exc:
            # A bug or a local problem (disk full, ...): another worker may well succeed.
            log.exception("job %s: worker error", run.job_id)
            message = f"worker {self.config.worker_id} failed: {type(exc).__name__}: {exc}"
            return self._fail(run, message, False, None)

    def _attempt(self, run: _JobRun, job_dir: Path) -> Outcome:
        job = run.lease.job
        log_path = job_dir / "compile.log"
        log_path.touch()
        if not job.model_source:
            return self._fail(
                run, "job has no model_source; pass --model-source on lookup/ensure", True, None
            )
        try:
            source = resolve_model_source(job.model_source)
        except ValueError as exc:
            return self._fail(run, f"unusable model source: {exc}", True, None)
        except NotImplementedError as exc:
            # Another worker (a newer one) may be able to read it: worth another attempt.
            return self._fail(run, f"this worker cannot read the model source: {exc}", False, None)

        out_dir = job_dir / "out"
        out_dir.mkdir()
        request = CompileRequest(job.job_id, key_fields(job.key), source, out_dir)
        (job_dir / "request.json").write_text(request.to_json())
        started = time.monotonic()
        returncode, stopped_because = self._compile(run, job_dir, log_path)
        compile_seconds = time.monotonic() - started

        if run.gone.is_set():
            raise _LeaseGone(f"{run.gone_reason}; compile stopped")
        if stopped_because is not None:
            return self._release(run, stopped_because)
        log_digest = self._upload_log(run, log_path)
        if returncode == EXIT_OK:
            return self._publish(run, job_dir, log_digest, compile_seconds)
        report = failure_report(kind_name(job.key.key.kind), returncode, job_dir)
        return self._fail(run, report, returncode == EXIT_DETERMINISTIC, log_digest)

    def _compile(self, run: _JobRun, job_dir: Path, log_path: Path) -> tuple[int, str | None]:
        """Run the backend; (exit status, why we stopped it or None if it ended by itself)."""
        kind = kind_name(run.lease.job.key.key.kind)
        command = [
            self.config.python,
            "-m",
            RUN_MODULE,
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
        reader = threading.Thread(
            target=_pump_stdout, args=(proc.stdout, run, log_path), name=f"stdout-{run.job_id}", daemon=True
        )
        reader.start()
        try:
            stopped_because = self._supervise(proc, run)
        finally:
            if proc.poll() is None:
                _kill_group(proc, self.config.kill_grace_seconds)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # stray helpers of a finished child
            reader.join(timeout=10)
        return proc.returncode, stopped_because

    def _supervise(self, proc: subprocess.Popen[bytes], run: _JobRun) -> str | None:
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
                _kill_group(proc, self.config.kill_grace_seconds)
                return None
            if not self.stopping:
                continue
            now = time.monotonic()
            if drain_until is None:
                drain_until = now + self.config.drain_seconds
                if self.config.drain_seconds > 0 and not self._abandon.is_set():
                    log.info(
                        "job %s: stopping; letting the compile finish for up to %g s",
                        run.job_id,
                        self.config.drain_seconds,
                    )
            if self._abandon.is_set() or now >= drain_until:
                _kill_group(proc, self.config.kill_grace_seconds)
                return "worker shutting down"

    # Reporting --------------------------------------------------------------------------

    def _call(self, run: _JobRun, what: str, fn: Callable[[], T]) -> T:
        """`fn()`, retried while the server is unreachable and the lease may still be ours.

        Raises _LeaseGone once it cannot be (or the heartbeat learned it is not), and any
        other PrebakeError as is.
        """
        failures = 0
        while True:
            if run.gone.is_set():
                raise _LeaseGone(f"{run.gone_reason} (before {what})")
            try:
                result = fn()
            except (Unavailable, DeadlineExceeded) as exc:
                self._outage.down(exc)
                if run.surely_expired():
                    raise _LeaseGone(
                        f"the server was unreachable for longer than the lease ({what})"
                    ) from exc
                time.sleep(_backoff(failures))
                failures += 1
                continue
            self._outage.up()
            run.touch()
            return result

    def _upload_log(self, run: _JobRun, log_path: Path) -> blobs_pb2.Digest | None:
        """Upload the compile log as a blob; None (and a warning) if that fails."""
        try:
            digest_hex, size = hash_file(log_path)
            digest = blobs_pb2.Digest(hash=digest_hex, size_bytes=size)
            self._call(run, "uploading the log", lambda: self._client.upload_blob(log_path, digest))
        except (OSError, PrebakeError) as exc:
            log.warning("job %s: compile log not uploaded: %s", run.job_id, exc)
            return None
        return digest

    def _publish(
        self, run: _JobRun, job_dir: Path, log_digest: blobs_pb2.Digest | None, compile_seconds: float
    ) -> Outcome:
        job_id, token = run.job_id, run.lease.token
        out_dir = job_dir / "out"
        run.set_message("uploading the artifact")
        files = self._call(run, "uploading", lambda: self._client.upload_directory(out_dir))
        if not files:
            return self._fail(run, "the compiler reported success but wrote no files", False, log_digest)
        producer = registry_pb2.Producer(
            worker=self.config.worker_id,
            toolchain_versions=_toolchain_versions(_read_result(job_dir / "result.json")),
            compile_seconds=compile_seconds,
            log=log_digest,
        )
        run.set_message("publishing")

        def complete() -> workers_pb2.CompleteJobResponse:
            return self._client.complete_job(job_id, token, files, producer)

        try:
            try:
                response = self._call(run, "publishing", complete)
            except (FailedPrecondition, DataLoss) as exc:
                # Either a blob vanished since we uploaded it (re-upload and retry once) or
                # the lease is gone (then nothing is missing and we must not retry).
                if not self._reupload_missing(run, job_dir, files, log_digest):
                    raise _LeaseGone(f"publishing refused: {exc}") from exc
                response = self._call(run, "publishing", complete)
        except (FailedPrecondition, NotFound) as exc:
            raise _LeaseGone(f"publishing refused: {exc}") from exc
        artifact = response.artifact
        log.info(
            "job %s: published artifact %s (%d files, %d bytes)",
            job_id,
            artifact.artifact_id,
            artifact.file_count,
            artifact.total_size_bytes,
        )
        return Outcome.SUCCEEDED

    def _reupload_missing(
        self,
        run: _JobRun,
        job_dir: Path,
        files: Sequence[registry_pb2.ArtifactFile],
        log_digest: blobs_pb2.Digest | None,
    ) -> bool:
        """Upload again whatever the server lacks; False if it lacked nothing."""
        wanted = [f.digest for f in files] + ([log_digest] if log_digest is not None else [])
        missing = self._call(run, "checking blobs", lambda: self._client.find_missing_blobs(wanted))
        if not missing:
            return False
        log.warning(
            "job %s: %d blob(s) vanished before publishing; uploading again", run.job_id, len(missing)
        )
        self._call(run, "uploading", lambda: self._client.upload_directory(job_dir / "out"))
        if log_digest is not None and any(m.hash == log_digest.hash for m in missing):
            log_file = job_dir / "compile.log"
            self._call(run, "uploading the log", lambda: self._client.upload_blob(log_file, log_digest))
        return True

    def _fail(
        self, run: _JobRun, error: str, deterministic: bool, log_digest: blobs_pb2.Digest | None
    ) -> Outcome:
        error = error[:MAX_ERROR_CHARS]
        label = "deterministic" if deterministic else "transient"
        log.warning("job %s: %s failure: %s", run.job_id, label, error.splitlines()[0] if error else "")
        try:
            job = self._call(
                run,
                "reporting the failure",
                lambda: self._client.fail_job(run.job_id, run.lease.token, error, deterministic, log_digest),
            )
        except (FailedPrecondition, NotFound) as exc:
            raise _LeaseGone(f"failure report refused: {exc}") from exc
        if job.state == jobs_pb2.JOB_STATE_QUEUED:
            log.info("job %s: requeued for another attempt", run.job_id)
        return Outcome.FAILED

    def _release(self, run: _JobRun, reason: str) -> Outcome:
        try:
            self._call(
                run, "releasing", lambda: self._client.release_job(run.job_id, run.lease.token, reason)
            )
        except (FailedPrecondition, NotFound) as exc:
            raise _LeaseGone(f"release refused: {exc}") from exc
        log.info("job %s: released back to the queue (%s)", run.job_id, reason)
        return Outcome.RELEASED


# Running a worker -------------------------------------------------------------------------


def run_until_signalled(worker: Worker) -> int:
    """Run `worker` on a thread until it ends or SIGINT/SIGTERM; returns its job count.

    The first signal stops gracefully (drain, then release); a second one skips the
    drain. Must be called from the main thread (signal handlers).
    """
    signals_seen = 0

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal signals_seen
        signals_seen += 1
        name = signal.Signals(signum).name
        if signals_seen == 1:
            log.info("%s: stopping (a running compile may finish; signal again to skip that)", name)
            worker.stop()
        else:
            log.info("%s again: stopping now", name)
            worker.stop(drain=False)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    taken: list[int] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            taken.append(worker.run())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name="prebake-worker")
    thread.start()
    try:
        # Joining in slices keeps the main thread responsive to signals.
        while thread.is_alive():
            thread.join(0.5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if error:
        raise error[0]
    return taken[0] if taken else 0


def _local_target(address: str) -> str:
    """A dialable address for a server listening on `address` (wildcards become loopback)."""
    host, _, port = address.rpartition(":")
    if host in ("", "0.0.0.0", "[::]", "::"):
        return f"127.0.0.1:{port}"
    return address


def run_embedded_workers(
    address: str, stop: threading.Event, work_dir: Path, per_kind: int = 1
) -> list[threading.Thread]:
    """Start `per_kind` daemon worker threads per kind whose toolchain is installed here.

    For `prebake serve`: probes the backends (a child process), logs which kinds are
    served and why the others are not, and starts the workers against the server at
    `address`. Setting `stop` stops them without a drain (a running compile is killed
    and released); join the returned threads (bounded) before stopping the server so
    that the release reaches it. Never raises for a missing toolchain or a failed probe:
    the server then runs without workers, and says so.
    """
    if per_kind <= 0:
        return []
    try:
        probed = probe_backends()
    except ProbeError as exc:
        log.warning("no embedded compile workers: %s", exc)
        return []
    for status in probed.values():
        if not status.available:
            log.info("embedded workers: not serving %s", status.describe())
    for kind in kind_names():
        if kind not in probed:
            log.info("embedded workers: not serving %s: no %s backend in this installation", kind, kind)
    available = [s for s in probed.values() if s.available and s.toolchain]
    if not available:
        log.warning("no embedded compile workers: no compile toolchain is installed here")
        return []
    target = _local_target(address)
    workers: list[Worker] = []
    for status in available:
        for i in range(per_kind):
            config = WorkerConfig(
                server=target,
                work_dir=work_dir,
                kinds=(status.kind,),
                worker_id=f"{default_worker_id()}/embedded-{status.kind}-{i + 1}",
                drain_seconds=0.0,
            )
            workers.append(Worker(config, backends={status.kind: status}))
        log.info("embedded workers: serving %s with %d worker(s)", status.describe(), per_kind)

    def stop_all() -> None:
        stop.wait()
        for worker in workers:
            worker.stop(drain=False)

    threads = [
        threading.Thread(target=w.run, name=f"prebake-worker-{w.config.worker_id}", daemon=True)
        for w in workers
    ]
    threads.append(threading.Thread(target=stop_all, name="prebake-worker-stopper", daemon=True))
    for thread in threads:
        thread.start()
    return threads


def join_embedded_workers(
    threads: Sequence[threading.Thread], timeout: float = EMBEDDED_JOIN_SECONDS
) -> None:
    """Join threads from `run_embedded_workers` (after setting its stop event), within `timeout`."""
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    alive = [t.name for t in threads if t.is_alive()]
    if alive:
        log.warning("embedded workers still running after %g s: %s", timeout, ", ".join(alive))
