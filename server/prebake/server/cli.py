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
from pathlib import Path

from prebake.core.cli_values import count, size
from prebake.core.command_plugins import CommandFailed, CommandRegistrar
from prebake.server.config import DEFAULT_DATA_DIR, DEFAULT_LISTEN, ServerConfig, load_server_config

INSTALL_HINT = "prebake serve needs the server extra: pip install 'prebake[server]'"


def register(commands: CommandRegistrar) -> None:
    """Add `serve` with its flags (each one a ServerConfig field; see `_config`)."""
    p = commands.add_command(
        "serve",
        serve,
        summary="run a prebake server",
        description=(
            "Run the server in this process until SIGINT/SIGTERM: registry and blobs under the\n"
            "data directory, and an in-process compile worker for every backend whose toolchain\n"
            "is installed here (see --workers). Settings: flags > PREBAKE_* environment\n"
            "variables > --config file.\n"
            "\n"
            "One server per address and per data directory: a port or a data directory another\n"
            "server holds is refused at start-up, naming that server (exit 1)."
        ),
        examples="""
        prebake serve
        prebake serve --listen 0.0.0.0:50051 --data-dir /var/lib/prebake --max-store-bytes 500G
        prebake serve --workers 0          # compile only on separate `prebake worker` hosts
        PREBAKE_DATA_DIR=/srv/prebake prebake serve --config prebake.toml
        """,
        connects=False,
    )
    p.add_argument("--listen", metavar="HOST:PORT", help=f"address to listen on (default {DEFAULT_LISTEN})")
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help=f"where the registry and blobs live (default {os.path.join('.', DEFAULT_DATA_DIR)})",
    )
    p.add_argument("--config", metavar="FILE", help="TOML file with a [server] table (env PREBAKE_CONFIG)")
    p.add_argument("--max-blob-bytes", type=size, metavar="N", help="largest blob accepted (default 64G)")
    p.add_argument(
        "--max-store-bytes", type=size, metavar="N", help="total blob bytes allowed (default: no limit)"
    )
    p.add_argument(
        "--workers",
        type=count,
        metavar="N",
        help="in-process compile workers per installed backend (default 1; 0 = none)",
    )


def serve(args: argparse.Namespace) -> int:
    """Run the server until signalled; CommandFailed for bad settings or a taken port/data dir."""
    config = _config(args)
    try:
        from prebake.server.app import serve as serve_forever
        from prebake.server.data_dir_lock import DataDirInUse
        from prebake.server.exclusive_bind import CannotListen
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] == "prebake":
            raise  # a broken install of prebake itself, not a missing extra
        raise CommandFailed(f"{INSTALL_HINT} (missing module {exc.name})") from exc
    try:
        serve_forever(config)
    except (DataDirInUse, CannotListen) as exc:
        raise CommandFailed(str(exc)) from exc
    return 0


def _config(args: argparse.Namespace) -> ServerConfig:
    flags = {
        "listen": args.listen,
        "data_dir": args.data_dir,
        "max_blob_bytes": args.max_blob_bytes,
        "max_store_bytes": args.max_store_bytes,
        "embedded_workers": args.workers,
    }
    try:
        return load_server_config(flags, os.environ, Path(args.config) if args.config else None)
    except ValueError as exc:
        raise CommandFailed(str(exc), bad_input=True) from exc
