"""`prebake.v1.Registry`: lookup with single-flight enqueue, manifests, atomic publish."""

from __future__ import annotations

import time
from typing import Any

import grpc

from prebake.server import compat, convert
from prebake.server.errors import InvalidArgument, NotFound
from prebake.server.key_normalization import diff_keys, normalize_key
from prebake.server.records import ErrorClass, JobState, NormalizedKey
from prebake.server.services.blob_checks import require_present, verified_manifest
from prebake.server.state import ServerState
from prebake.server.status import unary
from prebake.v1 import registry_pb2, registry_pb2_grpc

MAX_MODEL_SOURCE = 1024
POLICIES = {
    registry_pb2.COMPATIBILITY_POLICY_LONGER_SEQUENCE: compat.Policy.LONGER_SEQUENCE,
    registry_pb2.COMPATIBILITY_POLICY_NEURONCORE_V2_FAMILY: compat.Policy.NEURONCORE_V2_FAMILY,
}
NEAREST = 5
Ctx = grpc.aio.ServicerContext[Any, Any]


def check_artifact_id(artifact_id: str) -> str:
    if len(artifact_id) != 32 or any(c not in "0123456789abcdef" for c in artifact_id):
        raise InvalidArgument(f"artifact id {artifact_id!r} is not a key digest (32 lowercase hex digits)")
    return artifact_id


def check_model_source(source: str) -> str:
    if len(source) > MAX_MODEL_SOURCE:
        raise InvalidArgument(f"model_source is {len(source)} characters; at most {MAX_MODEL_SOURCE}")
    if any(ord(c) < 32 for c in source):
        raise InvalidArgument("model_source contains control characters")
    return source


class RegistryService(registry_pb2_grpc.RegistryServicer):
    def __init__(self, state: ServerState) -> None:
        self.s = state

    def normalize(self, msg: Any) -> NormalizedKey:
        key = normalize_key(convert.key_request(msg), self.s.catalog, self.s.default_toolchains)
        self.s.models.check(key.model, key.kind)
        return key

    def nearest(self, key: NormalizedKey) -> list[registry_pb2.NearMiss]:
        return [
            registry_pb2.NearMiss(
                artifact_id=a.artifact_id,
                key=convert.resolved_key(a.key),
                differences=[
                    registry_pb2.FieldDifference(field=name, artifact_value=theirs, requested_value=ours)
                    for name, theirs, ours in diff_keys(a.key, key)
                ],
            )
            for a in self.s.registry.nearest(key, NEAREST)
        ]

    def _match(self, key: NormalizedKey, request: registry_pb2.LookupRequest) -> compat.Match | None:
        """The exact artifact, else the best one an allowed compatibility policy admits."""
        registry = self.s.registry
        found = registry.get_artifact(key.digest)
        if found is not None:
            return compat.Match(found, "exact", compat.exact_reason(key))
        allowed = [POLICIES[p] for p in request.allow if p in POLICIES]
        if not compat.applies(key, allowed):
            return None
        candidates = registry.compatible_candidates(key, compat.candidate_targets(key, allowed))
        match = compat.choose(key, candidates, allowed)
        if match is None:
            return None
        with_files = registry.get_artifact(match.artifact.artifact_id)
        return None if with_files is None else compat.Match(with_files, match.policy, match.reason)

    @unary
    async def Lookup(self, request: registry_pb2.LookupRequest, context: Ctx) -> registry_pb2.LookupResponse:
        key = self.normalize(request.key)
        model_source = check_model_source(request.model_source)
        s = self.s
        s.counters.lookups += 1
        resolved = convert.resolved_key(key)
        match = self._match(key, request)
        if match is not None:
            s.counters.hits += 1
            s.tracker.hit(match.artifact.artifact_id)
            return registry_pb2.LookupResponse(
                status=registry_pb2.LOOKUP_STATUS_HIT,
                key=resolved,
                artifact=convert.artifact(match.artifact),
                match_reason=match.reason,
                matched_policy=match.policy,
            )
        s.counters.misses += 1
        response = registry_pb2.LookupResponse(key=resolved, nearest=self.nearest(key))
        active = s.registry.active_job(key.digest)
        if active is not None:
            response.status = registry_pb2.LOOKUP_STATUS_COMPILING
            response.job.CopyFrom(convert.job(active))
            return response
        last = s.registry.last_finished_job(key.digest)
        if (
            last is not None
            and not request.force
            and last.state == JobState.FAILED
            and last.error_class == ErrorClass.DETERMINISTIC
            and last.finished_at is not None
            and time.time() - last.finished_at < s.config.negative_cache_seconds
        ):
            response.status = registry_pb2.LOOKUP_STATUS_FAILED
            response.job.CopyFrom(convert.job(last))
            response.error = last.error
            return response
        if request.on_miss == registry_pb2.ON_MISS_REPORT:
            response.status = registry_pb2.LOOKUP_STATUS_MISS
            response.error = "no artifact for this key; no job was created (on_miss=REPORT)"
            return response
        job, created = s.registry.create_or_join_job(key, model_source, s.config.job_max_attempts)
        if created:
            s.hub.notify([job.job_id])
            s.work.fire()
        response.status = registry_pb2.LOOKUP_STATUS_MISS if created else registry_pb2.LOOKUP_STATUS_COMPILING
        response.job.CopyFrom(convert.job(job))
        response.job_created = created
        return response

    @unary
    async def GetArtifact(
        self, request: registry_pb2.GetArtifactRequest, context: Ctx
    ) -> registry_pb2.Artifact:
        found = self.s.registry.get_artifact(check_artifact_id(request.artifact_id))
        if found is None:
            raise NotFound(f"no artifact {request.artifact_id}")
        return convert.artifact(found)

    @unary
    async def PublishArtifact(
        self, request: registry_pb2.PublishArtifactRequest, context: Ctx
    ) -> registry_pb2.PublishArtifactResponse:
        key = self.normalize(request.key)
        s = self.s
        files, producer, digests = await verified_manifest(s, request.files, request.producer)
        require_present(s, digests)  # no await from here to the registry write
        stored, created, completed = s.registry.publish(key, files, producer, replace=request.replace)
        s.hub.notify(j.job_id for j in completed)
        return registry_pb2.PublishArtifactResponse(
            artifact=convert.artifact(stored),
            created=created,
            completed_job_ids=[j.job_id for j in completed],
        )
