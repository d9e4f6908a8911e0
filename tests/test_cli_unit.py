"""Client and CLI behaviour that needs no prebake server.

The command line (help, key options, exit codes, an unreachable server), error mapping,
keys and the client's import hygiene. The transfer logic (resumption after a reset or a
stall, verification, atomic placement) is tested against the real server, with network
faults injected by a proxy, in test_client_faults.py.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import os
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import grpc
import pytest

from prebake.client import ArtifactKey, cli, errors, exitcodes
from prebake.client.cli import PLUGIN_COMMANDS, build_parser, main
from prebake.core.command_plugins import ENTRY_POINT_GROUP, CommandFailed, CommandRegistrar
from prebake.v1 import key_pb2

ROOT = Path(__file__).resolve().parent.parent
KEY_ARGS = ["--kind", "neuron", "--model", "m/x", "--instance-type", "ml.inf2.xlarge"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Command line ---------------------------------------------------------------------------


def _command_paths(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _command_paths(sub, (*prefix, name))


COMMANDS = sorted(_command_paths(build_parser()))


def test_every_command_is_covered() -> None:
    names = {" ".join(path) for path in COMMANDS}
    expected = {"serve", "worker", "lookup", "fetch", "ensure", "publish", "ls", "show", "rm", "pin", "stats"}
    expected |= {"jobs", "jobs list", "jobs show", "jobs watch", "jobs cancel"}
    assert expected <= names


@pytest.mark.parametrize("path", [(), *COMMANDS], ids=lambda p: " ".join(p) or "prebake")
def test_help_exits_0_with_description_and_examples(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*path, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: prebake")
    assert "examples:" in out and "exit codes:" in out
    description = out.split("\n\n")[1]
    assert len(description.split()) >= 3, f"no description in {path}: {description!r}"


def test_top_level_help_documents_every_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--help"])
    out = capsys.readouterr().out
    for code in exitcodes.DESCRIPTIONS:
        assert f"\n  {code:<3} " in out


def test_exit_code_constants_are_distinct_and_as_documented() -> None:
    codes = [exitcodes.OK, exitcodes.ERROR, exitcodes.USAGE, exitcodes.MISS, exitcodes.COMPILING]
    codes += [exitcodes.FAILED, exitcodes.NOT_FOUND, exitcodes.UNAVAILABLE, exitcodes.NO_WORKER]
    codes += [exitcodes.UNTRUSTED, exitcodes.INVALID, exitcodes.DENIED, exitcodes.INTERRUPTED]
    assert codes == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 130]
    assert len(set(codes)) == len(codes)


def test_key_options_build_the_key() -> None:
    from prebake.client.commands import key_from_args

    args = build_parser().parse_args(
        [
            *("lookup", *KEY_ARGS, "--sequence-length", "512", "--batch-size", "2", "--tp", "2"),
            *("--precision", "bf16", "--revision", "abc", "--toolchain", "neuronx-cc-2"),
            *("--option", "a=1", "--option", "b=x=y"),
        ]
    )
    key = key_from_args(args)
    assert key == ArtifactKey(
        kind="neuron",
        model="m/x",
        model_revision="abc",
        instance_type="ml.inf2.xlarge",
        sequence_length=512,
        batch_size=2,
        tensor_parallel_degree=2,
        precision="bf16",
        toolchain="neuronx-cc-2",
        options={"a": "1", "b": "x=y"},
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["lookup", "--model", "m/x"],  # --kind is required
        ["lookup", *KEY_ARGS, "--option", "a=1", "--option", "a=2"],
        ["fetch", "--dest", "d"],  # neither a key nor --artifact
        ["fetch", *KEY_ARGS, "--artifact", "ab" * 16, "--dest", "d"],
        ["stats", "--frobnicate"],
        ["frobnicate"],
    ],
)
def test_bad_command_lines_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # Port 9 (discard) is never a prebake server; a usage error must not get as far as connecting.
    assert main(["--server", "127.0.0.1:9", *argv]) == exitcodes.USAGE
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["lookup", *KEY_ARGS, "--option", "x"],
        ["lookup", *KEY_ARGS, "--option", "=1"],
        ["lookup", *KEY_ARGS, "--batch-size", "many"],
        ["lookup", *KEY_ARGS, "--tp", "0"],
        ["jobs", "--state", "sleeping"],
        ["ls", "--kind", "tpu"],
        ["serve", "--max-blob-bytes", "lots"],
        ["worker", "--drain-seconds", "-1"],
    ],
)
def test_bad_values_exit_with_the_invalid_input_code(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # A value the parser refuses is invalid input (a wrapper must not retry it), not a usage error.
    assert main(["--server", "127.0.0.1:9", *argv]) == exitcodes.INVALID
    assert "error: argument " in capsys.readouterr().err


def test_server_option_is_accepted_before_and_after_the_command() -> None:
    parser = build_parser()
    before = parser.parse_args(["--server", "h:1", "--timeout", "3", "stats"])
    after = parser.parse_args(["stats", "--server", "h:1", "--timeout", "3"])
    assert (before.server, before.timeout) == (after.server, after.timeout) == ("h:1", 3.0)
    assert parser.parse_args(["jobs", "--state", "queued", "leased"]).states == ["queued", "leased"]
    assert parser.parse_args(["jobs", "list", "--state", "queued", "--state", "failed"]).states == [
        "queued",
        "failed",
    ]
    assert parser.parse_args(["jobs", "--kind", "awq", "list"]).kind == "awq"


def test_server_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREBAKE_SERVER", "example:1234")
    assert build_parser().parse_args(["stats"]).server == "example:1234"


def test_lookup_against_a_closed_port_exits_7_naming_the_address(capsys: pytest.CaptureFixture[str]) -> None:
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    assert main(["--server", address, "lookup", *KEY_ARGS]) == exitcodes.UNAVAILABLE
    err = capsys.readouterr().err
    assert err.startswith("error: ") and address in err and "prebake serve" in err
    assert time.monotonic() - started < 15, "bounded retries"


def test_main_works_as_a_console_script(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / d) for d in ("proto", "core", "client"))}
    code = "import sys; from prebake.client.cli import main; raise SystemExit(main())"
    result = subprocess.run(
        [sys.executable, "-c", code, "show", "--help"], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and "usage: prebake show" in result.stdout


def test_importing_the_client_loads_no_server_or_heavy_dependency() -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(str(ROOT / d) for d in ("proto", "core", "client", "server")),
    }
    code = (
        "import sys, prebake.client, prebake.client.cli, prebake.client.commands;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore', 'sqlite_utils')"
        " or m.startswith('prebake.server'));"
        "print(','.join(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


# Commands from other parts: entry points in the prebake.commands group -----------------


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_plugin_commands_are_the_entry_points_the_package_declares() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = pyproject["project"]["entry-points"][ENTRY_POINT_GROUP]
    assert declared == {
        "serve": "prebake.server.cli:register",
        "config": "prebake.server.cli:register_config",
        "worker": "prebake.compiler.cli:register",
        "init-aws": "prebake.server.ops_cli:register_init_aws",
        "reindex": "prebake.server.ops_cli:register_reindex",
        "migrate": "prebake.server.ops_cli:register_migrate",
        "token": "prebake.server.auth.token_cli:register",
        "key": "prebake.core.key_cli:register",
    }
    # The client knows each one, to say what to install where it is missing.
    assert set(PLUGIN_COMMANDS) == set(declared)
    installed = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert installed == declared, "the installed metadata is stale: pip install -e ."
    for value in declared.values():
        module, _, attr = value.partition(":")
        assert callable(getattr(importlib.import_module(module), attr))


def test_the_client_imports_no_plugin_and_the_server_nothing_of_the_client() -> None:
    for path in (ROOT / "client").rglob("*.py"):
        bad = {m for m in _imports(path) if m.startswith(("prebake.server", "prebake.compiler"))}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
    for path in (ROOT / "server").rglob("*.py"):
        bad = {m for m in _imports(path) if m.startswith("prebake.client")}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
    bad = {m for m in _imports(ROOT / "compiler/prebake/compiler/cli.py") if m.startswith("prebake.client.c")}
    assert bad <= {"prebake.client.client"}, bad  # the Client type only, never the CLI


def test_serve_without_the_server_extra_says_what_to_install(tmp_path: Path) -> None:
    # As if grpcio-health-checking were not installed: importing grpc_health fails.
    code = (
        "import sys; sys.modules['grpc_health'] = None;"
        "from prebake.client.cli import main; raise SystemExit(main(sys.argv[1:]))"
    )
    argv = ["serve", "--workers", "0", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "d")]
    result = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == exitcodes.ERROR, result.stderr
    assert "prebake serve needs the server extra: pip install 'prebake[server]'" in result.stderr
    assert "grpc_health" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "d").exists()


def test_commands_missing_from_the_install_say_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "entry_points", lambda group: [])
    assert main(["--help"]) == 0
    listing = capsys.readouterr().out
    assert "run a prebake server (not installed here)" in listing
    assert "run a compile worker (not installed here)" in listing
    # Whatever the arguments, the answer is what to install, not "invalid choice".
    assert main(["serve", "--listen", "127.0.0.1:1", "--data-dir", "x"]) == exitcodes.ERROR
    assert (
        "error: prebake serve needs the server extra: pip install 'prebake[server]'"
        in capsys.readouterr().err
    )
    assert main(["--server", "127.0.0.1:9", "worker", "--kind", "inductor"]) == exitcodes.ERROR
    assert "error: prebake worker needs the compiler and a backend: pip install" in capsys.readouterr().err
    assert main(["serve", "--help"]) == 0
    assert "pip install 'prebake[server]'" in capsys.readouterr().out


def test_a_plugin_that_fails_to_load_breaks_only_its_own_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = EntryPoint("serve", "prebake.server.no_such_module:register", ENTRY_POINT_GROUP)
    monkeypatch.setattr(cli, "entry_points", lambda group: [broken])
    assert main(["serve"]) == exitcodes.ERROR
    err = capsys.readouterr().err
    assert "pip install 'prebake[server]'" in err and "prebake.server.no_such_module:register failed" in err
    assert main(["lookup", "--help"]) == 0
    assert main(["--server", "127.0.0.1:9", "lookup", "--model", "m"]) == exitcodes.USAGE  # parsing as usual


def _register_greet(commands: CommandRegistrar) -> None:
    p = commands.add_command(
        "greet",
        _greet,
        summary="greet someone",
        description="Print a greeting (a plugin command from another package).",
        examples="prebake greet --name you",
        connects=False,
    )
    p.add_argument("--name", required=True)


def _greet(args: argparse.Namespace) -> int:
    if args.name == "nobody":
        raise CommandFailed("there is nobody to greet", bad_input=True)
    if args.name == "everybody":
        raise CommandFailed("too many to greet")
    print(f"hello {args.name}")
    return 0


def test_any_package_can_add_a_command_through_the_protocol(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    greet = EntryPoint("greet", f"{__name__}:_register_greet", ENTRY_POINT_GROUP)
    # One named like a client command is ignored; one taking a taken name fails alone.
    shadow = EntryPoint("lookup", f"{__name__}:_register_greet", ENTRY_POINT_GROUP)
    twice = EntryPoint("greet-again", f"{__name__}:_register_greet", ENTRY_POINT_GROUP)
    monkeypatch.setattr(cli, "entry_points", lambda group: [*entry_points(group=group), greet, shadow, twice])
    assert "greet someone" in build_parser().format_help()
    assert main(["greet", "--name", "you"]) == 0 and capsys.readouterr().out == "hello you\n"
    assert main(["greet", "--name", "nobody"]) == exitcodes.USAGE
    assert capsys.readouterr().err == "error: there is nobody to greet\n"
    assert main(["greet", "--name", "everybody"]) == exitcodes.ERROR
    assert main(["greet"]) == exitcodes.USAGE  # its own arguments are checked by argparse
    assert main(["greet", "--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:\n  prebake greet --name you" in out and "exit codes:" in out
    assert build_parser().parse_args(["lookup", *KEY_ARGS]).handler.__name__ == "lookup"
    assert main(["greet-again"]) == exitcodes.ERROR
    assert "a command of that name exists already" in capsys.readouterr().err


def test_each_client_command_adds_the_command_it_is_listed_under() -> None:
    for name, add in cli.CLIENT_COMMANDS.items():
        parser = argparse.ArgumentParser()
        add(cli._Commands(parser.add_subparsers(), argparse.ArgumentParser(add_help=False)))
        assert set(_command_paths(parser)) >= {(name,)}
        assert {path[0] for path in _command_paths(parser)} == {name}


# Errors and keys --------------------------------------------------------------------------


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


EXPECTED_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.DATA_LOSS: errors.DataLoss,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.QuotaExceeded,
    grpc.StatusCode.ABORTED: errors.Aborted,
    grpc.StatusCode.OUT_OF_RANGE: errors.OutOfRange,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
    grpc.StatusCode.CANCELLED: errors.Cancelled,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.UNIMPLEMENTED: errors.Unimplemented,
    grpc.StatusCode.INTERNAL: errors.Internal,
    grpc.StatusCode.UNKNOWN: errors.PrebakeError,
}


@pytest.mark.parametrize("code", list(grpc.StatusCode), ids=lambda c: c.name)
def test_from_rpc_error_maps_every_status_code(code: grpc.StatusCode) -> None:
    err = errors.from_rpc_error(FakeRpcError(code, f"server says {code.name}"), target="h:1")
    assert type(err) is EXPECTED_ERRORS.get(code, errors.PrebakeError)
    assert isinstance(err, errors.PrebakeError)
    assert str(err) == err.details == f"server says {code.name}"
    assert err.code == code.name
    if code is grpc.StatusCode.UNAVAILABLE:
        assert isinstance(err, errors.Unavailable) and err.target == "h:1"


def test_client_side_errors_belong_to_their_status_family() -> None:
    assert issubclass(errors.DownloadDigestMismatch, errors.DataLoss)
    assert issubclass(errors.UnsafeManifest, errors.DataLoss)
    assert issubclass(errors.DestinationExists, errors.FailedPrecondition)
    assert issubclass(errors.NoCapableWorker, errors.FailedPrecondition)
    assert issubclass(errors.CompileFailed, errors.FailedPrecondition)
    assert issubclass(errors.JobCancelled, errors.Cancelled)


def test_artifact_key_round_trips_through_the_proto() -> None:
    key = ArtifactKey(
        kind="awq",
        model="meta-llama/Meta-Llama-3-8B",
        model_revision="r1",
        instance_type="ml.g5.12xlarge",
        sequence_length=4096,
        batch_size=4,
        tensor_parallel_degree=4,
        precision="int4-awq",
        toolchain="llmcompressor-0.14",
        options={"group_size": "128", "zero_point": "true"},
    )
    proto = key.to_proto()
    assert proto.kind == key_pb2.ARTIFACT_KIND_AWQ and dict(proto.options) == dict(key.options)
    assert ArtifactKey.from_proto(proto) == key
    assert ArtifactKey.from_proto(key_pb2.ArtifactKey.FromString(proto.SerializeToString())) == key


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("neuron", key_pb2.ARTIFACT_KIND_NEURON),
        ("inductor", key_pb2.ARTIFACT_KIND_INDUCTOR),
        ("AWQ", key_pb2.ARTIFACT_KIND_AWQ),
        ("tpu", key_pb2.ARTIFACT_KIND_UNSPECIFIED),
        ("", key_pb2.ARTIFACT_KIND_UNSPECIFIED),
        ("unspecified", key_pb2.ARTIFACT_KIND_UNSPECIFIED),
    ],
)
def test_unknown_kinds_are_left_for_the_server_to_reject(kind: str, expected: int) -> None:
    assert ArtifactKey(kind=kind, model="m").to_proto().kind == expected


def test_artifact_keys_are_immutable_values() -> None:
    import copy
    import pickle

    options = {"a": "1"}
    key = ArtifactKey(kind="neuron", model="m", options=options)
    options["a"] = "2"
    assert key.options == {"a": "1"}
    assert {key: 1}[ArtifactKey(kind="neuron", model="m", options={"a": "1"})] == 1
    assert copy.deepcopy(key) == key == pickle.loads(pickle.dumps(key))
    with pytest.raises(TypeError):
        key.options["a"] = "3"  # type: ignore[index]
