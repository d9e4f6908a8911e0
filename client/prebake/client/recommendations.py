"""How `prebake recommend` and `prebake catalog presets` show their answers, and the `prebake
ensure` flags of a key (the command line a recommendation or a preset prints)."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from typing import Any

from google.protobuf import json_format

from prebake.client import render
from prebake.client.cli_errors import to_flags
from prebake.core.names import kind_name
from prebake.v1 import catalog_pb2, evaluations_pb2, key_pb2, registry_pb2

POLICY_NAMES: dict[int, str] = {
    registry_pb2.COMPATIBILITY_POLICY_LONGER_SEQUENCE: "longer_sequence",
    registry_pb2.COMPATIBILITY_POLICY_NEURONCORE_V2_FAMILY: "neuroncore_v2_family",
}
OBJECTIVE_NAMES: dict[int, str] = {
    evaluations_pb2.OBJECTIVE_LATENCY: "latency",
    evaluations_pb2.OBJECTIVE_THROUGHPUT: "throughput",
    evaluations_pb2.OBJECTIVE_COST: "cost",
}


def key_args(key: key_pb2.ArtifactKey, allow: Sequence[int] = ()) -> list[str]:
    """The key flags of `prebake ensure` (and lookup, fetch) that state `key` exactly."""
    args = ["--kind", kind_name(key.kind), "--model", key.model]
    if key.model_revision:
        args += ["--revision", key.model_revision]
    numbers = (
        ("--instance-type", key.instance_type),
        ("--sequence-length", key.sequence_length),
        ("--batch-size", key.batch_size),
        ("--tp", key.tensor_parallel_degree),
        ("--precision", key.precision),
        ("--toolchain", key.toolchain),
    )
    args += [word for flag, value in numbers if value for word in (flag, str(value))]
    for name in sorted(key.options):
        args += ["--option", f"{name}={key.options[name]}"]
    for policy in allow:
        args += ["--allow", POLICY_NAMES[policy]]
    return args


def ensure_command(args: Sequence[str]) -> str:
    return shlex.join(["prebake", "ensure", *args, "--dest", "DIR"])


def _value(objective: str, value: float) -> str:
    if objective == "cost":
        return f"{value:.4f}"
    return f"{value:,.1f}"


def recommend_text(response: registry_pb2.RecommendResponse, objective: str) -> str:
    header = ["RANK", "ARTIFACT", "KIND", "TARGET", "SEQ", "BATCH", "TP", "CONC", "TTFT P50", "ITL P50",
              "LATENCY P50", "TOK/S", "$/M"]  # fmt: skip
    rows = []
    for c in response.candidates:
        k, lv = c.key.key, c.level
        rows.append(
            [
                str(c.rank),
                c.artifact_id[:12],
                kind_name(k.kind),
                c.key.compile_target or "-",
                str(k.sequence_length or "-"),
                str(k.batch_size or "-"),
                str(k.tensor_parallel_degree or "-"),
                str(lv.concurrency),
                f"{lv.ttft_ms.p50:g}",
                f"{lv.itl_ms.p50:g}",
                f"{lv.client_latency_ms.p50:g}",
                f"{lv.output_tokens_per_second:,.1f}",
                f"{c.blended_price_per_million_tokens:.4f}" if c.blended_price_per_million_tokens else "-",
            ]
        )
    lines = [render.table(header, rows), ""]
    for c in response.candidates:
        lines.append(f"#{c.rank} {c.artifact_id} ({objective} {_value(objective, c.objective_value)})")
        lines += [f"  - {to_flags(reason)}" for reason in c.reasons]
    if response.excluded:
        lines += ["", f"not qualifying ({len(response.excluded)} of {response.considered} evaluated):"]
        lines += [f"  - {e.artifact_id[:12]}: {to_flags(e.reason)}" for e in response.excluded]
    top = response.candidates[0]
    lines += [
        "",
        "to deploy the top pick:",
        "  " + ensure_command(key_args(top.ensure_key, top.ensure_allow)),
    ]
    return "\n".join(lines)


def recommend_json(response: registry_pb2.RecommendResponse) -> dict[str, Any]:
    data: dict[str, Any] = json_format.MessageToDict(response, preserving_proto_field_name=True)
    for sent, c in zip(data.get("candidates", []), response.candidates, strict=True):
        sent["ensure_args"] = key_args(c.ensure_key, c.ensure_allow)
        sent["ensure_allow"] = [POLICY_NAMES[p] for p in c.ensure_allow]
    top = response.candidates[0]
    data["ensure_command"] = ensure_command(key_args(top.ensure_key, top.ensure_allow))
    return data


def presets_text(presets: Sequence[catalog_pb2.Preset]) -> str:
    header = [
        "PRESET",
        "OBJECTIVE",
        "KIND",
        "INSTANCE",
        "SEQ",
        "BATCH",
        "TP",
        "PRECISION",
        "ARTIFACT",
        "EVALUATED",
    ]
    rows = []
    for p in presets:
        k = p.key
        evaluated = "-"
        if p.evaluation.evaluation_id:
            best = min(p.evaluation.levels, key=lambda lv: lv.client_latency_ms.p50, default=None)
            evaluated = render.short_time(p.evaluation.created_at)
            if best is not None:
                evaluated += f" (c{best.concurrency}: {best.client_latency_ms.p50:g} ms)"
        rows.append(
            [
                p.name,
                OBJECTIVE_NAMES.get(p.objective, "-"),
                kind_name(k.kind),
                k.instance_type or "-",
                str(k.sequence_length or "-"),
                str(k.batch_size or "-"),
                str(k.tensor_parallel_degree or "-"),
                k.precision or "-",
                p.artifact_id[:12] or "-",
                evaluated,
            ]
        )
    return render.table(header, rows)


def preset_json(preset: catalog_pb2.Preset) -> dict[str, Any]:
    data: dict[str, Any] = json_format.MessageToDict(preset, preserving_proto_field_name=True)
    data["objective"] = OBJECTIVE_NAMES.get(preset.objective, "")
    data["ensure_args"] = key_args(preset.key)
    return data
