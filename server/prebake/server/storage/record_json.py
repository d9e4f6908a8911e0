"""Compact JSON of the records every storage backend stores as text: producers and
worker capabilities.

One encoding for every backend (SQLite columns, DynamoDB attributes), so that a
registry moved from one engine to another keeps the same text. Floats round-trip
exactly (JSON numbers are written with `repr`).
"""

from __future__ import annotations

import json
from typing import Any

from prebake.server.records import Digest, Producer, WorkerCapability


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


def capabilities_json(capabilities: tuple[WorkerCapability, ...]) -> str:
    return to_json([[c.kind, c.toolchain, list(c.compile_targets)] for c in capabilities])


def capabilities_from_json(text: str) -> tuple[WorkerCapability, ...]:
    return tuple(
        WorkerCapability(str(kind), str(toolchain), tuple(str(t) for t in targets))
        for kind, toolchain, targets in json.loads(text)
    )
