"""`Registry.Recommend`: gathers a model's evaluated artifacts and answers
`prebake.server.recommend`'s ranking (which holds every rule); `RegistryService` delegates here."""

from __future__ import annotations

import math

from prebake.core import names
from prebake.core.errors import FailedPrecondition, InvalidArgument, InvalidKey
from prebake.server import compat, convert, evaluation_messages, recommend
from prebake.server.key_normalization import DEFAULT_TOOLCHAINS, KeyRequest, check_model, normalize_key
from prebake.server.records import Artifact, Evaluation, NormalizedKey
from prebake.server.state import ServerState
from prebake.server.storage.evaluation_store import EvaluationQuery
from prebake.v1 import evaluations_pb2, key_pb2, registry_pb2

OBJECTIVES = {
    evaluations_pb2.OBJECTIVE_LATENCY: recommend.Objective.LATENCY,
    evaluations_pb2.OBJECTIVE_THROUGHPUT: recommend.Objective.THROUGHPUT,
    evaluations_pb2.OBJECTIVE_COST: recommend.Objective.COST,
}
POLICIES = {
    registry_pb2.COMPATIBILITY_POLICY_LONGER_SEQUENCE: compat.Policy.LONGER_SEQUENCE,
    registry_pb2.COMPATIBILITY_POLICY_NEURONCORE_V2_FAMILY: compat.Policy.NEURONCORE_V2_FAMILY,
}
POLICY_VALUES = {policy: value for value, policy in POLICIES.items()}
DEFAULT_LIMIT = 10
MAX_LIMIT = 100
MAX_INSTANCE_TYPES = 32
MAX_EXCLUDED = 20
# Bounds one recommendation's reads: a model's newest evaluations, per name it is stored under.
MAX_EVALUATIONS = 2000
PAGE = 500


def invalid(field: str, message: str) -> InvalidArgument:
    """InvalidArgument about `field` (the BadRequest detail names it; the message names it in
    backquotes, or is about its value, so the CLI can show its flag)."""
    error = InvalidArgument(message)
    error.field = field
    return error


