"""Handlers of the `prebake` subcommands; each returns an exit code.

Results go to stdout (text, or one JSON object with --json); progress and errors go to
stderr, so `--json` output can be piped as is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict

from prebake.client import evaluation_files, exitcodes, importing, recommendations, render
from prebake.client.artifact_key import ArtifactKey
from prebake.client.cli_errors import Failure, report
from prebake.client.client import Client
from prebake.client.credentials import from_settings
from prebake.client.errors import (
    FailedPrecondition,
    InvalidArgument,
    PrebakeError,
    Unauthenticated,
    Unavailable,
    UntrustedArtifact,
)
from prebake.client.hostcache import ENV as HOST_CACHE_ENV
from prebake.client.hostcache import HostCache
from prebake.client.matrix import MatrixError, load_matrix
from prebake.client.prewarm import OK_OUTCOMES, PrewarmProgress, PrewarmRow, summarize
from prebake.client.prewarm import dry_run as prewarm_dry_run
from prebake.client.prewarm import prewarm as prewarm_keys
from prebake.client.progress import (
    Activity,
    JobProgress,
    PrewarmDisplay,
    TransferProgress,
    VerifyProgress,
    is_interactive,
)
from prebake.core.command_plugins import CommandFailed
from prebake.core.signing import SigningKey, SigningUnavailable, TrustSet
from prebake.core.units import human_bytes
from prebake.v1 import admin_pb2, jobs_pb2, registry_pb2

# Public key files whose signatures fetch/ensure accept, when no --trust is given.
TRUST_ENV = "PREBAKE_TRUST"
_LOOKUP_EXIT = {
    registry_pb2.LOOKUP_STATUS_HIT: exitcodes.OK,
    registry_pb2.LOOKUP_STATUS_MISS: exitcodes.MISS,
    registry_pb2.LOOKUP_STATUS_COMPILING: exitcodes.COMPILING,
    registry_pb2.LOOKUP_STATUS_FAILED: exitcodes.FAILED,
}
_JOB_EXIT = {
    jobs_pb2.JOB_STATE_SUCCEEDED: exitcodes.OK,
    jobs_pb2.JOB_STATE_FAILED: exitcodes.FAILED,
    jobs_pb2.JOB_STATE_CANCELLED: exitcodes.ERROR,
}


class UsageError(Exception):
    """A command line that parses but makes no sense (reported like argparse's errors)."""


def run(args: argparse.Namespace) -> int:
    """Dispatch parsed arguments to their handler, mapping failures to exit codes.

    Every failure is reported by `cli_errors.report` (stderr, and one JSON object on
    stdout with --json); the exit code of an error class is `exitcodes.for_error`'s.
    """
    as_json = bool(getattr(args, "json", False))
    # What the handler is doing (the displays tell it), so that Ctrl-C says what it left.
    activity = args.activity = Activity()
    try:
        if not args.needs_client:
            return int(args.handler(args))
        credentials = from_settings(
            os.environ,
            token=args.token,
            token_file=args.token_file,
            ca_bundle=args.ca_bundle,
            client_cert=args.client_cert,
            client_key=args.client_key,
        )
        with Client(args.server, timeout=args.timeout, credentials=credentials) as client:
            return int(args.handler(args, client))
    except UsageError:
        raise  # the parser's usage line goes with it (cli.main)
    except CommandFailed as exc:
        code = exitcodes.USAGE if exc.bad_input else exitcodes.ERROR
        return report(Failure("USAGE" if exc.bad_input else "ERROR", str(exc), code), as_json)
    except PrebakeError as exc:
        if isinstance(exc, Unavailable):
            # The library's message says what failed (often in gRPC's words); lead with the address.
            exc = Unavailable(f"cannot reach the prebake server at {exc.target or args.server}: {exc}")
        return report(Failure.of(exc, _hint(exc)), as_json)
    except KeyboardInterrupt:
        return report(Failure("CANCELLED", activity.interrupted(), exitcodes.INTERRUPTED), as_json)
    except BrokenPipeError:
        # stdout closed early (e.g. `| head`): not an error worth a traceback.
        sys.stderr.close()
        return exitcodes.ERROR


def _hint(exc: PrebakeError) -> str:
    """A line on what to do next, for the errors whose message cannot know the CLI."""
    if isinstance(exc, Unavailable):
        return "start one with `prebake serve`, or point --server (or PREBAKE_SERVER) at a running server"
    if isinstance(exc, Unauthenticated):
        return "pass a token with --token-file FILE (or PREBAKE_TOKEN_FILE), or a client certificate"
    if isinstance(exc, UntrustedArtifact):
        return "nothing was placed"
    return ""


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def _emit(args: argparse.Namespace, text: str, data: dict[str, Any]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, sort_keys=False))
    elif text:
        print(text)


