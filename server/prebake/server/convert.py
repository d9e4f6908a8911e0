"""Conversions between domain records (`prebake.server.records`) and `prebake.v1` messages.

Pure functions; validation of untrusted input happens here for digests and file lists
(raising domain errors), and in `prebake.server.key_normalization` for keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf.descriptor import EnumDescriptor
from google.protobuf.timestamp_pb2 import Timestamp

from prebake.core import names
from prebake.core.digests import hash_bytes
from prebake.core.errors import InvalidArgument, InvalidKey
from prebake.core.key_fields import KEY_FIELDS
from prebake.core.manifest_paths import validate_manifest_paths
from prebake.core.signing import Signature
from prebake.server.evaluation_messages import fill
from prebake.server.key_normalization import KeyRequest, check_option_count
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
    Producer,
)
from prebake.v1 import blobs_pb2, jobs_pb2, key_pb2, registry_pb2

JOB_STATES = {
    JobState.QUEUED: jobs_pb2.JOB_STATE_QUEUED,
    JobState.LEASED: jobs_pb2.JOB_STATE_LEASED,
    JobState.SUCCEEDED: jobs_pb2.JOB_STATE_SUCCEEDED,
    JobState.FAILED: jobs_pb2.JOB_STATE_FAILED,
    JobState.CANCELLED: jobs_pb2.JOB_STATE_CANCELLED,
}
JOB_STATES_FROM_PROTO = {value: state for state, value in JOB_STATES.items()}

JOB_PURPOSES = {
    JobPurpose.COMPILE: jobs_pb2.JOB_PURPOSE_COMPILE,
    JobPurpose.EVALUATE: jobs_pb2.JOB_PURPOSE_EVALUATE,
}
JOB_PURPOSES_FROM_PROTO = {value: purpose for purpose, value in JOB_PURPOSES.items()}

ERROR_CLASSES = {
    ErrorClass.NONE: jobs_pb2.ERROR_CLASS_UNSPECIFIED,
    ErrorClass.TRANSIENT: jobs_pb2.ERROR_CLASS_TRANSIENT,
    ErrorClass.DETERMINISTIC: jobs_pb2.ERROR_CLASS_DETERMINISTIC,
}

MAX_NOTE = 4096
MAX_WORKER = 256
MAX_TOOL_VERSIONS = 32


def kind_name(kind: int) -> str:
    """Proto enum -> kind name; "" for unspecified or unknown values."""
    return names.kind_name(kind)


def timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def seconds(ts: Timestamp) -> float:
    """The time of a Timestamp that `timestamp` made: `timestamp(seconds(ts)) == ts`.

    (A float has ~240 ns of resolution at today's dates, far coarser than the nanoseconds
    `timestamp` truncates to, so the nearest float to the nanoseconds maps back exactly.)
    """
    return ts.ToNanoseconds() / 1e9


def key_request(msg: key_pb2.ArtifactKey) -> KeyRequest:
    """The key as stated on the wire; every field of the contract is copied (see KEY_FIELDS).

    `InvalidKey` for too many options, before they are copied."""
    check_option_count(len(msg.options))
    if not names.is_known(key_pb2.ArtifactKind.DESCRIPTOR, msg.kind):
        # Not "required": the caller sent a number, maybe from a newer contract.
        raise InvalidKey("kind", f"unknown kind {msg.kind}; use one of {names.kind_values()}")
    values: dict[str, Any] = {name: getattr(msg, name) for name in KEY_FIELDS}
    values["kind"] = kind_name(msg.kind)
    values["options"] = dict(msg.options)
    return KeyRequest(**values)


def key_message(key: NormalizedKey) -> key_pb2.ArtifactKey:
    """The normalised key in wire form (instance_type is the instance's canonical name)."""
    values: dict[str, Any] = {name: getattr(key, name) for name in KEY_FIELDS}
    values["kind"] = names.kind_to_proto(key.kind)
    values["options"] = dict(key.options)
    return key_pb2.ArtifactKey(**values)


def resolved_key(key: NormalizedKey) -> key_pb2.ResolvedKey:
    return key_pb2.ResolvedKey(
        digest=key.digest,
        canonical=key.canonical,
        schema_version=key.schema_version,
        key=key_message(key),
        compile_target=key.compile_target,
        relevant_fields=list(key.relevant_fields),
        ignored_fields=list(key.ignored_fields),
    )


def normalized_key(msg: key_pb2.ResolvedKey) -> NormalizedKey:
    """A key as the server resolved it (`resolved_key`), back as a record, as stated.

    Not normalised again: the canonical text and digest are kept, so an artifact restored
    from its archived manifest keeps its id whatever today's normalisation rules say.
    `InvalidArgument` for an unknown kind or a digest that is not the canonical text's.
    """
    kind = kind_name(msg.key.kind)
    if not kind:
        raise InvalidArgument(f"key {msg.digest}: unknown kind {msg.key.kind}")
    if hash_bytes(msg.canonical.encode()) != msg.digest:
        raise InvalidArgument(f"key {msg.digest}: the digest is not the canonical text's")
    values: dict[str, Any] = {name: getattr(msg.key, name) for name in KEY_FIELDS}
    values["kind"] = kind
    values["options"] = tuple(sorted(msg.key.options.items()))
    return NormalizedKey(
        schema_version=msg.schema_version,
        compile_target=msg.compile_target,
        relevant_fields=tuple(msg.relevant_fields),
        ignored_fields=tuple(msg.ignored_fields),
        canonical=msg.canonical,
        digest=msg.digest,
        **values,
    )


def digest_from_proto(msg: blobs_pb2.Digest, what: str = "digest") -> Digest:
    """Validate and convert; raises InvalidArgument naming `what`."""
    try:
        return Digest(msg.hash, msg.size_bytes)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{what}: {exc}") from None


def enum_value(descriptor: EnumDescriptor, number: int, field: str) -> int:
    """`number`, checked to be a value of the enum; InvalidArgument naming `field` and the
    values (by name and number, from the descriptor) if it is not. An unknown number is
    refused rather than read as unset, so a request never does something it did not ask for."""
    if not names.is_known(descriptor, number):
        known = names.known_values(descriptor)
        raise InvalidArgument(f"{field}: unknown {descriptor.name} value {number}; one of {known}")
    return number


def digest(d: Digest) -> blobs_pb2.Digest:
    return blobs_pb2.Digest(hash=d.hash, size_bytes=d.size)


def file_entries(files: Sequence[registry_pb2.ArtifactFile]) -> list[FileEntry]:
    """Validate a manifest's file list (paths and digests) and convert it, sorted by path."""
    validate_manifest_paths([f.path for f in files])
    entries = [
        FileEntry(f.path, digest_from_proto(f.digest, f"file {f.path!r}"), f.executable) for f in files
    ]
    return sorted(entries, key=lambda e: e.path)


def producer_from_proto(msg: registry_pb2.Producer) -> Producer:
    if len(msg.note) > MAX_NOTE:
        raise InvalidArgument(f"producer note is {len(msg.note)} characters; at most {MAX_NOTE}")
    if len(msg.worker) > MAX_WORKER:
        raise InvalidArgument(f"producer worker is {len(msg.worker)} characters; at most {MAX_WORKER}")
    if len(msg.toolchain_versions) > MAX_TOOL_VERSIONS:
        raise InvalidArgument(
            f"producer lists {len(msg.toolchain_versions)} tool versions; at most {MAX_TOOL_VERSIONS}"
        )
    return Producer(
        worker=msg.worker,
        toolchain_versions=tuple(sorted(msg.toolchain_versions.items())),
        compile_seconds=max(0.0, msg.compile_seconds),
        log=digest_from_proto(msg.log, "producer log") if msg.HasField("log") else None,
        note=msg.note,
    )


def producer(p: Producer) -> registry_pb2.Producer:
    return registry_pb2.Producer(
        worker=p.worker,
        toolchain_versions=dict(p.toolchain_versions),
        compile_seconds=p.compile_seconds,
        log=digest(p.log) if p.log else None,
        note=p.note,
    )


def artifact(a: Artifact) -> registry_pb2.Artifact:
    return registry_pb2.Artifact(
        artifact_id=a.artifact_id,
        key=resolved_key(a.key),
        files=[
            registry_pb2.ArtifactFile(path=f.path, digest=digest(f.digest), executable=f.executable)
            for f in a.files
        ],
        file_count=a.file_count,
        total_size_bytes=a.total_size,
        producer=producer(a.producer),
        created_at=timestamp(a.created_at),
        last_accessed_at=timestamp(a.last_accessed_at),
        pinned=a.pinned,
        manifest_digest=a.manifest_digest,
        hit_count=a.hit_count,
        signature=signature(a.signature),
        unavailable=a.unavailable,
    )


def signature(sig: Signature | None) -> registry_pb2.Signature | None:
    if sig is None:
        return None
    return registry_pb2.Signature(key_id=sig.key_id, signature=sig.signature, public_key=sig.public_key)


def signature_from_proto(msg: registry_pb2.Signature) -> Signature:
    """The signature as sent, its shape checked (`BadSignature`, an INVALID_ARGUMENT)."""
    sig = Signature(key_id=msg.key_id, signature=msg.signature, public_key=msg.public_key)
    sig.check_shape()
    return sig


def job(j: Job) -> jobs_pb2.Job:
    return jobs_pb2.Job(
        job_id=j.job_id,
        key=resolved_key(j.key),
        state=JOB_STATES[j.state],
        created_at=timestamp(j.created_at),
        updated_at=timestamp(j.updated_at),
        attempts=j.attempts,
        max_attempts=j.max_attempts,
        progress=j.progress,
        message=j.message,
        error=j.error,
        error_class=ERROR_CLASSES[j.error_class],
        log=digest(j.log) if j.log else None,
        artifact_id=j.artifact_id,
        worker=j.worker,
        lease_expires_at=timestamp(j.lease_expires_at),
        model_source=j.model_source,
        finished_at=timestamp(j.finished_at),
        request_id=j.request_id,
        purpose=JOB_PURPOSES[j.purpose],
        evaluation=None if j.evaluation is None else evaluation_spec(j.evaluation),
        evaluation_id=j.evaluation_id,
    )


def evaluation_spec(spec: EvaluationSpec) -> jobs_pb2.EvaluationSpec:
    msg = jobs_pb2.EvaluationSpec()
    fill(msg.workload, spec.workload)
    fill(msg.price, spec.price)
    return msg


def unique_digests(entries: Iterable[FileEntry]) -> list[Digest]:
    return list(dict.fromkeys(e.digest for e in entries))
