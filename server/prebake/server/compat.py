"""Compatibility policies: when an artifact compiled for another key may serve a request.

Pure functions over normalised keys, so the rules are table-tested on their own; the
registry only supplies candidates (same kind, model, revision, batch size,
tensor-parallel degree, precision, toolchain and options). Deterministic choice: the
smallest sufficient sequence length, then the requested compile target before another,
then the oldest artifact, then the artifact id.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from prebake.server.records import Artifact, NormalizedKey

# inf2 and trn1 (trn1n resolves to trn1) are both NeuronCore-v2; trn2 is v3.
NEURONCORE_V2 = frozenset({"inf2", "trn1"})


class Policy(enum.StrEnum):
    LONGER_SEQUENCE = "longer_sequence"
    NEURONCORE_V2_FAMILY = "neuroncore_v2_family"


@dataclass(frozen=True)
class Match:
    artifact: Artifact
    policy: str  # "exact", a policy name, or two joined by "+"
    reason: str


def candidate_targets(key: NormalizedKey, allowed: Iterable[Policy]) -> list[str]:
    """Compile targets whose artifacts may serve `key` under the allowed policies."""
    if Policy.NEURONCORE_V2_FAMILY in set(allowed) and key.compile_target in NEURONCORE_V2:
        return [key.compile_target, *sorted(NEURONCORE_V2 - {key.compile_target})]
    return [key.compile_target]


def applies(key: NormalizedKey, allowed: Iterable[Policy]) -> bool:
    """Whether any allowed policy can widen an exact lookup of `key` (neuron keys only)."""
    return key.kind == "neuron" and bool(set(allowed))


def choose(key: NormalizedKey, candidates: Sequence[Artifact], allowed: Iterable[Policy]) -> Match | None:
    """The best candidate the allowed policies admit for `key`, or None.

    A candidate must agree with `key` on everything but sequence length and compile
    target (the registry's query guarantees that); each of those two may differ only
    as an allowed policy says.
    """
    policies = set(allowed)
    targets = candidate_targets(key, policies)
    usable = []
    for artifact in candidates:
        other = artifact.key
        if other.compile_target not in targets:
            continue
        if other.sequence_length < key.sequence_length:
            continue
        if other.sequence_length > key.sequence_length and Policy.LONGER_SEQUENCE not in policies:
            continue
        usable.append(artifact)
    if not usable:
        return None
    best = min(
        usable,
        key=lambda a: (
            a.key.sequence_length,
            a.key.compile_target != key.compile_target,
            a.created_at,
            a.artifact_id,
        ),
    )
    return Match(best, *_explain(key, best.key))


# The fields a policy may relax (as `key_normalization.diff_keys` names them).
_RELAXABLE = frozenset({"sequence_length", "compile_target"})


def would_hit_with(key: NormalizedKey, near: Artifact, differing: Iterable[str]) -> list[Policy]:
    """The policies that, all allowed, would make `near` serve `key`; [] if none would.

    `differing` are the fields in which `near`'s key differs from `key` (diff_keys): a
    difference outside sequence length and compile target is one no policy relaxes.
    """
    fields = set(differing)
    if near.unavailable or not fields or not fields <= _RELAXABLE or not applies(key, Policy):
        return []
    match = choose(key, [near], list(Policy))
    return [] if match is None else [Policy(name) for name in match.policy.split("+")]


def _explain(wanted: NormalizedKey, got: NormalizedKey) -> tuple[str, str]:
    used: list[str] = []
    reasons: list[str] = []
    if got.sequence_length != wanted.sequence_length:
        used.append(Policy.LONGER_SEQUENCE.value)
        reasons.append(
            f"compiled for sequence_length {got.sequence_length}, which serves your {wanted.sequence_length}"
        )
    if got.compile_target != wanted.compile_target:
        used.append(Policy.NEURONCORE_V2_FAMILY.value)
        reasons.append(
            f"compiled for {got.compile_target}, which shares NeuronCore-v2 with your "
            f"{wanted.compile_target} ({wanted.instance_type}); tensor_parallel_degree "
            f"{got.tensor_parallel_degree} fits it"
        )
    return "+".join(used) or "exact", "; ".join(reasons) or "exact key match"


def exact_reason(key: NormalizedKey) -> str:
    """Why an exact match matched, naming what the kind ignores (e.g. AWQ and batch size)."""
    if key.ignored_fields:
        return f"exact key match ({key.kind} keys ignore {', '.join(key.ignored_fields)})"
    return "exact key match"
