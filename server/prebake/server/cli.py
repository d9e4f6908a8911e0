"""`prebake serve`: the server's subcommand, added to the one `prebake` command.

Reached through the `prebake.commands` entry point `serve` (the protocol is in
`prebake.core.command_plugins`). This module imports only the standard library, core and
the server's config at load time, so that every `prebake` invocation can list it: the
server itself (and its extras: grpc health and reflection, sqlite-utils) is imported when
the command runs, and its absence is reported with what to install.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prebake.core.cli_values import count, positive_int, seconds, size
from prebake.core.command_plugins import CommandFailed, CommandRegistrar
from prebake.core.errors import PrebakeError
from prebake.core.logs import LOG_FORMATS, LOG_LEVELS
from prebake.server.config import (
    ENV_PREFIX,
    ServerConfig,
    Setting,
    is_secret,
    load_server_config,
    load_server_config_with_sources,
    settings,
)


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
            "\n"
            "Every setting below has a flag, a PREBAKE_<NAME> environment variable and a key\n"
            "<name> in the TOML file of --config (in a [server] table, or at the top level).\n"
            "Flags beat environment variables, which beat the file, which beats the defaults.\n"
            "`prebake config show` prints the values a server would run with and where each\n"
            "came from.\n"
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
    p.add_argument("--config", metavar="FILE", help="TOML file with a [server] table (env PREBAKE_CONFIG)")
    p.add_argument(
        "--create-tables",
        action="store_true",
        help="create the --registry's DynamoDB tables first if missing (as prebake init-aws)",
    )
    add_setting_flags(p)


@dataclass(frozen=True)
class _Flag:
    """How a ServerConfig field is given on the command line."""

    flag: str
    options: Mapping[str, Any] = field(default_factory=dict)
    # Given once per value, the values joined with "," (the setting's comma-separated form).
    repeatable: bool = False


# Flags whose spelling or parsing is not the generated one (--FIELD-NAME, parsed by the
# field's type; see `_flag`): the shorter names earlier versions had, and repeatable flags
# of comma-separated settings.
_FLAGS: Mapping[str, _Flag] = {
    "processes": _Flag("--processes", {"type": positive_int, "metavar": "N"}),
    "embedded_workers": _Flag("--workers", {"type": count, "metavar": "N"}),
    "gc_interval_seconds": _Flag("--gc-interval", {"type": seconds, "metavar": "SECONDS"}),
    "unreferenced_blob_grace_seconds": _Flag(
        "--unreferenced-blob-grace", {"type": seconds, "metavar": "SECONDS"}
    ),
    "integrity_sweep_bytes_per_second": _Flag("--integrity-sweep-rate", {"type": size, "metavar": "N"}),
    "model_source_roots": _Flag("--model-source-root", {"metavar": "DIR|s3://PREFIX"}, repeatable=True),
    "model_source_map": _Flag("--model-source-for", {"metavar": "MODEL=SOURCE"}, repeatable=True),
    "signer_keys": _Flag("--signer-key", {"metavar": "FILE"}, repeatable=True),
    "revoked_signers": _Flag("--revoked-signer", {"metavar": "KEY_ID"}, repeatable=True),
    "log_format": _Flag("--log-format", {"choices": LOG_FORMATS}),
    "log_level": _Flag("--log-level", {"type": str.lower, "choices": LOG_LEVELS}),
    "store": _Flag("--store", {"metavar": "s3://BUCKET/PREFIX"}),
    "registry": _Flag("--registry", {"metavar": "dynamodb://TABLE_PREFIX"}),
}


def _flag(setting: Setting) -> _Flag:
    """The flag of `setting`: from `_FLAGS`, else --FIELD-NAME parsed by the field's type."""
    if setting.name in _FLAGS:
        return _FLAGS[setting.name]
    name, default = setting.name, setting.default
    options: dict[str, Any]
    if isinstance(default, bool):
        options = {"action": argparse.BooleanOptionalAction}
    elif isinstance(default, int):
        options = {"type": size if "bytes" in name else int, "metavar": "N"}
        if name.endswith("_seconds"):
            options = {"type": count, "metavar": "SECONDS"}
    elif isinstance(default, float):
        options = {"type": seconds, "metavar": "SECONDS"} if name.endswith("_seconds") else {"type": float}
        options.setdefault("metavar", "X")
    elif name.endswith("listen"):
        options = {"metavar": "HOST:PORT"}
    elif isinstance(default, Path) or name.endswith("_dir"):
        options = {"metavar": "DIR"}
    elif name.endswith(("_file", "_cert", "_key", "_ca")):
        options = {"metavar": "FILE"}
    else:
        options = {"metavar": "VALUE"}
    return _Flag("--" + name.replace("_", "-"), options)


def flag_of(name: str) -> str:
    """The command-line flag of the ServerConfig field `name` (e.g. --workers)."""
    return _flag(next(s for s in settings() if s.name == name)).flag


