"""`prebake.v1.Registry`: lookup with single-flight enqueue, manifests, atomic publish."""

from __future__ import annotations

import time
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from prebake.core import request_ids
from prebake.core.errors import InvalidArgument, NotFound
from prebake.server import compat, convert, nearest
from prebake.server.auth.request_rules import ENQUEUE_REFUSED, may_enqueue, require_replace_allowed
from prebake.server.bounded import Bounded
from prebake.server.key_normalization import DEFAULT_TOOLCHAINS, diff_keys, normalize_key, with_model
from prebake.server.lookup_memo import (
    CAPACITY,
    Answer,
    Answers,
    JobMessages,
    KnownKey,
    LiveToolchain,
    ManifestMessages,
    WorkersSeen,
)
from prebake.server.nearest_memo import MISS_FRESH_SECONDS, NearestMemo
from prebake.server.rate_limits import RateLimit, caller
from prebake.server.records import Artifact, Digest, ErrorClass, Job, JobState, NormalizedKey
from prebake.server.services.blob_checks import (
    checked_signature,
    require_present,
    superseded,
    verified_manifest,
)
from prebake.server.services.evaluation_rpcs import EvaluationRpcs
from prebake.server.services.recommend_rpc import RecommendRpc
from prebake.server.signatures import revoked_message
from prebake.server.state import ServerState
from prebake.server.status import unary
from prebake.server.worker_liveness import WorkerLiveness
from prebake.v1 import evaluations_pb2, key_pb2, registry_pb2, registry_pb2_grpc

POLICIES = {
    registry_pb2.COMPATIBILITY_POLICY_LONGER_SEQUENCE: compat.Policy.LONGER_SEQUENCE,
    registry_pb2.COMPATIBILITY_POLICY_NEURONCORE_V2_FAMILY: compat.Policy.NEURONCORE_V2_FAMILY,
}
POLICY_VALUES = {policy: value for value, policy in POLICIES.items()}
NEAREST = 5
Ctx = grpc.aio.ServicerContext[Any, Any]


def check_artifact_id(artifact_id: str) -> str:
    if len(artifact_id) != 32 or any(c not in "0123456789abcdef" for c in artifact_id):
        raise InvalidArgument(f"artifact id {artifact_id!r} is not a key digest (32 lowercase hex digits)")
    return artifact_id