def key_from_args(args: argparse.Namespace) -> ArtifactKey:
    """The ArtifactKey the key options describe. Raises UsageError for repeated options."""
    options: dict[str, str] = {}
    for name, value in args.options:
        if name in options and options[name] != value:
            raise UsageError(f"--option {name} given twice with different values")
        options[name] = value
    return ArtifactKey(
        kind=args.kind or "",
        model=args.model or "",
        model_revision=args.revision,
        instance_type=args.instance_type,
        sequence_length=args.sequence_length,
        batch_size=args.batch_size,
        tensor_parallel_degree=args.tp,
        precision=args.precision,
        toolchain=args.toolchain,
        options=options,
    )


def _activity(args: argparse.Namespace) -> Activity:
    activity = getattr(args, "activity", None)
    return activity if isinstance(activity, Activity) else Activity()


@contextmanager
def _transfer_display(args: argparse.Namespace, label: str) -> Iterator[Callable[[int, int], None]]:
    """A progress callback: the display (unless --quiet), and the activity Ctrl-C reports."""
    activity = _activity(args)
    display = None if getattr(args, "quiet", False) else TransferProgress(label)

    def progress(done: int, total: int) -> None:
        activity.transferring(label if done < total else "")
        if display is not None:
            display(done, total)

    try:
        yield progress
    finally:
        activity.transferring("")
        if display is not None:
            display.close()


@contextmanager
def _job_display(args: argparse.Namespace) -> Iterator[Callable[[jobs_pb2.JobEvent], None]]:
    """An on_event callback: the display (unless --quiet), and the activity Ctrl-C reports."""
    activity = _activity(args)
    display = None if getattr(args, "quiet", False) else JobProgress()

    def on_event(event: jobs_pb2.JobEvent) -> None:
        activity.job_event(event)
        if display is not None:
            display(event)

    try:
        yield on_event
    finally:
        if display is not None:
            display.close()


# Commands ---------------------------------------------------------------------------


def lookup(args: argparse.Namespace, client: Client) -> int:
    response = client.lookup(
        key_or_preset(args, client),
        on_miss="report" if args.no_enqueue else "enqueue",
        force=args.force,
        model_source=args.model_source,
        allow=args.allow,
    )
    _emit(args, render.lookup_text(response, explain=args.explain), render.lookup_json(response))
    return _LOOKUP_EXIT.get(response.status, exitcodes.ERROR)


def fetch(args: argparse.Namespace, client: Client) -> int:
    if args.artifact and (args.kind or args.model or args.preset):
        raise UsageError("give either --artifact or a key (--kind, --model, ... or --preset NAME), not both")
    if not args.artifact and not args.preset and not (args.kind and args.model):
        raise UsageError("give a key (at least --kind and --model), --preset NAME or --artifact ID")
    response: registry_pb2.LookupResponse | None = None
    if args.artifact:
        artifact = client.get_artifact(args.artifact)
    else:
        response = client.lookup(key_or_preset(args, client), on_miss="report", allow=args.allow)
        if response.status != registry_pb2.LOOKUP_STATUS_HIT:
            return _fetch_miss(args, response)
        artifact = response.artifact
    with _transfer_display(args, "download") as display:
        result = client.fetch(
            artifact,
            Path(args.dest),
            progress=display,
            overwrite=args.overwrite,
            host_cache=host_cache_from_args(args, env_default=True),
            trust=trust_from_args(args),
        )
    data = {
        "status": "HIT",
        "artifact_id": result.artifact_id,
        "fetch": render.fetch_json(result),
        "lookup": render.lookup_json(response) if response is not None else None,
    }
    _emit(args, render.fetch_text(result), data)
    return exitcodes.OK


