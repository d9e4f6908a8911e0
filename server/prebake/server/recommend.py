"""Recommendations: which evaluated artifact of a model best meets an objective, and why.

Pure functions over records (artifacts, their evaluations, normalised keys), so the ranking is
unit-tested on its own; `Registry.Recommend` (services/recommend_rpc.py) only gathers the
records. The rule, precisely:

1. **Candidates.** Every artifact of the model (under any of its names) that has an
   evaluation, each judged by its *newest* evaluation only (a new measurement supersedes the
   old; an older evaluation is never used, even when the newest lacks the requested
   concurrency). Artifacts that cannot be served (`unavailable`, a revoked signer) are excluded.
2. **Filters** (`serving`). `kind`: equal. `instance_types` and `sequence_length`: the artifact
   must serve one of the instance types (in the request's order) at that sequence length:
   the key of the artifact's fields with that instance type and sequence length normalises
   to the artifact's own key (an exact lookup would hit it), or, with `allow`, a compatibility
   policy admits the artifact for that key (`prebake.server.compat`, as a lookup would). An
   exact match is preferred over a policy match for the same instance type.
3. **Levels.** Of the evaluation's levels, those considered are: the one at `concurrency`
   when it is set, else every level. A level qualifies when it has no invocation errors
   (its latencies would be of the requests that succeeded), measured the objective's metric
   (a client latency, an output rate, a price: 0 means not measured), and meets the limits:
   `ttft_ms.p50 <= max_ttft_ms` and `itl_ms.p50 <= max_itl_ms` (medians, as the blended price
   uses; a limit of 0 is none; an unmeasured, 0, metric does not meet a limit).
4. **Objective value** of a level: LATENCY, `client_latency_ms.p50` (lower is better; not
   TTFT + ITL, which ignores the output length); THROUGHPUT, `output_tokens_per_second`
   (overall, higher is better); COST, the blended USD per million tokens (lower is better):
   the stored `blended_price_per_million_tokens`, else recomputed with `prebake.core.pricing`
   from the evaluation's `PriceInputs` (hourly price, discount) at concurrency / p50 ITL, else
   blended from the stored per-input and per-output prices at the recorded ratio.
5. **Chosen level** of a candidate: the qualifying level with the best objective value; ties
   go to the lower p50 client latency, then the higher output rate, then the lower concurrency.
6. **Ranking** of candidates: by their chosen level's objective value, then the same
   tie-breakers, then the newer evaluation, then the artifact id (so equal inputs always give
   the same order).
7. **Nothing qualifies**: `refusal` words why (no evaluation; the filters; the concurrency;
   errors or unmeasured metrics; the limits, naming the closest level: the smallest worst
   ratio of measured value to limit).

Client latency depends on the workload's output length: evaluations of different workloads
rank as measured; each candidate's reasons name its workload.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from prebake.core import pricing
from prebake.core.errors import InvalidKey
from prebake.core.evaluation_records import DEFAULT_INPUT_OUTPUT_RATIO, LevelMetrics
from prebake.server import compat
from prebake.server.key_normalization import KeyRequest, diff_keys, with_model
from prebake.server.records import Artifact, Evaluation, NormalizedKey


class Objective(enum.StrEnum):
    LATENCY = "latency"
    THROUGHPUT = "throughput"
    COST = "cost"


UNITS = {Objective.LATENCY: "ms", Objective.THROUGHPUT: "output tokens/s", Objective.COST: "$/M tokens"}
_WHAT = {
    Objective.LATENCY: "p50 client latency",
    Objective.THROUGHPUT: "output throughput",
    Objective.COST: "blended price",
}


@dataclass(frozen=True)
class Limits:
    """The request's constraints; 0 means none."""

    max_ttft_ms: float = 0.0
    max_itl_ms: float = 0.0
    concurrency: int = 0

    def words(self) -> str:
        said = [f"{name} {value:g}" for name, value in self._limits() if value]
        return " and ".join(said)

    def _limits(self) -> tuple[tuple[str, float], ...]:
        return (("max_ttft_ms", self.max_ttft_ms), ("max_itl_ms", self.max_itl_ms))


@dataclass(frozen=True)
class Serving:
    """How an artifact serves the request: the key to look up and the policies it needs."""

    request: KeyRequest
    policies: tuple[compat.Policy, ...] = ()
    reason: str = ""


@dataclass(frozen=True)
class Candidate:
    """An artifact that passed the filters, with its newest evaluation."""

    artifact: Artifact
    evaluation: Evaluation
    serving: Serving


