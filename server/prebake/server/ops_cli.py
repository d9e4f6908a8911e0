"""`prebake init-aws`, `prebake reindex`, `prebake migrate`: the server's operations commands.

Each is a `prebake.commands` entry point (see `prebake.core.command_plugins`) named after its
command. Like `prebake.server.cli`, this module imports only the standard library, core and
the server's config at load time; what a command runs is imported when it runs, and a
missing extra is reported with what to install. Results go to stdout (one line each),
progress to stderr; a command that could not do all of its job exits 1 with the reason.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

from prebake.core.command_plugins import CommandFailed, CommandRegistrar
from prebake.core.errors import PrebakeError
from prebake.server.cli import add_backend_flags, config_from, missing_server_extra
from prebake.server.config import ServerConfig, load_server_config

# Problems listed one per line before "... and N more".
SHOWN_PROBLEMS = 50


def _show(lines: Iterable[str]) -> None:
    listed = list(lines)
    for line in listed[:SHOWN_PROBLEMS]:
        print(line)
    if len(listed) > SHOWN_PROBLEMS:
        print(f"... and {len(listed) - SHOWN_PROBLEMS} more")


def _add_config_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML file with a [server] table (env PREBAKE_CONFIG)")


# --- init-aws --------------------------------------------------------------------------


def register_init_aws(commands: CommandRegistrar) -> None:
    p = commands.add_command(
        "init-aws",
        init_aws,
        summary="create the DynamoDB tables and check the S3 bucket (idempotent)",
        description=(
            "Prepare the AWS backends a server will use: create the --registry's DynamoDB\n"
            "tables if missing (and wait until they are active) and check that the --store's\n"
            "bucket exists and may be used. Prints one line per table (created or exists) and\n"
            "one for the bucket; running it again changes nothing. It does not create the\n"
            "bucket. Endpoint, region and credentials come from boto3's standard sources\n"
            "(AWS_PROFILE, AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL_DYNAMODB, instance roles).\n"
            "Settings as for serve: flags > PREBAKE_* environment variables > --config file."
        ),
        examples="""
        prebake init-aws --store s3://my-bucket/prebake --registry dynamodb://prebake-prod
        PREBAKE_REGISTRY=dynamodb://prebake-prod prebake init-aws
        """,
        connects=False,
    )
    _add_config_flag(p)
    add_backend_flags(p)


def init_aws(args: argparse.Namespace) -> int:
    config = config_from(args, store=args.store, registry=args.registry)
    if not config.store and not config.registry:
        raise CommandFailed(
            "name what to prepare: --store s3://BUCKET/PREFIX and/or --registry dynamodb://TABLE_PREFIX",
            bad_input=True,
        )
    try:
        from prebake.server import backends
    except ModuleNotFoundError as exc:
        raise missing_server_extra(exc, "init-aws") from exc
    try:
        if config.store:
            _, described = backends.open_s3(config)
            print(f"bucket {described}: ok", flush=True)
        if config.registry:
            for table, outcome in backends.create_tables(config):
                print(f"table {table}: {outcome}", flush=True)
    except PrebakeError as exc:
        raise CommandFailed(str(exc)) from exc
    return 0


# --- reindex ---------------------------------------------------------------------------


def register_reindex(commands: CommandRegistrar) -> None:
    p = commands.add_command(
        "reindex",
        reindex,
        summary="rebuild the registry's artifacts from the manifests in the blob store",
        description=(
            "Disaster recovery: restore every artifact whose manifest is archived in the store\n"
            "(manifests/ beside the blobs) into the registry, with its id, key, files, producer,\n"
            "creation time and pin as last set. Artifacts already present are skipped, so it may\n"
            "run again, and beside running replicas of a DynamoDB registry; a SQLite registry\n"
            "must not be served meanwhile (its data dir is locked). An artifact with a blob\n"
            "missing from the store is reported, not restored; then the exit code is 1. Hit\n"
            "counts and access times start afresh; jobs are not restored.\n"
            "Settings as for serve: flags > PREBAKE_* environment variables > --config file."
        ),
        examples="""
        prebake reindex --store s3://my-bucket/prebake --registry dynamodb://prebake-new
        prebake reindex --data-dir /var/lib/prebake     # local: after losing registry.sqlite3
        """,
        connects=False,
    )
    p.add_argument("--data-dir", metavar="DIR", help="the data directory of local backends (as for serve)")
    _add_config_flag(p)
    add_backend_flags(p)


def reindex(args: argparse.Namespace) -> int:
    config = config_from(args, data_dir=args.data_dir, store=args.store, registry=args.registry)
    try:
        from prebake.server.progress import Progress
        from prebake.server.reindex import ReindexReport, reindex_configured
    except ModuleNotFoundError as exc:
        raise missing_server_extra(exc, "reindex") from exc
    progress = Progress()
    progress.show("reindex: listing the archived manifests")

    def tick(report: ReindexReport) -> None:
        progress.tick(report.progress_line)

    try:
        report = reindex_configured(config, tick)
    except (PrebakeError, OSError) as exc:  # OSError: DataDirInUse, an unusable data dir
        raise CommandFailed(str(exc)) from exc
    progress.show(report.progress_line())
    _show(
        [
            *(
                f"differs: artifact {a} is in the registry with another file list; kept"
                for a in report.differing
            ),
            *(
                f"not restored: artifact {a}: {len(m)} blob(s) missing from the store, e.g. {m[0]}"
                for a, m in sorted(report.missing_blobs.items())
            ),
            *(f"unreadable: {key}: {why}" for key, why in sorted(report.unreadable.items())),
        ]
    )
    print(
        f"reindex: {report.found} archived artifacts: {len(report.restored)} restored, "
        f"{report.present} already present"
    )
    if not report.ok:
        raise CommandFailed(
            f"{len(report.missing_blobs)} artifact(s) with missing blobs and {len(report.unreadable)} "
            "unreadable manifest(s) were not restored (listed above)"
        )
    return 0


# --- migrate ---------------------------------------------------------------------------


def register_migrate(commands: CommandRegistrar) -> None:
    p = commands.add_command(
        "migrate",
        migrate,
        summary="copy a local installation into S3 + DynamoDB (or another data dir)",
        description=(
            "Copy everything a local server stored (--from: its data dir, SQLite + local disk)\n"
            "into the destination backends: every blob the destination lacks (streamed,\n"
            "verified, resumable), then every artifact with its id, files, creation time, pin\n"
            "and hit count, its manifest archived beside the blobs. Idempotent: a second run\n"
            "copies nothing new. Jobs and workers are not copied. The source's server must be\n"
            "stopped (its data dir is locked while this runs). A destination that keeps its\n"
            "registry or blobs on local disk needs --to-data-dir. Only flags configure it (no\n"
            "PREBAKE_* variables, no config file), so nothing is copied to an unintended place."
        ),
        examples="""
        prebake migrate --from /var/lib/prebake --to-store s3://my-bucket/prebake \\
            --to-registry dynamodb://prebake-prod
        prebake migrate --from ./prebake-data --to-data-dir /srv/prebake-new
        """,
        connects=False,
    )
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="DATA_DIR",
        help="the data dir of the local installation",
    )
    add_backend_flags(p, prefix="to-")
    p.add_argument(
        "--to-data-dir",
        metavar="DIR",
        help="data dir of the destination's local registry or blobs (when not both in AWS)",
    )


def migrate_target(args: argparse.Namespace) -> ServerConfig:
    """The destination of `prebake migrate` from its flags alone."""
    if not (args.to_store or args.to_registry or args.to_data_dir):
        raise CommandFailed(
            "name the destination: --to-store s3://... and --to-registry dynamodb://... (or --to-data-dir)",
            bad_input=True,
        )
    flags = {"store": args.to_store, "registry": args.to_registry, "data_dir": args.to_data_dir}
    try:
        target = load_server_config(flags, environ={})
    except ValueError as exc:
        raise CommandFailed(str(exc), bad_input=True) from exc
    if not (target.store and target.registry) and not args.to_data_dir:
        local = " and ".join(n for n, v in (("blobs", target.store), ("registry", target.registry)) if not v)
        raise CommandFailed(
            f"the destination's {local} would be on local disk: name its --to-data-dir "
            "(or --to-store / --to-registry for AWS)",
            bad_input=True,
        )
    return target


def migrate(args: argparse.Namespace) -> int:
    target = migrate_target(args)
    try:
        from prebake.server.migrate import MigrateReport
        from prebake.server.migrate import migrate as run_migrate
        from prebake.server.progress import Progress
    except ModuleNotFoundError as exc:
        raise missing_server_extra(exc, "migrate") from exc
    progress = Progress()

    def blob_tick(report: MigrateReport) -> None:
        progress.tick(report.blob_line)

    def artifact_tick(report: MigrateReport) -> None:
        progress.tick(report.artifact_line)

    try:
        report = run_migrate(Path(args.source), target, blob_tick, artifact_tick)
    except (PrebakeError, OSError) as exc:  # OSError: DataDirInUse, an unusable data dir
        raise CommandFailed(str(exc)) from exc
    _show(
        [
            *(f"blob not copied: {d}: {why}" for d, why in sorted(report.blob_errors.items())),
            *(
                f"artifact not copied: {a}: {len(m)} blob(s) missing at the destination, e.g. {m[0]}"
                for a, m in sorted(report.artifacts_missing_blobs.items())
            ),
            *(
                f"differs: artifact {a} is at the destination with another file list; kept"
                for a in report.artifacts_differing
            ),
        ]
    )
    print(report.blob_line())
    print(report.artifact_line())
    if not report.ok:
        raise CommandFailed(
            f"{len(report.blob_errors)} blob(s) and {len(report.artifacts_missing_blobs)} artifact(s) "
            "were not copied (listed above); fix the cause and run migrate again"
        )
    return 0
