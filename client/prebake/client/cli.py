"""The `prebake` command line: argument parsing, dispatch and exit codes.

The handlers live in `prebake.client.commands`; this module defines the command-line
shape (kept stable for scripts), one small `_add_*` function per command or command
group, and turns failures into `error: ...` on stderr and the exit codes of
`prebake.client.exitcodes`.

Commands from other parts of prebake
------------------------------------
`serve` (the server) and `worker` (the compile worker) live next to the code they run and
are never imported by this module. They are plugins: entry points of the installed
package in the group `prebake.commands` (pyproject.toml), each named after its command and
pointing at a `register(commands)` callable. The protocol, with nothing in it from either
side, is `prebake.core.command_plugins`:

- `build_parser` loads every entry point of the group and calls it once with a
  `CommandRegistrar` (`_Commands` here). The callable adds its command with
  `commands.add_command(name, handler, summary=, description=, examples=, connects=)`,
  which gives it the help layout and exit-code table every command has and, with
  `connects=True`, the --server/--timeout options; it then adds its own arguments to the
  parser it gets back.
- `commands.run` calls `handler(args)`, or `handler(args, client)` with a connected
  `Client` when `connects`; the handler returns an exit code or raises `CommandFailed`
  (`error: <message>`, exit 1, or 2 for bad input). Client errors get the usual codes.
- A plugin module imports only the standard library and `prebake.core` (plus its own
  part's light modules) at load time and the rest inside its handler, so that loading
  every plugin costs every `prebake` run little.
- A command of `PLUGIN_COMMANDS` whose entry point is missing or fails to load is still
  listed; running it (with any arguments) prints what to install and exits 1, instead of
  argparse's "invalid choice". A plugin that fails to load never breaks other commands.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from prebake.client import commands, exitcodes
from prebake.client.channel import TARGET_FORMS, check_target
from prebake.client.cli_errors import FLAG_FIELDS, Failure, report
from prebake.client.client import DEFAULT_TARGET
from prebake.client.errors import InvalidArgument
from prebake.core import cli_values
from prebake.core.cli_values import positive_int, positive_seconds, seconds, size
from prebake.core.command_plugins import ENTRY_POINT_GROUP, CommandFailed, Register
from prebake.core.names import job_state_names, kind_names
from prebake.core.suggest import unknown

DEFAULT_TIMEOUT = 30.0


@dataclass(frozen=True)
class PluginCommand:
    """What the CLI knows of a command another part provides: enough to say what to install."""

    summary: str
    needs: str
    install: str

    def hint(self, name: str) -> str:
        return f"prebake {name} needs {self.needs}: {self.install}"


# In `prebake --help` order, before the client's own commands.
PLUGIN_COMMANDS = {
    "serve": PluginCommand("run a prebake server", "the server extra", "pip install 'prebake[server]'"),
    "config": PluginCommand(
        "show the server configuration and where each setting came from",
        "the server extra",
        "pip install 'prebake[server]'",
    ),
    "worker": PluginCommand(
        "run a compile worker",
        "the compiler and a backend",
        "pip install 'prebake[inductor]' (or 'prebake[awq]')",
    ),
    "init-aws": PluginCommand(
        "create the DynamoDB tables and check the S3 bucket",
        "the server and AWS extras",
        "pip install 'prebake[server,aws]'",
    ),
    "reindex": PluginCommand(
        "rebuild the registry from the manifests in the blob store",
        "the server extra",
        "pip install 'prebake[server]'",
    ),
    "migrate": PluginCommand(
        "copy a local installation into S3 + DynamoDB",
        "the server extra",
        "pip install 'prebake[server]'",
    ),
    "token": PluginCommand(
        "add, revoke and list the tokens of a server's token file",
        "the server extra",
        "pip install 'prebake[server]'",
    ),
    "key": PluginCommand(
        "generate a signing key pair for artifacts", "the signing extra", "pip install 'prebake[signing]'"
    ),
}


class InvalidValue(argparse.ArgumentError):
    """A flag's value that its type or choices refused: invalid input (exit INVALID), not usage.

    `field` is the contract field the flag sets (`cli_errors.FIELD_FLAGS`), else its dest.
    """

    def __init__(self, action: argparse.Action, message: str) -> None:
        super().__init__(action, message)
        flag = max(action.option_strings, key=len, default="")
        self.field = FLAG_FIELDS.get(flag, action.dest)


class ParseFailed(Exception):
    """The command line was refused; `cli.main` reports it (usage line, message, JSON)."""

    def __init__(self, parser: argparse.ArgumentParser, message: str, exit_code: int, field: str | None):
        super().__init__(message)
        self.parser = parser
        self.exit_code = exit_code
        self.field = field


class _Parser(argparse.ArgumentParser):
    """argparse, with bad values told apart from bad usage, and "did you mean" for choices.

    Every subcommand's parser is one too (argparse makes subparsers of the parent's class).
    """

    def _get_value(self, action: argparse.Action, arg_string: str) -> Any:
        try:
            return super()._get_value(action, arg_string)
        except argparse.ArgumentError as exc:
            raise InvalidValue(action, exc.message) from None

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        choices = action.choices
        if choices is None or value in choices:
            return
        if isinstance(action, argparse._SubParsersAction):  # an unknown command is a usage error
            raise argparse.ArgumentError(action, unknown("command", value, list(choices)))
        if isinstance(action.metavar, str):
            what = action.metavar.lower()
        else:
            what = action.dest.replace("_", " ") if action.option_strings else "value"
        raise InvalidValue(action, unknown(what, str(value), [str(c) for c in choices]))

    def error(self, message: str) -> Any:
        # Called by argparse inside its `except ArgumentError` (or directly for a missing or
        # unrecognised argument): what is being handled tells a bad value from bad usage.
        exc = sys.exc_info()[1]
        if isinstance(exc, InvalidValue):
            raise ParseFailed(self, message, exitcodes.INVALID, exc.field)
        raise ParseFailed(self, message, exitcodes.USAGE, None)


def _server_target(text: str) -> str:
    try:
        return check_target(text)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _epilog(examples: str, extra: str = "") -> str:
    text = "examples:\n" + textwrap.indent(textwrap.dedent(examples).strip("\n"), "  ")
    return f"{text}\n\n{extra}" if extra else text


def _option(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return name.strip(), value


def _client_options(suppress: bool) -> argparse.ArgumentParser:
    """--server and --timeout, accepted before or after the command name.

    On subcommands the defaults are suppressed so that a value given before the command
    is not overwritten by the subcommand's default.
    """
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("server connection")
    default_server = argparse.SUPPRESS if suppress else os.environ.get("PREBAKE_SERVER") or DEFAULT_TARGET
    group.add_argument(
        "--server",
        metavar="HOST:PORT",
        type=_server_target,
        default=default_server,
        help=f"prebake server address: {TARGET_FORMS} (env PREBAKE_SERVER; default {DEFAULT_TARGET})",
    )
    group.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=positive_seconds,
        default=argparse.SUPPRESS if suppress else DEFAULT_TIMEOUT,
        help=f"deadline of each request (default {DEFAULT_TIMEOUT:g})",
    )
    _add_credentials(parent, suppress)
    return parent


def _add_credentials(parent: argparse.ArgumentParser, suppress: bool) -> None:
    """--token, --token-file, --ca-bundle, --client-cert, --client-key (env: see `credentials`)."""
    group = parent.add_argument_group("authentication and TLS")
    default = argparse.SUPPRESS if suppress else None
    flags = [
        ("--token", "TOKEN", "bearer token (env PREBAKE_TOKEN; prefer --token-file: a flag shows in ps)"),
        ("--token-file", "FILE", "file holding the token (env PREBAKE_TOKEN_FILE)"),
        (
            "--ca-bundle",
            "FILE",
            "PEM CAs that sign the server's certificate: use TLS (env PREBAKE_CA_BUNDLE)",
        ),
        ("--client-cert", "FILE", "PEM client certificate for mutual TLS (env PREBAKE_CLIENT_CERT)"),
        ("--client-key", "FILE", "PEM key of --client-cert (env PREBAKE_CLIENT_KEY)"),
    ]
    for flag, metavar, text in flags:
        group.add_argument(flag, metavar=metavar, default=default, help=text)


def _add_key_options(parser: argparse.ArgumentParser, required: bool, lookup: bool = True) -> None:
    """The key's options; with `lookup`, also --allow (compatibility policies for a lookup)."""
    group = parser.add_argument_group(
        "artifact key",
        "the configuration; the server validates and normalises it (aliases, defaults, "
        "fields the kind ignores)",
    )
    actions: list[argparse.Action] = []

    def add(*flags: str, **kwargs: Any) -> None:
        actions.append(group.add_argument(*flags, **kwargs))

    add("--kind", required=required, type=cli_values.kind, help=f"compiler family: {', '.join(kind_names())}")
    add("--model", required=required, help="model id, e.g. meta-llama/Meta-Llama-3-8B")
    add("--revision", default="", help="model revision (commit hash or weights digest)")
    add("--instance-type", default="", metavar="TYPE", help="e.g. ml.inf2.48xlarge")
    # Positive when given; omitted, 0 leaves the field unset (the server says if the kind needs it).
    add("--sequence-length", type=positive_int, default=0, metavar="N", help="compiled sequence length")
    add("--batch-size", type=positive_int, default=0, metavar="N", help="compiled batch size")
    add("--tp", type=positive_int, default=0, metavar="N", help="tensor-parallel degree (default 1)")
    add("--precision", default="", help="bf16, fp16, fp32, int8, fp8, int4-awq (default: kind's)")
    add("--toolchain", default="", help="compiler version (default: the server's)")
    add(
        "--option",
        dest="options",
        action="append",
        type=_option,
        default=[],
        metavar="KEY=VALUE",
        help="extra compiler option; repeatable",
    )
    # Every key flag as (destination, flag), for what refuses them beside `--preset`
    # (`commands.key_or_preset`): derived here, where they are defined.
    parser.set_defaults(key_flags=tuple((a.dest, a.option_strings[0]) for a in actions))
    if not lookup:
        return
    group.add_argument(
        "--allow",
        action="append",
        default=[],
        choices=["longer_sequence", "neuroncore_v2_family"],
        metavar="POLICY",
        help="also accept an artifact this policy admits (longer_sequence, neuron: compiled for a "
        "longer sequence length; neuroncore_v2_family: compiled for the other NeuronCore-v2 family, "
        "inf2/trn1); repeatable",
    )


