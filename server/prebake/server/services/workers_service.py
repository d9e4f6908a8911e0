"""`prebake.v1.Workers`: lease, heartbeat, complete, fail and release jobs (compiles; evaluations
complete through `prebake.server.services.evaluation_jobs`)."""

from __future__ import annotations

import time
from typing import Any

import grpc

from prebake.core import names
from prebake.core.errors import InvalidArgument, NotFound
from prebake.server import convert
from prebake.server.key_normalization import MAX_TOOLCHAIN
from prebake.server.records import ErrorClass, Job, JobPurpose, JobState, WorkerCapability
from prebake.server.services.blob_checks import (
    checked_signature,
    require_present,
    superseded,
    verified_manifest,
)
from prebake.server.services.evaluation_jobs import EvaluationJobs
from prebake.server.services.jobs_service import check_job_id
from prebake.server.state import ServerState
from prebake.server.status import unary
from prebake.v1 import jobs_pb2, workers_pb2, workers_pb2_grpc

MAX_WAIT = 60.0
MAX_CAPABILITIES = 16
# A capability's compile targets are stored with the worker's record (its toolchain is
# capped as a key's is).
MAX_COMPILE_TARGETS = 32
MAX_COMPILE_TARGET = 64
MAX_WORKER_ID = 256
MAX_MESSAGE = 1024
MAX_ERROR = 16_384
# Long-polls re-check at least this often: a job whose retry backoff ends becomes
# leasable without any event announcing it.
RECHECK_SECONDS = 1.0
Ctx = grpc.aio.ServicerContext[Any, Any]
ERROR_CLASSES = {
    jobs_pb2.ERROR_CLASS_TRANSIENT: ErrorClass.TRANSIENT,
    jobs_pb2.ERROR_CLASS_DETERMINISTIC: ErrorClass.DETERMINISTIC,
}


def check_worker_id(worker_id: str) -> str:
    if not 1 <= len(worker_id) <= MAX_WORKER_ID or not worker_id.isprintable():
        raise InvalidArgument(f"worker_id must be 1-{MAX_WORKER_ID} printable characters, got {worker_id!r}")
    return worker_id


def capabilities(request: workers_pb2.LeaseJobRequest) -> list[WorkerCapability]:
    """The request's capabilities, validated."""
    if not 1 <= len(request.capabilities) <= MAX_CAPABILITIES:
        count = len(request.capabilities)
        raise InvalidArgument(f"a worker advertises 1-{MAX_CAPABILITIES} capabilities, got {count}")
    result = []
    for i, cap in enumerate(request.capabilities):
        kind = convert.kind_name(cap.kind)
        if not kind:
            what = "an unknown kind" if cap.kind else "no kind"
            raise InvalidArgument(f"capabilities[{i}] has {what}; use one of {names.kind_values()}")
        if not cap.toolchain:
            raise InvalidArgument(f"capabilities[{i}] ({kind}) has no toolchain; jobs are matched on it")
        if len(cap.toolchain) > MAX_TOOLCHAIN:
            raise InvalidArgument(
                f"capabilities[{i}] toolchain is {len(cap.toolchain)} characters; at most {MAX_TOOLCHAIN}"
            )
        if len(cap.compile_targets) > MAX_COMPILE_TARGETS or any(
            len(t) > MAX_COMPILE_TARGET for t in cap.compile_targets
        ):
            raise InvalidArgument(
                f"capabilities[{i}] lists at most {MAX_COMPILE_TARGETS} compile targets of at most "
                f"{MAX_COMPILE_TARGET} characters each"
            )
        purposes = []
        for j, value in enumerate(cap.purposes):
            if value not in convert.JOB_PURPOSES_FROM_PROTO:
                convert.enum_value(jobs_pb2.JobPurpose.DESCRIPTOR, value, f"capabilities[{i}].purposes[{j}]")
                raise InvalidArgument(
                    f"capabilities[{i}].purposes[{j}]: JOB_PURPOSE_UNSPECIFIED is not a purpose"
                )
            purposes.append(convert.JOB_PURPOSES_FROM_PROTO[value])
        # None listed: compile only, as workers from before evaluation jobs mean it.
        served = tuple(dict.fromkeys(purposes)) or (JobPurpose.COMPILE,)
        result.append(WorkerCapability(kind, cap.toolchain, tuple(cap.compile_targets), served))
    return result


