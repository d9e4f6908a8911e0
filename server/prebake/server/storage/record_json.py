"""Compact JSON of the records every storage backend stores as text: producers,
signatures, worker capabilities and evaluations.

One encoding for every backend (SQLite columns, DynamoDB attributes), so that a
registry moved from one engine to another keeps the same text. Floats round-trip
exactly (JSON numbers are written with `repr`).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import typing
from functools import cache
from typing import Any

from prebake.core.signing import Signature
from prebake.server.records import Digest, Evaluation, EvaluationSpec, JobPurpose, Producer, WorkerCapability


def to_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def producer_json(producer: Producer) -> str:
    log = producer.log
    return to_json(
        {
            "worker": producer.worker,
            "toolchain_versions": [list(pair) for pair in producer.toolchain_versions],
            "compile_seconds": producer.compile_seconds,
            "log": None if log is None else [log.hash, log.size],
            "note": producer.note,
        }
    )


def producer_from_json(text: str) -> Producer:
    data = json.loads(text)
    log = data["log"]
    return Producer(
        worker=data["worker"],
        toolchain_versions=tuple((str(k), str(v)) for k, v in data["toolchain_versions"]),
        compile_seconds=float(data["compile_seconds"]),
        log=None if log is None else Digest(log[0], log[1]),
        note=data["note"],
    )


def signature_json(signature: Signature | None) -> str | None:
    """`{"key_id", "signature", "public_key"}` (bytes in base64), or None when unsigned."""
    if signature is None:
        return None
    return to_json(
        {
            "key_id": signature.key_id,
            "signature": base64.b64encode(signature.signature).decode(),
            "public_key": base64.b64encode(signature.public_key).decode(),
        }
    )


def signature_from_json(text: str | None) -> Signature | None:
    if text is None:
        return None
    data = json.loads(text)
    return Signature(
        key_id=str(data["key_id"]),
        signature=base64.b64decode(data["signature"]),
        public_key=base64.b64decode(data["public_key"]),
    )


def capabilities_json(capabilities: tuple[WorkerCapability, ...]) -> str:
    return to_json(
        [[c.kind, c.toolchain, list(c.compile_targets), [p.value for p in c.purposes]] for c in capabilities]
    )


def capabilities_from_json(text: str) -> tuple[WorkerCapability, ...]:
    # Capabilities written before job purposes existed have three parts: compile only.
    found = []
    for kind, toolchain, targets, *rest in json.loads(text):
        purposes = tuple(JobPurpose(p) for p in rest[0]) if rest else (JobPurpose.COMPILE,)
        found.append(WorkerCapability(str(kind), str(toolchain), tuple(str(t) for t in targets), purposes))
    return tuple(found)


def evaluation_spec_json(spec: EvaluationSpec) -> str:
    return to_json(dataclasses.asdict(spec))


def evaluation_spec_from_json(text: str) -> EvaluationSpec:
    found: EvaluationSpec = _record(EvaluationSpec, json.loads(text))
    return found


def evaluation_spec_from_data(data: dict[str, Any]) -> EvaluationSpec:
    found: EvaluationSpec = _record(EvaluationSpec, data)
    return found


def evaluation_json(evaluation: Evaluation) -> str:
    """The evaluation's fields as a JSON object (nested records as objects, tuples as arrays)."""
    return to_json(dataclasses.asdict(evaluation))


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _value(hint: Any, data: Any) -> Any:
    """`data` (decoded JSON) as the type `hint` of a record field."""
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return _record(hint, data)
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_value(args[0], item) for item in data)
        return tuple(_value(arg, item) for arg, item in zip(args, data, strict=True))
    return hint(data)  # int, float, str


def _record(cls: type, data: dict[str, Any]) -> Any:
    # Fields the text lacks keep their defaults: evaluations written before a field existed.
    hints = _hints(cls)
    return cls(
        **{f.name: _value(hints[f.name], data[f.name]) for f in dataclasses.fields(cls) if f.name in data}
    )


def evaluation_from_json(text: str) -> Evaluation:
    found: Evaluation = _record(Evaluation, json.loads(text))
    return found