@dataclass(frozen=True)
class Ranked:
    candidate: Candidate
    level: LevelMetrics
    value: float
    price: float  # blended $/M tokens as computed (0 when unknown)
    price_note: str  # "" for a stored price, else how it was obtained
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class Excluded:
    artifact_id: str
    reason: str
    # How far it got: 0 filters, 1 concurrency, 2 errors or unmeasured, 3 limits.
    stage: int
    # For stage 3: the worst measured/limit ratio of its closest level, and that level.
    closeness: float = math.inf
    level: LevelMetrics | None = None


@dataclass(frozen=True)
class Outcome:
    ranked: tuple[Ranked, ...]
    excluded: tuple[Excluded, ...]


# --- prices -----------------------------------------------------------------------------


def blended_price(evaluation: Evaluation, level: LevelMetrics) -> tuple[float, str]:
    """The level's blended $/M tokens and how it was had ("" stored; 0.0 when unknown)."""
    if level.blended_price_per_million_tokens > 0:
        return level.blended_price_per_million_tokens, ""
    p = evaluation.price
    ratio = p.input_output_ratio or DEFAULT_INPUT_OUTPUT_RATIO
    if p.hourly_usd > 0 and level.itl_ms.p50 > 0 and level.concurrency > 0:
        try:
            value = pricing.blended_price_per_million_tokens(p, level.concurrency, level.itl_ms.p50)
        except ValueError:
            pass
        else:
            discount = f" less {p.discount_rate:.0%}" if p.discount_rate else ""
            return value, f"recomputed from ${p.hourly_usd:g}/h{discount} at concurrency / p50 ITL"
    if level.price_per_million_input_tokens > 0 and level.price_per_million_output_tokens > 0:
        value = pricing.blend(
            level.price_per_million_input_tokens, level.price_per_million_output_tokens, ratio
        )
        return value, f"blended {ratio:g}:1 from the input and output prices"
    return 0.0, ""


def objective_value(objective: Objective, level: LevelMetrics, price: float) -> float:
    """The level's value for `objective` (0.0: not measured)."""
    if objective is Objective.LATENCY:
        return level.client_latency_ms.p50
    if objective is Objective.THROUGHPUT:
        return level.output_tokens_per_second
    return price


def _order(objective: Objective, value: float, level: LevelMetrics) -> tuple[float, float, float, int]:
    """Sort key: better first (see the module docstring, 5 and 6)."""
    signed = -value if objective is Objective.THROUGHPUT else value
    return (signed, level.client_latency_ms.p50, -level.output_tokens_per_second, level.concurrency)


# --- one candidate ------------------------------------------------------------------------


def _violations(level: LevelMetrics, limits: Limits) -> list[tuple[str, float, float]]:
    """(limit name, measured p50, limit) for each limit the level does not meet."""
    out = []
    for name, limit, measured in (
        ("max_ttft_ms", limits.max_ttft_ms, level.ttft_ms.p50),
        ("max_itl_ms", limits.max_itl_ms, level.itl_ms.p50),
    ):
        if limit and not (0 < measured <= limit):
            out.append((name, measured, limit))
    return out


def _closeness(violations: Sequence[tuple[str, float, float]]) -> float:
    return max((measured / limit if measured > 0 else math.inf) for _, measured, limit in violations)


def _p50s(level: LevelMetrics) -> str:
    return f"TTFT p50 {level.ttft_ms.p50:g} ms, ITL p50 {level.itl_ms.p50:g} ms"