def _add_preset(parser: argparse.ArgumentParser) -> None:
    # The key flags are then not required: the command checks one or the other, never both
    # (`commands.key_or_preset`).
    parser.add_argument(
        "--preset",
        metavar="NAME",
        help="the key of this preset (`prebake catalog presets`), instead of the key options",
    )


def _add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object to stdout")


def _add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress display on stderr")


def _add_host_cache(parser: argparse.ArgumentParser, purpose: str, env_default: bool) -> None:
    """--host-cache [DIR] (and, if the env var enables it, --no-host-cache).

    Given without DIR, the value is "" (the default root: `commands.host_cache_from_args`).
    """
    default_dir = "default DIR: $PREBAKE_HOST_CACHE or ~/.cache/prebake/blobs"
    enabled = "; on by default when PREBAKE_HOST_CACHE is set" if env_default else ""
    parser.add_argument(
        "--host-cache",
        nargs="?",
        const="",
        default=None,
        metavar="DIR",
        help=f"{purpose} ({default_dir}{enabled})",
    )
    if env_default:
        parser.add_argument(
            "--no-host-cache",
            action="store_true",
            help="do not use the host cache even if PREBAKE_HOST_CACHE is set",
        )


def _add_trust(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust",
        action="append",
        default=[],
        metavar="KEYFILE",
        help="place only artifacts signed by this public key (PEM); repeatable, any one suffices "
        "(key rotation). Default: the files in $PREBAKE_TRUST (a path list). Refused: exit 9, "
        "nothing placed. Needs pip install 'prebake[signing]'",
    )


