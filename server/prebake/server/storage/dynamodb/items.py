"""Domain records <-> DynamoDB items (low-level AttributeValue maps), and sort keys.

Numbers: a float (a time, a progress) is written as the exact decimal of its `repr`
(the shortest text that reads back as the same double), so it reads back identical and
DynamoDB compares it exactly (record_hits' "never backwards"). Structured values (a key,
a producer, a job's fields) are compact JSON strings, whose floats round-trip the same
way. Times in sort keys are 16 hex digits of the double's bits, mapped so that string
order is numeric order (`ordered_time`), followed by "#" and the item's id: a GSI range
key that breaks ties on the id exactly as the SQLite backend's ORDER BY does.

Item size: DynamoDB items are at most 400 KB. An artifact's files are one attribute,
zlib-compressed JSON `[[path, hash, size, executable], ...]`, limited to
`MAX_FILES_BYTES` compressed (a few thousand files with ordinary paths: an artifact is
a model's compiled files, usually tens). A larger list is refused with
`InvalidArgument` before anything is written (pack the files into fewer, larger ones).
"""

from __future__ import annotations

import dataclasses
import json
import struct
import typing
import zlib
from decimal import Decimal
from typing import Any

from prebake.core.errors import InvalidArgument
from prebake.server.records import (
    Artifact,
    Digest,
    ErrorClass,
    EvaluationSpec,
    FileEntry,
    Job,
    JobPurpose,
    JobState,
    NormalizedKey,
    WorkerRecord,
)
from prebake.server.storage.record_json import (
    capabilities_from_json,
    capabilities_json,
    evaluation_spec_from_data,
    producer_from_json,
    producer_json,
    signature_from_json,
    signature_json,
    to_json,
)

# An AttributeValue map as botocore's low-level client sends and returns it.
Item = dict[str, Any]

MAX_FILES_BYTES = 300_000
ARTIFACTS_PARTITION = "artifacts"
JOBS_PARTITION = "jobs"
LEASED_PARTITION = "leased"
JOB_SK = "job"
ACTIVE_SK = "active"
FINISHED_PREFIX = "finished#"
# An evaluation job's guard and finished copy sort apart from the compile job's, so that
# `active` and `last_finished` of a key read compile jobs only.
EVALUATION_GUARD_PREFIX = "active#evaluate#"
EVALUATED_PREFIX = "evaluated#"
EVENT_PREFIX = "event#"
_MASK = (1 << 64) - 1


# --- attribute values ----------------------------------------------------------------


def s(value: str) -> dict[str, str]:
    return {"S": value}


def n(value: int | float) -> dict[str, str]:
    if isinstance(value, bool):
        raise TypeError("a bool is not a DynamoDB number")
    if isinstance(value, int):
        return {"N": str(value)}
    # Fixed-point text of the shortest round-tripping decimal: exact, and without the
    # exponent notation `repr` uses for large and small values.
    return {"N": format(Decimal(repr(float(value))), "f")}


def b(value: bytes) -> dict[str, bytes]:
    return {"B": value}


def boolean(value: bool) -> dict[str, bool]:
    return {"BOOL": value}


def get_s(item: Item, name: str) -> str:
    return str(item[name]["S"])


def get_int(item: Item, name: str) -> int:
    return int(item[name]["N"])


def get_float(item: Item, name: str) -> float:
    return float(item[name]["N"])


def get_bool(item: Item, name: str) -> bool:
    return bool(item[name]["BOOL"])


# --- sort keys -----------------------------------------------------------------------


def ordered_time(at: float) -> int:
    """The double's bits as an unsigned integer whose order is the numbers' order."""
    bits = int(struct.unpack(">Q", struct.pack(">d", float(at) + 0.0))[0])  # + 0.0: -0.0 is 0.0
    return bits ^ _MASK if bits >> 63 else bits | (1 << 63)


def oldest_first(at: float, ident: str) -> str:
    """A range key ordering by `at` ascending, then `ident` ascending."""
    return f"{ordered_time(at):016x}#{ident}"


def newest_first(at: float, ident: str) -> str:
    """A range key ordering by `at` descending, then `ident` ascending."""
    return f"{ordered_time(at) ^ _MASK:016x}#{ident}"


def not_after(at: float) -> str:
    """The smallest `oldest_first` key past every key of a time <= `at`."""
    return f"{ordered_time(at):016x}$"  # "$" sorts right after "#"


# --- keys and files ------------------------------------------------------------------


