"""`prebake serve`: the server's subcommand, added to the one `prebake` command.

Reached through the `prebake.commands` entry point `serve` (the protocol is in
`prebake.core.command_plugins`). This module imports only the standard library, core and
the server's config at load time, so that every `prebake` invocation can list it: the
server itself (and its extras: grpc health and reflection, sqlite-utils) is imported when
the command runs, and its absence is reported with what to install.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from prebake.core.cli_values import count, positive_int, seconds, size
from prebake.core.command_plugins import CommandFailed, CommandRegistrar
from prebake.core.errors import PrebakeError
from prebake.core.logs import add_log_flags
from prebake.server.config import DEFAULT_DATA_DIR, DEFAULT_LISTEN, ServerConfig, load_server_config


def register(commands: CommandRegistrar) -> None:
    """Add `serve` with its flags (each one a ServerConfig field; see `_config`)."""
    p = commands.add_command(
        "serve",
        serve,
        summary="run a prebake server",
        description=(
            "Run the server in this process until SIGINT/SIGTERM: registry and blobs under the\n"
            "data directory (or in DynamoDB and S3: --registry, --store), and an in-process\n"
            "compile worker for every backend whose toolchain is installed here (see --workers).\n"
            "Settings: flags > PREBAKE_* environment variables > --config file.\n"
            "\n"
            "One server per address, and per data directory while the registry or the blobs\n"
            "live there: a port or a data directory another server holds is refused at\n"
            "start-up, naming that server (exit 1). With both in AWS a server keeps no state\n"
            "and any number of replicas may serve one bucket and table set. A missing bucket\n"
            "or table is refused at start-up with what to run (prebake init-aws).\n"
            "\n"
            "Authentication: --auth-file FILE (see prebake token --help) makes every rpc but\n"
            "health and reflection need a token or client certificate with a fitting role.\n"
            "Without it the server listens only on a loopback address, unless told\n"
            "--insecure-allow-anonymous. --tls-cert/--tls-key serve TLS; --tls-client-ca\n"
            "requires and verifies client certificates (mutual TLS)."
        ),
        examples="""
        prebake serve
        prebake serve --listen 0.0.0.0:50051 --data-dir /var/lib/prebake --max-store-bytes 500G
        prebake serve --workers 0          # compile only on separate `prebake worker` hosts
        prebake serve --model-source-root /srv/models --model-source-root s3://my-bucket/models
        PREBAKE_DATA_DIR=/srv/prebake prebake serve --config prebake.toml
        prebake serve --store s3://my-bucket/prebake --registry dynamodb://prebake-prod --create-tables
        prebake serve --listen 0.0.0.0:50051 --auth-file /etc/prebake/tokens --tls-cert s.pem --tls-key s.key
        prebake serve --metrics-listen 127.0.0.1:9100   # http://127.0.0.1:9100/ status, /metrics
        """,
        connects=False,
    )
    p.add_argument("--listen", metavar="HOST:PORT", help=f"address to listen on (default {DEFAULT_LISTEN})")
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help=(
            "where a local registry and blobs live, and embedded workers' scratch space "
            f"(default {os.path.join('.', DEFAULT_DATA_DIR)})"
        ),
    )
    p.add_argument("--config", metavar="FILE", help="TOML file with a [server] table (env PREBAKE_CONFIG)")
    add_backend_flags(p)
    p.add_argument(
        "--create-tables",
        action="store_true",
        help="create the --registry's DynamoDB tables first if missing (as prebake init-aws)",
    )
    p.add_argument("--max-blob-bytes", type=size, metavar="N", help="largest blob accepted (default 64G)")
    p.add_argument(
        "--max-store-bytes", type=size, metavar="N", help="total blob bytes allowed (default: no limit)"
    )
    p.add_argument(
        "--gc-interval",
        type=seconds,
        metavar="SECONDS",
        help="how often the garbage collector runs (default 300; 0 = never, `prebake gc` still works)",
    )
    p.add_argument(
        "--unreferenced-blob-grace",
        type=seconds,
        metavar="SECONDS",
        help="how long an uploaded blob no artifact uses is kept for its publish (default 21600: 6 h)",
    )
    p.add_argument(
        "--workers",
        type=count,
        metavar="N",
        help="in-process compile workers per installed backend (default 1; 0 = none)",
    )
    p.add_argument(
        "--processes",
        type=positive_int,
        metavar="N",
        help=(
            "server processes sharing the listen port, to use N cores for rpcs (default 1; "
            "env PREBAKE_PROCESSES)"
        ),
    )
    p.add_argument(
        "--blob-http-listen",
        metavar="HOST:PORT",
        help=(
            "serve blob downloads over HTTP from signed URLs handed out with manifests, so "
            "fetches bypass gRPC streaming (local store, no TLS; env PREBAKE_BLOB_HTTP_LISTEN)"
        ),
    )
    # Integrity sweep (issue 9).
    p.add_argument(
        "--integrity-sweep-seconds",
        type=float,
        metavar="S",
        help="re-hash stored blobs and repair what is lost every S seconds (default 86400; 0 = off)",
    )
    p.add_argument(
        "--integrity-sweep-rate",
        type=size,
        metavar="N",
        help="bytes per second that sweep hashes at most (default 32M; 0 = unlimited)",
    )
    p.add_argument(
        "--model-source-root",
        action="append",
        metavar="DIR|s3://PREFIX",
        help=(
            "a directory or s3:// prefix a lookup's --model-source may point inside; repeatable "
            "(default: DATA_DIR/models; env PREBAKE_MODEL_SOURCE_ROOTS, comma-separated)"
        ),
    )
    p.add_argument(
        "--model-source-for",
        action="append",
        metavar="MODEL=SOURCE",
        help=(
            "the source of MODEL's jobs when a lookup names none (a directory or s3:// prefix, "
            "allowed as is); repeatable (env PREBAKE_MODEL_SOURCE_MAP, comma-separated)"
        ),
    )
    add_log_flags(p)
    p.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help=(
            "serve Prometheus metrics (/metrics) and a status page (/) over HTTP here; port 0 = a "
            "free port (default: off; env PREBAKE_METRICS_LISTEN). Non-loopback needs --auth-file"
        ),
    )
    _add_security_flags(p)
    _add_signing_flags(p)


def _add_security_flags(p: argparse.ArgumentParser) -> None:
    """Authentication and TLS: ServerConfig's auth_file, insecure_allow_anonymous, tls_*."""
    group = p.add_argument_group("authentication and TLS")
    group.add_argument(
        "--auth-file",
        metavar="FILE",
        help="token file that turns authentication on (prebake token add makes it; env PREBAKE_AUTH_FILE)",
    )
    group.add_argument(
        "--insecure-allow-anonymous",
        action="store_true",
        default=None,
        help="serve a non-loopback --listen address without authentication (anyone reaching it "
        "may replace artifacts; a warning is logged)",
    )
    group.add_argument("--tls-cert", metavar="FILE", help="PEM certificate chain: serve TLS (with --tls-key)")
    group.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    group.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        help="PEM CA bundle: mutual TLS, every client needs a certificate one of them signed",
    )