def _fetch_miss(args: argparse.Namespace, response: registry_pb2.LookupResponse) -> int:
    code = _LOOKUP_EXIT.get(response.status, exitcodes.ERROR)
    summary = render.lookup_json(response)
    data = {"status": summary["status"], "artifact_id": None, "fetch": None, "lookup": summary}
    _emit(args, render.lookup_text(response), data)
    hints = {
        exitcodes.MISS: "no artifact for this key; `prebake ensure` compiles and fetches it",
        exitcodes.COMPILING: f"the artifact is being compiled (job {response.job.job_id}); "
        "`prebake ensure` waits for it",
        exitcodes.FAILED: "the key's last compile failed; `prebake lookup --force` retries it",
    }
    _error(hints.get(code, "no artifact for this key"))
    return code


def key_or_preset(args: argparse.Namespace, client: Client) -> ArtifactKey:
    """The key flags' key, or `--preset NAME`'s as the server resolves it (`Catalog.GetPreset`),
    for every command that takes either (lookup, fetch, ensure).

    UsageError for both, or for neither (`--kind` and `--model` missing); NotFound, naming the
    closest presets, for an unknown name. `--allow` is no key flag: it goes with either."""
    preset = getattr(args, "preset", None)
    if preset is None:
        missing = [
            flag for flag, dest in (("--kind", "kind"), ("--model", "model")) if not getattr(args, dest)
        ]
        if missing:
            raise UsageError(f"the following arguments are required: {', '.join(missing)} (or --preset NAME)")
        return key_from_args(args)
    # The key flags (`cli._add_key_options`); their defaults mean "not given".
    given = [flag for dest, flag in args.key_flags if getattr(args, dest)]
    if given:
        raise UsageError(f"--preset NAME states the whole key; do not also give {', '.join(given)}")
    return ArtifactKey.from_proto(client.get_preset(preset).key)


def ensure(args: argparse.Namespace, client: Client) -> int:
    key = key_or_preset(args, client)
    with _job_display(args) as jobs, _transfer_display(args, "download") as display:
        result = client.ensure(
            key,
            Path(args.dest),
            model_source=args.model_source,
            timeout=args.wait_timeout,
            progress=display,
            on_event=jobs,
            overwrite=args.overwrite,
            host_cache=host_cache_from_args(args, env_default=True),
            allow=args.allow,
            worker_grace=args.worker_grace,
            trust=trust_from_args(args),
        )
    text = render.fetch_text(result.fetch)
    if result.job_id:
        text += (
            f"\ncompiled by job {result.job_id} (lookup said {result.status}); total {result.seconds:.1f}s"
        )
    data = {
        "status": result.status,
        "artifact_id": result.artifact_id,
        "job_id": result.job_id,
        "seconds": result.seconds,
        "fetch": render.fetch_json(result.fetch),
    }
    _emit(args, text, data)
    return exitcodes.OK


def trust_from_args(args: argparse.Namespace) -> TrustSet | None:
    """The trust set of --trust KEYFILE (repeatable), else of $PREBAKE_TRUST (a path list
    separated by the platform's path separator); None when neither names a key."""
    paths = list(args.trust) or [p for p in os.environ.get(TRUST_ENV, "").split(os.pathsep) if p]
    if not paths:
        return None
    try:
        return TrustSet.load(paths)
    except (InvalidArgument, SigningUnavailable) as exc:
        raise CommandFailed(f"--trust: {exc}", bad_input=True) from None


def signing_key_from_args(args: argparse.Namespace) -> SigningKey | None:
    """The key --signing-key FILE names, or None; CommandFailed (usage) if it cannot be used."""
    if not args.signing_key:
        return None
    try:
        return SigningKey.load(args.signing_key)
    except (InvalidArgument, SigningUnavailable) as exc:
        raise CommandFailed(f"--signing-key: {exc}", bad_input=True) from None