def _add_job_filters(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--state",
        dest="states",
        action="extend",
        nargs="+",
        choices=job_state_names(),
        default=default,
        metavar="STATE",
        help=f"only jobs in these states ({', '.join(job_state_names())}); repeatable",
    )
    parser.add_argument("--kind", type=cli_values.kind, default=default, help="only jobs of this kind")
    parser.add_argument(
        "--limit", type=int, default=argparse.SUPPRESS if suppress else 50, help="at most N jobs (default 50)"
    )
    if not suppress:
        _add_json(parser)
    else:
        parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")


class _Commands:
    """The CommandRegistrar given to plugins, also used for the client's own commands.

    Every command gets the same help layout (description, examples, exit codes) and, if it
    connects to a server, the --server/--timeout options; its handler is recorded in the
    parsed arguments (`handler`, `needs_client`) for `commands.run`.
    """

    def __init__(self, subparsers: Any, connection: argparse.ArgumentParser) -> None:
        self._subparsers = subparsers
        self._connection = connection

    def names(self) -> set[str]:
        return set(self._subparsers.choices)

    def nested(self, subparsers: Any) -> _Commands:
        """The same registrar for a command group's subcommands (`prebake jobs show`)."""
        return _Commands(subparsers, self._connection)

    def add_command(
        self,
        name: str,
        handler: Callable[..., int],
        *,
        summary: str,
        description: str,
        examples: str,
        connects: bool = True,
    ) -> argparse.ArgumentParser:
        if name in self._subparsers.choices:
            raise ValueError(f"prebake {name}: a command of that name exists already")
        p: argparse.ArgumentParser = self._subparsers.add_parser(
            name,
            help=summary,
            description=description,
            epilog=_epilog(examples, exitcodes.describe()),
            formatter_class=_formatter,
            parents=[self._connection] if connects else [],
        )
        p.set_defaults(handler=handler, needs_client=connects)
        return p