def judge(candidate: Candidate, objective: Objective, limits: Limits) -> Ranked | Excluded:
    """The candidate's chosen level (Ranked, without ranking reasons yet), or why none qualifies."""
    evaluation = candidate.evaluation
    artifact_id = candidate.artifact.artifact_id
    levels = list(evaluation.levels)
    if limits.concurrency:
        levels = [lv for lv in levels if lv.concurrency == limits.concurrency]
        if not levels:
            measured = ", ".join(str(lv.concurrency) for lv in evaluation.levels)
            return Excluded(
                artifact_id, f"no level at concurrency {limits.concurrency} (measured: {measured})", 1
            )
    usable: list[tuple[LevelMetrics, float, float, str]] = []
    unusable: list[str] = []
    for level in levels:
        if level.invocation_errors:
            unusable.append(
                f"concurrency {level.concurrency} had {level.invocation_errors} invocation errors"
            )
            continue
        price, note = blended_price(evaluation, level)
        value = objective_value(objective, level, price)
        if value <= 0:
            unusable.append(f"concurrency {level.concurrency} measured no {_WHAT[objective]}")
            continue
        usable.append((level, value, price, note))
    if not usable:
        return Excluded(artifact_id, "; ".join(unusable), 2)
    meeting = [u for u in usable if not _violations(u[0], limits)]
    if not meeting:
        closest = min(usable, key=lambda u: (_closeness(_violations(u[0], limits)), u[0].concurrency))
        level = closest[0]
        return Excluded(
            artifact_id,
            f"no level meets {limits.words()}: the closest, concurrency {level.concurrency}, "
            f"has {_p50s(level)}",
            3,
            _closeness(_violations(level, limits)),
            level,
        )
    level, value, price, note = min(meeting, key=lambda u: _order(objective, u[1], u[0]))
    return Ranked(
        candidate, level, value, price, note, _level_reasons(objective, limits, level, meeting, usable)
    )


def _fmt(objective: Objective, value: float) -> str:
    if objective is Objective.COST:
        return f"${value:.4f} per 1M tokens"
    return f"{value:.1f} {UNITS[objective]}"


def _level_reasons(
    objective: Objective,
    limits: Limits,
    level: LevelMetrics,
    meeting: Sequence[tuple[LevelMetrics, float, float, str]],
    usable: Sequence[tuple[LevelMetrics, float, float, str]],
) -> tuple[str, ...]:
    reasons = []
    if limits.concurrency:
        reasons.append(f"concurrency {level.concurrency}, as requested")
    elif len(meeting) == 1 and len(usable) == 1:
        reasons.append(f"concurrency {level.concurrency}: its only usable level")
    else:
        others = [f"{u[0].concurrency}: {_fmt(objective, u[1])}" for u in meeting if u[0] is not level]
        left_out = len(usable) - len(meeting)
        why = f"concurrency {level.concurrency}: the best {_WHAT[objective]} of the levels meeting the limits"
        if others:
            why += f" (others: {'; '.join(others)})"
        if left_out:
            why += f"; {left_out} level(s) exceed the limits"
        reasons.append(why)
    if limits.words():
        reasons.append(f"meets {limits.words()} ({_p50s(level)})")
    return tuple(reasons)


# --- ranking --------------------------------------------------------------------------------


def rank(candidates: Iterable[Candidate], objective: Objective, limits: Limits) -> Outcome:
    """Every candidate ranked (best first) or excluded with why (see the module docstring)."""
    ranked: list[Ranked] = []
    excluded: list[Excluded] = []
    for candidate in candidates:
        verdict = judge(candidate, objective, limits)
        if isinstance(verdict, Ranked):
            ranked.append(verdict)
        else:
            excluded.append(verdict)
    ranked.sort(
        key=lambda r: (
            _order(objective, r.value, r.level),
            -r.candidate.evaluation.created_at,
            r.candidate.artifact.artifact_id,
        )
    )
    out = []
    for i, r in enumerate(ranked):
        out.append(replace(r, reasons=(_rank_reason(objective, ranked, i), *r.reasons, *_context(r))))
    return Outcome(tuple(out), tuple(excluded))


def _rank_reason(objective: Objective, ranked: Sequence[Ranked], i: int) -> str:
    mine = ranked[i]
    what = f"{_WHAT[objective]} {_fmt(objective, mine.value)}"
    if len(ranked) == 1:
        return f"{what}: the only qualifying artifact"
    if i == 0:
        nxt = ranked[1]
        if nxt.value == mine.value:
            other = nxt.candidate.artifact.artifact_id[:12]
            return f"{what}, tied with the next ({other}); first by the tie-breakers"
        return f"{what}: best; the next has {_fmt(objective, nxt.value)}"
    prev = ranked[i - 1]
    if prev.value == mine.value:
        return f"{what}, tied with rank {i}; after it by the tie-breakers"
    return f"{what}: behind rank {i} ({_fmt(objective, prev.value)})"


def measured_on(evaluation: Evaluation) -> str:
    return evaluation.price.instance_type or evaluation.host.instance_type


def _context(r: Ranked) -> tuple[str, ...]:
    e = r.candidate.evaluation
    w = e.workload
    where = measured_on(e) or e.host.hostname or "an unknown host"
    out = [
        f"measured on {where}: {w.requests} requests of {w.prompt_tokens} prompt + "
        f"{w.output_tokens} output tokens (evaluation {e.evaluation_id})"
    ]
    if r.price_note:
        out.append(f"price {r.price_note}")
    if r.candidate.serving.reason:
        out.append(r.candidate.serving.reason)
    return tuple(out)