def _shown_default(setting: Setting) -> str:
    value = setting.default
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int) and "bytes" in setting.name and value:
        for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
            if value % (1 << shift) == 0:
                return f"{value >> shift}{unit}"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, Path) and not value.is_absolute():
        return os.path.join(".", value)
    return str(value) if str(value) else "empty"


def add_setting_flags(p: argparse.ArgumentParser) -> None:
    """A flag for every ServerConfig field, grouped as config.py groups them, each documented
    with its environment variable, TOML key and default (all from `settings()`)."""
    groups: dict[str, Any] = {}
    for setting in settings():
        if setting.section not in groups:
            groups[setting.section] = p.add_argument_group(f"settings: {setting.section.lower()}")
        flag = _flag(setting)
        repeat = "; repeatable, or comma-separated in env and file" if flag.repeatable else ""
        where = f"[env {setting.env}; key {setting.name}; default {_shown_default(setting)}{repeat}]"
        groups[setting.section].add_argument(
            flag.flag,
            dest=setting.name,
            action="append" if flag.repeatable else flag.options.get("action", "store"),
            default=None,
            help=f"{setting.doc} {where}".replace("%", "%%"),
            **{k: v for k, v in flag.options.items() if k != "action"},
        )


def setting_flags(args: argparse.Namespace) -> dict[str, object]:
    """The settings given as flags (None: not given), as `load_server_config` takes them."""
    given: dict[str, object] = {}
    for setting in settings():
        value = getattr(args, setting.name)
        given[setting.name] = ",".join(value) if _flag(setting).repeatable and value is not None else value
    return given


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
    return config_from(args, **setting_flags(args))


def register_config(commands: CommandRegistrar) -> None:
    """Add `config show`: the configuration `serve` would run with, and where it came from."""
    p = commands.add_command(
        "config",
        _config_group,
        summary="show the server configuration and where each setting came from",
        description=(
            "Inspect the server configuration as `prebake serve` would build it (see its --help\n"
            "for every setting)."
        ),
        examples="""
        prebake config show
        prebake config show --config prebake.toml --json
        """,
        connects=False,
    )
    sub = commands.nested(p.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True))
    show = sub.add_command(
        "show",
        config_show,
        summary="print the effective configuration and each value's source",
        description=(
            "Build the configuration from the same flags, PREBAKE_* environment variables and\n"
            "--config file as `prebake serve` (and check it the same way: a bad setting is a\n"
            "usage error, exit 2), then print every setting with its value and its source:\n"
            "default, file PATH, env PREBAKE_NAME or flag --name. Settings that are or point\n"
            "at a secret (tokens, private keys) print only whether they are set."
        ),
        examples="""
        prebake config show
        PREBAKE_LISTEN=0.0.0.0:50051 prebake config show --config /etc/prebake.toml --workers 0
        prebake config show --json | jq '.settings[] | select(.source != "default")'
        """,
        connects=False,
    )
    show.add_argument("--json", action="store_true", help="one JSON object on stdout")
    show.add_argument("--config", metavar="FILE", help="TOML file with a [server] table (env PREBAKE_CONFIG)")
    add_setting_flags(show)


def _config_group(args: argparse.Namespace) -> int:
    """`prebake config` alone: argparse requires a subcommand, so this is never reached."""
    raise CommandFailed("prebake config: name a subcommand (show)", bad_input=True)


def config_show(args: argparse.Namespace) -> int:
    """Print every setting's effective value and source; CommandFailed (usage) for bad settings."""
    config_file = Path(args.config) if args.config else None
    try:
        config, sources = load_server_config_with_sources(setting_flags(args), os.environ, config_file)
    except ValueError as exc:
        raise CommandFailed(str(exc), bad_input=True) from exc
    rows = []
    for setting in settings():
        value = getattr(config, setting.name)
        if is_secret(setting.name):
            value = "set" if value else ""
        elif isinstance(value, Path):
            value = str(value)
        source = sources[setting.name]
        origin = flag_of(setting.name) if source.layer == "flag" else source.origin
        rows.append({"name": setting.name, "value": value, "source": source.layer, "from": origin})
    if args.json:
        used = config_file or os.environ.get(f"{ENV_PREFIX}CONFIG") or None
        print(json.dumps({"config_file": str(used) if used else None, "settings": rows}, indent=2))
        return 0
    table = [["SETTING", "VALUE", "SOURCE"]]
    for row in rows:
        shown = row["value"]
        text = json.dumps(shown) if shown == "" or isinstance(shown, bool) else str(shown)
        table.append([str(row["name"]), text, f"{row['source']} {row['from']}".strip()])
    widths = [max(len(line[i]) for line in table) for i in range(2)]
    for name, text, origin in table:
        print(f"{name.ljust(widths[0])}  {text.ljust(widths[1])}  {origin}".rstrip())
    return 0
