"""`prebake token add / revoke / list`: edit a server's token file (a `prebake.commands` plugin).

Shapes scripts depend on:
    prebake token add FILE --role ROLE [--role ROLE ...] --name NAME   # the new token, alone, on stdout
    prebake token revoke FILE NAME
    prebake token list FILE [--json]                       # names, roles, created; never hashes

The file format is in `prebake.server.auth.tokens`. A running server re-reads the file on
its next rpc, so a revoked token stops working at once. Like every plugin module, this
imports only the standard library and core (and the standard-library `tokens` module).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from prebake.core.command_plugins import CommandFailed, CommandRegistrar
from prebake.core.errors import PrebakeError
from prebake.server.auth.tokens import ROLE_NAMES, add_entry, read_entries, revoke_entry


def register(commands: CommandRegistrar) -> None:
    p = commands.add_command(
        "token",
        token,
        summary="add, revoke and list the tokens of a server's token file",
        description=(
            "Manage the token file that `prebake serve --auth-file FILE` authenticates with.\n"
            "add: append an entry and print its new token once, alone on stdout (only its\n"
            "  SHA-256 is stored; the file is created with mode 0600). With --cert-subject the\n"
            "  entry names a client certificate (mutual TLS) instead and no token is printed.\n"
            "revoke: remove an entry; a running server refuses its token from the next rpc.\n"
            "list: the entries' names, roles and creation times (never hashes).\n"
            f"Roles: {', '.join(ROLE_NAMES)} (admin may call everything)."
        ),
        examples="""
        prebake token add /etc/prebake/tokens --role reader --name deploy-fleet > deploy.token
        prebake token add /etc/prebake/tokens --role worker --role publisher --name ci
        prebake token add /etc/prebake/tokens --role worker --name gpu-1 --cert-subject CN=gpu-1
        prebake token revoke /etc/prebake/tokens ci
        prebake token list /etc/prebake/tokens --json
        """,
        connects=False,
    )
    tokens = commands.nested(p.add_subparsers(dest="token_command", metavar="SUBCOMMAND", required=True))
    add = tokens.add_command(
        "add",
        token_add,
        summary="add an entry and print its token",
        description=(
            "Append an entry to FILE (created with mode 0600 if missing) and print its new\n"
            "token once, alone on stdout; only the token's SHA-256 is stored. With\n"
            "--cert-subject the entry names a client certificate instead (mutual TLS) and no\n"
            "token is printed. A name already in the file is refused."
        ),
        examples="""
        prebake token add /etc/prebake/tokens --role reader --name deploy-fleet > deploy.token
        prebake token add /etc/prebake/tokens --role worker --name gpu-1 --cert-subject CN=gpu-1
        """,
        connects=False,
    )
    add.add_argument("file", metavar="FILE", help="the token file (created if missing)")
    add.add_argument(
        "--role", dest="roles", action="append", required=True, choices=ROLE_NAMES, help="a role; repeatable"
    )
    add.add_argument("--name", required=True, help="the entry's name (unique in the file)")
    add.add_argument(
        "--cert-subject",
        default="",
        metavar="SUBJECT",
        help="authenticate a client certificate with this subject (e.g. CN=worker-1) instead of a token",
    )
    revoke = tokens.add_command(
        "revoke",
        token_revoke,
        summary="remove an entry",
        description="Remove the entry NAME from FILE; a running server refuses it from its next rpc.",
        examples="prebake token revoke /etc/prebake/tokens ci",
        connects=False,
    )
    revoke.add_argument("file", metavar="FILE", help="the token file")
    revoke.add_argument("name", metavar="NAME", help="the entry to remove")
    listing = tokens.add_command(
        "list",
        token_list,
        summary="list the entries",
        description="List the entries of FILE: names, roles, creation times and kinds (never hashes).",
        examples="prebake token list /etc/prebake/tokens --json",
        connects=False,
    )
    listing.add_argument("file", metavar="FILE", help="the token file")
    listing.add_argument("--json", action="store_true", help="print one JSON object to stdout")


def token(args: argparse.Namespace) -> int:
    """`prebake token` alone: argparse requires a subcommand, so this is never reached."""
    raise CommandFailed("prebake token: name a subcommand (add, revoke or list)", bad_input=True)


def token_add(args: argparse.Namespace) -> int:
    """`prebake token add`; CommandFailed (exit 2 for bad input) when it cannot."""
    path = Path(args.file)
    with _failures():
        new = add_entry(path, args.name, args.roles, cert_subject=args.cert_subject)
    what = f"certificate {args.cert_subject}" if new is None else "a new token (printed once)"
    print(f"added {args.name!r} ({', '.join(args.roles)}) to {path}: {what}", file=sys.stderr)
    if new is not None:
        print(new, flush=True)
    return 0


def token_revoke(args: argparse.Namespace) -> int:
    """`prebake token revoke`; CommandFailed (exit 2 for bad input) when it cannot."""
    path = Path(args.file)
    with _failures():
        gone = revoke_entry(path, args.name)
    print(f"revoked {gone.name!r} ({', '.join(gone.roles)}) in {path}", file=sys.stderr)
    return 0


def token_list(args: argparse.Namespace) -> int:
    """`prebake token list`; CommandFailed when the file cannot be read."""
    with _failures():
        _list(Path(args.file), args.json)
    return 0


@contextlib.contextmanager
def _failures() -> Iterator[None]:
    try:
        yield
    except PrebakeError as exc:
        raise CommandFailed(str(exc), bad_input=exc.code == "INVALID_ARGUMENT") from exc


def _list(path: Path, as_json: bool) -> None:
    entries = read_entries(path)
    rows = [
        {
            "name": e.name,
            "roles": list(e.roles),
            "created": e.created,
            "credential": f"cert {e.cert_subject}" if e.cert_subject else "token",
        }
        for e in entries
    ]
    if as_json:
        print(json.dumps({"file": str(path), "entries": rows}, indent=2))
        return
    if not rows:
        print(f"no entries in {path}")
        return
    width = max(len(r["name"]) for r in rows)  # type: ignore[arg-type]
    for r in rows:
        print(f"{r['name']:<{width}}  {','.join(r['roles']):<24}  {r['created']:<20}  {r['credential']}")  # type: ignore[arg-type]