def _tuples(value: Any) -> Any:
    """JSON arrays back to the tuples the records hold (nested: options are pairs)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def key_json(key: NormalizedKey) -> str:
    """Every field of the key, by its dataclass field name (a new field is stored too)."""
    return to_json({f.name: getattr(key, f.name) for f in dataclasses.fields(NormalizedKey)})


def key_from_json(text: str) -> NormalizedKey:
    return NormalizedKey(**{name: _tuples(value) for name, value in json.loads(text).items()})


def encode_files(files: tuple[FileEntry, ...]) -> bytes:
    """The files attribute; `InvalidArgument` past `MAX_FILES_BYTES` (see the module doc)."""
    text = to_json([[f.path, f.digest.hash, f.digest.size, f.executable] for f in files])
    packed = zlib.compress(text.encode("utf-8"), 6)
    if len(packed) > MAX_FILES_BYTES:
        raise InvalidArgument(
            f"an artifact of {len(files)} files is too large for the DynamoDB registry: its file "
            f"list takes {len(packed)} bytes compressed, at most {MAX_FILES_BYTES} fit in one "
            "DynamoDB item (400 KB); pack the files into fewer, larger ones"
        )
    return packed


def decode_files(packed: bytes) -> tuple[FileEntry, ...]:
    return tuple(
        FileEntry(path=str(path), digest=Digest(str(hash_), int(size)), executable=bool(executable))
        for path, hash_, size, executable in json.loads(zlib.decompress(packed).decode("utf-8"))
    )


def artifact_blobs(artifact: Artifact) -> set[Digest]:
    """The blobs an artifact references: its files and its producer's log."""
    blobs = {f.digest for f in artifact.files}
    if artifact.producer.log is not None:
        blobs.add(artifact.producer.log)
    return blobs


# --- artifacts -----------------------------------------------------------------------


def kind_model(kind: str, model: str) -> str:
    # A kind never contains "#", so the first one separates the two.
    return f"{kind}#{model}"


def artifact_item(artifact: Artifact, files: bytes, ref_nonce: str) -> Item:
    """The item of `artifact`; `files` from `encode_files`, `ref_nonce` names its blob refs."""
    signature = signature_json(artifact.signature)
    return {
        "artifact_id": s(artifact.artifact_id),
        "kind": s(artifact.key.kind),
        "model": s(artifact.key.model),
        "kind_model": s(kind_model(artifact.key.kind, artifact.key.model)),
        "list_pk": s(ARTIFACTS_PARTITION),
        "list_sk": s(newest_first(artifact.created_at, artifact.artifact_id)),
        "key": s(key_json(artifact.key)),
        "manifest_digest": s(artifact.manifest_digest),
        "file_count": n(artifact.file_count),
        "total_size": n(artifact.total_size),
        "producer": s(producer_json(artifact.producer)),
        "created_at": n(artifact.created_at),
        "last_accessed_at": n(artifact.last_accessed_at),
        "pinned": boolean(artifact.pinned),
        "hit_count": n(artifact.hit_count),
        "files": b(files),
        "ref_nonce": s(ref_nonce),
        # Not in ARTIFACT_LISTED_ATTRIBUTES: like the files, only on the full item.
        **({} if signature is None else {"signature": s(signature)}),
        # Not in the list indexes' projection (their schema is fixed): listings leave it "".
        "unavailable": s(artifact.unavailable),
    }


def artifact_from_item(item: Item) -> Artifact:
    """The artifact of an item; without files or signature when the item has none (an index copy)."""
    full = "files" in item
    return Artifact(
        artifact_id=get_s(item, "artifact_id"),
        key=key_from_json(get_s(item, "key")),
        files=decode_files(item["files"]["B"]) if full else (),
        file_count=get_int(item, "file_count"),
        total_size=get_int(item, "total_size"),
        producer=producer_from_json(get_s(item, "producer")),
        created_at=get_float(item, "created_at"),
        last_accessed_at=get_float(item, "last_accessed_at"),
        pinned=get_bool(item, "pinned"),
        manifest_digest=get_s(item, "manifest_digest"),
        hit_count=get_int(item, "hit_count"),
        signature=signature_from_json(get_s(item, "signature")) if full and "signature" in item else None,
        unavailable=get_s(item, "unavailable") if "unavailable" in item else "",
    )


def ref_item(digest: Digest, holder: str) -> Item:
    return {"blob": s(str(digest)), "holder": s(holder)}


def artifact_holder(artifact_id: str, ref_nonce: str) -> str:
    return f"a#{artifact_id}#{ref_nonce}"


def job_holder(job_id: str) -> str:
    return f"j#{job_id}"


# --- jobs ----------------------------------------------------------------------------


def job_pk(job_id: str) -> str:
    return f"job#{job_id}"


def key_pk(key_digest: str) -> str:
    return f"key#{key_digest}"


def event_sk(sequence: int) -> str:
    return f"{EVENT_PREFIX}{sequence:012d}"


def finished_sk(job: Job) -> str:
    """Orders a key's finished jobs by finished_at, then created_at (newest last); compile
    and evaluation jobs apart."""
    assert job.finished_at is not None
    finished, created = ordered_time(job.finished_at), ordered_time(job.created_at)
    prefix = FINISHED_PREFIX if job.purpose is JobPurpose.COMPILE else EVALUATED_PREFIX
    return f"{prefix}{finished:016x}#{created:016x}#{job.job_id}"


