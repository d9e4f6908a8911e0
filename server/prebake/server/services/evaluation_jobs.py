"""Evaluation jobs: `Jobs.EnqueueEvaluation` and `Workers.CompleteEvaluationJob`.

An evaluation job is a job of the one queue (same leases, fencing and retries as compiles,
`prebake.server.job_lifecycle`) whose purpose is EVALUATE and which carries what it runs
(`EvaluationSpec`: the workload and the price inputs, resolved here from the server's price
table when it is enqueued, so every worker prices the same way and the inputs are recorded).
`JobsService` and `WorkersService` delegate here to keep those modules about their protocols.

Completion is fenced by the job's compare-and-set: the lease is checked and the job marked
SUCCEEDED with a new evaluation id in one conditional write, and only the caller that won it
stores the evaluation under that id, so a worker that lost its lease stores nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from prebake.core import request_ids
from prebake.core.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from prebake.core.evaluation_records import EvaluationWorkload, PriceInputs
from prebake.server import convert
from prebake.server import evaluation_messages as messages
from prebake.server.auth.request_rules import may_enqueue
from prebake.server.records import Artifact, EvaluationSpec, Job, JobPurpose
from prebake.server.services.evaluation_rpcs import EvaluationRpcs, checked_artifact_id, new_evaluation_id
from prebake.server.state import ServerState
from prebake.server.storage.evaluation_store import EvaluationQuery
from prebake.server.worker_liveness import WorkerLiveness
from prebake.v1 import evaluations_pb2, jobs_pb2, workers_pb2

# (check, spend) of the caller's job-creation rate limit (`prebake.server.rate_limits`).
Budget = tuple[Callable[[], None], Callable[[], None]]
MAX_LEVELS = 16
MAX_CONCURRENCY = 256
MAX_REQUESTS = 10_000
MAX_PROMPT_TOKENS = 1_000_000
MAX_OUTPUT_TOKENS = 100_000
# 0 in a request means this many tokens (prompt and output alike).
DEFAULT_TOKENS = 16
# How many of the artifact's evaluations a repeated completion reads looking for its own.
RETRY_SCAN = 100

ENQUEUE_REFUSED = (
    "this server lets readers only look up (reader_may_enqueue is off); evaluations are enqueued "
    "by publishers and admins"
)


def workload(request: jobs_pb2.EnqueueEvaluationRequest) -> EvaluationWorkload:
    """The request's workload, checked (`InvalidArgument` naming the field)."""
    w = request.workload
    prompt = w.prompt_tokens or DEFAULT_TOKENS
    output = w.output_tokens or DEFAULT_TOKENS
    for name, value, top in (
        ("prompt_tokens", prompt, MAX_PROMPT_TOKENS),
        ("output_tokens", output, MAX_OUTPUT_TOKENS),
        ("requests", w.requests, MAX_REQUESTS),
    ):
        if not 1 <= value <= top:
            raise messages.invalid(f"workload.{name}", f"{value}; expected 1-{top:,}")
    levels = list(w.concurrency_levels)
    if not 1 <= len(levels) <= MAX_LEVELS:
        raise messages.invalid(
            "workload.concurrency_levels", f"{len(levels)} levels; expected 1-{MAX_LEVELS}"
        )
    for i, level in enumerate(levels):
        if not 1 <= level <= MAX_CONCURRENCY:
            raise messages.invalid(
                f"workload.concurrency_levels[{i}]", f"{level}; a concurrency is 1-{MAX_CONCURRENCY}"
            )
        if level in levels[:i]:
            raise messages.invalid(f"workload.concurrency_levels[{i}]", f"concurrency {level} appears twice")
    # Run in ascending order (the load driver's order), so "1,4" and "4,1" are one evaluation.
    return EvaluationWorkload(prompt, output, w.requests, tuple(sorted(levels)))


def checked_discount(discount: float) -> float:
    if not (math.isfinite(discount) and 0 <= discount < 1):
        raise messages.invalid("discount_rate", f"{discount}; a discount is from 0 to below 1")
    return discount


