"""Rows of the registry database <-> domain records (`prebake.server.records`).

Tuple-valued fields are stored as compact JSON arrays; a key's digest is the id column
of its table (artifact_id or key_digest).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from prebake.server.records import (
    Artifact,
    Digest,
    ErrorClass,
    FileEntry,
    Job,
    JobPurpose,
    JobState,
    NormalizedKey,
    WorkerRecord,
)
from prebake.server.storage.record_json import (
    capabilities_from_json,
    evaluation_spec_from_json,
    evaluation_spec_json,
    producer_from_json,
    producer_json,
    signature_from_json,
    signature_json,
    to_json,
)
from prebake.server.storage.sqlite.schema import KEY_COLUMNS

Row = dict[str, Any]

# Columns of `jobs` a compare-and-set may change (the key, the id, the purpose, the spec
# and the flight never change).
MUTABLE_JOB_COLUMNS = (
    "state",
    "attempts",
    "max_attempts",
    "progress",
    "message",
    "error",
    "error_class",
    "log_hash",
    "log_size",
    "artifact_id",
    "worker",
    "lease_expires_at",
    "fencing_token",
    "not_before",
    "model_source",
    "updated_at",
    "finished_at",
    "evaluation_id",
)


def key_row(key: NormalizedKey) -> Row:
    row: Row = {
        "key_schema_version": key.schema_version,
        "kind": key.kind,
        "model": key.model,
        "model_revision": key.model_revision,
        "instance_type": key.instance_type,
        "compile_target": key.compile_target,
        "sequence_length": key.sequence_length,
        "batch_size": key.batch_size,
        "tensor_parallel_degree": key.tensor_parallel_degree,
        "precision": key.precision,
        "toolchain": key.toolchain,
        "key_options": to_json([list(pair) for pair in key.options]),
        "key_relevant_fields": to_json(list(key.relevant_fields)),
        "key_ignored_fields": to_json(list(key.ignored_fields)),
        "key_canonical": key.canonical,
    }
    assert row.keys() == KEY_COLUMNS.keys()
    return row


def key_from_row(row: Mapping[str, Any], digest: str) -> NormalizedKey:
    return NormalizedKey(
        schema_version=row["key_schema_version"],
        kind=row["kind"],
        model=row["model"],
        model_revision=row["model_revision"],
        instance_type=row["instance_type"],
        compile_target=row["compile_target"],
        sequence_length=row["sequence_length"],
        batch_size=row["batch_size"],
        tensor_parallel_degree=row["tensor_parallel_degree"],
        precision=row["precision"],
        toolchain=row["toolchain"],
        options=tuple((str(name), str(value)) for name, value in json.loads(row["key_options"])),
        relevant_fields=tuple(json.loads(row["key_relevant_fields"])),
        ignored_fields=tuple(json.loads(row["key_ignored_fields"])),
        canonical=row["key_canonical"],
        digest=digest,
    )


def digest_or_none(hash_: str | None, size: int | None) -> Digest | None:
    return None if hash_ is None or size is None else Digest(hash_, size)


def log_columns(log: Digest | None) -> Row:
    return {"log_hash": None if log is None else log.hash, "log_size": None if log is None else log.size}


def file_from_row(row: Mapping[str, Any]) -> FileEntry:
    return FileEntry(
        path=row["path"], digest=Digest(row["hash"], row["size"]), executable=bool(row["executable"])
    )


def artifact_row(artifact: Artifact) -> Row:
    return {
        "artifact_id": artifact.artifact_id,
        **key_row(artifact.key),
        "manifest_digest": artifact.manifest_digest,
        "file_count": artifact.file_count,
        "total_size": artifact.total_size,
        "producer": producer_json(artifact.producer),
        **log_columns(artifact.producer.log),
        "created_at": artifact.created_at,
        "last_accessed_at": artifact.last_accessed_at,
        "pinned": int(artifact.pinned),
        "hit_count": artifact.hit_count,
        "signature": signature_json(artifact.signature),
        "unavailable": artifact.unavailable,
    }


def artifact_from_row(row: Mapping[str, Any], files: tuple[FileEntry, ...] = ()) -> Artifact:
    """The artifact of a row; its signature comes with its `files` (listings carry neither)."""
    return Artifact(
        artifact_id=row["artifact_id"],
        key=key_from_row(row, row["artifact_id"]),
        files=files,
        file_count=row["file_count"],
        total_size=row["total_size"],
        producer=producer_from_json(row["producer"]),
        created_at=row["created_at"],
        last_accessed_at=row["last_accessed_at"],
        pinned=bool(row["pinned"]),
        manifest_digest=row["manifest_digest"],
        hit_count=row["hit_count"],
        signature=signature_from_json(row["signature"]) if files else None,
        unavailable=row["unavailable"],
    )


def job_row(job: Job) -> Row:
    return {
        "job_id": job.job_id,
        "key_digest": job.key.digest,
        **key_row(job.key),
        **mutable_job_columns(job),
        "created_at": job.created_at,
        "request_id": job.request_id,
        "purpose": job.purpose.value,
        "evaluation": "" if job.evaluation is None else evaluation_spec_json(job.evaluation),
        "flight": job.flight,
        "revision": job.revision,
    }


def mutable_job_columns(job: Job) -> Row:
    row: Row = {
        "state": job.state.value,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "progress": job.progress,
        "message": job.message,
        "error": job.error,
        "error_class": job.error_class.value,
        **log_columns(job.log),
        "artifact_id": job.artifact_id,
        "worker": job.worker,
        "lease_expires_at": job.lease_expires_at,
        "fencing_token": job.fencing_token,
        "not_before": job.not_before,
        "model_source": job.model_source,
        "updated_at": job.updated_at,
        "finished_at": job.finished_at,
        "evaluation_id": job.evaluation_id,
    }
    assert tuple(row) == MUTABLE_JOB_COLUMNS
    return row


def job_from_row(row: Mapping[str, Any]) -> Job:
    return Job(
        job_id=row["job_id"],
        key=key_from_row(row, row["key_digest"]),
        state=JobState(row["state"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        progress=row["progress"],
        message=row["message"],
        error=row["error"],
        error_class=ErrorClass(row["error_class"]),
        log=digest_or_none(row["log_hash"], row["log_size"]),
        artifact_id=row["artifact_id"],
        worker=row["worker"],
        lease_expires_at=row["lease_expires_at"],
        fencing_token=row["fencing_token"],
        not_before=row["not_before"],
        model_source=row["model_source"],
        finished_at=row["finished_at"],
        request_id=row["request_id"],
        purpose=JobPurpose(row["purpose"]),
        evaluation=evaluation_spec_from_json(row["evaluation"]) if row["evaluation"] else None,
        evaluation_id=row["evaluation_id"],
        revision=row["revision"],
    )


def worker_from_row(row: Mapping[str, Any]) -> WorkerRecord:
    return WorkerRecord(
        worker_id=row["worker_id"],
        capabilities=capabilities_from_json(row["capabilities"]),
        last_seen=row["last_seen"],
        expires_at=row["expires_at"],
    )