def guard_sk(job: Job) -> str:
    """The sort key of the single-flight guard of the job's flight (`Job.flight`)."""
    if job.purpose is JobPurpose.COMPILE or job.evaluation is None:
        return ACTIVE_SK
    return EVALUATION_GUARD_PREFIX + job.evaluation.digest


def queued_partition(kind: str, toolchain: str) -> str:
    return f"{kind}#{toolchain}"


# Job fields stored beside its JSON rather than in it.
_JOB_OUTSIDE_JSON = frozenset({"key", "revision"})
_JOB_TYPES = typing.get_type_hints(Job)


def job_fields_json(job: Job) -> str:
    """Every field of `job` but its key and revision (stored beside it), by field name."""
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(Job):
        if f.name not in _JOB_OUTSIDE_JSON:
            value = getattr(job, f.name)
            if isinstance(value, Digest):
                value = [value.hash, value.size]
            elif isinstance(value, EvaluationSpec):
                value = dataclasses.asdict(value)
            fields[f.name] = value
    return to_json(fields)


def _job_field(name: str, value: Any) -> Any:
    kind = _JOB_TYPES[name]
    if value is None:
        return None
    if kind is JobState or kind is ErrorClass or kind is JobPurpose:
        return kind(value)
    if name == "evaluation":
        return evaluation_spec_from_data(value)
    if name == "log":
        return Digest(str(value[0]), int(value[1]))
    if kind in (float, float | None):
        return float(value)  # JSON may have written 3.0 as 3
    return value


def job_from_json(text: str, key: NormalizedKey, revision: int) -> Job:
    fields = {name: _job_field(name, value) for name, value in json.loads(text).items()}
    return Job(key=key, revision=revision, **fields)


def _job_copy(job: Job, pk: str, sk: str) -> Item:
    return {
        "pk": s(pk),
        "sk": s(sk),
        "job_id": s(job.job_id),
        "key_digest": s(job.key.digest),
        "kind": s(job.key.kind),
        "state": s(job.state.value),
        "revision": n(job.revision),
        "created_at": n(job.created_at),
        "key": s(key_json(job.key)),
        "job": s(job_fields_json(job)),
    }


def job_item(job: Job) -> Item:
    """The job's own item, with the index attributes of its state."""
    item = _job_copy(job, job_pk(job.job_id), JOB_SK)
    item["list_pk"] = s(JOBS_PARTITION)
    item["list_sk"] = s(newest_first(job.created_at, job.job_id))
    if job.state is JobState.QUEUED:
        item["queued_pk"] = s(queued_partition(job.key.kind, job.key.toolchain))
        item["queued_sk"] = s(oldest_first(job.created_at, job.job_id))
    if job.state is JobState.LEASED and job.lease_expires_at is not None:
        item["leased_pk"] = s(LEASED_PARTITION)
        item["leased_sk"] = s(oldest_first(job.lease_expires_at, job.job_id))
    return item


def guard_item(job: Job) -> Item:
    """The flight's single-flight guard: a copy of its active job."""
    return _job_copy(job, key_pk(job.key.digest), guard_sk(job))


def finished_item(job: Job) -> Item:
    """A copy of a finished job in its key's partition (last_finished reads the newest)."""
    return _job_copy(job, key_pk(job.key.digest), finished_sk(job))


def job_from_item(item: Item) -> Job:
    """The job of its own item, its guard or its finished copy."""
    return job_from_json(get_s(item, "job"), key_from_json(get_s(item, "key")), get_int(item, "revision"))


# The item of the jobs table that holds the lifetime lookup and hit totals (no job has
# this pk; scans of jobs filter on sk = "job", and it carries no index attributes).
COUNTERS_KEY: Item = {"pk": s("counters"), "sk": s("lifetime")}


def event_item(job: Job) -> Item:
    """The event the change to `job` (as stored, revision bumped) appends."""
    return {
        "pk": s(job_pk(job.job_id)),
        "sk": s(event_sk(job.revision)),
        "sequence": n(job.revision),
        "at": n(job.updated_at),
        "job": s(job_fields_json(job)),
    }


def is_event(item: Item) -> bool:
    return get_s(item, "sk").startswith(EVENT_PREFIX)


# --- workers -------------------------------------------------------------------------


def worker_item(record: WorkerRecord) -> Item:
    return {
        "worker_id": s(record.worker_id),
        "capabilities": s(capabilities_json(record.capabilities)),
        "last_seen": n(record.last_seen),
        "expires_at": n(record.expires_at),
    }


def worker_from_item(item: Item) -> WorkerRecord:
    return WorkerRecord(
        worker_id=get_s(item, "worker_id"),
        capabilities=capabilities_from_json(get_s(item, "capabilities")),
        last_seen=get_float(item, "last_seen"),
        expires_at=get_float(item, "expires_at"),
    )