class RegistryService(registry_pb2_grpc.RegistryServicer):
    def __init__(self, state: ServerState) -> None:
        self.s = state
        c = state.config
        self.job_creations = RateLimit("compile jobs created", c.job_create_burst, c.job_create_per_minute)
        self.near: NearestMemo[list[registry_pb2.NearMiss]] = NearestMemo()
        self.keys: Bounded[bytes, KnownKey] = Bounded(CAPACITY)
        self.manifests = ManifestMessages()
        self.answers = Answers()
        self.job_messages = JobMessages()
        self.evaluations = EvaluationRpcs(state)
        self.recommendations = RecommendRpc(state)

    async def normalize(self, msg: Any) -> tuple[NormalizedKey, str]:
        """The key, and where its toolchain came from (see LookupResponse.toolchain_source)."""
        known = await self.known_key(msg)
        return known.key, known.toolchain_source

    async def known_key(self, msg: key_pb2.ArtifactKey) -> KnownKey:
        """`normalize`, answered from the memo when the same key message was seen and what
        it depended on is unchanged (see `prebake.server.lookup_memo`)."""
        raw = msg.SerializeToString()
        known = self.keys.get(raw)
        if known is not None and await self._still_offered(known.live_toolchain):
            return known
        request = convert.key_request(msg)
        live_toolchain: LiveToolchain | None = None
        if request.toolchain:
            key = normalize_key(request, self.s.catalog, DEFAULT_TOOLCHAINS, self.s.models)
            source = "requested"
        else:
            configured = self.s.configured_toolchains
            # Read before normalising (which is synchronous); cached, so a hit rarely
            # pays for it.
            live = await self.s.liveness.live()
            sources: list[str] = []

            def resolve(kind: str, compile_target: str) -> str:
                nonlocal live_toolchain
                if kind in configured:
                    sources.append("configured default")
                    return configured[kind]
                newest = WorkerLiveness.newest_toolchain(live, kind, compile_target)
                live_toolchain = (kind, compile_target, newest)
                if newest is not None:
                    sources.append(f"newest toolchain of a live worker ({newest[1]})")
                    return newest[0]
                sources.append("built-in default")
                return DEFAULT_TOOLCHAINS.get(kind, "")

            key = normalize_key(request, self.s.catalog, resolve, self.s.models)
            source = sources[0] if sources else "built-in default"
        self.s.models.check(key.model, key.kind)
        known = KnownKey(key, source, convert.resolved_key(key), live_toolchain)
        self.keys.put(raw, known)
        return known

    async def _still_offered(self, live_toolchain: LiveToolchain | None) -> bool:
        """Whether the live workers offer what they offered when a key was normalised."""
        if live_toolchain is None:
            return True
        kind, target, offered = live_toolchain
        return WorkerLiveness.newest_toolchain(await self.s.liveness.live(), kind, target) == offered

    def stored_as(self, key: NormalizedKey, stated: str = "") -> list[NormalizedKey]:
        """`key` as artifacts stored before model names were canonical may be keyed: under
        each other name of its model, and as `stated` in the request (normalise on read: no
        migration rewrites them; see prebake.server.key_normalization)."""
        names = dict.fromkeys((*self.s.models.other_names(key.model), stated))
        return [with_model(key, name) for name in names if name and name != key.model]

    async def exact_artifact(self, key: NormalizedKey, stated: str) -> Artifact | None:
        """The artifact stored for exactly `key`, under its canonical model name or, as
        `stored_as` says, under another name of the model (`stated`: the request's)."""
        index = self.s.storage.artifacts
        found = await index.get(key.digest)
        if found is not None:  # the usual case: the other names are worked out only when needed
            return found
        for candidate in self.stored_as(key, stated):
            found = await index.get(candidate.digest)
            if found is not None:
                return found
        return None

    async def nearest(self, key: NormalizedKey) -> list[registry_pb2.NearMiss]:
        index = self.s.storage.artifacts
        ranked = await nearest.nearest(index, key, NEAREST)
        for old in self.stored_as(key):  # the model's artifacts stored under its other names
            others = await nearest.nearest(index, old, NEAREST)
            ranked = nearest.rank_nearest([*ranked, *others], key, NEAREST)
        found = []
        for a in ranked:
            if a.artifact_id == key.digest:  # the key's own artifact, unavailable: no "near miss"
                continue
            differences = diff_keys(a.key, key)
            found.append(
                registry_pb2.NearMiss(
                    artifact_id=a.artifact_id,
                    key=convert.resolved_key(a.key),
                    differences=[
                        registry_pb2.FieldDifference(field=name, artifact_value=theirs, requested_value=ours)
                        for name, theirs, ours in differences
                    ],
                    would_hit_with=[
                        POLICY_VALUES[p] for p in compat.would_hit_with(key, a, (d[0] for d in differences))
                    ],
                )
            )
        return found

    async def _match(
        self, key: NormalizedKey, request: registry_pb2.LookupRequest, refused: list[str]
    ) -> compat.Match | None:
        """The exact artifact, else the best one an allowed compatibility policy admits.

        Artifacts signed by a revoked key are not matched; why is appended to `refused`.
        """
        index = self.s.storage.artifacts
        found = await self.exact_artifact(key, request.key.model)
        # An artifact one of whose blobs is lost never hits (see prebake.server.integrity).
        if found is not None and not found.unavailable:
            signer = self.s.signatures.revoked_signer(found)
            if signer is None:
                return compat.Match(found, "exact", compat.exact_reason(key))
            refused.append(revoked_message(found.artifact_id, signer))
        allowed = [POLICIES[p] for p in request.allow if p in POLICIES]
        if not compat.applies(key, allowed):
            return None
        candidates = await nearest.compatible_candidates(index, key, compat.candidate_targets(key, allowed))
        match = compat.choose(key, [c for c in candidates if not c.unavailable], allowed)
        if match is None:
            return None
        with_files = await index.get(match.artifact.artifact_id)
        if with_files is None or with_files.unavailable:
            return None
        signer = self.s.signatures.revoked_signer(with_files)
        if signer is not None:
            refused.append(revoked_message(with_files.artifact_id, signer))
            return None
        return compat.Match(with_files, match.policy, match.reason)

    def _manifest(
        self, found: Artifact, direct_download: bool, into: registry_pb2.Artifact | None = None
    ) -> registry_pb2.Artifact:
        """The artifact as sent, with presigned download URLs when asked for and possible;
        filled into `into` (an empty message, such as a response's field) when given."""
        sent = registry_pb2.Artifact() if into is None else into
        self.manifests.fill(sent, found)
        seconds = self.s.config.presign_seconds
        if not direct_download or seconds <= 0 or not self.s.blobs.presigns:
            return sent
        expires = Timestamp()
        expires.FromNanoseconds(int((time.time() + seconds) * 1e9))
        urls: dict[Digest, str | None] = {}
        for entry, file in zip(sent.files, found.files, strict=True):
            if file.digest not in urls:
                urls[file.digest] = self.s.blobs.download_url(file.digest, seconds)
            url = urls[file.digest]
            if url is None:
                return sent  # this store cannot presign; nothing to add
            entry.download_url = url
            entry.download_url_expires_at.CopyFrom(expires)
        return sent

    async def _unserved_reason(self, key: NormalizedKey) -> str:
        """Why no live worker could run a job for `key` ("" if one can, or during start-up grace)."""
        if self.s.in_worker_grace:
            return ""
        return WorkerLiveness.unserved_reason(await self.s.liveness.live(), key)

    async def _unserved(self, key: NormalizedKey, job: Job) -> tuple[str, Job]:
        """Why no live worker can take `job` ("" if one can, or during start-up grace),
        and the job as it is now.

        The reason also becomes the job's message, so watchers and `prebake jobs` see it.
        """
        s = self.s
        reason = await self._unserved_reason(key)
        if reason and job.state == JobState.QUEUED and job.message != reason:
            job = await s.lifecycle.set_message(job.job_id, reason)
            s.hub.notify([job.job_id])
        return reason, job

    def _refuse_other_source(self, job: Job, model_source: str, named: bool) -> None:
        """A joiner joins the job's source too: naming another one is FAILED_PRECONDITION
        (not a silent join). A lookup that names none joins whatever the job reads."""
        if named:
            conflict = self.s.model_sources.conflict(job.job_id, job.model_source, model_source)
            if conflict is not None:
                raise conflict

    def _count_hit(self, artifact_id: str, policy: str) -> None:
        s = self.s
        s.counters.lookups += 1
        s.counters.hits += 1
        s.tracker.lookup()
        s.tracker.hit(artifact_id)
        s.metrics.lookup("hit", policy)

    def _count_miss(self) -> None:
        """Count a lookup that did not hit; the metrics count it by outcome, once known."""
        s = self.s
        s.counters.lookups += 1
        s.counters.misses += 1
        s.tracker.lookup()

    async def _workers_seen(self) -> WorkersSeen:
        """What a join's `unserved_reason` depends on (`Answer.workers`): the live workers as
        this replica sees them (its cache of them may lag behind the marker) and the grace."""
        live = await self.s.liveness.live()
        return self.s.in_worker_grace, tuple((w.worker_id, w.capabilities) for w in live)

    async def _reusable(self, answer: Answer) -> bool:
        return await self._still_offered(answer.live_toolchain) and (
            answer.workers is None or answer.workers == await self._workers_seen()
        )

    @unary
    async def Lookup(self, request: registry_pb2.LookupRequest, context: Ctx) -> registry_pb2.LookupResponse:
        # A repeated hit or join is answered as it was while nothing stored has changed since
        # (see `prebake.server.lookup_memo`): the same bytes were valid then and are now.
        marker = self.s.storage.artifacts.change_marker()
        raw = b""
        if marker is not None:
            raw = request.SerializeToString()
            reused = self.answers.get(raw, marker)
            if reused is not None and await self._reusable(reused):
                if reused.artifact_id:
                    self._count_hit(reused.artifact_id, reused.policy)
                else:
                    self._count_miss()
                    self.s.metrics.lookup("compiling", "joined")
                return reused.response
        # Before anything else: an on_miss this server does not know must not enqueue.
        convert.enum_value(registry_pb2.OnMiss.DESCRIPTOR, request.on_miss, "on_miss")
        for i, policy in enumerate(request.allow):
            convert.enum_value(registry_pb2.CompatibilityPolicy.DESCRIPTOR, policy, f"allow[{i}]")
        known = await self.known_key(request.key)
        key, toolchain_source, resolved = known.key, known.toolchain_source, known.resolved
        s = self.s
        # Policy, not input: the source a job would read (see `prebake.server.model_sources`).
        model_source, named = s.model_sources.resolve(key.model, request.model_source)
        refused: list[str] = []
        match = await self._match(key, request, refused)
        if match is not None:
            self._count_hit(match.artifact.artifact_id, match.policy)
            hit = registry_pb2.LookupResponse(
                status=registry_pb2.LOOKUP_STATUS_HIT,
                key=resolved,
                match_reason=match.reason,
                matched_policy=match.policy,
                toolchain_source=toolchain_source,
            )
            # Filled in place: passed to the constructor, the manifest would be copied once more.
            self._manifest(match.artifact, request.direct_download, into=hit.artifact)
            if marker is not None and not any(f.download_url for f in hit.artifact.files):
                artifact_id = match.artifact.artifact_id
                self.answers.put(raw, Answer(hit, artifact_id, match.policy, marker, known.live_toolchain))
            return hit
        self._count_miss()
        jobs = s.storage.jobs
        active = await jobs.active(key.digest)
        if active is not None:
            self._refuse_other_source(active, model_source, named)
        # Joiners of an in-flight job share the near-miss list computed as it began (by
        # the lookup that created it); a stampede of plain misses shares one computation.
        since = active.created_at if active is not None else time.time()
        near = await self.near.get(key.digest, lambda: self.nearest(key), since - MISS_FRESH_SECONDS)
        response = registry_pb2.LookupResponse(
            key=resolved, nearest=near, toolchain_source=toolchain_source, error="; ".join(refused)
        )
        if active is not None:
            response.status = registry_pb2.LOOKUP_STATUS_COMPILING
            s.metrics.lookup("compiling", "joined")
            workers = await self._workers_seen()
            response.unserved_reason, active = await self._unserved(key, active)
            self.job_messages.fill(response.job, active)
            if marker is not None:
                # A join that changed the job's message moved the marker: it is not reused.
                self.answers.put(raw, Answer(response, "", "", marker, known.live_toolchain, workers))
            return response
        last = await jobs.last_finished(key.digest)
        if (
            last is not None
            and not request.force
            and last.state == JobState.FAILED
            and last.error_class == ErrorClass.DETERMINISTIC
            and last.finished_at is not None
            and time.time() - last.finished_at < s.config.negative_cache_seconds
        ):
            response.status = registry_pb2.LOOKUP_STATUS_FAILED
            s.metrics.lookup("failed", "negative_cache")
            self.job_messages.fill(response.job, last)
            response.error = last.error
            return response
        if request.on_miss == registry_pb2.ON_MISS_REPORT:
            # The caller asked for no job: an ordinary answer, so `error` stays empty.
            response.status = registry_pb2.LOOKUP_STATUS_MISS
            s.metrics.lookup("miss", "report_only")
            # Whether a job would be taken, so a report-only caller (a dry run) can tell
            # "would compile" from "no capable worker" without creating anything.
            response.unserved_reason = await self._unserved_reason(key)
            return response
        if not may_enqueue(s.config.reader_may_enqueue):
            response.status = registry_pb2.LOOKUP_STATUS_MISS
            s.metrics.lookup("miss", "enqueue_refused")
            response.error = ENQUEUE_REFUSED
            return response
        # A miss that would enqueue needs a job creation left in the caller's bucket, and
        # spends it if it created the job (a join costs nothing).
        who = caller(context)
        self.job_creations.check(who)
        job, created = await s.lifecycle.create_or_join(
            key, model_source, s.config.job_max_attempts, request_id=request_ids.current() or ""
        )
        if not created:  # created concurrently by another lookup since `active` above
            self._refuse_other_source(job, model_source, named)
        if created:
            self.job_creations.spend(who)
            s.hub.notify([job.job_id])
            s.work.fire()
        response.status = registry_pb2.LOOKUP_STATUS_MISS if created else registry_pb2.LOOKUP_STATUS_COMPILING
        s.metrics.lookup(*(("miss", "enqueued") if created else ("compiling", "joined")))
        response.unserved_reason, job = await self._unserved(key, job)
        self.job_messages.fill(response.job, job)
        response.job_created = created
        return response

    @unary
    async def GetArtifact(
        self, request: registry_pb2.GetArtifactRequest, context: Ctx
    ) -> registry_pb2.Artifact:
        found: Artifact | None
        if request.HasField("key"):
            found = await self._artifact_of_key(request)
        else:
            found = await self.s.storage.artifacts.get(check_artifact_id(request.artifact_id))
        if found is None:
            raise NotFound(f"no artifact {request.artifact_id}")
        self.s.signatures.refuse_revoked(found)
        sent = self._manifest(found, request.direct_download)
        # Here only: hits (`Lookup`) and listings stay small (see `Artifact.evaluations`).
        sent.evaluations.extend(await self.evaluations.of_artifact(found.artifact_id))
        return sent

    async def _artifact_of_key(self, request: registry_pb2.GetArtifactRequest) -> Artifact:
        if request.artifact_id:
            raise InvalidArgument("set `artifact_id` or `key`, not both")
        key, _ = await self.normalize(request.key)
        found = await self.exact_artifact(key, request.key.model)
        if found is None:
            raise NotFound(f"no artifact for this key (key digest {key.digest})")
        return found

    @unary
    async def PublishArtifact(
        self, request: registry_pb2.PublishArtifactRequest, context: Ctx
    ) -> registry_pb2.PublishArtifactResponse:
        require_replace_allowed(request.replace)
        key, _ = await self.normalize(request.key)
        s = self.s
        files, producer, digests = await verified_manifest(s, request.files, request.producer)
        signature = checked_signature(s, key, files, request)
        async with s.blob_refs:
            require_present(s, digests)
            stored, created, completed = await s.lifecycle.publish(
                key,
                files,
                producer,
                request.replace,
                force=request.force,
                signature=signature,
                supersede=superseded(s),
            )
        s.hub.notify(j.job_id for j in completed)
        return await s.run_blocking(
            lambda: registry_pb2.PublishArtifactResponse(
                artifact=convert.artifact(stored),
                created=created,
                completed_job_ids=[j.job_id for j in completed],
            )
        )

    @unary
    async def ListEvaluations(
        self, request: registry_pb2.ListEvaluationsRequest, context: Ctx
    ) -> registry_pb2.ListEvaluationsResponse:
        return await self.evaluations.list(request)

    @unary
    async def ImportEvaluation(
        self, request: registry_pb2.ImportEvaluationRequest, context: Ctx
    ) -> evaluations_pb2.Evaluation:
        return await self.evaluations.import_(request)

    @unary
    async def Recommend(
        self, request: registry_pb2.RecommendRequest, context: Ctx
    ) -> registry_pb2.RecommendResponse:
        return await self.recommendations.answer(request)
