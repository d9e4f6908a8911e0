"""Rows of interleaved measurements, the printed table, the JSON file and the target lines.

A `Row` holds one subject and one baseline, measured alternately in rounds: `subject[i]` and
`baseline[i]` are round i's figures (a median latency, a throughput, a duration). Its ratio
is median(subject) / median(baseline); its spread is the 25th-75th percentile of the
per-round ratios subject[i] / baseline[i] (min-max below four rounds). Whether a larger ratio
is better depends on the unit: for times lower is better, for rates higher.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

RATES = ("qps", "MiB/s")


@dataclass
class Row:
    name: str  # what --only selects
    what: str
    baseline: str
    unit: str  # "ms", "s", "qps", "MiB/s"
    subject: list[float] = field(default_factory=list)
    base: list[float] = field(default_factory=list)
    note: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    def add(self, subject: float, base: float) -> None:
        self.subject.append(subject)
        self.base.append(base)

    @property
    def ratio(self) -> float:
        if not self.subject or not self.base:
            return float("nan")
        b = statistics.median(self.base)
        return statistics.median(self.subject) / b if b else float("inf")

    @property
    def spread(self) -> tuple[float, float]:
        rounds = sorted(s / b if b else float("inf") for s, b in zip(self.subject, self.base, strict=True))
        if not rounds:
            return (float("nan"), float("nan"))
        if len(rounds) < 4:
            return (rounds[0], rounds[-1])
        q = statistics.quantiles(rounds, n=4)
        return (q[0], q[2])

    def as_json(self) -> dict[str, object]:
        out = asdict(self)
        out["ratio"] = self.ratio
        out["ratio_spread"] = list(self.spread)
        out["subject_median"] = statistics.median(self.subject) if self.subject else None
        out["baseline_median"] = statistics.median(self.base) if self.base else None
        return out


@dataclass(frozen=True)
class Target:
    """`ratio(row) op limit`; `also` names an extra condition (e.g. no failures) checked by
    `extra_ok` on the row."""

    title: str
    row: str
    op: str  # "<=" or ">="
    limit: float
    extra_key: str = ""  # a key of row.extra that must be 0 (e.g. failures)

    def check(self, rows: dict[str, Row]) -> tuple[str, str]:
        row = rows.get(self.row)
        if row is None or not row.subject:
            return ("n/a", "NOT RUN")
        ratio = row.ratio
        met = ratio <= self.limit if self.op == "<=" else ratio >= self.limit
        text = f"{ratio:.2f}x"
        if self.extra_key:
            bad = row.extra.get(self.extra_key, 0)
            text += f", {self.extra_key} {bad}"
            met = met and bad == 0
        return (text, "MET" if met else "MISSED")


def _fmt(value: float, unit: str) -> str:
    if math.isnan(value):
        return "-"
    if unit == "ms" and value < 1:
        return f"{value * 1000:.0f} µs"
    if abs(value) >= 100:
        return f"{value:,.0f} {unit}"
    return f"{value:.3g} {unit}"


def table(rows: Sequence[Row]) -> str:
    header = ("row", "prebake (median)", "baseline (median)", "ratio", "round ratios", "n", "vs")
    lines = []
    for r in rows:
        lo, hi = r.spread
        lines.append(
            (
                r.what,
                _fmt(statistics.median(r.subject), r.unit) if r.subject else "-",
                _fmt(statistics.median(r.base), r.unit) if r.base else "-",
                f"{r.ratio:.2f}x",
                f"{lo:.2f}-{hi:.2f}",
                str(len(r.subject)),
                r.baseline,
            )
        )
    widths = [
        max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)
    ]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    out.extend("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines)
    notes = [f"  {r.name}: {r.note}" for r in rows if r.note]
    if notes:
        out.append("notes:")
        out.extend(notes)
    return "\n".join(out)


def target_lines(targets: Sequence[Target], rows: dict[str, Row]) -> list[str]:
    lines = []
    for t in targets:
        text, verdict = t.check(rows)
        lines.append(f"TARGET {t.title} {t.op} {t.limit:g}x: {text} {verdict}")
    return lines


def write_json(path: Path, rows: Sequence[Row], targets: Sequence[Target], meta: dict[str, object]) -> None:
    by_name = {r.name: r for r in rows}
    payload = {
        "meta": meta,
        "rows": [r.as_json() for r in rows],
        "targets": [
            {**asdict(t), "result": t.check(by_name)[0], "verdict": t.check(by_name)[1]} for t in targets
        ],
    }
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
