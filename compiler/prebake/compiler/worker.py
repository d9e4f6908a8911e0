"""The compile worker: lease jobs from a prebake server, compile them in a child process, publish.

Evaluation jobs (purpose EVALUATE) take the same loop with other steps: the workload is checked
against the key, the artifact fetched through a host cache under `work_dir`, the workload run
in the evaluation child (`prebake.compiler.evaluation_run`, the same protocol) and the result
stored with `CompleteEvaluationJob` (see evaluation_job.py).

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

This module holds the loop and its configuration; each step lives in a module of its own:
probe.py (which backends run here), lease_poll.py (the cancellable long poll),
job_run.py (one leased job's shared state), heartbeat.py, outage.py (backoff and retries
under a lease), work_dir.py (private, locked directories), supervise.py (the compile
child), reports.py (failure texts), publish_outputs.py (upload and `CompleteJob`),
signals.py (`prebake worker` in the foreground) and embedded.py (workers inside
`prebake serve`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from prebake.client.client import Client
from prebake.client.credentials import Credentials
from prebake.client.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PrebakeError,
    Unavailable,
)
from prebake.client.hostcache import HostCache
from prebake.compiler.backend import EXIT_DETERMINISTIC, EXIT_OK, CompileError, CompileRequest
from prebake.compiler.evaluation_job import (
    EVALUATION_MODULE,
    evaluation_message,
    evaluation_request,
    workload_problem,
)
from prebake.compiler.heartbeat import Heartbeat, heartbeat_interval
from prebake.compiler.job_run import JobRun, Lease, LeaseGone, Outcome
from prebake.compiler.lease_poll import LeasePoller
from prebake.compiler.model_source import DownloadCache, checked_source, resolve_model_source
from prebake.compiler.outage import Outage, backoff, call_under_lease
from prebake.compiler.probe import (
    BackendStatus,
    ProbeError,
    WorkerSetupError,
    probe_backends,
    select_backends,
)
from prebake.compiler.publish_outputs import NothingToPublish, publish, upload_log
from prebake.compiler.reports import MAX_ERROR_CHARS, failure_report
from prebake.compiler.supervise import RUN_MODULE, key_fields, read_result, run_compile
from prebake.compiler.work_dir import default_work_dir, worker_dir
from prebake.core.names import kind_name, kind_names
from prebake.core.request_ids import request_scope
from prebake.core.s3_urls import is_s3_url
from prebake.core.signing import SigningKey
from prebake.core.source_roots import lexical_path, lexically_within, really_within
from prebake.v1 import blobs_pb2, jobs_pb2, workers_pb2

# Callers of `prebake worker` import these from here (with Worker and WorkerConfig).
log = logging.getLogger("prebake.worker")


def default_worker_id() -> str:
    """`hostname:pid`, unique among the live workers of a fleet."""
    return f"{socket.gethostname()}:{os.getpid()}"


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
    # Token and TLS material for the server (a token with the worker role, or a client
    # certificate the server's token file names); none for a server without auth.
    credentials: Credentials = field(default_factory=Credentials)
    # Local directories this worker may read model sources from (symbolic links resolved),
    # re-checked before reading; None: whatever the job says (the server is the policy
    # point, see prebake.server.model_sources). Embedded workers get the server's roots.
    model_roots: tuple[Path, ...] | None = None
    # Private key file (PEM PKCS#8) every completed artifact is signed with; None: unsigned.
    signing_key: Path | None = None


def _load_signing_key(path: Path | None) -> SigningKey | None:
    """The worker's signing key, loaded at start-up so that a bad key stops it before any lease."""
    if path is None:
        return None
    try:
        return SigningKey.load(path)
    except PrebakeError as exc:
        raise WorkerSetupError(f"--signing-key: {exc}") from None


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
      fails deterministically, before anything is compiled (one whose S3 source cannot be
      read right now, transiently). An s3:// source is downloaded before the compile, into
      `work_dir/model-cache/<revision>/`, shared by the workers of one work dir and kept
      across jobs, so a revision is downloaded once.
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
        self.signing_key = _load_signing_key(config.signing_key)
        self._client = client or Client(
            config.server, timeout=config.rpc_timeout, credentials=config.credentials
        )
        self._owns_client = client is None
        self._poller = LeasePoller(config.server, config.rpc_timeout, config.credentials)
        self._outage = Outage(config.server)
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
            with worker_dir(self.config.work_dir) as directory:
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

    def _lease(self) -> Lease | None:
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
            self._stopping.wait(backoff(self._reconnects))
            self._reconnects += 1
            return None
        except PrebakeError as exc:  # INTERNAL and the like: the server's problem, wait and retry
            log.warning("LeaseJob failed: %s", exc)
            self._stopping.wait(backoff(self._reconnects))
            self._reconnects += 1
            return None
        self._reconnects = 0
        if response is None:
            return None
        self._outage.up()
        if not response.HasField("job"):
            return None
        lease = Lease(response.job, response.fencing_token, response.lease_seconds)
        if self.stopping:
            # Granted just as we were told to stop: give it straight back.
            with contextlib.suppress(LeaseGone):
                self._release(JobRun(lease), "worker stopping")
            return None
        return lease

    # One job --------------------------------------------------------------------------

    def _process(self, lease: Lease, job_dir: Path) -> Outcome:
        """Run one leased job in `job_dir` (created here, removed after) to its outcome.

        Inside the job's request scope: every log line and rpc for the job carries the
        request id of the lookup that created it (a fresh one for a job without one).
        """
        with request_scope(lease.job.request_id or None):
            return self._process_in_scope(lease, job_dir)

    def _process_in_scope(self, lease: Lease, job_dir: Path) -> Outcome:
        job = lease.job
        log.info(
            "job %s: leased (%s, attempt %d/%d)",
            job.job_id,
            job.key.canonical or job.key.digest,
            job.attempts,
            job.max_attempts,
        )
        run = JobRun(lease)
        started = time.monotonic()
        try:
            job_dir.mkdir()
            with Heartbeat(self._client, run, heartbeat_interval(lease.lease_seconds), self._outage):
                outcome = self._attempt_or_report(run, job_dir)
        except LeaseGone as exc:
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

    def _attempt_or_report(self, run: JobRun, job_dir: Path) -> Outcome:
        """`_attempt`, reporting an unexpected error of the worker itself as transient."""
        try:
            return self._attempt(run, job_dir)
        except LeaseGone:
            raise
        except Exception as exc:
            # A bug or a local problem (disk full, ...): another worker may well succeed.
            log.exception("job %s: worker error", run.job_id)
            message = f"worker {self.config.worker_id} failed: {type(exc).__name__}: {exc}"
            return self._fail(run, message, False, None)

    def _attempt(self, run: JobRun, job_dir: Path) -> Outcome:
        job = run.lease.job
        if job.purpose == jobs_pb2.JOB_PURPOSE_EVALUATE:
            return self._evaluate(run, job_dir)
        log_path = job_dir / "compile.log"
        log_path.touch()
        if not job.model_source:
            return self._fail(
                run, "job has no model_source; pass --model-source on lookup/ensure", True, None
            )
        try:
            source = self._local_source(job, job_dir)
        except ValueError as exc:
            return self._fail(run, f"unusable model source: {exc}", True, None)
        except CompileError as exc:
            what = "unusable model source" if exc.deterministic else "cannot read the model source"
            return self._fail(run, f"{what}: {exc}", exc.deterministic, None)

        out_dir = job_dir / "out"
        out_dir.mkdir()
        request = CompileRequest(job.job_id, key_fields(job.key), source, out_dir)
        (job_dir / "request.json").write_text(request.to_json())
        started = time.monotonic()
        returncode, stopped_because = self._run_child(run, job_dir, log_path)
        compile_seconds = time.monotonic() - started

        if run.gone.is_set():
            raise LeaseGone(f"{run.gone_reason}; compile stopped")
        if stopped_because is not None:
            return self._release(run, stopped_because)
        log_digest = upload_log(self._client, self._outage, run, log_path)
        if returncode == EXIT_OK:
            try:
                publish(
                    self._client,
                    self._outage,
                    run,
                    job_dir,
                    worker_id=self.config.worker_id,
                    log_digest=log_digest,
                    compile_seconds=compile_seconds,
                    signing_key=self.signing_key,
                )
            except NothingToPublish as exc:
                return self._fail(run, str(exc), False, log_digest)
            return Outcome.SUCCEEDED
        report = failure_report(kind_name(job.key.key.kind), returncode, job_dir)
        return self._fail(run, report, returncode == EXIT_DETERMINISTIC, log_digest)

    def _run_child(
        self, run: JobRun, job_dir: Path, log_path: Path, *, module: str = RUN_MODULE
    ) -> tuple[int, str | None]:
        """Run the job's child process (a compile, or with `module` an evaluation) with this
        worker's stop and drain settings; see `supervise.run_compile`."""
        return run_compile(
            run,
            job_dir,
            log_path,
            python=self.config.python,
            stopping=self._stopping,
            abandon=self._abandon,
            drain_seconds=self.config.drain_seconds,
            kill_grace_seconds=self.config.kill_grace_seconds,
            module=module,
        )

    def _evaluate(self, run: JobRun, job_dir: Path) -> Outcome:
        """An evaluation job: check, fetch the artifact, run the workload in a child, complete."""
        job = run.lease.job
        problem = workload_problem(job)
        if problem:
            return self._fail(run, problem, True, None)
        log_path = job_dir / "compile.log"
        log_path.touch()
        run.report(0.0, "fetching the artifact")
        artifact_dir = job_dir / "artifact"
        # Through this work dir's host cache: a worker evaluating one artifact again (more
        # workloads, other discounts) downloads none of its files twice.
        try:
            self._client.fetch(
                job.artifact_id, artifact_dir, host_cache=HostCache(self.config.work_dir / "host-cache")
            )
        except NotFound:
            # Deleted or evicted since the job was enqueued: no retry brings it back.
            return self._fail(
                run, f"artifact {job.artifact_id} no longer exists; nothing to evaluate", True, None
            )
        request = evaluation_request(job, artifact_dir, self._tokenizer_dir(job, job_dir))
        (job_dir / "request.json").write_text(json.dumps(request, indent=1))
        returncode, stopped_because = self._run_child(run, job_dir, log_path, module=EVALUATION_MODULE)
        if run.gone.is_set():
            raise LeaseGone(f"{run.gone_reason}; evaluation stopped")
        if stopped_because is not None:
            return self._release(run, stopped_because)
        result = read_result(job_dir / "result.json")
        if returncode != EXIT_OK or not result.get("ok"):
            log_digest = upload_log(self._client, self._outage, run, log_path)
            report = str(
                result.get("error") or failure_report(kind_name(job.key.key.kind), returncode, job_dir)
            )
            return self._fail(run, report, returncode == EXIT_DETERMINISTIC, log_digest)
        evaluation = evaluation_message(result["evaluation"])
        try:
            call_under_lease(
                run,
                self._outage,
                "storing the evaluation",
                lambda: self._client.complete_evaluation_job(run.job_id, run.lease.token, evaluation),
            )
        except (FailedPrecondition, NotFound) as exc:
            raise LeaseGone(f"evaluation refused: {exc}") from exc
        return Outcome.SUCCEEDED

    def _tokenizer_dir(self, job: jobs_pb2.Job, job_dir: Path) -> Path | None:
        """The model source's directory, when it has one this worker may read (its tokenizer, if
        any, then decodes responses); None otherwise: prompts are token ids."""
        if not job.model_source:
            return None
        try:
            return self._local_source(job, job_dir)
        except (ValueError, CompileError, OSError) as exc:
            log.info("job %s: no tokenizer from the model source (%s); using token ids", job.job_id, exc)
            return None

    def _local_source(self, job: jobs_pb2.Job, job_dir: Path) -> Path:
        """The local checkpoint the compile reads.

        An s3:// source is checked against the key's revision (one listing) and downloaded
        here, into the cache every worker on this work dir shares (staging in the job
        directory, so a killed worker's half download goes with it), because the compile
        child may have no boto3. A local directory is only resolved: the backend checks
        its revision (`checked_source`), so that it is hashed once.
        """
        if is_s3_url(job.model_source):
            cache = DownloadCache.in_work_dir(self.config.work_dir, job_dir)
            return checked_source(job.model_source, job.key.key.model_revision, cache)
        roots = self.config.model_roots
        if roots is not None:
            path = lexical_path(job.model_source)
            allowed = [str(r) for r in roots]
            if path is None or not lexically_within(path, allowed) or not really_within(path, allowed):
                # As the server says it: nothing about what exists outside the roots.
                raise ValueError(f"{job.model_source!r} is not under this worker's model source roots")
        return resolve_model_source(job.model_source)

    # Ending a job without an artifact -------------------------------------------------

    def _fail(
        self, run: JobRun, error: str, deterministic: bool, log_digest: blobs_pb2.Digest | None
    ) -> Outcome:
        error = error[:MAX_ERROR_CHARS]
        label = "deterministic" if deterministic else "transient"
        log.warning("job %s: %s failure: %s", run.job_id, label, error.splitlines()[0] if error else "")
        try:
            job = call_under_lease(
                run,
                self._outage,
                "reporting the failure",
                lambda: self._client.fail_job(run.job_id, run.lease.token, error, deterministic, log_digest),
            )
        except (FailedPrecondition, NotFound) as exc:
            raise LeaseGone(f"failure report refused: {exc}") from exc
        if job.state == jobs_pb2.JOB_STATE_QUEUED:
            log.info("job %s: requeued for another attempt", run.job_id)
        return Outcome.FAILED

    def _release(self, run: JobRun, reason: str) -> Outcome:
        try:
            call_under_lease(
                run,
                self._outage,
                "releasing",
                lambda: self._client.release_job(run.job_id, run.lease.token, reason),
            )
        except (FailedPrecondition, NotFound) as exc:
            raise LeaseGone(f"release refused: {exc}") from exc
        log.info("job %s: released back to the queue (%s)", run.job_id, reason)
        return Outcome.RELEASED
