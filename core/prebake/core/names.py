"""Short lowercase names for the contract's enums, as people type and read them.

"neuron" for ARTIFACT_KIND_NEURON, "queued" for JOB_STATE_QUEUED, "HIT" for
LOOKUP_STATUS_HIT. Derived from the generated descriptors, so a value added to the
proto is picked up without a change here.
"""

from __future__ import annotations

from google.protobuf.descriptor import EnumDescriptor

from prebake.v1 import jobs_pb2, key_pb2, registry_pb2

_KIND = key_pb2.ArtifactKind.DESCRIPTOR
_STATE = jobs_pb2.JobState.DESCRIPTOR
_STATUS = registry_pb2.LookupStatus.DESCRIPTOR
_ERROR_CLASS = jobs_pb2.ErrorClass.DESCRIPTOR
_POLICY = registry_pb2.CompatibilityPolicy.DESCRIPTOR

TERMINAL_JOB_STATES = frozenset(
    {jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED}
)


def _prefix(descriptor: EnumDescriptor) -> str:
    return descriptor.values[0].name.removesuffix("UNSPECIFIED")


def _short(descriptor: EnumDescriptor, number: int) -> str:
    value = descriptor.values_by_number.get(number)
    if value is None or number == 0:
        return ""
    return value.name.removeprefix(_prefix(descriptor)).lower()


def _names(descriptor: EnumDescriptor) -> list[str]:
    return [_short(descriptor, v.number) for v in descriptor.values if v.number != 0]


def _number(descriptor: EnumDescriptor, name: str) -> int | None:
    full = name.strip().upper()
    if not full.startswith(_prefix(descriptor)):
        full = _prefix(descriptor) + full
    value = descriptor.values_by_name.get(full)
    return None if value is None or value.number == 0 else value.number


def value_names(descriptor: EnumDescriptor) -> list[str]:
    """The enum's values as the contract spells them, without the unset one:
    ["ARTIFACT_KIND_NEURON", "ARTIFACT_KIND_AWQ", ...]. What a JSON or proto-loader client
    sends by name (the short names are this module's, for people at a CLI)."""
    return [v.name for v in descriptor.values if v.number != 0]


def known_values(descriptor: EnumDescriptor) -> str:
    """ "ARTIFACT_KIND_NEURON (1), ARTIFACT_KIND_AWQ (2), ...": the names and numbers a caller may send."""
    return ", ".join(f"{v.name} ({v.number})" for v in descriptor.values if v.number != 0)


def is_known(descriptor: EnumDescriptor, number: int) -> bool:
    """Whether `number` is a value of the enum (a newer client may send one this server lacks)."""
    return number in descriptor.values_by_number


def kind_names() -> list[str]:
    """["neuron", "awq", "inductor"]."""
    return _names(_KIND)


def kind_values() -> str:
    """ "ARTIFACT_KIND_NEURON (1), ARTIFACT_KIND_AWQ (2), ARTIFACT_KIND_INDUCTOR (3)"."""
    return known_values(_KIND)


def kind_to_proto(kind: str) -> key_pb2.ArtifactKind.ValueType:
    """ "neuron" (or "NEURON", "ARTIFACT_KIND_NEURON") -> the enum; unknown or "" -> UNSPECIFIED."""
    number = _number(_KIND, kind) if kind else None
    return key_pb2.ArtifactKind.ValueType(number or 0)


def kind_name(kind: int) -> str:
    """ARTIFACT_KIND_NEURON -> "neuron"; unspecified or unknown -> ""."""
    return _short(_KIND, kind)


def job_state_names() -> list[str]:
    """["queued", "leased", "succeeded", "failed", "cancelled"]."""
    return _names(_STATE)


def job_state_to_proto(state: str) -> jobs_pb2.JobState.ValueType:
    """ "queued" -> JOB_STATE_QUEUED. Raises ValueError for an unknown name."""
    number = _number(_STATE, state)
    if number is None:
        raise ValueError(f"unknown job state {state!r}; known: {', '.join(job_state_names())}")
    return jobs_pb2.JobState.ValueType(number)


def job_state_name(state: int) -> str:
    """JOB_STATE_LEASED -> "leased"."""
    return _short(_STATE, state) or "unknown"


def lookup_status_name(status: int) -> str:
    """LOOKUP_STATUS_HIT -> "HIT" (upper case, as the CLI and its JSON print it)."""
    return (_short(_STATUS, status) or "unspecified").upper()


def policy_name(policy: int) -> str:
    """COMPATIBILITY_POLICY_LONGER_SEQUENCE -> "longer_sequence" (as `--allow` takes it)."""
    return _short(_POLICY, policy)


def error_class_name(error_class: int) -> str:
    """ERROR_CLASS_DETERMINISTIC -> "deterministic"; none -> ""."""
    return _short(_ERROR_CLASS, error_class)
