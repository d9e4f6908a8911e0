"""`prebake key generate`: make an Ed25519 key pair for signing artifacts.

A `prebake.commands` plugin (entry point `key`; the protocol is
`prebake.core.command_plugins`). It lives in core because the signature format does
(`prebake.core.signing`); `cryptography` is imported only when the command runs, and its
absence is reported with the extra to install.
"""

from __future__ import annotations

import argparse
import json
import sys

from prebake.core.command_plugins import CommandFailed, CommandRegistrar
from prebake.core.errors import PrebakeError


def register(commands: CommandRegistrar) -> None:
    p = commands.add_command(
        "key",
        key,
        summary="generate a signing key pair for artifacts",
        description=(
            "generate --out FILE: write a new Ed25519 private key to FILE (PEM PKCS#8, mode 0600)\n"
            "and its public key to FILE.pub (PEM), and print the key id (ed25519:<32 hex>).\n"
            "Sign with the private key (prebake publish/worker --signing-key FILE, or the server's\n"
            "signing_key for embedded workers); give the public key to deploy hosts (prebake\n"
            "ensure --trust FILE.pub) and, optionally, to the server (signer_keys). An existing\n"
            "file is never overwritten. Needs pip install 'prebake[signing]'."
        ),
        examples="""
        prebake key generate --out /etc/prebake/signing.key
        prebake ensure ... --trust /etc/prebake/signing.key.pub --dest /opt/model
        """,
        connects=False,
    )
    p.add_argument("action", choices=["generate"], help="what to do (generate a new key pair)")
    p.add_argument("--out", required=True, metavar="FILE", help="private key file to create (and FILE.pub)")
    p.add_argument("--json", action="store_true", help="print one JSON object to stdout")


def key(args: argparse.Namespace) -> int:
    from prebake.core.signing import generate_key_files

    try:
        private, public, key_id = generate_key_files(args.out)
    except PrebakeError as exc:
        raise CommandFailed(str(exc)) from None
    if args.json:
        print(json.dumps({"key_id": key_id, "private_key": str(private), "public_key": str(public)}))
    else:
        print(key_id)
        print(f"private key: {private} (keep it secret)\npublic key:  {public}", file=sys.stderr)
    return 0
