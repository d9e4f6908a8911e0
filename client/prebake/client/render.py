"""How the CLI shows results: concise aligned text for people, one JSON object for scripts.

The JSON shapes are explicit (not `MessageToDict`) so that scripts see stable snake_case
names, integers as numbers (proto3 JSON would turn int64 into strings) and null for
absent values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf import json_format, timestamp_pb2

from prebake.client.artifact_key import ArtifactKey
from prebake.client.fetch import FetchResult
from prebake.client.prewarm import PrewarmRow
from prebake.client.progress import human_seconds
from prebake.core.names import error_class_name, job_state_name, kind_name, lookup_status_name, policy_name
from prebake.core.units import human_bytes
from prebake.v1 import admin_pb2, blobs_pb2, evaluations_pb2, jobs_pb2, key_pb2, registry_pb2, workers_pb2

# JSON --------------------------------------------------------------------------------


def timestamp_json(ts: timestamp_pb2.Timestamp) -> str | None:
    return ts.ToJsonString() if ts.seconds or ts.nanos else None


def digest_json(digest: blobs_pb2.Digest) -> dict[str, Any] | None:
    return {"hash": digest.hash, "size_bytes": digest.size_bytes} if digest.hash else None


def key_json(resolved: key_pb2.ResolvedKey) -> dict[str, Any]:
    key = ArtifactKey.from_proto(resolved.key)
    return {
        "digest": resolved.digest,
        "canonical": resolved.canonical,
        "schema_version": resolved.schema_version,
        "compile_target": resolved.compile_target,
        "key": {**dataclasses.asdict(key), "options": dict(key.options)},
        "relevant_fields": list(resolved.relevant_fields),
        "ignored_fields": list(resolved.ignored_fields),
    }


def artifact_json(artifact: registry_pb2.Artifact, files: bool = True) -> dict[str, Any]:
    producer = artifact.producer
    data: dict[str, Any] = {
        "artifact_id": artifact.artifact_id,
        "kind": kind_name(artifact.key.key.kind),
        "model": artifact.key.key.model,
        "key": key_json(artifact.key),
        "file_count": artifact.file_count or len(artifact.files),
        "total_size_bytes": artifact.total_size_bytes,
        "manifest_digest": artifact.manifest_digest,
        # The key id the producer signed with, as the server recorded it (null: unsigned, or a
        # listing); `--trust` verifies the signature itself.
        "signer": artifact.signature.key_id if artifact.HasField("signature") else None,
        "pinned": artifact.pinned,
        # Why it cannot be served (a blob lost); null while it can.
        "unavailable": artifact.unavailable or None,
        "hit_count": artifact.hit_count,
        "created_at": timestamp_json(artifact.created_at),
        "last_accessed_at": timestamp_json(artifact.last_accessed_at),
        "producer": {
            "worker": producer.worker,
            "toolchain_versions": dict(producer.toolchain_versions),
            "compile_seconds": producer.compile_seconds,
            "log": digest_json(producer.log),
            "note": producer.note,
        },
    }
    if files:
        data["files"] = [
            {
                "path": f.path,
                "hash": f.digest.hash,
                "size_bytes": f.digest.size_bytes,
                "executable": f.executable,
            }
            for f in artifact.files
        ]
    return data


def job_json(job: jobs_pb2.Job) -> dict[str, Any]:
    return {
        "job_id": job.job_id,
        "state": job_state_name(job.state),
        "kind": kind_name(job.key.key.kind),
        "model": job.key.key.model,
        "key_digest": job.key.digest,
        "progress": job.progress,
        "message": job.message,
        "error": job.error or None,
        "error_class": error_class_name(job.error_class) or None,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "artifact_id": job.artifact_id or None,
        "worker": job.worker or None,
        "model_source": job.model_source or None,
        "log": digest_json(job.log),
        "created_at": timestamp_json(job.created_at),
        "updated_at": timestamp_json(job.updated_at),
        "lease_expires_at": timestamp_json(job.lease_expires_at),
        "finished_at": timestamp_json(job.finished_at),
        # Compile or evaluate; an evaluation job's stored evaluation once it succeeded.
        "purpose": "evaluate" if job.purpose == jobs_pb2.JOB_PURPOSE_EVALUATE else "compile",
        "evaluation_id": job.evaluation_id or None,
    }


def near_miss_json(near: registry_pb2.NearMiss) -> dict[str, Any]:
    return {
        "artifact_id": near.artifact_id,
        "key_digest": near.key.digest,
        "differences": [
            {"field": d.field, "artifact_value": d.artifact_value, "requested_value": d.requested_value}
            for d in near.differences
        ],
        "would_hit_with": [policy_name(p) for p in near.would_hit_with],
    }


def lookup_json(response: registry_pb2.LookupResponse) -> dict[str, Any]:
    has_job = response.HasField("job") and bool(response.job.job_id)
    hit = response.status == registry_pb2.LOOKUP_STATUS_HIT
    return {
        "status": lookup_status_name(response.status),
        "key_digest": response.key.digest,
        "job_id": response.job.job_id if has_job else None,
        "job_created": response.job_created,
        "error": response.error or None,
        "artifact": artifact_json(response.artifact, files=False) if hit else None,
        "match_reason": response.match_reason or None,
        "matched_policy": response.matched_policy or None,
        "job": job_json(response.job) if has_job else None,
        "nearest": [near_miss_json(n) for n in response.nearest],
        "key": key_json(response.key),
    }


def fetch_json(result: FetchResult) -> dict[str, Any]:
    data = dataclasses.asdict(result)
    data["dest"] = str(result.dest)
    return data


def stats_json(stats: admin_pb2.Stats) -> dict[str, Any]:
    return {
        "artifacts": stats.artifacts,
        "pinned_artifacts": stats.pinned_artifacts,
        "blobs": stats.blobs,
        "blob_bytes": stats.blob_bytes,
        "lookups": stats.lookups,
        "hits": stats.hits,
        "misses": stats.misses,
        "hit_rate": stats.hit_rate,
        "jobs_by_state": dict(stats.jobs_by_state),
        "queue_depth": stats.queue_depth,
        "bytes_served": stats.bytes_served,
        "bytes_received": stats.bytes_received,
        "started_at": timestamp_json(stats.started_at),
    }


def gc_json(report: admin_pb2.CollectGarbageResponse) -> dict[str, Any]:
    usage = report.usage
    return {
        "dry_run": report.dry_run,
        "stale_uploads": {"count": report.stale_uploads, "bytes": report.stale_upload_bytes},
        "quarantined_blobs": {"count": report.quarantined_blobs, "bytes": report.quarantined_bytes},
        "orphaned_blobs": {"count": report.orphaned_blobs, "bytes": report.orphaned_bytes},
        "evicted_artifacts": {
            "ids": list(report.evicted_artifact_ids),
            "blobs": report.evicted_blobs,
            "bytes": report.evicted_bytes,
        },
        "kept_in_use": report.kept_in_use,
        "usage": {
            "blob_bytes": usage.blob_bytes,
            "upload_bytes": usage.upload_bytes,
            "reserved_bytes": usage.reserved_bytes,
            "used_bytes": usage.blob_bytes + usage.upload_bytes + usage.reserved_bytes,
            "max_store_bytes": usage.max_store_bytes,
        },
    }


# Text --------------------------------------------------------------------------------


def rows(pairs: Iterable[tuple[str, str]], indent: str = "  ") -> str:
    """Aligned "label  value" lines, skipping empty values."""
    items = [(label, value) for label, value in pairs if value]
    width = max((len(label) for label, _ in items), default=0)
    return "\n".join(f"{indent}{label:<{width}}  {value}" for label, value in items)


def table(headers: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns; the last column is not padded."""
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    lines = []
    for row in [list(headers), *body]:
        cells = [cell.ljust(widths[i]) if i < len(row) - 1 else cell for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def short_time(ts: timestamp_pb2.Timestamp) -> str:
    if not (ts.seconds or ts.nanos):
        return ""
    return ts.ToDatetime().strftime("%Y-%m-%d %H:%M:%SZ")


def describe_key(resolved: key_pb2.ResolvedKey) -> str:
    text = ArtifactKey.from_proto(resolved.key).describe()
    return f"{text} (target {resolved.compile_target})" if resolved.compile_target else text


def size_summary(file_count: int, total_bytes: int) -> str:
    return f"{file_count} file{'s' if file_count != 1 else ''}, {human_bytes(total_bytes)}"


def job_summary(job: jobs_pb2.Job) -> str:
    text = job_state_name(job.state)
    if job.state == jobs_pb2.JOB_STATE_LEASED:
        text += f" {job.progress * 100:.0f}%"
        if job.worker:
            text += f" on {job.worker}"
    if job.message and job.state in (jobs_pb2.JOB_STATE_QUEUED, jobs_pb2.JOB_STATE_LEASED):
        text += f": {job.message}"
    return text


def differences_text(near: registry_pb2.NearMiss) -> str:
    text = ", ".join(
        f"{d.field} {d.artifact_value or '(unset)'} (you asked {d.requested_value or '(unset)'})"
        for d in near.differences
    )
    if near.would_hit_with:
        allow = " ".join(f"--allow {policy_name(p)}" for p in near.would_hit_with)
        text += f"; a hit with {allow}"
    return text


def lookup_text(response: registry_pb2.LookupResponse, explain: bool = False) -> str:
    """Human output of a lookup. On a miss, the closest artifact and its differences;
    with `explain`, the canonical key, the fields that count, and every near artifact
    field by field."""
    status = lookup_status_name(response.status)
    lines = []
    if response.status == registry_pb2.LOOKUP_STATUS_HIT:
        artifact = response.artifact
        why = response.match_reason or "matched"
        if response.matched_policy and response.matched_policy not in why:
            why += f", policy {response.matched_policy}"
        lines.append(f"HIT  artifact {artifact.artifact_id}")
        lines.append(
            rows(
                [
                    ("key", describe_key(artifact.key)),
                    (
                        "files",
                        size_summary(artifact.file_count or len(artifact.files), artifact.total_size_bytes),
                    ),
                    ("why", why),
                    ("created", short_time(artifact.created_at)),
                    ("pinned", "yes" if artifact.pinned else ""),
                ]
            )
        )
        return "\n".join(lines)
    lines.append(f"{status}  key {response.key.digest}")
    job = response.job if response.HasField("job") and response.job.job_id else None
    pairs = [("key", describe_key(response.key))]
    if response.key.ignored_fields:
        kind = kind_name(response.key.key.kind)
        pairs.append(("ignored", f"{', '.join(response.key.ignored_fields)} (not part of a {kind} key)"))
    if job is not None:
        how = "created" if response.job_created else "joined"
        pairs.append(("job", f"{job.job_id} ({how}; {job_summary(job)})"))
    elif response.status == registry_pb2.LOOKUP_STATUS_MISS and not response.error:
        pairs.append(("job", "none enqueued"))
    if response.error:
        pairs.append(("error", response.error))
    if explain:
        pairs.append(("counts", ", ".join(response.key.relevant_fields)))
        pairs.append(("canonical", response.key.canonical))
    lines.append(rows(pairs))
    if not response.nearest:
        if explain:
            lines.append("  no artifact of this kind and model exists yet")
        return "\n".join(lines)
    if not explain:
        closest = response.nearest[0]
        lines.append(f"  nearest  {closest.artifact_id}  {differences_text(closest)}")
        more = len(response.nearest) - 1
        if more:
            lines.append(f"  ({more} more near artifact{'s' if more != 1 else ''}; --explain shows them)")
        return "\n".join(lines)
    lines.append("  nearest artifacts of this kind and model, closest first:")
    for near in response.nearest:
        lines.append(f"    {near.artifact_id}  ({describe_key(near.key)})")
        body = [
            [d.field, d.artifact_value or "(unset)", d.requested_value or "(unset)"] for d in near.differences
        ]
        table_text = table(["FIELD", "ARTIFACT", "YOU ASKED"], body)
        lines.extend("      " + line for line in table_text.splitlines())
        if near.would_hit_with:
            allow = " ".join(f"--allow {policy_name(p)}" for p in near.would_hit_with)
            lines.append(f"      a hit with {allow}")
    return "\n".join(lines)


def artifact_text(artifact: registry_pb2.Artifact) -> str:
    producer = artifact.producer
    toolchain = ", ".join(f"{k} {v}" for k, v in sorted(producer.toolchain_versions.items()))
    lines = [
        f"artifact {artifact.artifact_id}",
        rows(
            [
                ("key", describe_key(artifact.key)),
                ("canonical", artifact.key.canonical),
                (
                    "files",
                    size_summary(artifact.file_count or len(artifact.files), artifact.total_size_bytes),
                ),
                ("manifest", artifact.manifest_digest),
                ("signer", artifact.signature.key_id if artifact.HasField("signature") else "unsigned"),
                ("pinned", "yes" if artifact.pinned else "no"),
                ("unavailable", artifact.unavailable),
                ("hits", str(artifact.hit_count)),
                ("created", short_time(artifact.created_at)),
                ("accessed", short_time(artifact.last_accessed_at)),
                ("producer", producer.worker),
                ("toolchain", toolchain),
                ("compile", human_seconds(producer.compile_seconds) if producer.compile_seconds else ""),
                (
                    "log",
                    f"blob {producer.log.hash} ({human_bytes(producer.log.size_bytes)})"
                    if producer.log.hash
                    else "",
                ),
                ("note", producer.note),
            ]
        ),
    ]
    if artifact.files:
        lines.append("  files:")
        body = [
            [human_bytes(f.digest.size_bytes), "x" if f.executable else "-", f.digest.hash, f.path]
            for f in artifact.files
        ]
        lines.extend("    " + line for line in table(["size", "x", "xxh3", "path"], body).splitlines())
    return "\n".join(lines)


def artifacts_table(artifacts: Sequence[registry_pb2.Artifact]) -> str:
    body = [
        [
            a.artifact_id,
            kind_name(a.key.key.kind),
            a.key.compile_target or a.key.key.instance_type,
            human_bytes(a.total_size_bytes),
            ", ".join(s for s, on in (("pinned", a.pinned), ("unavailable", bool(a.unavailable))) if on),
            short_time(a.created_at),
            a.key.key.model,
        ]
        for a in artifacts
    ]
    return table(["ARTIFACT", "KIND", "TARGET", "SIZE", "STATE", "CREATED", "MODEL"], body)


def _evaluation_spec_text(job: jobs_pb2.Job) -> str:
    """An evaluation job's workload in a line ("" for a compile job; rows() skips it)."""
    if job.purpose != jobs_pb2.JOB_PURPOSE_EVALUATE:
        return ""
    w, price = job.evaluation.workload, job.evaluation.price
    levels = ",".join(str(c) for c in w.concurrency_levels)
    return (
        f"{w.requests} requests of {w.prompt_tokens} prompt + {w.output_tokens} output tokens at "
        f"concurrency {levels}; {price.instance_type or 'no instance type'} at ${price.hourly_usd:g}/h"
        + (f" less {price.discount_rate:.0%}" if price.discount_rate else "")
    )


def job_text(job: jobs_pb2.Job) -> str:
    return "\n".join(
        [
            f"job {job.job_id}",
            rows(
                [
                    ("state", job_summary(job)),
                    ("key", describe_key(job.key)),
                    ("digest", job.key.digest),
                    (
                        "attempts",
                        f"{job.attempts}/{job.max_attempts}" if job.max_attempts else str(job.attempts),
                    ),
                    (
                        "error",
                        job.error + (f" ({error_class_name(job.error_class)})" if job.error_class else ""),
                    ),
                    ("artifact", job.artifact_id),
                    ("evaluates", _evaluation_spec_text(job)),
                    ("evaluation", job.evaluation_id),
                    ("worker", job.worker),
                    ("source", job.model_source),
                    (
                        "log",
                        f"blob {job.log.hash} ({human_bytes(job.log.size_bytes)})" if job.log.hash else "",
                    ),
                    ("created", short_time(job.created_at)),
                    ("updated", short_time(job.updated_at)),
                    ("finished", short_time(job.finished_at)),
                ]
            ),
        ]
    )


def jobs_table(jobs: Sequence[jobs_pb2.Job]) -> str:
    body = [
        [
            j.job_id,
            job_state_name(j.state),
            f"{j.progress * 100:.0f}%" if j.state == jobs_pb2.JOB_STATE_LEASED else "",
            kind_name(j.key.key.kind),
            short_time(j.created_at),
            ArtifactKey.from_proto(j.key.key).describe(),
        ]
        for j in jobs
    ]
    return table(["JOB", "STATE", "PROGRESS", "KIND", "CREATED", "KEY"], body)


def _capabilities_text(worker: workers_pb2.WorkerInfo) -> str:
    return "; ".join(
        f"{kind_name(c.kind)} {c.toolchain} ({', '.join(c.compile_targets) or 'any target'})"
        for c in worker.capabilities
    )


def workers_text(workers: Sequence[workers_pb2.WorkerInfo]) -> str:
    if not workers:
        return "no live workers (start one with `prebake worker`)"
    body = [
        [w.worker_id, "live" if w.live else "expired", short_time(w.last_seen), _capabilities_text(w)]
        for w in workers
    ]
    return table(["WORKER", "STATE", "LAST SEEN", "SERVES"], body)


def workers_json(workers: Sequence[workers_pb2.WorkerInfo]) -> list[dict[str, Any]]:
    return [
        {
            "worker_id": w.worker_id,
            "live": w.live,
            "last_seen": w.last_seen.ToJsonString(),
            "expires_at": w.expires_at.ToJsonString(),
            "capabilities": [
                {
                    "kind": kind_name(c.kind),
                    "toolchain": c.toolchain,
                    "compile_targets": list(c.compile_targets),
                }
                for c in w.capabilities
            ],
        }
        for w in workers
    ]


def stats_text(stats: admin_pb2.Stats) -> str:
    jobs = ", ".join(f"{state} {count}" for state, count in sorted(stats.jobs_by_state.items()))
    return rows(
        [
            ("artifacts", f"{stats.artifacts} ({stats.pinned_artifacts} pinned)"),
            ("blobs", f"{stats.blobs} ({human_bytes(stats.blob_bytes)})"),
            (
                "lookups",
                f"{stats.lookups} ({stats.hits} hits, {stats.misses} misses, hit rate {stats.hit_rate:.1%})",
            ),
            ("jobs", jobs or "none"),
            ("queue depth", str(stats.queue_depth)),
            ("served", human_bytes(stats.bytes_served)),
            ("received", human_bytes(stats.bytes_received)),
            ("since", short_time(stats.started_at)),
        ],
        indent="",
    )


def gc_text(report: admin_pb2.CollectGarbageResponse) -> str:
    def removed(count: int, size: int) -> str:
        return f"{count} ({human_bytes(size)})"

    usage = report.usage
    used = usage.blob_bytes + usage.upload_bytes + usage.reserved_bytes
    quota = f" of {human_bytes(usage.max_store_bytes)}" if usage.max_store_bytes else " (no quota)"
    evicted = removed(len(report.evicted_artifact_ids), report.evicted_bytes)
    if report.evicted_artifact_ids:
        evicted += ": " + ", ".join(report.evicted_artifact_ids)
    lines = [
        "dry run: nothing was removed; this is what would be" if report.dry_run else "",
        rows(
            [
                ("stale uploads", removed(report.stale_uploads, report.stale_upload_bytes)),
                ("unreferenced blobs", removed(report.orphaned_blobs, report.orphaned_bytes)),
                ("quarantined blobs", removed(report.quarantined_blobs, report.quarantined_bytes)),
                ("evicted artifacts", evicted),
                ("kept (in use)", str(report.kept_in_use) if report.kept_in_use else ""),
                ("store", f"{human_bytes(used)} used{quota}"),
            ],
            indent="",
        ),
    ]
    return "\n".join(line for line in lines if line)


def fetch_text(result: FetchResult) -> str:
    if result.already_present:
        size = size_summary(result.files, result.total_bytes)
        return f"{result.dest}: already holds artifact {result.artifact_id} ({size})"
    moved = f"downloaded {human_bytes(result.bytes_downloaded)}"
    if result.bytes_resumed:
        moved += f", resumed {human_bytes(result.bytes_resumed)}"
    if result.bytes_from_cache:
        moved += f", {human_bytes(result.bytes_from_cache)} from the host cache"
    return (
        f"{result.dest}: placed artifact {result.artifact_id} "
        f"({size_summary(result.files, result.total_bytes)}; {moved}) in {human_seconds(result.seconds)}"
    )


def prewarm_row_json(row: PrewarmRow) -> dict[str, Any]:
    return {
        "key": {**dataclasses.asdict(row.key), "options": dict(row.key.options)},
        "model_source": row.model_source or None,
        "outcome": row.outcome,
        "detail": row.detail or None,
        "lookup_status": row.lookup_status or None,
        "key_digest": row.key_digest or None,
        "compile_target": row.compile_target or None,
        "artifact_id": row.artifact_id or None,
        "job_id": row.job_id or None,
        "job_created": row.job_created,
        "cached": row.cached,
        "bytes_cached": row.bytes_cached,
    }


def _prewarm_detail(row: PrewarmRow) -> str:
    parts = []
    if row.outcome in ("hit", "compiled") and row.artifact_id:
        parts.append(f"artifact {row.artifact_id}")
    if row.job_id and row.outcome in (
        "compiled",
        "enqueued",
        "joined",
        "in_flight",
        "no_worker",
        "cancelled",
        "timeout",
    ):
        parts.append(f"job {row.job_id}")
    if row.cached:
        parts.append(f"cached {human_bytes(row.bytes_cached)}" if row.bytes_cached else "in host cache")
    first_line = next((line for line in row.detail.splitlines() if line.strip()), "")
    if first_line:
        parts.append(first_line)
    return "; ".join(parts)


def prewarm_table(rows: Sequence[PrewarmRow]) -> str:
    """One line per configuration, in the order of the matrix."""

    def number(value: int) -> str:
        return str(value) if value else "-"

    body = []
    for row in rows:
        key, resolved = row.key, row.resolved
        instance = key.instance_type or (resolved.instance_type if resolved else "")
        target = f"{instance or '-'}/{row.compile_target}" if row.compile_target else instance or "-"
        precision = key.precision or (resolved.precision if resolved else "")
        body.append(
            [
                key.model,
                key.kind,
                target,
                number(key.sequence_length),
                number(key.batch_size),
                number(key.tensor_parallel_degree),
                precision or "-",
                row.outcome,
                _prewarm_detail(row),
            ]
        )
    headers = ["MODEL", "KIND", "INSTANCE/TARGET", "SEQ", "BATCH", "TP", "PRECISION", "OUTCOME", "DETAIL"]
    return table(headers, body)


def prewarm_summary(counts: dict[str, int], hidden_invalid: int = 0) -> str:
    """ "12 keys: 3 hit, 8 compiled, 1 failed" (counts as from `prewarm.summarize`)."""
    total = sum(counts.values()) + hidden_invalid
    parts = [f"{n} {outcome}" for outcome, n in counts.items() if n]
    text = f"{total} key{'s' if total != 1 else ''}: {', '.join(parts) or 'none shown'}"
    if hidden_invalid:
        text += f" ({hidden_invalid} invalid not shown)"
    return text


# --- evaluations ----------------------------------------------------------------------------


def evaluation_json(evaluation: evaluations_pb2.Evaluation) -> dict[str, Any]:
    """The evaluation in protobuf JSON form with the proto's field names: what
    `prebake evaluations import` reads back (int64 token counts are strings, as in that form)."""
    data: dict[str, Any] = json_format.MessageToDict(
        evaluation, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return data


def _number(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}"


def evaluation_text(evaluation: evaluations_pb2.Evaluation) -> str:
    """A heading (id, source, time, host, workload) and one row per concurrency level."""
    w, host = evaluation.workload, evaluation.host
    where = host.instance_type or host.hostname or "unknown host"
    cpu = f", {host.cpu_count} CPUs" if host.cpu_count else ""
    heading = (
        f"evaluation {evaluation.evaluation_id}  {short_time(evaluation.created_at)}  {evaluation.source}\n"
        f"  {where}{cpu}; {w.requests} requests of {w.prompt_tokens} prompt + {w.output_tokens} output tokens"
    )
    price = evaluation.price
    if price.hourly_usd:
        heading += f"; ${price.hourly_usd:g}/h"
        if price.discount_rate:
            heading += f" less {price.discount_rate * 100:g}%"
    body = [
        [
            str(level.concurrency),
            _number(level.ttft_ms.p50),
            _number(level.itl_ms.p50),
            _number(level.output_tokens_per_second),
            f"{level.blended_price_per_million_tokens:.4f}" if price.hourly_usd else "",
            str(level.invocation_errors) if level.invocation_errors else "",
        ]
        for level in evaluation.levels
    ]
    headers = ["CONCURRENCY", "TTFT P50 MS", "ITL P50 MS", "OUTPUT TOK/S", "$/M BLENDED", "ERRORS"]
    lines = table(headers, body).splitlines()
    return "\n".join([heading, *(f"  {line}" for line in lines)])


def evaluations_text(evaluations: Sequence[evaluations_pb2.Evaluation]) -> str:
    return "\n\n".join(evaluation_text(e) for e in evaluations)


def evaluations_table(evaluations: Sequence[evaluations_pb2.Evaluation]) -> str:
    """One line per evaluation (for listings); `prebake show ARTIFACT` gives the levels."""
    body = [
        [
            e.evaluation_id,
            e.artifact_id,
            short_time(e.created_at),
            e.host.instance_type or e.host.hostname,
            ",".join(str(level.concurrency) for level in e.levels),
            e.source,
        ]
        for e in evaluations
    ]
    return table(["EVALUATION", "ARTIFACT", "CREATED", "HOST", "CONCURRENCY", "SOURCE"], body)