class WorkersService(workers_pb2_grpc.WorkersServicer):
    def __init__(self, state: ServerState) -> None:
        self.s = state
        self.evaluation_jobs = EvaluationJobs(state)

    async def _lease_any(self, worker: str, caps: list[WorkerCapability]) -> Job | None:
        return await self.s.lifecycle.lease(worker, caps, lease_seconds=self.s.config.lease_seconds)

    @unary
    async def ListWorkers(
        self, request: workers_pb2.ListWorkersRequest, context: Ctx
    ) -> workers_pb2.ListWorkersResponse:
        now = time.time()
        records = await self.s.storage.workers.workers(now, include_expired=request.include_expired)
        return workers_pb2.ListWorkersResponse(
            workers=[
                workers_pb2.WorkerInfo(
                    worker_id=w.worker_id,
                    capabilities=[
                        workers_pb2.Capability(
                            kind=names.kind_to_proto(c.kind),
                            toolchain=c.toolchain,
                            compile_targets=c.compile_targets,
                            purposes=[convert.JOB_PURPOSES[p] for p in c.purposes],
                        )
                        for c in w.capabilities
                    ],
                    last_seen=convert.timestamp(w.last_seen),
                    expires_at=convert.timestamp(w.expires_at),
                    live=w.live(now),
                )
                for w in records
            ]
        )

    @unary
    async def LeaseJob(
        self, request: workers_pb2.LeaseJobRequest, context: Ctx
    ) -> workers_pb2.LeaseJobResponse:
        worker = check_worker_id(request.worker_id)
        caps = capabilities(request)
        if not 0.0 <= request.wait_seconds <= MAX_WAIT:
            raise InvalidArgument(f"wait_seconds must be 0-{MAX_WAIT:g}, got {request.wait_seconds}")
        await self.s.liveness.heard_from(worker, caps)
        deadline = time.monotonic() + request.wait_seconds
        while (job := await self._lease_any(worker, caps)) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or context.cancelled():
                return workers_pb2.LeaseJobResponse(lease_seconds=self.s.config.lease_seconds)
            await self.s.work.wait(min(remaining, RECHECK_SECONDS))
        self.s.hub.notify([job.job_id])
        return workers_pb2.LeaseJobResponse(
            job=convert.job(job),
            fencing_token=job.fencing_token,
            lease_expires_at=convert.timestamp(job.lease_expires_at),
            lease_seconds=self.s.config.lease_seconds,
        )

    @unary
    async def Heartbeat(
        self, request: workers_pb2.HeartbeatRequest, context: Ctx
    ) -> workers_pb2.HeartbeatResponse:
        job_id = check_job_id(request.job_id)
        if len(request.message) > MAX_MESSAGE:
            raise InvalidArgument(f"message is {len(request.message)} characters; at most {MAX_MESSAGE}")
        current = await self.s.storage.jobs.get(job_id)
        if current is None:
            raise NotFound(f"no job {job_id}")
        if current.state == JobState.CANCELLED and current.fencing_token == request.fencing_token:
            # Cancelled under this worker's own lease: say so plainly rather than as an error.
            return workers_pb2.HeartbeatResponse(cancelled=True)
        job = await self.s.lifecycle.heartbeat(
            job_id,
            request.fencing_token,
            request.progress,
            request.message,
            lease_seconds=self.s.config.lease_seconds,
        )
        self.s.hub.notify([job_id])
        await self.s.liveness.still_alive(job.worker)
        return workers_pb2.HeartbeatResponse(lease_expires_at=convert.timestamp(job.lease_expires_at))

    @unary
    async def CompleteJob(
        self, request: workers_pb2.CompleteJobRequest, context: Ctx
    ) -> workers_pb2.CompleteJobResponse:
        job_id = check_job_id(request.job_id)
        s = self.s
        files, producer, digests = await verified_manifest(s, request.files, request.producer)
        signature = None
        if request.HasField("signature") or s.signatures.require:
            # The signature covers the job's key, which never changes once the job exists.
            job = await s.storage.jobs.get(job_id)
            if job is None:
                raise NotFound(f"no job {job_id}")
            signature = checked_signature(s, job.key, files, request)
        async with s.blob_refs:
            require_present(s, digests)
            artifact, completed = await s.lifecycle.complete(
                job_id, request.fencing_token, files, producer, signature=signature, supersede=superseded(s)
            )
        s.metrics.jobs_finished(completed)
        s.hub.notify(j.job_id for j in completed)
        return workers_pb2.CompleteJobResponse(artifact=convert.artifact(artifact))

    @unary
    async def CompleteEvaluationJob(
        self, request: workers_pb2.CompleteEvaluationJobRequest, context: Ctx
    ) -> workers_pb2.CompleteEvaluationJobResponse:
        return await self.evaluation_jobs.complete(check_job_id(request.job_id), request)

    @unary
    async def FailJob(self, request: workers_pb2.FailJobRequest, context: Ctx) -> jobs_pb2.Job:
        job_id = check_job_id(request.job_id)
        error_class = ERROR_CLASSES.get(request.error_class)  # type: ignore[call-overload]
        if error_class is None:
            raise InvalidArgument("error_class must be TRANSIENT or DETERMINISTIC")
        if len(request.error) > MAX_ERROR:
            raise InvalidArgument(f"error is {len(request.error)} characters; at most {MAX_ERROR}")
        log = convert.digest_from_proto(request.log, "log") if request.HasField("log") else None
        if log is not None:
            require_present(self.s, [log])
        job = await self.s.lifecycle.fail_leased(
            job_id, request.fencing_token, request.error, error_class, log
        )
        self.s.metrics.jobs_finished([job])
        self.s.hub.notify([job_id])
        if job.state == JobState.QUEUED:
            self.s.work.fire()
        return convert.job(job)

    @unary
    async def ReleaseJob(self, request: workers_pb2.ReleaseJobRequest, context: Ctx) -> jobs_pb2.Job:
        job_id = check_job_id(request.job_id)
        if len(request.reason) > MAX_MESSAGE:
            raise InvalidArgument(f"reason is {len(request.reason)} characters; at most {MAX_MESSAGE}")
        job = await self.s.lifecycle.release(job_id, request.fencing_token, request.reason)
        self.s.hub.notify([job_id])
        self.s.work.fire()
        return convert.job(job)
