"""Domain records shared by the registry, the blob stores and the services.

Plain frozen dataclasses, independent of gRPC and SQLite, so every layer can be tested
on its own. Times are UNIX seconds (float).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from prebake.core.digests import hash_bytes, hash_problem
from prebake.core.errors import InvalidArgument
from prebake.core.evaluation_records import EvaluationHost, EvaluationWorkload, LevelMetrics, PriceInputs
from prebake.core.signing import Signature


@dataclass(frozen=True, order=True)
class Digest:
    """A blob's identity: xxh3-128 hex digest (32 lowercase hex digits) and size."""

    hash: str
    size: int

    def __post_init__(self) -> None:
        problem = hash_problem(self.hash)
        if problem is not None:
            raise InvalidArgument(f"digest hash {problem}")
        if self.size < 0:
            raise InvalidArgument(f"digest size {self.size} is negative")

    def __str__(self) -> str:
        return f"{self.hash}/{self.size}"


@dataclass(frozen=True)
class NormalizedKey:
    """An artifact key after normalisation (see `prebake.server.key_normalization`).

    Fields irrelevant to the kind are cleared ("" or 0). `canonical` is the exact text
    that was hashed; `digest` is its xxh3-128 hex digest and the key's identity.
    """

    schema_version: int
    kind: str  # "neuron" | "awq" | "inductor"
    model: str
    model_revision: str
    instance_type: str
    compile_target: str
    sequence_length: int
    batch_size: int
    tensor_parallel_degree: int
    precision: str
    toolchain: str
    options: tuple[tuple[str, str], ...]
    relevant_fields: tuple[str, ...]
    ignored_fields: tuple[str, ...]
    canonical: str
    digest: str


@dataclass(frozen=True)
class FileEntry:
    """One file of an artifact: a validated relative POSIX path and its blob."""

    path: str
    digest: Digest
    executable: bool = False


@dataclass(frozen=True)
class Producer:
    """Who produced an artifact."""

    worker: str = ""
    toolchain_versions: tuple[tuple[str, str], ...] = ()
    compile_seconds: float = 0.0
    log: Digest | None = None
    note: str = ""


@dataclass(frozen=True)
class Artifact:
    """A published manifest. `artifact_id` is the key digest."""

    artifact_id: str
    key: NormalizedKey
    files: tuple[FileEntry, ...]
    file_count: int
    total_size: int
    producer: Producer
    created_at: float
    last_accessed_at: float
    pinned: bool
    manifest_digest: str
    hit_count: int = 0
    # The producer's signature (`prebake.core.signing`), checked when it was published;
    # None for an unsigned artifact. Read with the files: listings carry neither.
    signature: Signature | None = None
    # Why the artifact cannot be served ("" = it can): one of its blobs was found missing or
    # corrupt (see `prebake.server.integrity`). A lookup does not hit it; a publish of the key
    # makes a new, available artifact.
    unavailable: str = ""


class JobState(enum.StrEnum):
    QUEUED = "queued"
    LEASED = "leased"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def active(self) -> bool:
        return self in (JobState.QUEUED, JobState.LEASED)


class JobPurpose(enum.StrEnum):
    """What a job does; jobs stored before purposes existed are compile jobs."""

    COMPILE = "compile"
    EVALUATE = "evaluate"


class ErrorClass(enum.StrEnum):
    NONE = ""
    TRANSIENT = "transient"
    DETERMINISTIC = "deterministic"


