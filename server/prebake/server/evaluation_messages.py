"""Evaluation messages (`evaluations.proto`) <-> records (`prebake.server.records`), and the
checks an untrusted evaluation passes before anything is stored.

Both directions walk the message descriptor and the record's fields, which have the same names,
so neither the field list nor the numeric rules are written twice: every number of an evaluation
is finite and not negative, every `Distribution` is ordered, every string and map is bounded.
The rules no descriptor states (levels, unique concurrencies, the discount) follow.
Errors are `InvalidArgument` whose `field` is the request path (`evaluation.levels[1].ttft_ms.p90`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from prebake.core import evaluation_records
from prebake.core.errors import InvalidArgument
from prebake.core.evaluation_records import LevelMetrics
from prebake.server.records import Evaluation
from prebake.v1 import evaluations_pb2

MAX_LEVELS = 64
MAX_MAP_ENTRIES = 32
MAX_TEXT = 256
MAX_SOURCE = 1024
# GetArtifact carries an artifact's newest evaluations, at most this many (the proto says so).
ARTIFACT_EVALUATIONS = 20
# Message name -> record class: the parts of an evaluation that convert field by field.
RECORDS: dict[str, type] = {
    name: getattr(evaluation_records, name)
    for name in ("Distribution", "EvaluationWorkload", "EvaluationHost", "PriceInputs", "LevelMetrics")
}
_NUMBERS = {
    FieldDescriptor.TYPE_DOUBLE,
    FieldDescriptor.TYPE_FLOAT,
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
}
# Fields set by the server, not checked in requests.
_ASSIGNED = {"evaluation_id", "artifact_id", "created_at", "request_id"}


def invalid(field: str, message: str) -> InvalidArgument:
    error = InvalidArgument(f"{field}: {message}")
    error.field = field
    return error


def _is_map(f: Any) -> bool:
    return f.message_type is not None and f.message_type.GetOptions().map_entry


def _check_number(value: float, path: str) -> None:
    if not math.isfinite(value):
        raise invalid(path, f"{value} is not a finite number")
    if value < 0:
        raise invalid(path, f"{value} is negative; every count, time, rate and price is at least 0")


def _check(msg: Message, path: str) -> None:
    """The descriptor-wide rules, depth first, in field order."""
    for f in msg.DESCRIPTOR.fields:
        if f.name in _ASSIGNED and msg.DESCRIPTOR.name == "Evaluation":
            continue
        value = getattr(msg, f.name)
        here = f"{path}.{f.name}"
        if _is_map(f):
            if len(value) > MAX_MAP_ENTRIES:
                raise invalid(here, f"{len(value)} entries; at most {MAX_MAP_ENTRIES}")
            for k, v in value.items():
                if len(k) > MAX_TEXT or len(v) > MAX_TEXT:
                    raise invalid(here, f"entry {k[:40]!r} is longer than {MAX_TEXT} characters")
        elif f.type == FieldDescriptor.TYPE_MESSAGE:
            for i, item in enumerate(value) if f.is_repeated else [(None, value)]:
                _check(item, here if i is None else f"{here}[{i}]")
        elif f.type in _NUMBERS:
            for i, item in enumerate(value) if f.is_repeated else [(None, value)]:
                _check_number(item, here if i is None else f"{here}[{i}]")
        elif f.type == FieldDescriptor.TYPE_STRING:
            limit = MAX_SOURCE if f.name == "source" else MAX_TEXT
            if len(value) > limit:
                raise invalid(here, f"{len(value)} characters; at most {limit}")
    if msg.DESCRIPTOR.name == "Distribution" and not msg.p50 <= msg.p90 <= msg.p99:  # type: ignore[attr-defined]
        d: Any = msg
        raise invalid(
            path, f"percentiles out of order: p50 {d.p50}, p90 {d.p90}, p99 {d.p99}; need p50 <= p90 <= p99"
        )


def check(msg: evaluations_pb2.Evaluation, artifact_id: str, path: str = "evaluation") -> None:
    """Raise `InvalidArgument` naming the field unless `msg` may be stored for `artifact_id`."""
    if msg.artifact_id and msg.artifact_id != artifact_id:
        raise invalid(
            f"{path}.artifact_id", f"{msg.artifact_id!r} is not the request's artifact id {artifact_id}"
        )
    _check(msg, path)
    if not msg.levels:
        raise invalid(f"{path}.levels", "an evaluation needs at least one concurrency level")
    if len(msg.levels) > MAX_LEVELS:
        raise invalid(f"{path}.levels", f"{len(msg.levels)} levels; at most {MAX_LEVELS}")
    seen: set[int] = set()
    for i, level in enumerate(msg.levels):
        if level.concurrency < 1:
            raise invalid(
                f"{path}.levels[{i}].concurrency", f"{level.concurrency}; a concurrency is at least 1"
            )
        if level.concurrency in seen:
            raise invalid(f"{path}.levels[{i}].concurrency", f"concurrency {level.concurrency} appears twice")
        seen.add(level.concurrency)
    listed = list(msg.workload.concurrency_levels)
    if listed and sorted(listed) != sorted(seen):
        raise invalid(
            f"{path}.workload.concurrency_levels",
            f"{listed} are not the levels' concurrencies {sorted(seen)} (leave it empty to take those)",
        )
    if not msg.price.discount_rate < 1:
        raise invalid(
            f"{path}.price.discount_rate", f"{msg.price.discount_rate}; a discount is from 0 to below 1"
        )


# --- conversions ----------------------------------------------------------------------------


def _from_message(msg: Message) -> Any:
    cls = RECORDS[msg.DESCRIPTOR.name]
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        field = msg.DESCRIPTOR.fields_by_name[f.name]
        value = getattr(msg, f.name)
        if _is_map(field):
            values[f.name] = tuple(sorted(value.items()))
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            values[f.name] = _from_message(value)
        elif field.is_repeated:
            values[f.name] = tuple(value)
        else:
            values[f.name] = value
    return cls(**values)


def _fill(into: Message, record: Any) -> None:
    for f in dataclasses.fields(record):
        field = into.DESCRIPTOR.fields_by_name[f.name]
        value = getattr(record, f.name)
        if _is_map(field):
            getattr(into, f.name).update(dict(value))
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            _fill(getattr(into, f.name), value)
        elif field.is_repeated:
            getattr(into, f.name).extend(value)
        else:
            setattr(into, f.name, value)


def fill(into: Message, record: Any) -> None:
    """Set the fields of `into` from the record of its type (`RECORDS`)."""
    _fill(into, record)


def parts(msg: evaluations_pb2.Evaluation) -> dict[str, Any]:
    """The caller-given parts of a checked evaluation, as `Evaluation` record fields; an empty
    `workload.concurrency_levels` becomes the levels' concurrencies, in their order."""
    workload = _from_message(msg.workload)
    if not workload.concurrency_levels:
        workload = dataclasses.replace(
            workload, concurrency_levels=tuple(level.concurrency for level in msg.levels)
        )
    return {
        "workload": workload,
        "host": _from_message(msg.host),
        "price": _from_message(msg.price),
        "levels": tuple(_from_message(level) for level in msg.levels),
    }


def evaluation(record: Evaluation) -> evaluations_pb2.Evaluation:
    msg = evaluations_pb2.Evaluation(
        evaluation_id=record.evaluation_id,
        artifact_id=record.artifact_id,
        source=record.source,
        request_id=record.request_id,
    )
    msg.created_at.FromNanoseconds(int(record.created_at * 1e9))
    _fill(msg.workload, record.workload)
    _fill(msg.host, record.host)
    _fill(msg.price, record.price)
    for level in record.levels:
        _fill(msg.levels.add(), level)
    return msg


def level_metrics(record: LevelMetrics) -> evaluations_pb2.LevelMetrics:
    """One level in wire form (as `evaluation` fills each)."""
    msg = evaluations_pb2.LevelMetrics()
    _fill(msg, record)
    return msg