def build_parser() -> argparse.ArgumentParser:
    """The whole `prebake` command line: the plugins' commands, then the client's own."""
    parser = _Parser(
        prog="prebake",
        formatter_class=_formatter,
        parents=[_client_options(suppress=False)],
        description=(
            "prebake: a cache and registry of ahead-of-time compiled model artifacts.\n"
            "Look a configuration up, download its verified artifact, or have it compiled."
        ),
        epilog=_epilog(
            """
            prebake serve                                  # a server on 127.0.0.1:50051
            prebake ensure --kind inductor --model my/llama --instance-type ml.c7i.4xlarge \\
                --sequence-length 512 --batch-size 1 --dest ./model-aot
            prebake lookup --kind neuron --model meta-llama/Meta-Llama-3-8B \\
                --instance-type ml.inf2.48xlarge --sequence-length 8192 --batch-size 8 --tp 24
            prebake ls --kind neuron
            """,
            exitcodes.describe(),
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = _Commands(
        parser.add_subparsers(dest="command", metavar="COMMAND", required=True),
        _client_options(suppress=True),
    )
    _add_plugin_commands(sub)
    for add in CLIENT_COMMANDS.values():
        add(sub)
    return parser


def _add_plugin_commands(sub: _Commands) -> None:
    """The commands of the `prebake.commands` entry points; a stand-in for each missing one.

    An entry point named like a client command is ignored: the client's own always wins.
    """
    found: dict[str, EntryPoint] = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name not in CLIENT_COMMANDS:
            found.setdefault(entry.name, entry)  # two installs providing one name: the first wins
    for name in [*PLUGIN_COMMANDS, *sorted(found.keys() - PLUGIN_COMMANDS.keys())]:
        plugin = found.get(name)
        # Said too, for a development checkout whose installed metadata predates the plugin.
        problem = f" (no {ENTRY_POINT_GROUP!r} entry point {name!r} is installed)"
        if plugin is not None:
            try:
                register: Register = plugin.load()
                register(sub)
                continue
            except Exception as exc:  # a broken plugin must not take the other commands down
                problem = f" ({plugin.value} failed to load: {exc!r})"
        if name not in sub.names():
            _add_missing_plugin(sub, name, problem)


def _add_missing_plugin(sub: _Commands, name: str, problem: str) -> None:
    known = PLUGIN_COMMANDS.get(name)
    summary = known.summary if known else f"the {name} command"
    hint = known.hint(name) if known else f"prebake {name} is not usable here"
    message = hint + problem

    def not_installed(_args: argparse.Namespace) -> int:
        raise CommandFailed(message)

    p = sub.add_command(
        name,
        not_installed,
        summary=f"{summary} (not installed here)",
        description=f"{message}.",
        examples=known.install if known else f"prebake {name}",
        connects=False,
    )
    # Whatever the user passes, the answer is what to install, not an argument error.
    p.set_defaults(accepts_any_arguments=True)


def _add_lookup(sub: _Commands) -> None:
    p = sub.add_command(
        "lookup",
        commands.lookup,
        summary="look a configuration up (HIT / MISS / COMPILING / FAILED)",
        description="Look a key up. On a miss a compile job is enqueued (or the one in flight joined)\n"
        "unless --no-enqueue. A HIT shows the artifact and why it matched; a MISS shows the\n"
        "job and the nearest existing artifacts with the fields that differ.",
        examples="""
        prebake lookup --kind neuron --model meta-llama/Meta-Llama-3-8B \\
            --instance-type ml.inf2.48xlarge --sequence-length 8192 --batch-size 8 --tp 24
        prebake lookup --kind awq --model my/model --no-enqueue --json | jq .status
        prebake lookup --preset llama-3-8b/low-latency --no-enqueue
        """,
    )
    _add_key_options(p, required=False)
    _add_preset(p)
    p.add_argument("--no-enqueue", action="store_true", help="only report a miss; create no compile job")
    p.add_argument(
        "--explain",
        action="store_true",
        help="on a miss, show the canonical key and every near artifact field by field",
    )
    p.add_argument("--force", action="store_true", help="ignore a cached compile failure and enqueue again")
    p.add_argument(
        "--model-source", default="", metavar="SRC", help="weights for a new job (dir or s3:// prefix)"
    )
    _add_json(p)


def _add_fetch(sub: _Commands) -> None:
    p = sub.add_command(
        "fetch",
        commands.fetch,
        summary="download an existing artifact into a directory",
        description="Download the artifact for a key (or --artifact ID) into --dest, verified, resumable,\n"
        "placed atomically. Never compiles: a miss exits with the MISS code (see ensure).",
        examples="""
        prebake fetch --kind inductor --model my/llama --instance-type ml.c7i.4xlarge \\
            --sequence-length 512 --batch-size 1 --dest /opt/models/llama-aot
        prebake fetch --artifact 3f2a9c0d1e2b3a4f5e6d7c8b9a0f1e2d --dest ./a --overwrite
        prebake fetch --preset llama-3-8b/low-latency --dest /opt/ml/model/compiled
        """,
    )
    _add_key_options(p, required=False)
    _add_preset(p)
    p.add_argument("--artifact", metavar="ID", help="fetch this artifact id instead of looking a key up")
    p.add_argument("--dest", required=True, metavar="DIR", help="directory to place the artifact in")
    p.add_argument("--overwrite", action="store_true", help="replace whatever --dest holds")
    _add_host_cache(p, "place files this host's blob cache holds from it", env_default=True)
    _add_trust(p)
    _add_quiet(p)
    _add_json(p)


def _add_ensure(sub: _Commands) -> None:
    p = sub.add_command(
        "ensure",
        commands.ensure,
        summary="make a directory hold the artifact for a key, compiling it if needed",
        description="The deployer's command: look the key up; on a hit download it; on a miss wait for\n"
        "the compile job (showing its progress), then download. --dest is placed atomically\n"
        "and is left untouched on failure.",
        examples="""
        prebake ensure --kind neuron --model meta-llama/Meta-Llama-3-8B \\
            --instance-type ml.inf2.48xlarge --sequence-length 8192 --batch-size 8 --tp 24 \\
            --model-source s3://models/llama-3-8b --dest /opt/ml/model/compiled --wait-timeout 3600
        prebake ensure --preset llama-3-8b/low-latency --dest /opt/ml/model/compiled
        """,
    )
    _add_key_options(p, required=False)
    _add_preset(p)
    p.add_argument("--dest", required=True, metavar="DIR", help="directory to place the artifact in")
    p.add_argument(
        "--model-source", default="", metavar="SRC", help="weights for a compile (dir or s3:// prefix)"
    )
    p.add_argument(
        "--wait-timeout",
        type=positive_seconds,
        metavar="S",
        help="give up waiting for a compile after S seconds",
    )
    p.add_argument("--overwrite", action="store_true", help="replace whatever --dest holds")
    p.add_argument(
        "--worker-grace",
        type=seconds,
        default=0.0,
        metavar="S",
        help="when no live worker can compile the key, wait up to S seconds for one to appear "
        "before exiting with code 8 (default 0: exit at once)",
    )
    _add_host_cache(p, "place files this host's blob cache holds from it", env_default=True)
    _add_trust(p)
    _add_quiet(p)
    _add_json(p)


def _milliseconds(text: str) -> float:
    """A limit in ms, 0 (none) or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of milliseconds, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected 0 (no limit) or more milliseconds, got {text!r}")
    return value


def _add_recommend(sub: _Commands) -> None:
    p = sub.add_command(
        "recommend",
        commands.recommend,
        summary="rank a model's evaluated artifacts for latency, throughput or cost",
        description="Rank the evaluated artifacts of a model (each by its newest evaluation) for an\n"
        "objective: latency (lowest p50 client latency), throughput (most output tokens/s) or cost (lowest\n"
        "blended $ per 1M tokens), under optional p50 limits on TTFT and ITL. Each evaluation is\n"
        "judged at --concurrency, else at its best level that meets the limits. Shows why each\n"
        "ranks where it does, what did not qualify, and the `prebake ensure` line of the top pick.\n"
        "Nothing qualifying exits 12 with the reason (and the closest level).",
        examples="""
        prebake recommend --model meta-llama/Meta-Llama-3-8B --objective latency --max-ttft-ms 200
        prebake recommend --model meta-llama/Meta-Llama-3-8B --objective cost \\
            --instance-type ml.inf2.48xlarge --allow neuroncore_v2_family --json
        """,
    )
    p.add_argument("--model", required=True, help="the model (any of its names)")
    p.add_argument(
        "--objective",
        required=True,
        type=cli_values.one_of("objective", ["latency", "throughput", "cost"]),
        help="latency, throughput or cost",
    )
    p.add_argument(
        "--instance-type",
        dest="instance_types",
        action="append",
        default=[],
        metavar="TYPE",
        help="only artifacts that serve this instance type; repeatable",
    )
    p.add_argument("--kind", type=cli_values.kind, default=None, help="only artifacts of this kind")
    p.add_argument(
        "--sequence-length", type=positive_int, default=0, metavar="N", help="only artifacts serving N"
    )
    p.add_argument(
        "--max-ttft-ms", type=_milliseconds, default=0.0, metavar="MS", help="p50 time to first token limit"
    )
    p.add_argument(
        "--max-itl-ms", type=_milliseconds, default=0.0, metavar="MS", help="p50 inter-token latency limit"
    )
    p.add_argument(
        "--concurrency", type=positive_int, default=0, metavar="C", help="judge every evaluation at C"
    )
    p.add_argument(
        "--allow",
        action="append",
        default=[],
        choices=["longer_sequence", "neuroncore_v2_family"],
        metavar="POLICY",
        help="also consider artifacts this compatibility policy serves for the filters; repeatable",
    )
    p.add_argument(
        "--limit", type=positive_int, default=10, metavar="N", help="at most N candidates (default 10)"
    )
    _add_json(p)


def _add_prewarm(sub: _Commands) -> None:
    p = sub.add_command(
        "prewarm",
        commands.prewarm,
        summary="make sure every configuration of a matrix is compiled (and cached on this host)",
        description="Look every configuration of a prewarm file up: the missing ones get a compile job,\n"
        "those in flight are joined. Then wait for every job (showing progress) and print a\n"
        "table of what became of each: hit, compiled, failed, cancelled, invalid (the server\n"
        "refused the combination; its message says why), timeout or error. With --host-cache\n"
        "the artifacts are also downloaded into this host's cache, which later fetch/ensure\n"
        "calls on the host use first. --dry-run only looks every row up (report-only) and shows\n"
        "hit, would_compile, in_flight, no_worker (no live worker can compile it; the detail\n"
        "names the missing capability), failed or invalid: nothing is enqueued or downloaded.\n"
        "\n"
        "Progress goes to stderr: one line redrawn in place on a terminal; otherwise (logs, CI)\n"
        "a plain line per finished row and per change, and a heartbeat line with the elapsed\n"
        "time at least every 30 s.\n"
        "\n"
        "FILE is JSON, or YAML (needs PyYAML: pip install 'prebake[prewarm]'):\n"
        "  kind: neuron                   # default for every entry\n"
        "  toolchain: neuronx-cc-2        # optional default\n"
        '  options: {optlevel: "2"}       # optional default compiler options\n'
        "  models:                        # id strings, or {model, revision, model_source,\n"
        "    - model: meta-llama/Meta-Llama-3-8B    #  kind, toolchain, options}\n"
        "      model_source: s3://bucket/llama3-8b\n"
        "  instance_types: [ml.inf2.48xlarge, ml.trn1.32xlarge]\n"
        "  shapes: [{sequence_length: 8192, batch_size: 8}, {sequence_length: 4096, batch_size: 4}]\n"
        "  tensor_parallel_degrees: [24, 32]   # optional, default [1]\n"
        "  precisions: [bf16]\n"
        "  keys:                          # optional explicit keys, added to the product\n"
        "    - {kind: awq, model: my/model, precision: int4-awq, instance_type: ml.g5.12xlarge}\n"
        "The product is models x instance_types x shapes x tensor_parallel_degrees x\n"
        "precisions; identical entries are listed once. A file holding a list is a list of keys.\n"
        "\n"
        "Exit status: 0 if every row is hit or compiled (or, with --no-wait, enqueued/joined);\n"
        "5 if any compile failed; else 1 if any row is invalid, cancelled, timeout or error.\n"
        "Rows hidden by --skip-invalid do not count. 2: the file is unreadable or malformed.\n"
        "--dry-run: 0 if every row is hit, would_compile or in_flight; 5 if a key's last\n"
        "compile failed; else 1 (invalid, no_worker, error).\n"
        "--host-cache takes an optional DIR: `--host-cache FILE` with no other FILE reads FILE\n"
        "as the matrix (the default cache directory is used); name a directory as --host-cache=DIR.",
        examples="""
        prebake prewarm launch-matrix.yaml
        prebake prewarm launch-matrix.yaml --no-wait --skip-invalid
        prebake prewarm launch-matrix.yaml --dry-run --json
        prebake prewarm --host-cache launch-matrix.yaml
        prebake prewarm launch-matrix.json --wait-timeout 7200 --host-cache=/var/cache/prebake --json
        """,
    )
    # Optional only so that `--host-cache FILE` (whose DIR is optional) can hand FILE back:
    # commands.prewarm requires one.
    p.add_argument("matrix", metavar="FILE", nargs="?", help="prewarm matrix (YAML or JSON; see above)")
    p.add_argument("--no-wait", action="store_true", help="enqueue and report; do not wait for jobs")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="look every row up without enqueueing anything; show what prewarm would do",
    )
    p.add_argument(
        "--wait-timeout",
        type=positive_seconds,
        metavar="S",
        help="stop waiting for jobs after S seconds (they keep running; rows say timeout)",
    )
    _add_host_cache(p, "also download every artifact into this host's cache", env_default=False)
    p.add_argument("--skip-invalid", action="store_true", help="hide (and do not fail on) invalid rows")
    p.add_argument("--force", action="store_true", help="retry keys whose last compile failed")
    p.add_argument(
        "--concurrency",
        type=positive_int,
        default=8,
        metavar="N",
        help="parallel lookups/watches (default 8)",
    )
    _add_quiet(p)
    _add_json(p)


def _add_publish(sub: _Commands) -> None:
    p = sub.add_command(
        "publish",
        commands.publish,
        summary="publish a local directory as the artifact for a key",
        description="Hash every regular file under DIR, upload the blobs the server lacks (resumable),\n"
        "then publish the manifest atomically. Symbolic links are refused.",
        examples="""
        prebake publish ./out --kind inductor --model my/llama --instance-type ml.c7i.4xlarge \\
            --sequence-length 512 --batch-size 1 --note "built on ci-42"
        """,
    )
    p.add_argument("directory", metavar="DIR", help="directory whose files form the artifact")
    _add_key_options(p, required=True, lookup=False)
    p.add_argument("--note", default="", help="free text recorded as the producer's note")
    p.add_argument("--replace", action="store_true", help="replace an existing artifact with other files")
    p.add_argument(
        "--force", action="store_true", help="with --replace: replace even a pinned artifact (admin)"
    )
    _add_signing_key(p, "sign the artifact")
    _add_quiet(p)
    _add_json(p)


def _add_signing_key(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--signing-key",
        metavar="FILE",
        help=f"{what} with this Ed25519 private key (PEM; `prebake key generate`)",
    )


def _add_jobs(sub: _Commands) -> None:
    p = sub.add_command(
        "jobs",
        commands.jobs_list,
        summary="list, show, watch and cancel compile jobs",
        description="Compile jobs. Without a subcommand: list them (newest first).",
        examples="""
        prebake jobs --state queued leased
        prebake jobs show j-3f2a
        prebake jobs watch j-3f2a
        prebake jobs cancel j-3f2a --reason "wrong model"
        """,
    )
    _add_job_filters(p, suppress=False)
    jobs = sub.nested(p.add_subparsers(dest="jobs_command", metavar="SUBCOMMAND"))
    p = jobs.add_command(
        "list",
        commands.jobs_list,
        summary="list jobs (the default)",
        description="List compile jobs, newest first.",
        examples="prebake jobs list --state failed --kind neuron --limit 10",
    )
    _add_job_filters(p, suppress=True)
    p = jobs.add_command(
        "show",
        commands.jobs_show,
        summary="show one job",
        description="Show one job.",
        examples="prebake jobs show j-3f2a",
    )
    p.add_argument("job_id", metavar="ID")
    _add_json(p)
    p = jobs.add_command(
        "watch",
        commands.jobs_watch,
        summary="follow a job until it finishes",
        description="Follow a job's state and progress until it succeeds, fails or is cancelled.\n"
        "Exits 0 if it succeeded, 5 if it failed, 1 if it was cancelled.",
        examples="prebake jobs watch j-3f2a",
    )
    p.add_argument("job_id", metavar="ID")
    _add_quiet(p)
    _add_json(p)
    p = jobs.add_command(
        "cancel",
        commands.jobs_cancel,
        summary="cancel a queued or running job",
        description="Cancel a queued or leased job; its worker learns so at its next heartbeat.",
        examples='prebake jobs cancel j-3f2a --reason "superseded"',
    )
    p.add_argument("job_id", metavar="ID")
    p.add_argument("--reason", default="", help="recorded as the job's error")
    _add_json(p)


def _add_ls(sub: _Commands) -> None:
    p = sub.add_command(
        "ls",
        commands.ls,
        summary="list artifacts",
        description="List artifacts, newest first (without their files; see show).",
        examples="""
        prebake ls
        prebake ls --kind neuron --model meta-llama/Meta-Llama-3-8B --pinned
        """,
    )
    p.add_argument("--kind", type=cli_values.kind, help="only artifacts of this kind")
    p.add_argument("--model", default="", help="only artifacts of this model (exact)")
    p.add_argument("--pinned", action="store_true", help="only pinned artifacts")
    p.add_argument("--limit", type=int, default=100, help="at most N artifacts (default 100; 0 = all)")
    _add_json(p)


def _add_show(sub: _Commands) -> None:
    p = sub.add_command(
        "show",
        commands.show,
        summary="show an artifact's manifest",
        description="Show an artifact: key, producer, every file with its size and digest, and its newest\n"
        "evaluations (per concurrency: TTFT and ITL medians, output tokens per second, blended\n"
        "$ per million tokens). --json includes them whole.",
        examples="prebake show 3f2a9c0d1e2b3a4f5e6d7c8b9a0f1e2d",
    )
    p.add_argument("artifact_id", metavar="ARTIFACT_ID")
    _add_json(p)


def _add_evaluations(sub: _Commands) -> None:
    p = sub.add_command(
        "evaluations",
        commands.evaluations_list,
        summary="list and import evaluations (measured latency, throughput, price)",
        description="Evaluations of artifacts. Without a subcommand: list them (newest first).",
        examples="""
        prebake evaluations --model my/llama
        prebake evaluations import results.json --artifact 3f2a9c0d1e2b3a4f5e6d7c8b9a0f1e2d
        """,
    )
    _add_evaluation_filters(p, suppress=False)
    evaluations = sub.nested(p.add_subparsers(dest="evaluations_command", metavar="SUBCOMMAND"))
    p = evaluations.add_command(
        "list",
        commands.evaluations_list,
        summary="list evaluations (the default)",
        description="List evaluations, newest first: of one artifact, of one model's artifacts, or all.",
        examples="prebake evaluations list --artifact 3f2a9c0d1e2b3a4f5e6d7c8b9a0f1e2d --json",
    )
    _add_evaluation_filters(p, suppress=True)
    p = evaluations.add_command(
        "import",
        commands.evaluations_import,
        summary="store an evaluation measured elsewhere",
        description="Store the evaluation in FILE as one of the artifact's. FILE is JSON: an Evaluation in\n"
        "protobuf JSON form (what `prebake evaluations list --json` prints, one element), or a\n"
        "SageMaker-style results object with one `metrics` row per concurrency (the README's\n"
        "Evaluations section shows both). The server checks it whole; nothing is stored if it refuses.",
        examples="""
        prebake evaluations import eval.json --artifact 3f2a9c0d1e2b3a4f5e6d7c8b9a0f1e2d
        prebake evaluations import sagemaker-results.json --artifact 3f2a... --source "SageMaker job 12"
        """,
    )
    p.add_argument("file", metavar="FILE", help="the evaluation (JSON)")
    p.add_argument("--artifact", required=True, metavar="ID", help="the evaluated artifact's id")
    p.add_argument("--source", default="", help="where it came from (stored as import:SOURCE)")
    _add_json(p)


def _concurrency_levels(text: str) -> list[int]:
    """`1,4,8` -> [1, 4, 8]: each a positive integer (the server checks the rest)."""
    try:
        return [positive_int(part.strip()) for part in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers, got {text!r}"
        ) from None


def _add_evaluate(sub: _Commands) -> None:
    p = sub.add_command(
        "evaluate",
        commands.evaluate,
        summary="measure an artifact's latency, throughput and price on a worker",
        description="Enqueue an evaluation of the key's artifact (or --artifact ID): a worker that serves\n"
        "the artifact's kind fetches it, sends --requests synthetic requests at each --concurrency\n"
        "level and stores the evaluation (TTFT, inter-token latency, tokens/s, $ per million\n"
        "tokens from the server's price table). Waits with progress, then prints it; an identical\n"
        "evaluation in flight is joined.",
        examples="""
        prebake evaluate --kind inductor --model my/llama --instance-type ml.c7i.4xlarge \\
            --sequence-length 512 --batch-size 1 --concurrency 1,4,8 --requests 32
        prebake evaluate --artifact 3f2a9c0d1e2b3a4f5e6d7c8b9a0f1e2d --concurrency 1 --requests 8 --no-wait
        """,
    )
    _add_key_options(p, required=False, lookup=False)
    p.add_argument("--artifact", default="", metavar="ID", help="the artifact to evaluate, instead of a key")
    p.add_argument(
        "--concurrency",
        type=_concurrency_levels,
        required=True,
        metavar="C,C,...",
        help="concurrency levels to run (requests in flight at once), e.g. 1,4,8",
    )
    p.add_argument("--requests", type=positive_int, required=True, metavar="N", help="requests per level")
    p.add_argument(
        "--prompt-tokens", type=positive_int, default=0, metavar="P", help="tokens per prompt (default 16)"
    )
    p.add_argument(
        "--output-tokens",
        type=positive_int,
        default=0,
        metavar="O",
        help="tokens generated per request (default 16)",
    )
    p.add_argument(
        "--discount-rate",
        type=float,
        default=0.0,
        metavar="D",
        help="discount on the hourly price, 0 to below 1",
    )
    p.add_argument("--no-wait", action="store_true", help="enqueue and print the job; do not wait")
    p.add_argument(
        "--wait-timeout", type=positive_seconds, metavar="S", help="give up waiting after S seconds"
    )
    _add_quiet(p)
    _add_json(p)


def _add_evaluation_filters(p: argparse.ArgumentParser, suppress: bool) -> None:
    # Given on the group and on `list` alike; a subcommand's defaults must not mask the group's.
    default: Any = argparse.SUPPRESS if suppress else ""
    p.add_argument("--artifact", default=default, metavar="ID", help="only evaluations of this artifact")
    p.add_argument("--model", default=default, help="only evaluations of this model's artifacts (exact)")
    p.add_argument(
        "--limit",
        type=int,
        default=argparse.SUPPRESS if suppress else 100,
        help="at most N evaluations (default 100; 0 = all)",
    )
    if suppress:
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    else:
        _add_json(p)


def _add_rm(sub: _Commands) -> None:
    p = sub.add_command(
        "rm",
        commands.rm,
        summary="delete an artifact",
        description="Delete an artifact and every blob no other artifact uses; later lookups of its key\n"
        "miss. A pinned artifact needs --force.",
        examples="prebake rm 3f2a9c0d1e2b3a4f5e6d7c8b9a0f1e2d",
    )
    p.add_argument("artifact_id", metavar="ARTIFACT_ID")
    p.add_argument("--force", action="store_true", help="delete even if pinned")
    _add_json(p)


def _add_pin(sub: _Commands) -> None:
    p = sub.add_command(
        "pin",
        commands.pin,
        summary="pin (or --unpin) an artifact",
        description="Pinned artifacts are never evicted and are deleted only with rm --force.",
        examples="""
        prebake pin 3f2a9c0d1e2b3a4f5e6d7c8b9a0f1e2d
        prebake pin --unpin 3f2a9c0d1e2b3a4f5e6d7c8b9a0f1e2d
        """,
    )
    p.add_argument("artifact_id", metavar="ARTIFACT_ID")
    p.add_argument("--unpin", action="store_true", help="unpin instead")
    _add_json(p)


def _add_import(sub: _Commands) -> None:
    p = sub.add_command(
        "import",
        commands.import_set,
        summary="publish a set of artifacts compiled elsewhere, listed in a file",
        description="Publish every artifact a set file lists (e.g. a SageMaker-style precompiled set), each\n"
        "as `prebake publish` would. FILE is JSON, or YAML (needs PyYAML), holding a list of\n"
        "entries: the key's fields as in a prewarm file's `keys`, plus `path` (the directory\n"
        "with that artifact's files, relative to FILE) and an optional `note`. Entries are\n"
        "independent; the exit status is 1 if any failed.",
        examples="""
        prebake import precompiled-set.yaml
        # precompiled-set.yaml:
        # - {path: llama3-8b, kind: neuron, model: meta-textgeneration-llama-3-8b,
        #    instance_type: ml.inf2.48xlarge, sequence_length: 8192, batch_size: 8,
        #    tensor_parallel_degree: 24, note: SageMaker precompiled set}
        """,
    )
    p.add_argument("file", metavar="FILE", help="the set file (JSON or YAML)")
    _add_signing_key(p, "sign every artifact")
    _add_json(p)


def _add_catalog(sub: _Commands) -> None:
    p = sub.add_command(
        "catalog",
        commands.catalog,
        summary="list JumpStart models or instance types the server knows",
        description="models: the SageMaker JumpStart model table and which optimizations each model\n"
        "supports (quantization, speculative decoding, SageMaker draft model); AWQ keys for a\n"
        "model without quantization support are refused. instances: every instance type keys\n"
        "may name, with its cores (the bound of --tp), memory and compile target.",
        examples="""
        prebake catalog                        # models
        prebake catalog models --family LLaMA --quantization
        prebake catalog instances --json
        prebake catalog presets --model meta-llama/Meta-Llama-3-8B
        """,
    )
    p.add_argument("what", nargs="?", choices=["models", "instances", "presets"], default="models")
    p.add_argument("--family", default="", help="only this model family (e.g. LLaMA, Mistral)")
    p.add_argument("--model", default="", help="presets: only this model's (any of its names)")
    p.add_argument("--quantization", action="store_true", help="only models that support quantization")
    _add_json(p)


def _add_workers(sub: _Commands) -> None:
    p = sub.add_command(
        "workers",
        commands.workers,
        summary="list the live compile workers and what they serve",
        description="Workers heard of lately by any replica (a lease poll or a heartbeat), with the\n"
        "kind, toolchain and compile targets each serves. A key that names no toolchain gets\n"
        "the newest one a live worker serves for its compile target (unless configured).",
        examples="prebake workers\n        prebake workers --all --json",
    )
    p.add_argument("--all", action="store_true", help="include workers whose liveness expired")
    _add_json(p)


def _add_stats(sub: _Commands) -> None:
    p = sub.add_command(
        "stats",
        commands.stats,
        summary="show server statistics",
        description="Artifacts, blobs, lookups and hit rate, jobs per state, queue depth, bytes moved.",
        examples="prebake stats --json",
    )
    _add_json(p)


def _add_gc(sub: _Commands) -> None:
    p = sub.add_command(
        "gc",
        commands.gc,
        summary="collect garbage on the server now (or --dry-run: show what would go)",
        description="Remove unfinished uploads and temporary files left stale, blobs no artifact uses once\n"
        "their grace has passed (time for an uploader to publish), and quarantined blobs past\n"
        "theirs; with a quota (max_store_bytes), evict unpinned artifacts least recently used\n"
        "first while the store is above its high-water mark. Pinned artifacts, and artifacts\n"
        "being downloaded or used lately, are never evicted. The server also does this every\n"
        "gc_interval_seconds. Needs the admin role where authentication is on.",
        examples="""
        prebake gc --dry-run
        prebake gc --json
        """,
    )
    p.add_argument("--dry-run", action="store_true", help="remove nothing; report what would be removed")
    _add_json(p)


def _add_verify(sub: _Commands) -> None:
    p = sub.add_command(
        "verify",
        commands.verify,
        summary="re-hash the server's blobs and repair what is lost",
        description="The server re-hashes its stored blobs in full, least recently verified first, and\n"
        "checks that every blob an artifact names is stored. A corrupt blob is quarantined\n"
        "(kept aside for inspection); every artifact naming a corrupt or missing blob is marked\n"
        "unavailable (lookups stop hitting it) and, where a compile job built it, its compile\n"
        "is enqueued again; publishing the key makes it available again. The server also runs\n"
        "this sweep periodically (serve --integrity-sweep-seconds). Progress goes to stderr;\n"
        "the exit status is 1 if any damaged blob was found.",
        examples="""
        prebake verify
        prebake verify --limit 1000 --rate 50M      # the 1000 least recently verified, at 50 MiB/s
        prebake verify --dry-run --json             # report only, change nothing
        """,
    )
    p.add_argument("--limit", type=int, default=0, metavar="N", help="check at most N blobs (default 0: all)")
    p.add_argument(
        "--rate",
        type=size,
        default=0,
        metavar="BYTES",
        help="hash at most BYTES per second (e.g. 50M; 0: unlimited)",
    )
    p.add_argument("--dry-run", action="store_true", help="only report; quarantine and mark nothing")
    _add_quiet(p)
    _add_json(p)


# The client's own commands, by name, in `prebake --help` order (after the plugins').
CLIENT_COMMANDS: dict[str, Callable[[_Commands], None]] = {
    "lookup": _add_lookup,
    "fetch": _add_fetch,
    "ensure": _add_ensure,
    "prewarm": _add_prewarm,
    "publish": _add_publish,
    "jobs": _add_jobs,
    "ls": _add_ls,
    "show": _add_show,
    "evaluations": _add_evaluations,
    "recommend": _add_recommend,
    "evaluate": _add_evaluate,
    "rm": _add_rm,
    "pin": _add_pin,
    "import": _add_import,
    "catalog": _add_catalog,
    "workers": _add_workers,
    "stats": _add_stats,
    "gc": _add_gc,
    "verify": _add_verify,
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("prebake")
    except PackageNotFoundError:
        return "(not installed)"


def main(argv: list[str] | None = None) -> int:
    """Run the `prebake` command line; returns the exit code (see `exitcodes`).

    `--help`, `--version` and argparse's usage errors return their exit code instead of
    raising SystemExit, so callers can always use the return value. A refused command line
    is reported like any failure (`cli_errors`): a bad value exits INVALID, anything else
    USAGE, and with --json one error object goes to stdout.
    """
    words = sys.argv[1:] if argv is None else argv
    # Read from the words, since a refused command line has no parsed --json.
    as_json = "--json" in words[: words.index("--")] if "--" in words else "--json" in words
    parser = build_parser()
    try:
        args, unknown_args = parser.parse_known_args(argv)
        if unknown_args and not getattr(args, "accepts_any_arguments", False):
            parser.error(f"unrecognized arguments: {' '.join(unknown_args)}")
    except ParseFailed as exc:
        exc.parser.print_usage(sys.stderr)
        code = "INVALID_ARGUMENT" if exc.exit_code == exitcodes.INVALID else "USAGE"
        return report(Failure(code, str(exc), exc.exit_code, exc.field), as_json)
    except SystemExit as exc:
        if exc.code is None:
            return exitcodes.OK
        return exc.code if isinstance(exc.code, int) else exitcodes.USAGE
    try:
        return commands.run(args)
    except commands.UsageError as exc:
        parser.print_usage(sys.stderr)
        return report(Failure("USAGE", str(exc), exitcodes.USAGE), as_json)


if __name__ == "__main__":
    raise SystemExit(main())