@dataclass(frozen=True)
class Job:
    """A job: a compile of its key, or an evaluation of the key's artifact (`purpose`).

    At most one active (queued or leased) job exists per `flight`: per key digest for
    compile jobs, per key and evaluation spec for evaluation jobs, so an evaluation never
    blocks or joins a compile of its key.
    """

    job_id: str
    key: NormalizedKey
    state: JobState
    created_at: float
    updated_at: float
    attempts: int = 0
    max_attempts: int = 3
    progress: float = 0.0
    message: str = ""
    error: str = ""
    error_class: ErrorClass = ErrorClass.NONE
    log: Digest | None = None
    artifact_id: str = ""
    worker: str = ""
    lease_expires_at: float | None = None
    fencing_token: int = 0
    not_before: float = 0.0
    model_source: str = ""
    finished_at: float | None = None
    # The `x-request-id` of the rpc (a lookup) that created the job ("" if none); workers log
    # their lines for the job with it (see `prebake.core.request_ids`). Never changes.
    request_id: str = ""
    # Never changes. An evaluation job carries what it runs (`evaluation`) and, once it
    # succeeded, the id of the stored evaluation.
    purpose: JobPurpose = JobPurpose.COMPILE
    evaluation: EvaluationSpec | None = None
    evaluation_id: str = ""
    # Bumped by every stored change; the job queue's compare-and-set condition, and the
    # sequence number of the job event that change appended (creation is revision 1).
    revision: int = 0

    @property
    def flight(self) -> str:
        """The single-flight identity: at most one active job per flight."""
        if self.purpose is JobPurpose.COMPILE or self.evaluation is None:
            return self.key.digest
        return f"evaluate:{self.key.digest}:{self.evaluation.digest}"


@dataclass(frozen=True)
class JobEvent:
    """One change of a job, numbered from 1 within the job."""

    job_id: str
    sequence: int
    at: float
    job: Job


@dataclass(frozen=True)
class WorkerCapability:
    """One (kind, toolchain, compile targets) a worker serves; empty targets: any."""

    kind: str
    toolchain: str
    compile_targets: tuple[str, ...] = ()
    # Job purposes served; workers from before evaluation jobs serve compiles only.
    purposes: tuple[JobPurpose, ...] = (JobPurpose.COMPILE,)

    def serves(
        self, kind: str, toolchain: str, compile_target: str, purpose: JobPurpose = JobPurpose.COMPILE
    ) -> bool:
        return (
            self.kind == kind
            and self.toolchain == toolchain
            and (not self.compile_targets or compile_target in self.compile_targets)
            and purpose in self.purposes
        )

    def serves_job(self, job: Job) -> bool:
        return self.serves(job.key.kind, job.key.toolchain, job.key.compile_target, job.purpose)


@dataclass(frozen=True)
class WorkerRecord:
    """A worker as the server last heard of it (lease poll or heartbeat)."""

    worker_id: str
    capabilities: tuple[WorkerCapability, ...]
    last_seen: float
    expires_at: float

    def live(self, now: float) -> bool:
        return now < self.expires_at


@dataclass(frozen=True)
class RegistryCounts:
    """Sizes the registry can report without touching blobs."""

    artifacts: int
    pinned_artifacts: int
    jobs_by_state: dict[str, int] = field(default_factory=dict)
    # Lookups and hits since the registry was created (`ArtifactIndex.record_lookups`), for a
    # hit ratio that survives restarts; they may lose the last unflushed batch in a crash.
    lifetime_lookups: int = 0
    lifetime_hits: int = 0


# --- evaluations: made of the records the worker shares (`prebake.core.evaluation_records`) ---


@dataclass(frozen=True)
class EvaluationSpec:
    """What an evaluation job runs: the workload and the price inputs resolved at enqueue."""

    workload: EvaluationWorkload
    price: PriceInputs

    @property
    def digest(self) -> str:
        """Identical specs share a digest (xxh3-128 of their fields): one job in flight."""
        # The records' repr, class and field names included: queued jobs keep this digest in
        # their flight, so renaming a record or a field would split a flight across an upgrade.
        text = repr((self.workload, self.price))
        return hash_bytes(text.encode())


@dataclass(frozen=True)
class Evaluation:
    """One stored evaluation of one artifact; never changes once stored.

    `model` is the evaluated artifact's model as its key stores it, kept with the evaluation
    so that a model's evaluations are listed without reading its artifacts.
    """

    evaluation_id: str
    artifact_id: str
    model: str
    created_at: float
    workload: EvaluationWorkload
    host: EvaluationHost
    price: PriceInputs
    levels: tuple[LevelMetrics, ...]
    source: str = ""
    request_id: str = ""
