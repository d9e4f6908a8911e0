"""Records the contract suites store: keys, files, producers, jobs, and a settable clock."""

from __future__ import annotations

import json
import secrets
from typing import Any

from prebake.core.digests import hash_bytes
from prebake.core.evaluation_records import (
    Distribution,
    EvaluationHost,
    EvaluationWorkload,
    LevelMetrics,
    PriceInputs,
)
from prebake.core.signing import Signature
from prebake.server.job_lifecycle import new_artifact, new_job_id
from prebake.server.records import (
    Artifact,
    Digest,
    Evaluation,
    EvaluationSpec,
    FileEntry,
    Job,
    JobPurpose,
    JobState,
    NormalizedKey,
    Producer,
    WorkerCapability,
)

START = 1_000_000.0


class Clock:
    """A settable clock; every lifecycle call sees `now`."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def make_key(**overrides: Any) -> NormalizedKey:
    """A NormalizedKey built by hand: canonical JSON of the fields, digest = its xxh3-128."""
    fields: dict[str, Any] = {
        "schema_version": 1,
        "kind": "neuron",
        "model": "meta-llama/Meta-Llama-3-8B",
        "model_revision": "rev-a",
        "instance_type": "ml.inf2.48xlarge",
        "compile_target": "inf2",
        "sequence_length": 8192,
        "batch_size": 8,
        "tensor_parallel_degree": 24,
        "precision": "bf16",
        "toolchain": "neuronx-cc 2.x",
        "options": (("optlevel", "2"),),
        "relevant_fields": ("model", "model_revision", "sequence_length", "batch_size"),
        "ignored_fields": (),
    }
    fields.update(overrides)
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return NormalizedKey(**fields, canonical=canonical, digest=hash_bytes(canonical.encode()))


def blob(name: str, size: int = 100) -> Digest:
    return Digest(hash_bytes(name.encode()), size)


def entry(path: str, content: str | None = None, size: int = 100, executable: bool = False) -> FileEntry:
    return FileEntry(path=path, digest=blob(content or path, size), executable=executable)


FILES = (entry("model.neff", size=4096), entry("config.json", size=12), entry("bin/run.sh", executable=True))
PRODUCER = Producer(
    worker="worker-1",
    toolchain_versions=(("neuronx-cc", "2.15.1"), ("torch", "2.13.0")),
    compile_seconds=812.5,
    log=blob("log-1", 2048),
    note="compiled on inf2",
)
# Storage keeps a signature as given (the services check them): any well-formed bytes do.
SIGNATURE = Signature(key_id="ed25519:" + "ab" * 16, signature=bytes(range(64)), public_key=bytes(range(32)))
NEURON = WorkerCapability("neuron", "neuronx-cc 2.x")
NEURON_AWQ = (NEURON, WorkerCapability("awq", "llmcompressor 0.14"))


def by_path(entry: FileEntry) -> str:
    return entry.path


def make_artifact(
    key: NormalizedKey | None = None,
    files: tuple[FileEntry, ...] = FILES,
    producer: Producer = PRODUCER,
    at: float = START,
    pinned: bool = False,
) -> Artifact:
    """An artifact as the lifecycle would build it (files sorted by path)."""
    return new_artifact(key or make_key(), tuple(sorted(files, key=by_path)), producer, at, pinned=pinned)


def make_job(key: NormalizedKey | None = None, at: float = START, **overrides: Any) -> Job:
    """A new queued job as `JobLifecycle.create_or_join` would build it."""
    fields: dict[str, Any] = {
        "job_id": new_job_id(),
        "key": key or make_key(),
        "state": JobState.QUEUED,
        "created_at": at,
        "updated_at": at,
        "message": "waiting for a worker",
    }
    fields.update(overrides)
    return Job(**fields)


def make_evaluation(artifact: Artifact, at: float = START, **overrides: Any) -> Evaluation:
    """An evaluation of `artifact` at two concurrency levels, as the services would store it."""
    levels = tuple(
        LevelMetrics(
            concurrency=c,
            requests=8,
            client_invocations=8,
            duration_seconds=2.5 / c,
            input_tokens=8 * 128,
            output_tokens=8 * 32,
            ttft_ms=Distribution(40.0 * c, 55.5 * c, 70.25 * c),
            itl_ms=Distribution(9.5, 11.0, 14.0),
            client_latency_ms=Distribution(350.0, 400.0, 480.0),
            input_tokens_per_second=1024 * c / 2.5,
            output_tokens_per_second=256 * c / 2.5,
            input_tokens_per_second_per_request=Distribution(300.0, 320.0, 330.0),
            output_tokens_per_second_per_request=Distribution(80.0, 90.0, 95.0),
            price_per_million_input_tokens=0.1 / c,
            price_per_million_output_tokens=0.4 / c,
            blended_price_per_million_tokens=0.175 / c,
        )
        for c in (1, 4)
    )
    fields: dict[str, Any] = {
        "evaluation_id": "ev-" + secrets.token_hex(12),
        "artifact_id": artifact.artifact_id,
        "model": artifact.key.model,
        "created_at": at,
        "workload": EvaluationWorkload(128, 32, 8, (1, 4)),
        "host": EvaluationHost(
            "host-1", "Intel Xeon", 8, "c7i.2xlarge", (("python", "3.12"), ("torch", "2.13.0"))
        ),
        "price": PriceInputs("c7i.2xlarge", 0.357, 0.1, "table:2026-11-01", 3.0),
        "levels": levels,
        "source": "import:contract",
        "request_id": "req-1",
    }
    fields.update(overrides)
    return Evaluation(**fields)


def make_spec(requests: int = 4, levels: tuple[int, ...] = (1, 4), discount: float = 0.0) -> EvaluationSpec:
    """What an evaluation job runs, as `EnqueueEvaluation` resolves it."""
    return EvaluationSpec(
        EvaluationWorkload(16, 8, requests, levels),
        PriceInputs("c7i.2xlarge", 0.357, discount, "table:2026-11-01", 3.0),
    )


def make_evaluation_job(
    key: NormalizedKey | None = None, at: float = START, spec: EvaluationSpec | None = None, **overrides: Any
) -> Job:
    """A new queued evaluation job, as `JobLifecycle.create_or_join_evaluation` builds it."""
    found = key or make_key()
    return make_job(
        found,
        at,
        purpose=JobPurpose.EVALUATE,
        evaluation=spec or make_spec(),
        artifact_id=found.digest,
        **overrides,
    )