class RecommendRpc:
    def __init__(self, state: ServerState) -> None:
        self.s = state

    def normalize(self, request: KeyRequest) -> NormalizedKey:
        """Keys of stored artifacts, re-stated: the toolchain is always given, so no resolution."""
        return normalize_key(request, self.s.catalog, DEFAULT_TOOLCHAINS, self.s.models)

    def model_name(self, stated: str) -> str:
        """The canonical name of the model `stated` names, after the key's checks of a model
        (characters, length; an unknown JumpStart id is refused with the closest ones)."""
        model = self.s.models.canonical_name(check_model(stated))
        self.s.models.check(model, "")
        return model

    def _checked(
        self, request: registry_pb2.RecommendRequest
    ) -> tuple[str, str, list[str], recommend.Objective, recommend.Limits, list[compat.Policy], int]:
        """Every check before any read (a refused request costs no database round trip)."""
        if request.objective not in OBJECTIVES:
            if request.objective == evaluations_pb2.OBJECTIVE_UNSPECIFIED:
                values = "OBJECTIVE_LATENCY, OBJECTIVE_THROUGHPUT or OBJECTIVE_COST"
                raise invalid("objective", f"`objective` is required: {values}")
            raise invalid("objective", f"`objective`: unknown Objective value {request.objective}")
        objective = OBJECTIVES[request.objective]
        kind = ""
        if request.kind:
            try:
                convert.enum_value(key_pb2.ArtifactKind.DESCRIPTOR, request.kind, "kind")
            except InvalidArgument as exc:
                raise invalid("kind", str(exc)) from None
            kind = convert.kind_name(request.kind)
        model = self.model_name(request.model)
        if len(request.instance_types) > MAX_INSTANCE_TYPES:
            count = len(request.instance_types)
            raise invalid("instance_types", f"`instance_types`: {count} given; at most {MAX_INSTANCE_TYPES}")
        instance_types = []
        for i, name in enumerate(request.instance_types):
            try:
                instance_types.append(self.s.catalog.get(name).name)
            except InvalidKey as exc:
                raise invalid(f"instance_types[{i}]", str(exc)) from None
        for name, value in (("max_ttft_ms", request.max_ttft_ms), ("max_itl_ms", request.max_itl_ms)):
            if not math.isfinite(value) or value < 0:
                raise invalid(name, f"`{name}` {value} must be a finite number of ms, 0 (no limit) or more")
        if request.concurrency < 0:
            raise invalid("concurrency", f"`concurrency` {request.concurrency} is negative (0: any level)")
        if request.sequence_length < 0:
            raise invalid("sequence_length", f"`sequence_length` {request.sequence_length} is negative")
        allowed = []
        for i, policy in enumerate(request.allow):
            try:
                convert.enum_value(registry_pb2.CompatibilityPolicy.DESCRIPTOR, policy, f"allow[{i}]")
            except InvalidArgument as exc:
                exc.field = f"allow[{i}]"
                raise
            if policy in POLICIES:
                allowed.append(POLICIES[policy])
        if request.limit == 0:
            limit = DEFAULT_LIMIT
        elif 1 <= request.limit <= MAX_LIMIT:
            limit = request.limit
        else:
            raise invalid("limit", f"`limit` {request.limit} is outside 1-{MAX_LIMIT} (0: {DEFAULT_LIMIT})")
        limits = recommend.Limits(request.max_ttft_ms, request.max_itl_ms, request.concurrency)
        return model, kind, instance_types, objective, limits, allowed, limit

    async def _newest_evaluations(self, model: str, stated: str) -> dict[str, Evaluation]:
        """artifact id -> its newest evaluation, over every name the model's artifacts may carry."""
        names = dict.fromkeys((model, *self.s.models.other_names(model), stated))
        newest: dict[str, Evaluation] = {}
        store = self.s.storage.evaluations
        for name in names:
            token, read = "", 0
            while read < MAX_EVALUATIONS:
                page = await store.list_page(EvaluationQuery(model=name), token, PAGE)
                read += len(page.items)
                for e in page.items:
                    known = newest.get(e.artifact_id)
                    if known is None or (e.created_at, e.evaluation_id) > (
                        known.created_at,
                        known.evaluation_id,
                    ):
                        newest[e.artifact_id] = e
                token = page.next_token
                if not token:
                    break
        return newest

    async def answer(self, request: registry_pb2.RecommendRequest) -> registry_pb2.RecommendResponse:
        model, kind, instance_types, objective, limits, allowed, limit = self._checked(request)
        newest = await self._newest_evaluations(model, request.model)
        candidates: list[recommend.Candidate] = []
        excluded: list[recommend.Excluded] = []
        for artifact_id in sorted(newest):
            artifact = await self.s.storage.artifacts.get(artifact_id)
            why = self._unservable(artifact, kind)
            if artifact is None or why:
                excluded.append(recommend.Excluded(artifact_id, why or "deleted meanwhile", 0))
                continue
            serves = recommend.serving(
                artifact, instance_types, request.sequence_length, allowed, self.normalize
            )
            if isinstance(serves, str):
                excluded.append(recommend.Excluded(artifact_id, serves, 0))
                continue
            candidates.append(recommend.Candidate(artifact, newest[artifact_id], serves))
        outcome = recommend.rank(candidates, objective, limits)
        excluded.extend(outcome.excluded)
        if not outcome.ranked:
            raise FailedPrecondition(recommend.refusal(model, objective, limits, len(newest), excluded))
        return await self.s.run_blocking(
            lambda: registry_pb2.RecommendResponse(
                model=model,
                candidates=[self._candidate(i + 1, r) for i, r in enumerate(outcome.ranked[:limit])],
                excluded=[
                    registry_pb2.RecommendExclusion(artifact_id=e.artifact_id, reason=e.reason)
                    for e in excluded[:MAX_EXCLUDED]
                ],
                considered=len(newest),
            )
        )

    def _unservable(self, artifact: Artifact | None, kind: str) -> str:
        if artifact is None:
            return ""
        if kind and artifact.key.kind != kind:
            return f"kind {artifact.key.kind}, not {kind}"
        if artifact.unavailable:
            return f"unavailable: {artifact.unavailable}"
        signer = self.s.signatures.revoked_signer(artifact)
        if signer is not None:
            return f"signed by revoked key {signer}"
        return ""

    @staticmethod
    def _candidate(rank: int, r: recommend.Ranked) -> registry_pb2.RecommendCandidate:
        c = r.candidate
        wanted = c.serving.request
        return registry_pb2.RecommendCandidate(
            rank=rank,
            artifact_id=c.artifact.artifact_id,
            key=convert.resolved_key(c.artifact.key),
            ensure_key=key_pb2.ArtifactKey(
                kind=names.kind_to_proto(wanted.kind),
                model=wanted.model,
                model_revision=wanted.model_revision,
                instance_type=wanted.instance_type,
                sequence_length=wanted.sequence_length,
                batch_size=wanted.batch_size,
                tensor_parallel_degree=wanted.tensor_parallel_degree,
                precision=wanted.precision,
                toolchain=wanted.toolchain,
                options=dict(wanted.options),
            ),
            ensure_allow=[POLICY_VALUES[p] for p in c.serving.policies],
            evaluation_id=c.evaluation.evaluation_id,
            evaluation_created_at=convert.timestamp(c.evaluation.created_at),
            level=evaluation_messages.level_metrics(r.level),
            objective_value=r.value,
            blended_price_per_million_tokens=r.price,
            reasons=list(r.reasons),
            measured_on=recommend.measured_on(c.evaluation),
        )