class EvaluationJobs:
    """The two rpcs, over the server state and the registry's evaluation rpcs."""

    def __init__(self, state: ServerState, rpcs: EvaluationRpcs | None = None) -> None:
        self.s = state
        self.rpcs = rpcs or EvaluationRpcs(state)

    def price(self, artifact: Artifact, discount: float) -> PriceInputs:
        """The price inputs of an evaluation of `artifact` (its key's instance type)."""
        instance = artifact.key.instance_type
        if instance and instance in self.s.prices:
            return self.s.prices.price_inputs(instance, discount)
        # No price known: the evaluation is still measured, its prices are 0 (the proto says so).
        where = f"no price for {instance} in {self.s.prices.source}" if instance else "no instance type"
        return PriceInputs(instance, 0.0, discount, where)

    async def enqueue(
        self, artifact: Artifact, wanted: EvaluationWorkload, discount: float, budget: Budget | None = None
    ) -> jobs_pb2.EnqueueEvaluationResponse:
        """Enqueue (or join) the evaluation of `artifact`, which the caller found from the
        request after checking the request's fields (`workload`, `checked_discount`).

        `budget` (check, spend) is the caller's job-creation limit: checked unless an identical
        evaluation is in flight (a join costs nothing), spent when this call created the job.
        """
        s = self.s
        spec = EvaluationSpec(wanted, self.price(artifact, discount))
        if artifact.unavailable:
            raise FailedPrecondition(
                f"artifact {artifact.artifact_id} is unavailable ({artifact.unavailable}); "
                "it cannot be evaluated until it is rebuilt"
            )
        if not s.in_worker_grace:
            reason = WorkerLiveness.unserved_reason(
                await s.liveness.live(), artifact.key, JobPurpose.EVALUATE
            )
            if reason:
                raise FailedPrecondition(f"{reason}; nothing was enqueued")
        if not may_enqueue(s.config.reader_may_enqueue):
            raise PermissionDenied(ENQUEUE_REFUSED)
        if (
            budget is not None
            and await s.storage.jobs.active_evaluation(artifact.artifact_id, spec.digest) is None
        ):
            budget[0]()
        job, created = await s.lifecycle.create_or_join_evaluation(
            artifact.key,
            spec,
            model_source=await self.model_source(artifact),
            max_attempts=s.config.job_max_attempts,
            request_id=request_ids.current() or "",
        )
        if created:
            if budget is not None:
                budget[1]()
            s.hub.notify([job.job_id])
            s.work.fire()
        return jobs_pb2.EnqueueEvaluationResponse(job=convert.job(job), created=created)

    async def model_source(self, artifact: Artifact) -> str:
        """Where the worker reads the tokenizer from: the model's configured source, else the
        one the artifact's last compile job read (policy approved it then); "" for none."""
        source, _ = self.s.model_sources.resolve(artifact.key.model, "")
        if source:
            return source
        last = await self.s.storage.jobs.last_finished(artifact.artifact_id)
        return last.model_source if last is not None else ""

    async def complete(
        self, job_id: str, request: workers_pb2.CompleteEvaluationJobRequest
    ) -> workers_pb2.CompleteEvaluationJobResponse:
        """`CompleteEvaluationJob` of `job_id` (the request's, checked by the caller)."""
        s = self.s
        job = await s.storage.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        if job.purpose is not JobPurpose.EVALUATE or job.evaluation is None:
            raise InvalidArgument(f"job {job_id} is a compile job; complete it with CompleteJob")
        # Every check of the evaluation before the job changes: a refused one changes nothing.
        messages.check(request.evaluation, job.artifact_id)
        measured = sorted(level.concurrency for level in request.evaluation.levels)
        wanted = sorted(job.evaluation.workload.concurrency_levels)
        if measured != wanted:
            raise messages.invalid(
                "evaluation.levels", f"concurrencies {measured} are not the job's levels {wanted}"
            )
        done, changed = await s.lifecycle.complete_evaluation(
            job_id, request.fencing_token, new_evaluation_id()
        )
        if changed:
            s.metrics.jobs_finished([done])
            s.hub.notify([job_id])
        elif (found := await self._stored(done)) is not None:
            return workers_pb2.CompleteEvaluationJobResponse(job=convert.job(done), evaluation=found)
        try:
            stored = await self.rpcs.store(
                done.artifact_id,
                request.evaluation,
                f"worker:{done.worker}",
                evaluation_id=done.evaluation_id,
                request_id=done.request_id,
            )
        except NotFound:
            failed = await s.lifecycle.evaluation_not_stored(
                job_id, f"artifact {done.artifact_id} was deleted while it was evaluated"
            )
            s.hub.notify([job_id])
            raise FailedPrecondition(f"{failed.error}; the evaluation was not stored") from None
        return workers_pb2.CompleteEvaluationJobResponse(job=convert.job(done), evaluation=stored)

    async def _stored(self, job: Job) -> evaluations_pb2.Evaluation | None:
        """The evaluation a succeeded job stored, if it is stored (a repeated completion)."""
        page = await self.s.storage.evaluations.list_page(
            EvaluationQuery(artifact_id=job.artifact_id), "", RETRY_SCAN
        )
        for record in page.items:
            if record.evaluation_id == job.evaluation_id:
                return messages.evaluation(record)
        return None


def artifact_id_of(request: jobs_pb2.EnqueueEvaluationRequest) -> str:
    """The request's artifact id ("" when it names a key), checked."""
    if request.HasField("key") == bool(request.artifact_id):
        raise InvalidArgument("set `key` or `artifact_id` (one of them) to name the artifact to evaluate")
    return checked_artifact_id(request.artifact_id) if request.artifact_id else ""