def host_cache_from_args(args: argparse.Namespace, env_default: bool) -> HostCache | None:
    """The HostCache that --host-cache [DIR] / --no-host-cache ask for, or None.

    `--host-cache` without DIR means the default root ($PREBAKE_HOST_CACHE, else
    ~/.cache/prebake/blobs). With `env_default`, a set PREBAKE_HOST_CACHE enables the
    cache without the flag (deploy-time commands: a host operator opts the whole host in).
    """
    if getattr(args, "no_host_cache", False):
        return None
    if args.host_cache is not None:
        return HostCache(args.host_cache or None)
    if env_default and os.environ.get(HOST_CACHE_ENV):
        return HostCache()
    return None


def prewarm_exit_code(rows: list[PrewarmRow]) -> int:
    """0 if every row is fine; FAILED if a compile failed; else ERROR if any row is not fine."""
    outcomes = {row.outcome for row in rows}
    if "failed" in outcomes:
        return exitcodes.FAILED
    return exitcodes.ERROR if outcomes - OK_OUTCOMES else exitcodes.OK


@contextmanager
def _prewarm_display(args: argparse.Namespace) -> Iterator[Callable[[PrewarmProgress], None]]:
    activity = _activity(args)
    display = None if args.quiet else PrewarmDisplay()

    def progress(snapshot: PrewarmProgress) -> None:
        activity.waiting_for(snapshot.waiting)
        activity.transferring("host-cache download" if snapshot.caching else "")
        if display is not None:
            display(snapshot)

    try:
        yield progress
    finally:
        if display is not None:
            display.close()


def _prewarm_matrix(args: argparse.Namespace) -> str:
    """The matrix FILE. `--host-cache` takes an optional DIR, so in `prewarm --host-cache
    FILE` argparse hands FILE to it: with no other FILE given, FILE is the matrix and the
    cache takes its default directory (as `prewarm FILE --host-cache` would)."""
    if args.matrix is not None:
        return str(args.matrix)
    if args.host_cache and not Path(args.host_cache).is_dir():
        matrix, args.host_cache = args.host_cache, ""
        return str(matrix)
    given = f" (--host-cache took {args.host_cache} as its DIR)" if args.host_cache else ""
    raise UsageError(f"prewarm: a matrix FILE is required{given}")


def prewarm(args: argparse.Namespace, client: Client) -> int:
    try:
        entries = load_matrix(_prewarm_matrix(args))
    except MatrixError as exc:
        raise CommandFailed(str(exc), bad_input=True) from None
    cache = None if args.dry_run else host_cache_from_args(args, env_default=False)
    with _prewarm_display(args) as display:
        if args.dry_run:
            rows = prewarm_dry_run(
                client, entries, progress=display, concurrency=args.concurrency, force=args.force
            )
        else:
            rows = prewarm_keys(
                client,
                entries,
                wait=not args.no_wait,
                timeout=args.wait_timeout,
                fetch_to_cache=cache,
                progress=display,
                concurrency=args.concurrency,
                force=args.force,
            )
    shown = [row for row in rows if not (args.skip_invalid and row.outcome == "invalid")]
    counts = summarize(shown)
    code = prewarm_exit_code(shown)
    summary = render.prewarm_summary(counts, hidden_invalid=len(rows) - len(shown))
    data = {
        "keys": len(rows),
        "dry_run": args.dry_run,
        "counts": counts,
        "hidden_invalid": len(rows) - len(shown),
        "exit_code": code,
        "host_cache": str(cache.root) if cache is not None else None,
        "rows": [render.prewarm_row_json(row) for row in shown],
    }
    _emit(args, f"{render.prewarm_table(shown)}\n{summary}" if shown else summary, data)
    return code


def publish(args: argparse.Namespace, client: Client) -> int:
    key = key_from_args(args)
    # An AlreadyExists names `replace` (the request field): the failure report shows --replace.
    with _transfer_display(args, "upload") as display:
        response = client.publish(
            Path(args.directory),
            key,
            producer_note=args.note,
            replace=args.replace,
            progress=display,
            force=args.force,
            signing_key=signing_key_from_args(args),
        )
    artifact = response.artifact
    state = "published" if response.created else "unchanged (already published)"
    lines = [
        f"{state}: artifact {artifact.artifact_id}",
        render.rows(
            [
                ("key", render.describe_key(artifact.key)),
                ("files", render.size_summary(artifact.file_count, artifact.total_size_bytes)),
                (
                    "jobs",
                    ", ".join(response.completed_job_ids) + " completed"
                    if response.completed_job_ids
                    else "",
                ),
            ]
        ),
    ]
    data = {
        "artifact_id": artifact.artifact_id,
        "created": response.created,
        "completed_job_ids": list(response.completed_job_ids),
        "artifact": render.artifact_json(artifact),
    }
    _emit(args, "\n".join(lines), data)
    return exitcodes.OK


