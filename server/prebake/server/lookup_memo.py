"""What a repeated lookup reuses instead of recomputing: whole hit answers, normalised keys,
manifest messages and job messages.

A hit's own work is a point read; before these memos most of its time went to normalising
the same key message again and building the same manifest message again (issue 10: +265 µs
of Python per hit). Both memos are per process and bounded; neither can serve anything
stale, because each entry says what it depends on and is checked against it on every use:

- a normalised key depends only on the key message, except for the toolchain a live worker
  supplies when the request and the configuration name none (checked against the live
  workers at every use);
- a manifest message is fixed for as long as its artifact's (manifest_digest, created_at)
  is (a replace writes a new row); the few fields that change without a new manifest
  (pin, hit counts, availability) are set on every use from the artifact just read;
- a whole answer, a hit or the join of a compile in flight, depends on the request's bytes,
  what is stored (artifacts, jobs, workers; everything else it reads is fixed
  configuration: catalogs, revoked signers, policies), on live workers' toolchains like a
  normalised key, and for a join also on which workers are live and whether start-up grace
  is over (its `unserved_reason`). It is reused only while the storage's change marker
  (`ArtifactIndex.change_marker`, read before the answer was computed) is unchanged, so
  after any commit, by any process (a publish, a pin, a hit-count flush, a job's progress,
  a worker's heartbeat), the next lookup is computed afresh; storage that cannot tell gets
  nothing reused. Answers with download URLs are never kept (their URLs expire);
- a job message is fixed for as long as the job's (revision, updated_at) is: every stored
  change bumps the revision (`Job.revision`), so the joiners of one compile (a stampede of
  misses) build its message once.

Thread safety: event-loop only (like the services that own them).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from prebake.server import convert
from prebake.server.bounded import Bounded
from prebake.server.records import Artifact, Job, NormalizedKey, WorkerCapability
from prebake.v1 import jobs_pb2, key_pb2, registry_pb2

CAPACITY = 4096
# A live toolchain a key's normalisation depended on (see KnownKey.live_toolchain).
LiveToolchain = tuple[str, str, tuple[str, str] | None]


@dataclass(frozen=True)
class KnownKey:
    """A key message's normalisation, and the one input it may depend on besides the message.

    `live_toolchain` is None when the key's toolchain came from the request or the
    configuration; otherwise (kind, compile target, what the live workers offered then: the
    newest (toolchain, worker id) or None), to be compared with what they offer now.
    """

    key: NormalizedKey
    toolchain_source: str
    resolved: key_pb2.ResolvedKey
    live_toolchain: LiveToolchain | None


# Answers kept: the keys a fleet deploys again and again are few. Answers with more files
# than ANSWER_MAX_FILES are not kept: their serialisation, not their computation, dominates
# their cost, and the memo stays small (at most about 10 MB).
ANSWER_CAPACITY = 1024
# (start-up grace still on, (worker id, capabilities) of each live worker): see Answer.workers.
WorkersSeen = tuple[bool, tuple[tuple[str, tuple[WorkerCapability, ...]], ...]]
ANSWER_MAX_FILES = 64


@dataclass(frozen=True)
class Answer:
    """A lookup's response, what a reuse must count again, and what it depended on.

    `artifact_id` and `policy`: a hit's (counted as a hit again); empty for a join.
    `workers`: for a join, (start-up grace still on, the live workers and what they serve)
    then; None for a hit, which depends on neither.
    """

    response: registry_pb2.LookupResponse  # never changed once kept: it is sent as it is
    artifact_id: str
    policy: str
    marker: Hashable
    live_toolchain: LiveToolchain | None
    workers: WorkersSeen | None = None


class Answers:
    """Lookup responses by request bytes, valid while the storage's change marker is unchanged."""

    def __init__(self, capacity: int = ANSWER_CAPACITY) -> None:
        self._answers: Bounded[bytes, Answer] = Bounded(capacity)

    def get(self, request: bytes, marker: Hashable) -> Answer | None:
        answer = self._answers.get(request)
        return answer if answer is not None and answer.marker == marker else None

    def put(self, request: bytes, answer: Answer) -> None:
        if len(answer.response.artifact.files) <= ANSWER_MAX_FILES:
            self._answers.put(request, answer)


class ManifestMessages:
    """The `registry_pb2.Artifact` of recently sent artifacts, rebuilt only for a new manifest."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self._messages: Bounded[str, tuple[str, float, registry_pb2.Artifact]] = Bounded(capacity)

    def fill(self, into: registry_pb2.Artifact, found: Artifact) -> None:
        """Make `into` (an empty message) the manifest of `found`, as `convert.artifact` would."""
        known = self._messages.get(found.artifact_id)
        if known is None or known[0] != found.manifest_digest or known[1] != found.created_at:
            message = convert.artifact(found)
            self._messages.put(found.artifact_id, (found.manifest_digest, found.created_at, message))
            into.CopyFrom(message)
            return
        into.CopyFrom(known[2])
        # What changes without a new manifest: see SqliteArtifactIndex's `_VOLATILE_SQL`.
        into.pinned = found.pinned
        into.hit_count = found.hit_count
        into.last_accessed_at.FromNanoseconds(int(found.last_accessed_at * 1e9))
        into.unavailable = found.unavailable


class JobMessages:
    """The `jobs_pb2.Job` of recently sent jobs, rebuilt only once the job has changed."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self._messages: Bounded[str, tuple[int, float, jobs_pb2.Job]] = Bounded(capacity)

    def fill(self, into: jobs_pb2.Job, job: Job) -> None:
        """Make `into` (an empty message) the message of `job`, as `convert.job` would."""
        known = self._messages.get(job.job_id)
        if known is not None and known[:2] == (job.revision, job.updated_at):
            into.CopyFrom(known[2])
            return
        message = convert.job(job)
        if job.revision:  # 0: a job not read from the queue, which nothing vouches for
            self._messages.put(job.job_id, (job.revision, job.updated_at, message))
        into.CopyFrom(message)
