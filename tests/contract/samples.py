"""Records the contract suites store: keys, files, producers, jobs, and a settable clock."""

from __future__ import annotations

import json
from typing import Any

from prebake.core.digests import hash_bytes
from prebake.core.signing import Signature
from prebake.server.job_lifecycle import new_artifact, new_job_id
from prebake.server.records import (
    Artifact,
    Digest,
    FileEntry,
    Job,
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