def jobs_list(args: argparse.Namespace, client: Client) -> int:
    limit = args.limit if args.limit and args.limit > 0 else None
    jobs = list(client.iter_jobs(states=args.states or (), kind=args.kind or "", limit=limit))
    text = render.jobs_table(jobs) if jobs else "no jobs"
    _emit(args, text, {"jobs": [render.job_json(j) for j in jobs]})
    return exitcodes.OK


def jobs_show(args: argparse.Namespace, client: Client) -> int:
    job = client.get_job(args.job_id)
    _emit(args, render.job_text(job), render.job_json(job))
    return exitcodes.OK


def jobs_watch(args: argparse.Namespace, client: Client) -> int:
    with _job_display(args) as display:
        job = client.wait_for_job(args.job_id, on_event=display)
    _emit(args, render.job_text(job), render.job_json(job))
    return _JOB_EXIT.get(job.state, exitcodes.ERROR)


def jobs_cancel(args: argparse.Namespace, client: Client) -> int:
    job = client.cancel_job(args.job_id, reason=args.reason)
    _emit(args, render.job_text(job), render.job_json(job))
    return exitcodes.OK


def ls(args: argparse.Namespace, client: Client) -> int:
    limit = args.limit if args.limit > 0 else None
    artifacts = list(
        client.iter_artifacts(kind=args.kind or "", model=args.model, pinned_only=args.pinned, limit=limit)
    )
    text = render.artifacts_table(artifacts) if artifacts else "no artifacts"
    _emit(args, text, {"artifacts": [render.artifact_json(a, files=False) for a in artifacts]})
    return exitcodes.OK


def show(args: argparse.Namespace, client: Client) -> int:
    artifact = client.get_artifact(args.artifact_id)
    text, data = render.artifact_text(artifact), render.artifact_json(artifact)
    if artifact.evaluations:
        text += "\n\n" + render.evaluations_text(artifact.evaluations)
    data["evaluations"] = [render.evaluation_json(e) for e in artifact.evaluations]
    _emit(args, text, data)
    return exitcodes.OK


def evaluations_list(args: argparse.Namespace, client: Client) -> int:
    if args.artifact and args.model:
        raise UsageError("give --artifact or --model, not both")
    limit = args.limit if args.limit > 0 else None
    found = list(client.iter_evaluations(artifact_id=args.artifact, model=args.model, limit=limit))
    text = render.evaluations_table(found) if found else "no evaluations"
    _emit(args, text, {"evaluations": [render.evaluation_json(e) for e in found]})
    return exitcodes.OK


def evaluations_import(args: argparse.Namespace, client: Client) -> int:
    try:
        evaluation = evaluation_files.load(Path(args.file))
    except evaluation_files.EvaluationFileError as exc:
        raise CommandFailed(str(exc), bad_input=True) from None
    if args.source:
        evaluation.source = args.source
    stored = client.import_evaluation(args.artifact, evaluation)
    text = f"stored evaluation {stored.evaluation_id} of artifact {stored.artifact_id}\n\n"
    _emit(args, text + render.evaluation_text(stored), render.evaluation_json(stored))
    return exitcodes.OK