def _add_signing_flags(p: argparse.ArgumentParser) -> None:
    """Signed artifacts: ServerConfig's require_signatures, signer_keys, revoked_signers, signing_key."""
    group = p.add_argument_group("signed artifacts")
    group.add_argument(
        "--require-signatures",
        action="store_true",
        default=None,
        help="refuse unsigned publishes and job completions (env PREBAKE_REQUIRE_SIGNATURES)",
    )
    group.add_argument(
        "--signer-key",
        dest="signer_keys",
        action="append",
        metavar="FILE",
        help="accept signatures only by this public key (PEM); repeatable (default: any signer)",
    )
    group.add_argument(
        "--revoked-signer",
        dest="revoked_signers",
        action="append",
        metavar="KEY_ID",
        help="stop serving artifacts signed by this key id (ed25519:...); repeatable",
    )
    group.add_argument(
        "--signing-key",
        metavar="FILE",
        help="embedded workers sign their artifacts with this private key (PEM)",
    )


def add_backend_flags(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """--store and --registry, ServerConfig's `store` and `registry`; with `prefix` (e.g.
    "to-": --to-store) flags of another configuration, which no environment variable sets."""

    def env(name: str) -> str:
        return "" if prefix else f"; env PREBAKE_{name}"

    p.add_argument(
        f"--{prefix}store",
        metavar="URL",
        help=f"blobs: s3://BUCKET/PREFIX (default: local disk under the data dir{env('STORE')})",
    )
    p.add_argument(
        f"--{prefix}registry",
        metavar="URL",
        help=f"registry: dynamodb://TABLE_PREFIX (default: SQLite under the data dir{env('REGISTRY')})",
    )


def missing_server_extra(exc: ModuleNotFoundError, command: str) -> CommandFailed:
    """What to say when importing the server for `command` failed; re-raises `exc` if the
    missing module is prebake's own (a broken install, not a missing extra)."""
    if (exc.name or "").partition(".")[0] == "prebake":
        raise exc
    return CommandFailed(
        f"prebake {command} needs the server extra: pip install 'prebake[server]' (missing module {exc.name})"
    )


def serve(args: argparse.Namespace) -> int:
    """Run the server until signalled; CommandFailed for bad settings, a taken port or data
    dir, or backends that cannot be opened (missing bucket or tables, AWS extra, ...)."""
    config = _config(args)
    try:
        from prebake.server.app import serve as serve_forever
        from prebake.server.data_dir_lock import DataDirInUse
        from prebake.server.exclusive_bind import CannotListen
        from prebake.server.serving_processes import ServingProcessFailed
    except ModuleNotFoundError as exc:
        raise missing_server_extra(exc, "serve") from exc
    try:
        if args.create_tables:
            if not config.registry:
                raise CommandFailed(
                    "--create-tables needs a dynamodb:// --registry (SQLite creates itself)", bad_input=True
                )
            from prebake.server.backends import create_tables

            for table, outcome in create_tables(config):
                print(f"table {table}: {outcome}", file=sys.stderr, flush=True)
        serve_forever(config)
    except (DataDirInUse, CannotListen, ServingProcessFailed, PrebakeError) as exc:
        raise CommandFailed(str(exc)) from exc
    return 0


def config_from(args: argparse.Namespace, **flags: object) -> ServerConfig:
    """The ServerConfig of `flags` (None: not given), the environment and --config; bad
    settings are CommandFailed (usage)."""
    try:
        return load_server_config(flags, os.environ, Path(args.config) if args.config else None)
    except ValueError as exc:
        raise CommandFailed(str(exc), bad_input=True) from exc


def _config(args: argparse.Namespace) -> ServerConfig:
    return config_from(
        args,
        listen=args.listen,
        data_dir=args.data_dir,
        store=args.store,
        registry=args.registry,
        max_blob_bytes=args.max_blob_bytes,
        max_store_bytes=args.max_store_bytes,
        metrics_listen=args.metrics_listen,
        embedded_workers=args.workers,
        log_format=args.log_format,
        log_level=args.log_level,
        processes=args.processes,
        blob_http_listen=args.blob_http_listen,
        integrity_sweep_seconds=args.integrity_sweep_seconds,
        integrity_sweep_bytes_per_second=args.integrity_sweep_rate,
        auth_file=args.auth_file,
        insecure_allow_anonymous=args.insecure_allow_anonymous,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        model_source_roots=_joined(args.model_source_root),
        model_source_map=_joined(args.model_source_for),
        gc_interval_seconds=args.gc_interval,
        unreferenced_blob_grace_seconds=args.unreferenced_blob_grace,
        require_signatures=args.require_signatures,
        signer_keys=",".join(args.signer_keys) if args.signer_keys else None,
        revoked_signers=",".join(args.revoked_signers) if args.revoked_signers else None,
        signing_key=args.signing_key,
    )


def _joined(values: list[str] | None) -> str | None:
    """A repeatable flag as its comma-separated setting (None: not given)."""
    return None if values is None else ",".join(values)