def refusal(
    model: str, objective: Objective, limits: Limits, considered: int, excluded: Sequence[Excluded]
) -> str:
    """Why nothing qualifies, for a FAILED_PRECONDITION (see the module docstring, 7)."""
    if not considered:
        return (
            f"no artifact of {model} has an evaluation (ImportEvaluation stores one: "
            "prebake evaluations import)"
        )
    stage = max(e.stage for e in excluded)
    furthest = [e for e in excluded if e.stage == stage]
    if stage == 3:
        best = min(furthest, key=lambda e: (e.closeness, e.artifact_id))
        assert best.level is not None
        return (
            f"no evaluated artifact of {model} meets {limits.words()}: the closest is {best.artifact_id} "
            f"at concurrency {best.level.concurrency} with {_p50s(best.level)}"
        )
    what = {
        0: "serves the filters",
        1: f"has a level at concurrency {limits.concurrency}",
        2: f"has a level without invocation errors that measured its {_WHAT[objective]}",
    }[stage]
    shown = "; ".join(f"{e.artifact_id}: {e.reason}" for e in furthest[:3])
    more = f"; and {len(furthest) - 3} more" if len(furthest) > 3 else ""
    return f"no evaluated artifact of {model} {what} ({considered} considered; {shown}{more})"


# --- filters --------------------------------------------------------------------------------

Normalize = Callable[[KeyRequest], NormalizedKey]


def request_of(key: NormalizedKey, instance_type: str = "", sequence_length: int = 0) -> KeyRequest:
    """The key request of `key`'s fields, the instance type and sequence length replaced when given."""
    return KeyRequest(
        kind=key.kind,
        model=key.model,
        model_revision=key.model_revision,
        instance_type=instance_type or key.instance_type,
        sequence_length=sequence_length or key.sequence_length,
        batch_size=key.batch_size,
        tensor_parallel_degree=key.tensor_parallel_degree,
        precision=key.precision,
        toolchain=key.toolchain,
        options=dict(key.options),
    )


def serving(
    artifact: Artifact,
    instance_types: Sequence[str],
    sequence_length: int,
    allowed: Sequence[compat.Policy],
    normalize: Normalize,
) -> Serving | str:
    """How `artifact` serves the filters (module docstring, 2), or why it does not.

    `normalize` is the server's key normalisation with its catalogs (the toolchain is always
    stated, so no resolution is involved); an InvalidKey from it means "does not serve".
    """
    key = artifact.key
    if not instance_types and not sequence_length:
        return Serving(request_of(key))
    why: list[str] = []
    by_policy: Serving | None = None
    for instance_type in instance_types or [""]:
        wanted = request_of(key, instance_type, sequence_length)
        shown = instance_type or key.instance_type or key.compile_target
        try:
            requested = normalize(wanted)
        except InvalidKey as exc:
            why.append(f"not for {shown}: {exc}")
            continue
        if with_model(requested, key.model).digest == artifact.artifact_id:
            return Serving(wanted)
        if by_policy is None and compat.applies(requested, allowed):
            match = compat.choose(with_model(requested, key.model), [artifact], allowed)
            if match is not None:
                policies = tuple(compat.Policy(p) for p in match.policy.split("+"))
                by_policy = Serving(
                    wanted, policies, f"served with `allow` {'+'.join(policies)}: {match.reason}"
                )
                continue
        why.append(_not_served(artifact, with_model(requested, key.model), shown))
    return by_policy if by_policy is not None else "; ".join(why)


def _not_served(artifact: Artifact, wanted: NormalizedKey, shown: str) -> str:
    have = artifact.key
    differing = [name for name, _, _ in diff_keys(have, wanted)]
    parts = []
    if "compile_target" in differing:
        parts.append(f"compiled for {have.compile_target}, {shown} is {wanted.compile_target}")
    if "sequence_length" in differing:
        parts.append(f"compiled for sequence_length {have.sequence_length}, not {wanted.sequence_length}")
    said = "; ".join(parts) or f"its key differs from the key for {shown} ({', '.join(differing)})"
    hint = compat.would_hit_with(wanted, artifact, differing)
    if hint:
        said += f" (`allow` {' + '.join(hint)} would admit it)"
    return said