def evaluate(args: argparse.Namespace, client: Client) -> int:
    named_key = bool(args.kind or args.model)
    if bool(args.artifact) == named_key:
        raise UsageError("give the key options (--kind, --model, ...) or --artifact ID, one of them")
    response = client.enqueue_evaluation(
        key_from_args(args) if named_key else None,
        artifact_id=args.artifact,
        concurrency_levels=args.concurrency,
        requests=args.requests,
        prompt_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens,
        discount_rate=args.discount_rate,
    )
    job = response.job
    if args.no_wait:
        _emit(args, render.job_text(job), render.job_json(job))
        return exitcodes.OK
    with _job_display(args) as display:
        job = client.wait_for_job(job.job_id, timeout=args.wait_timeout, on_event=display)
    if job.state != jobs_pb2.JOB_STATE_SUCCEEDED:
        _emit(args, render.job_text(job), render.job_json(job))
        return _JOB_EXIT.get(job.state, exitcodes.ERROR)
    evaluation = client.evaluation_of(job)
    text = f"stored evaluation {evaluation.evaluation_id} of artifact {evaluation.artifact_id}\n\n"
    data = {"job": render.job_json(job), "evaluation": render.evaluation_json(evaluation)}
    _emit(args, text + render.evaluation_text(evaluation), data)
    return exitcodes.OK


def rm(args: argparse.Namespace, client: Client) -> int:
    try:
        response = client.delete_artifact(args.artifact_id, force=args.force)
    except FailedPrecondition as exc:
        hint = "`prebake rm --force` deletes it anyway, `prebake pin --unpin` unpins it"
        return report(Failure.of(exc, hint), args.json)
    text = (
        f"deleted artifact {args.artifact_id} "
        f"({response.blobs_deleted} blobs, {human_bytes(response.bytes_freed)} freed)"
    )
    data = {
        "artifact_id": args.artifact_id,
        "blobs_deleted": response.blobs_deleted,
        "bytes_freed": response.bytes_freed,
    }
    _emit(args, text, data)
    return exitcodes.OK


def pin(args: argparse.Namespace, client: Client) -> int:
    artifact = client.pin_artifact(args.artifact_id, pinned=not args.unpin)
    text = f"{'pinned' if artifact.pinned else 'unpinned'} artifact {artifact.artifact_id}"
    _emit(args, text, render.artifact_json(artifact, files=False))
    return exitcodes.OK


def workers(args: argparse.Namespace, client: Client) -> int:
    found = client.list_workers(include_expired=args.all)
    _emit(args, render.workers_text(found), {"workers": render.workers_json(found)})
    return exitcodes.OK


def stats(args: argparse.Namespace, client: Client) -> int:
    result = client.get_stats()
    _emit(args, render.stats_text(result), render.stats_json(result))
    return exitcodes.OK


def gc(args: argparse.Namespace, client: Client) -> int:
    if not args.json and is_interactive(sys.stderr):
        what = "finding" if args.dry_run else "collecting"
        print(f"{what} garbage on {client.target} ...", file=sys.stderr, flush=True)
    report = client.collect_garbage(dry_run=args.dry_run)
    _emit(args, render.gc_text(report), render.gc_json(report))
    return exitcodes.OK


_PROBLEMS = {admin_pb2.BLOB_PROBLEM_MISSING: "missing", admin_pb2.BLOB_PROBLEM_CORRUPT: "corrupt"}


def verify(args: argparse.Namespace, client: Client) -> int:
    if args.limit < 0:
        raise UsageError("--limit must not be negative (0: every blob)")
    display = None if args.quiet else VerifyProgress()
    damaged: list[admin_pb2.DamagedBlob] = []
    last = admin_pb2.VerifyBlobsProgress()
    try:
        for progress in client.verify_blobs(args.limit, args.rate, repair=not args.dry_run):
            last = progress
            damaged.extend(progress.damaged)
            if display is not None:
                display(progress.blobs_checked, progress.blobs_total, progress.bytes_hashed, len(damaged))
    finally:
        if display is not None:
            display.close()
    lines = []
    for d in damaged:
        line = f"{_PROBLEMS.get(d.problem, 'damaged')}  {d.digest.hash}/{d.digest.size_bytes}  {d.detail}"
        if d.artifact_ids:
            verb = "would be unavailable" if args.dry_run else "marked unavailable"
            line += f"\n  artifacts {verb}: {', '.join(d.artifact_ids)}"
        if d.job_ids:
            line += f"\n  rebuilding in job(s): {', '.join(d.job_ids)}"
        lines.append(line)
    lines.append(
        f"{last.blobs_checked} of {last.blobs_total} blobs checked, {human_bytes(last.bytes_hashed)} hashed, "
        f"{len(damaged)} damaged" + (" (dry run: nothing changed)" if args.dry_run and damaged else "")
    )
    data = {
        "blobs_total": last.blobs_total,
        "blobs_checked": last.blobs_checked,
        "bytes_hashed": last.bytes_hashed,
        "repair": not args.dry_run,
        "damaged": [
            {
                "digest": {"hash": d.digest.hash, "size_bytes": d.digest.size_bytes},
                "problem": _PROBLEMS.get(d.problem, "damaged"),
                "detail": d.detail,
                "artifact_ids": list(d.artifact_ids),
                "job_ids": list(d.job_ids),
            }
            for d in damaged
        ],
    }
    _emit(args, "\n".join(lines), data)
    return exitcodes.ERROR if damaged else exitcodes.OK


