"""The status page's HTML: plain server-rendered pages, no scripts, no external assets.

Pure functions of the snapshots in `prebake.server.status_data` (safe to call off the
event loop). Every value that reaches the page goes through `_e` (`html.escape`): model
names, worker ids, job messages and compile logs come from users and workers. Elements
carry stable classes and `data-*` attributes, so the page can be read by scripts and
tests as well as by people.
"""

from __future__ import annotations

import datetime
import html
import urllib.parse
from collections.abc import Iterable, Sequence

from prebake.core import names
from prebake.core.evaluation_records import LevelMetrics
from prebake.core.units import human_bytes
from prebake.server.hit_history import Interval
from prebake.server.records import (
    Artifact,
    Evaluation,
    Job,
    JobEvent,
    JobState,
    NormalizedKey,
    WorkerRecord,
)
from prebake.server.status_data import JobDetail, Overview, OverviewQuery

SPARK_WIDTH = 360
SPARK_HEIGHT = 48
RECENT_INTERVALS = 10
# A job page of an active job reloads itself this often (plain HTML: a meta refresh).
ACTIVE_JOB_REFRESH_SECONDS = 2

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:2rem}
table{border-collapse:collapse;font-size:.9rem}
th,td{border-bottom:1px solid #ddd;padding:.25rem .6rem;text-align:left;vertical-align:top}
td.num,th.num{text-align:right}
pre{background:#f6f6f6;padding:.6rem;overflow:auto;max-height:40rem;white-space:pre-wrap}
.state-succeeded{color:#176b2c}.state-failed{color:#a11}.state-cancelled{color:#777}
.live{color:#176b2c}.expired{color:#a11}
form label{margin-right:.8rem}
.note{color:#666;font-size:.85rem}
"""


def _e(value: object) -> str:
    """`value` as HTML text or attribute value."""
    return html.escape(str(value), quote=True)


def _when(at: float | None, now: float) -> str:
    """'2026-12-02 13:05:00Z (12 s ago)'; '-' for None."""
    if at is None:
        return "-"
    stamp = datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    delta = now - at
    ago = f"{_duration(abs(delta))} {'ago' if delta >= 0 else 'from now'}"
    return f'<time datetime="{_e(stamp)}">{_e(stamp)}</time> <span class="note">({_e(ago)})</span>'


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction * 100:.1f}%"


def _href(query: OverviewQuery, **changes: str) -> str:
    params = query.params(**changes)
    return "/?" + urllib.parse.urlencode(params) if params else "/"


def _table(headers: Sequence[str], rows: Iterable[str], css_class: str, empty: str) -> str:
    body = "".join(rows)
    if not body:
        return f'<p class="note {css_class}-empty">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def document(title: str, body: str, *, refresh_seconds: int | None = None) -> str:
    """A complete HTML page."""
    refresh = f'<meta http-equiv="refresh" content="{refresh_seconds}">' if refresh_seconds else ""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">{refresh}'
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>{body}</body></html>"
    )


def error_page(status: int, reason: str, message: str) -> str:
    """The page of a refused request: the status and what to change."""
    body = f'<h1>{status} {_e(reason)}</h1><p id="error">{_e(message)}</p><p><a href="/">status page</a></p>'
    return document(f"{status} {reason}", body)


def key_summary(key: NormalizedKey) -> str:
    """The key's relevant fields in one line (plain text)."""
    parts = [key.kind, key.model]
    if key.model_revision:
        parts.append(f"@{key.model_revision[:12]}")
    if key.instance_type or key.compile_target:
        parts.append(key.instance_type or key.compile_target)
    for label, value in (
        ("seq", key.sequence_length),
        ("batch", key.batch_size),
        ("tp", key.tensor_parallel_degree),
    ):
        if value:
            parts.append(f"{label} {value}")
    parts += [p for p in (key.precision, key.toolchain) if p]
    return " ".join(parts)


# --- the overview -----------------------------------------------------------------------


def render_overview(o: Overview) -> str:
    """`/`: store usage, hit ratio, workers, jobs and artifacts."""
    body = (
        "<h1>prebake status</h1>"
        f'<p class="note">up since {_when(o.started_at, o.now)}; read {_when(o.now, o.now)} '
        f'<a href="{_e(_href(o.query))}">reload</a> · <a href="/metrics">metrics</a></p>'
        + _usage_section(o)
        + _hit_ratio_section(o)
        + _workers_section(o.workers, o.now)
        + _jobs_section(o)
        + _evaluations_section(o)
        + _artifacts_section(o)
    )
    return document("prebake status", body)


def _usage_section(o: Overview) -> str:
    u, quota = o.usage, o.usage.max_store_bytes
    used = u.used_bytes
    if quota:
        meter = f'<meter id="store-meter" min="0" max="{quota}" value="{min(used, quota)}"></meter>'
        against = f"{_e(human_bytes(used))} of {_e(human_bytes(quota))} ({_percent(used / quota)})"
    else:
        meter, against = "", f"{_e(human_bytes(used))} (no quota: max_store_bytes is 0)"
    jobs = ", ".join(f"{_e(state)} {count}" for state, count in o.counts.jobs_by_state.items())
    return (
        '<h2 id="store">Store</h2><table class="store"><tbody>'
        f'<tr><th>used</th><td id="store-used" data-bytes="{used}" data-quota="{quota}">'
        f"{against} {meter}</td></tr>"
        f"<tr><th>published blobs</th><td>{o.blob_count} ({_e(human_bytes(u.blob_bytes))})</td></tr>"
        f"<tr><th>unfinished uploads</th><td>{_e(human_bytes(u.upload_bytes + u.reserved_bytes))}</td></tr>"
        f'<tr><th>artifacts</th><td id="artifact-count">{o.counts.artifacts} '
        f"({o.counts.pinned_artifacts} pinned)</td></tr>"
        f'<tr><th>jobs</th><td id="job-counts">{jobs}</td></tr>'
        "</tbody></table>"
    )


def sparkline(intervals: Sequence[Interval]) -> str:
    """An inline SVG of the per-interval hit ratio (intervals without lookups are gaps)."""
    points = [(i, iv.ratio) for i, iv in enumerate(intervals) if iv.ratio is not None]
    if len(points) < 2:
        return ""
    span = max(len(intervals) - 1, 1)

    def xy(i: int, ratio: float) -> str:
        return f"{i * SPARK_WIDTH / span:.1f},{(1 - ratio) * (SPARK_HEIGHT - 4) + 2:.1f}"

    line = " ".join(xy(i, r) for i, r in points)
    return (
        f'<svg id="hit-sparkline" width="{SPARK_WIDTH}" height="{SPARK_HEIGHT}" '
        f'viewBox="0 0 {SPARK_WIDTH} {SPARK_HEIGHT}" role="img" aria-label="hit ratio per interval">'
        f"<title>hit ratio per interval, 0-100%</title>"
        f'<rect width="{SPARK_WIDTH}" height="{SPARK_HEIGHT}" fill="#f6f6f6"/>'
        f'<polyline fill="none" stroke="#1b5fa8" stroke-width="2" points="{line}"/></svg>'
    )


def _hit_ratio_section(o: Overview) -> str:
    lifetime = o.hits / o.lookups if o.lookups else None
    busy = [iv for iv in o.intervals if iv.lookups][-RECENT_INTERVALS:]
    rows = (
        f'<tr class="interval"><td>{_when(iv.start, o.now)}</td><td>{_duration(iv.end - iv.start)}</td>'
        f'<td class="num">{iv.lookups}</td><td class="num">{iv.hits}</td>'
        f'<td class="num">{_percent(iv.ratio)}</td></tr>'
        for iv in reversed(busy)
    )
    return (
        '<h2 id="hits">Hit ratio</h2>'
        f'<p>since start-up: <strong id="hit-ratio" data-lookups="{o.lookups}" data-hits="{o.hits}">'
        f"{_percent(lifetime)}</strong> ({o.hits} hits, {o.misses} misses of {o.lookups} lookups)</p>"
        + sparkline(o.intervals)
        + _table(
            ["from", "for", "lookups", "hits", "hit ratio"],
            rows,
            "intervals",
            "no lookups in the sampled history yet",
        )
    )


def _capabilities(worker: WorkerRecord) -> str:
    return "<br>".join(
        f'<span class="capability">{_e(c.kind)} {_e(c.toolchain)}'
        f"{(' for ' + _e(', '.join(c.compile_targets))) if c.compile_targets else ' for any target'}</span>"
        for c in worker.capabilities
    )


def _worker_row(w: WorkerRecord, now: float) -> str:
    liveness = "live" if w.live(now) else "expired"
    return (
        f'<tr class="worker" data-worker-id="{_e(w.worker_id)}"><td>{_e(w.worker_id)}</td>'
        f'<td class="liveness {liveness}">{liveness}</td><td>{_capabilities(w)}</td>'
        f"<td>{_when(w.last_seen, now)}</td><td>{_when(w.expires_at, now)}</td></tr>"
    )


def _workers_section(workers: Sequence[WorkerRecord], now: float) -> str:
    rows = (_worker_row(w, now) for w in workers)
    return '<h2 id="workers">Workers</h2>' + _table(
        ["worker", "liveness", "capabilities", "last heard", "live until"], rows, "workers", "no workers yet"
    )


def _job_row(job: Job, now: float) -> str:
    text = job.error or job.message
    return (
        f'<tr class="job" data-job-id="{_e(job.job_id)}">'
        f'<td><a href="/jobs/{_e(job.job_id)}">{_e(job.job_id)}</a></td>'
        f'<td class="state state-{_e(job.state)}">{_e(job.state)}</td>'
        f'<td class="progress num">{_percent(job.progress)}</td>'
        f"<td>{_e(key_summary(job.key))}</td><td>{_e(job.worker or '-')}</td>"
        f'<td class="message">{_e(text[:200] + ("…" if len(text) > 200 else ""))}</td>'
        f"<td>{_when(job.updated_at, now)}</td></tr>"
    )


def _level_cell(level: LevelMetrics) -> str:
    price = (
        f" · ${level.blended_price_per_million_tokens:.3g}/M tokens"
        if level.blended_price_per_million_tokens
        else ""
    )
    errors = level.invocation_errors + level.empty_responses + level.tokenizer_failures
    return (
        f'<li class="level" data-concurrency="{level.concurrency}">c={level.concurrency}: '
        f"TTFT {level.ttft_ms.p50:.1f} ms · ITL {level.itl_ms.p50:.1f} ms · "
        f"{level.output_tokens_per_second:.1f} output tok/s{price}"
        f"{f' · {errors} failed' if errors else ''}</li>"
    )


def _evaluation_row(e: Evaluation, now: float) -> str:
    w = e.workload
    return (
        f'<tr class="evaluation" data-evaluation-id="{_e(e.evaluation_id)}" '
        f'data-artifact-id="{_e(e.artifact_id)}">'
        f'<td class="model">{_e(e.model)}</td><td class="artifact">{_e(e.artifact_id)}</td>'
        f'<td class="workload">{w.prompt_tokens} in / {w.output_tokens} out tokens, '
        f"{w.requests} requests</td>"
        f'<td><ul class="levels">{"".join(_level_cell(level) for level in e.levels)}</ul></td>'
        f'<td class="price-inputs">{_e(e.price.instance_type or "-")}'
        f"{f' at ${e.price.hourly_usd:.4g}/h' if e.price.hourly_usd else ''}</td>"
        f'<td class="source">{_e(e.source or "-")}</td><td>{_when(e.created_at, now)}</td></tr>'
    )


def _evaluations_section(o: Overview) -> str:
    rows = (_evaluation_row(e, o.now) for e in o.evaluations)
    return '<h2 id="evaluations">Evaluations</h2>' + _table(
        ["model", "artifact", "workload", "per concurrency level (p50)", "priced as", "source", "measured"],
        rows,
        "evaluations",
        "no evaluations yet",
    )


def _options(selected: str, values: Iterable[str], any_label: str) -> str:
    choices = [("", any_label), *((v, v) for v in values)]
    return "".join(
        f'<option value="{_e(v)}"{" selected" if v == selected else ""}>{_e(label)}</option>'
        for v, label in choices
    )


def _jobs_section(o: Overview) -> str:
    q = o.query
    form = (
        '<form method="get" action="/" id="job-filter">'
        + "".join(
            f'<input type="hidden" name="{name}" value="{_e(value)}">'
            for name, value in q.params().items()
            if name in ("kind", "model", "instance_type")
        )
        + f'<label>state <select name="job_state">{_options(q.job_state, (s.value for s in JobState), "any")}'
        '</select></label><button type="submit">show</button></form>'
    )
    more = (
        f'<p><a id="jobs-next" href="{_e(_href(q, jobs_page=o.jobs.next_token))}">older jobs</a></p>'
        if o.jobs.next_token
        else ""
    )
    first = f'<p><a href="{_e(_href(q, jobs_page=""))}">newest jobs</a></p>' if q.jobs_page else ""
    return (
        '<h2 id="jobs">Jobs</h2>'
        + form
        + _table(
            ["job", "state", "progress", "key", "worker", "message", "updated"],
            (_job_row(j, o.now) for j in o.jobs.items),
            "jobs",
            "no jobs",
        )
        + more
        + first
    )


def _artifact_row(a: Artifact, now: float) -> str:
    unavailable = (
        f' <span class="state-failed">unavailable: {_e(a.unavailable)}</span>' if a.unavailable else ""
    )
    return (
        f'<tr class="artifact" data-artifact-id="{_e(a.artifact_id)}">'
        f'<td class="model">{_e(a.key.model)}{unavailable}</td><td class="kind">{_e(a.key.kind)}</td>'
        f'<td class="instance">{_e(a.key.instance_type or a.key.compile_target or "-")}</td>'
        f"<td>{_e(key_summary(a.key))}</td>"
        f'<td class="size num" data-bytes="{a.total_size}">{_e(human_bytes(a.total_size))}</td>'
        f'<td class="files num">{a.file_count}</td>'
        f'<td class="hits num">{a.hit_count}</td>'
        f'<td class="last-access">{_when(a.last_accessed_at, now)}</td>'
        f"<td>{'pinned' if a.pinned else ''}</td><td>{_when(a.created_at, now)}</td></tr>"
    )


def _artifacts_section(o: Overview) -> str:
    q = o.query
    form = (
        '<form method="get" action="/" id="artifact-search">'
        f'<label>kind <select name="kind">{_options(q.kind, names.kind_names(), "any")}</select></label>'
        f'<label>model <input name="model" value="{_e(q.model)}" placeholder="exact model id" size="32">'
        "</label>"
        f'<label>instance type <input name="instance_type" value="{_e(q.instance_type)}" '
        'placeholder="ml.inf2.48xlarge or a compile target"></label>'
        + (f'<input type="hidden" name="job_state" value="{_e(q.job_state)}">' if q.job_state else "")
        + '<button type="submit">search</button> <a href="/">clear</a></form>'
    )
    capped = (
        '<p class="note">the instance-type filter stops after a few thousand artifacts per page; '
        "the next page continues the search</p>"
        if o.artifacts_scan_capped
        else ""
    )
    more = (
        f'<p><a id="artifacts-next" href="{_e(_href(q, artifacts_page=o.artifacts.next_token))}">'
        "next page</a></p>"
        if o.artifacts.next_token
        else ""
    )
    first = f'<p><a href="{_e(_href(q, artifacts_page=""))}">first page</a></p>' if q.artifacts_page else ""
    rows = (_artifact_row(a, o.now) for a in o.artifacts.items)
    headers = ["model", "kind", "instance", "key", "size", "files", "hits", "last access", "", "published"]
    return (
        '<h2 id="artifacts">Artifacts</h2>'
        + form
        + capped
        + _table(headers, rows, "artifacts", "no artifacts match")
        + more
        + first
    )


# --- one job ------------------------------------------------------------------------------


def _event_row(event: JobEvent) -> str:
    job = event.job
    text = job.error or job.message
    return (
        f'<tr class="event" data-sequence="{event.sequence}"><td class="num">{event.sequence}</td>'
        f"<td>{_when(event.at, event.at)}</td>"
        f'<td class="state state-{_e(job.state)}">{_e(job.state)}</td>'
        f'<td class="num">{_percent(job.progress)}</td><td>{_e(job.worker or "-")}</td>'
        f'<td class="message">{_e(text)}</td></tr>'
    )


def render_job(d: JobDetail) -> str:
    """`/jobs/JOB_ID`: the job, its events and its compile log; reloads while active."""
    j, now = d.job, d.now
    fields = [
        ("state", f'<span id="job-state" class="state-{_e(j.state)}">{_e(j.state)}</span>'),
        ("progress", f'<span id="job-progress">{_percent(j.progress)}</span>'),
        ("key", f"{_e(key_summary(j.key))}<br><code>{_e(j.key.digest)}</code>"),
        ("worker", f'<span id="job-worker">{_e(j.worker or "-")}</span>'),
        ("attempts", f"{j.attempts} of {j.max_attempts}"),
        ("message", f'<span id="job-message">{_e(j.message)}</span>'),
        (
            "error",
            f'<span id="job-error">{_e(j.error)}</span>' + (f" ({_e(j.error_class)})" if j.error else ""),
        ),
        ("artifact", f'<code id="job-artifact">{_e(j.artifact_id or "-")}</code>'),
        ("model source", _e(j.model_source or "-")),
        ("created", _when(j.created_at, now)),
        ("updated", _when(j.updated_at, now)),
        ("finished", _when(j.finished_at, now)),
    ]
    summary = "".join(f"<tr><th>{_e(label)}</th><td>{value}</td></tr>" for label, value in fields)
    earlier = f'<p class="note">{d.earlier_events} earlier events not shown</p>' if d.earlier_events else ""
    if d.log_problem:
        log = f'<p id="job-log-problem">{_e(d.log_problem)}</p>'
    elif j.log is None:
        log = (
            '<p class="note" id="job-log-none">no compile log yet: a worker uploads it when the job ends</p>'
        )
    else:
        shown = human_bytes(len(d.log_tail.encode()))
        cut = f'<p class="note">the last {_e(shown)} of {_e(human_bytes(j.log.size))}</p>'
        log = (cut if d.log_truncated else "") + f'<pre id="job-log">{_e(d.log_tail)}</pre>'
    body = (
        f'<p><a href="/">status page</a></p><h1>job <code id="job-id">{_e(j.job_id)}</code></h1>'
        f'<table class="job-summary"><tbody>{summary}</tbody></table>'
        '<h2 id="events">Events</h2>'
        + earlier
        + _table(
            ["#", "at", "state", "progress", "worker", "message"],
            (_event_row(e) for e in d.events),
            "events",
            "no events",
        )
        + '<h2 id="log">Compile log</h2>'
        + log
    )
    refresh = ACTIVE_JOB_REFRESH_SECONDS if j.state.active else None
    return document(f"job {j.job_id}", body, refresh_seconds=refresh)
