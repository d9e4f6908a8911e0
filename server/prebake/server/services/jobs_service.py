"""`prebake.v1.Jobs`: inspect, list, watch and cancel jobs; enqueue evaluations
(`prebake.server.services.evaluation_jobs`)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

import grpc

from prebake.core.errors import InvalidArgument, NotFound
from prebake.server import convert
from prebake.server.rate_limits import caller
from prebake.server.records import Job
from prebake.server.services import evaluation_jobs, pagination
from prebake.server.services.evaluation_jobs import EvaluationJobs
from prebake.server.services.registry_service import RegistryService
from prebake.server.state import ServerState
from prebake.server.status import streaming, unary
from prebake.server.storage import JobQuery
from prebake.v1 import jobs_pb2, jobs_pb2_grpc, key_pb2

JOB_ID_RE = re.compile(r"^j-[0-9a-f]{24}$")
MAX_REASON = 1024
# Watchers re-read the registry at least this often, so a change made by another
# process sharing the database is still seen.
WATCH_POLL_SECONDS = 2.0
Ctx = grpc.aio.ServicerContext[Any, Any]


def check_job_id(job_id: str) -> str:
    if not JOB_ID_RE.match(job_id):
        raise InvalidArgument(f"job id {job_id!r} is malformed; job ids look like j-<24 hex digits>")
    return job_id


class JobsService(jobs_pb2_grpc.JobsServicer):
    def __init__(self, state: ServerState, registry: RegistryService | None = None) -> None:
        self.s = state
        # Keys are resolved as lookups resolve them (toolchains, model names): the registry's.
        self.registry = registry or RegistryService(state)
        self.evaluation_jobs = EvaluationJobs(state, self.registry.evaluations)

    async def _job(self, job_id: str) -> Job:
        job = await self.s.storage.jobs.get(check_job_id(job_id))
        if job is None:
            raise NotFound(f"no job {job_id}")
        return job

    @unary
    async def GetJob(self, request: jobs_pb2.GetJobRequest, context: Ctx) -> jobs_pb2.Job:
        return convert.job(await self._job(request.job_id))

    @unary
    async def ListJobs(self, request: jobs_pb2.ListJobsRequest, context: Ctx) -> jobs_pb2.ListJobsResponse:
        limit = pagination.page_size(request.page_size)
        states = []
        for i, value in enumerate(request.states):
            if value not in convert.JOB_STATES_FROM_PROTO:
                convert.enum_value(jobs_pb2.JobState.DESCRIPTOR, value, f"states[{i}]")
                raise InvalidArgument(f"states[{i}]: JOB_STATE_UNSPECIFIED is not a state to filter by")
            states.append(convert.JOB_STATES_FROM_PROTO[value])
        # An unknown kind would read as "any kind": refused instead.
        kind = convert.kind_name(convert.enum_value(key_pb2.ArtifactKind.DESCRIPTOR, request.kind, "kind"))
        query = JobQuery(states=tuple(states), kind=kind)
        page = await self.s.storage.jobs.list_page(query, request.page_token, limit)
        return jobs_pb2.ListJobsResponse(
            jobs=[convert.job(j) for j in page.items], next_page_token=page.next_token
        )

    @streaming
    async def WatchJob(
        self, request: jobs_pb2.WatchJobRequest, context: Ctx
    ) -> AsyncIterator[jobs_pb2.JobEvent]:
        jobs = self.s.storage.jobs
        job = await self._job(request.job_id)
        wake = self.s.hub.subscribe(job.job_id)
        try:
            events = await jobs.events(job.job_id)
            sequence = events[-1].sequence if events else 0
            yield jobs_pb2.JobEvent(sequence=sequence, job=convert.job(job))
            while job.state.active:
                wake.clear()
                for event in await jobs.events(job.job_id, after_sequence=sequence):
                    sequence = event.sequence
                    job = event.job
                    yield jobs_pb2.JobEvent(sequence=sequence, job=convert.job(job))
                if not job.state.active:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), WATCH_POLL_SECONDS)
        finally:
            self.s.hub.unsubscribe(job.job_id, wake)

    @unary
    async def CancelJob(self, request: jobs_pb2.CancelJobRequest, context: Ctx) -> jobs_pb2.Job:
        if len(request.reason) > MAX_REASON:
            raise InvalidArgument(f"reason is {len(request.reason)} characters; at most {MAX_REASON}")
        job = await self.s.lifecycle.cancel(check_job_id(request.job_id), request.reason)
        self.s.metrics.jobs_finished([job])
        self.s.hub.notify([job.job_id])
        return convert.job(job)

    @unary
    async def EnqueueEvaluation(
        self, request: jobs_pb2.EnqueueEvaluationRequest, context: Ctx
    ) -> jobs_pb2.EnqueueEvaluationResponse:
        # The request's own fields first: a malformed one costs no read.
        artifact_id = evaluation_jobs.artifact_id_of(request)
        wanted = evaluation_jobs.workload(request)
        discount = evaluation_jobs.checked_discount(request.discount_rate)
        if artifact_id:
            artifact = await self.s.storage.artifacts.get(artifact_id)
            if artifact is None:
                raise NotFound(f"no artifact {artifact_id}")
        else:
            key, _ = await self.registry.normalize(request.key)
            found = await self.registry.exact_artifact(key, request.key.model)
            if found is None:
                raise NotFound(
                    f"no artifact for this key ({key.digest}); `prebake ensure` it first, then evaluate it"
                )
            artifact = found
        # Worker time like a compile: the same per-caller budget of jobs created (a join is free).
        who, limit = caller(context), self.registry.job_creations
        return await self.evaluation_jobs.enqueue(
            artifact, wanted, discount, (lambda: limit.check(who), lambda: limit.spend(who))
        )