_SUPPORT = {0: "-", 1: "yes", 2: "no"}


def catalog(args: argparse.Namespace, client: Client) -> int:
    if args.what == "presets":
        return catalog_presets(args, client)
    if args.what == "instances":
        types = client.list_instance_types()
        rows = [
            [t.name, t.accelerator, str(t.total_cores), t.compile_target, f"{t.accelerator_memory_gib:g}"]
            for t in types
        ]
        header = ["INSTANCE", "ACCELERATOR", "CORES", "TARGET", "ACCEL GiB"]
        data: Any = {"instance_types": [MessageToDict(t, preserving_proto_field_name=True) for t in types]}
    else:
        models = client.list_models(args.family, args.quantization)
        rows = [
            [
                m.family,
                m.jumpstart_model_id,
                m.hf_model_id or "-",
                _SUPPORT[m.quantization],
                _SUPPORT[m.speculative_decoding],
                _SUPPORT[m.sagemaker_draft_model],
            ]
            for m in models
        ]
        header = [
            "FAMILY",
            "JUMPSTART MODEL",
            "HUGGING FACE MODEL",
            "QUANTIZATION",
            "SPECULATIVE",
            "DRAFT MODEL",
        ]
        data = {"models": [MessageToDict(m, preserving_proto_field_name=True) for m in models]}
    _emit(args, render.table(header, rows), data)
    return exitcodes.OK


def import_set(args: argparse.Namespace, client: Client) -> int:
    signing_key = signing_key_from_args(args)
    try:
        entries = importing.load_set(Path(args.file))
    except MatrixError as exc:
        raise CommandFailed(str(exc), bad_input=True) from None

    def report(result: importing.ImportResult) -> None:
        if args.json:
            return
        where = result.entry.directory
        if result.error:
            _error(f"{where}: {result.error}")
        else:
            print(f"{'published' if result.created else 'already there'}  {result.artifact_id}  {where}")

    results = importing.import_set(client, entries, report, signing_key=signing_key)
    failed = sum(1 for r in results if r.error)
    data = {
        "imported": [
            {
                "path": str(r.entry.directory),
                "artifact_id": r.artifact_id or None,
                "created": r.created,
                "error": r.error or None,
            }
            for r in results
        ]
    }
    summary = f"{len(results)} entries: {len(results) - failed} published or present, {failed} failed"
    _emit(args, summary, data)
    return exitcodes.ERROR if failed else exitcodes.OK


def recommend(args: argparse.Namespace, client: Client) -> int:
    response = client.recommend(
        args.model,
        args.objective,
        instance_types=args.instance_types,
        kind=args.kind or "",
        max_ttft_ms=args.max_ttft_ms,
        max_itl_ms=args.max_itl_ms,
        concurrency=args.concurrency,
        sequence_length=args.sequence_length,
        allow=args.allow,
        limit=args.limit,
    )
    _emit(
        args,
        recommendations.recommend_text(response, args.objective),
        recommendations.recommend_json(response),
    )
    return exitcodes.OK


def catalog_presets(args: argparse.Namespace, client: Client) -> int:
    presets = client.list_presets(args.model)
    text = recommendations.presets_text(presets) if presets else "no presets"
    _emit(args, text, {"presets": [recommendations.preset_json(p) for p in presets]})
    return exitcodes.OK
