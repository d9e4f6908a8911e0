"""How a part of prebake other than the thin client adds a subcommand to `prebake`.

There is one `prebake` command, parsed by `prebake.client.cli`. The commands that run
server or compiler code (`serve`, `worker`) live next to that code, and the client never
imports them: each is an entry point in the group `ENTRY_POINT_GROUP` of the installed
package's metadata (pyproject.toml, `[project.entry-points."prebake.commands"]`), named
after its command, whose object is a `Register` callable:

    serve = "prebake.server.cli:register"

At start-up the client CLI loads every entry point of the group and calls it once with a
`CommandRegistrar`. The callable adds its command through `add_command` (which gives it the
help layout, the exit-code table and, with `connects=True`, the --server/--timeout options
of every client command) and then adds its own arguments to the parser it gets back.

Rules for a plugin module, so that every `prebake` invocation stays cheap and a missing
extra is reported instead of crashing the command line:
- import only the standard library and `prebake.core` at module level; import what the
  command runs (the server, a toolchain) inside the handler;
- a handler returns an exit code (0 for success) or raises `CommandFailed`; with
  `connects=True` it is called as `handler(args, client)` with a connected
  `prebake.client.Client`, else as `handler(args)`. The client errors a connected handler
  lets through (server unreachable, not found, ...) get the client's usual exit codes.

This module is the whole contract: it imports nothing from either side.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, Protocol

ENTRY_POINT_GROUP = "prebake.commands"


class CommandFailed(Exception):
    """A command could not do its job; the CLI prints `error: <message>` and exits.

    The exit code is 2 (usage) when `bad_input` (a bad setting or configuration), else 1.
    The message should say what to do about it.
    """

    def __init__(self, message: str, *, bad_input: bool = False) -> None:
        super().__init__(message)
        self.bad_input = bad_input


class CommandRegistrar(Protocol):
    """What a `Register` callable gets: the means to add its command to `prebake`."""

    def add_command(
        self,
        name: str,
        handler: Callable[..., int],
        *,
        summary: str,
        description: str,
        examples: str,
        connects: bool,
    ) -> argparse.ArgumentParser:
        """Add the subcommand `name` and return its parser, for the command's own arguments.

        `summary` is its line in `prebake --help`; `description` (preformatted text) and
        `examples` (one command per line, dedented) make up `prebake NAME --help`.
        `connects`: the handler talks to a server (gets --server, --timeout and a Client).
        """
        ...

    def nested(self, subparsers: Any) -> CommandRegistrar:
        """A registrar for the subcommands of a command group (`prebake token add`):
        pass `add_subparsers(...)` of the group's parser; each subcommand then gets its
        own handler, description and examples like any command."""
        ...


Register = Callable[[CommandRegistrar], None]
