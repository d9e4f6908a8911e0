"""Every mistake a person makes with `prebake` -> its exit code, its message, its JSON object.

Through the real command line against a real server on loopback: each row is a command
line, the exit code it must end with (`exitcodes`), a substring of its stderr message and
the `{"error": {...}}` object it prints on stdout with `--json` (code, field, exit code).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from prebake.client import Client, exitcodes
from prebake.client.errors import InvalidArgument
from prebake.core import status_details
from prebake.core.request_ids import REQUEST_ID_HEADER
from prebake.server.app import BackgroundServer, background_server
from prebake.v1 import registry_pb2, registry_pb2_grpc
from tests.auth_fixtures import make_token_file
from tests.conftest import LLAMA3_8B_INF2, data_files, make_artifact_dir
from tests.plugin_cli import PrebakeCli, Ran

KEY = [
    "--kind", "neuron", "--model", "meta-llama/Meta-Llama-3-8B", "--instance-type", "ml.inf2.48xlarge",
    "--sequence-length", "8192", "--batch-size", "8", "--tp", "24", "--precision", "bf16",
]  # fmt: skip


def with_flag(flag: str, value: str | None) -> list[str]:
    """KEY with `flag` set to `value` (None: without the flag)."""
    args = list(KEY)
    at = args.index(flag)
    del args[at : at + 2]
    return args if value is None else [*args, flag, value]


def error_object(ran: Ran) -> dict[str, object]:
    """The one JSON object a failed `--json` command printed on stdout, checked for shape."""
    data = json.loads(ran.out)  # exactly one object: anything else does not parse
    assert list(data) == ["error"], data
    error = data["error"]
    assert set(error) == {"code", "message", "field", "exit_code"}, error
    assert error["exit_code"] == ran.code
    assert error["message"] in ran.err, "the JSON message is the one people see"
    result: dict[str, object] = error
    return result


INVALID_KEYS = [
    pytest.param(
        with_flag("--tp", "32"),
        "--tp: ml.inf2.48xlarge has 24 NeuronCores; tensor_parallel_degree=32 does not fit",
        "tensor_parallel_degree",
        id="tp-too-big-for-the-instance",
    ),
    pytest.param(
        with_flag("--precision", "int3"),
        "unknown precision 'int3'; did you mean 'int8' or 'int4'?",
        "precision",
        id="precision-typo",
    ),
    pytest.param(
        with_flag("--instance-type", "ml.inf2.48xlarg"),
        "--instance-type: unknown instance type 'ml.inf2.48xlarg'; did you mean 'ml.inf2.48xlarge'",
        "instance_type",
        id="instance-type-typo",
    ),
    pytest.param(
        with_flag("--sequence-length", "-5"),
        "argument --sequence-length: must be positive (1 or more); got '-5'",
        "sequence_length",
        id="negative-sequence-length",
    ),
    pytest.param(
        with_flag("--sequence-length", "0"),
        "argument --sequence-length: must be positive",
        "sequence_length",
        id="zero-sequence-length",
    ),
    pytest.param(
        with_flag("--sequence-length", None),
        "--sequence-length: sequence_length must be positive for neuron keys (it is required)",
        "sequence_length",
        id="missing-sequence-length",
    ),
    pytest.param(
        with_flag("--kind", "nueron"),
        "unknown kind 'nueron'; did you mean 'neuron'? (one of neuron, awq, inductor)",
        "kind",
        id="kind-typo",
    ),
    pytest.param(
        with_flag("--batch-size", "many"),
        "argument --batch-size: expected a whole number, got 'many'",
        "batch_size",
        id="batch-size-not-a-number",
    ),
]


@pytest.mark.parametrize(("key", "message", "field"), INVALID_KEYS)
@pytest.mark.parametrize("command", ["lookup", "ensure"])
def test_an_invalid_key_exits_with_the_invalid_input_code(  # noqa: PLR0917 (parameters and fixtures)
    command: str,
    key: list[str],
    message: str,
    field: str,
    server: BackgroundServer,
    prebake: PrebakeCli,
    tmp_path: Path,
) -> None:
    dest = ["--dest", str(tmp_path / "dest")] if command == "ensure" else []
    ran = prebake("--server", server.address, command, *key, *dest, "--json")
    assert ran.code == exitcodes.INVALID, ran.err
    assert message in ran.err
    assert error_object(ran) | {"message": ""} == {
        "code": "INVALID_ARGUMENT",
        "message": "",
        "field": field,
        "exit_code": exitcodes.INVALID,
    }
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["ls", "--kind", "nueron"],
        ["jobs", "--kind", "nueron"],
        ["jobs", "list", "--kind", "nueron"],
        ["fetch", "--kind", "nueron", "--model", "m", "--dest", "d"],
        ["publish", "d", *with_flag("--kind", "nueron")],
    ],
)
def test_kind_is_checked_the_same_way_by_every_command(
    argv: list[str], server: BackgroundServer, prebake: PrebakeCli
) -> None:
    ran = prebake("--server", server.address, *argv, "--json")
    assert ran.code == exitcodes.INVALID
    assert "unknown kind 'nueron'; did you mean 'neuron'?" in ran.err
    assert error_object(ran)["field"] == "kind"


@pytest.mark.parametrize(
    ("argv", "code", "message", "error_code"),
    [
        pytest.param(["lookup", "--model", "m/x"], exitcodes.USAGE, "--kind", "USAGE", id="missing-kind"),
        pytest.param(["lookp", *KEY], exitcodes.USAGE, "did you mean 'lookup'?", "USAGE", id="command-typo"),
        pytest.param(["stats", "--frobnicate"], exitcodes.USAGE, "unrecognized", "USAGE", id="unknown-flag"),
        pytest.param(
            ["fetch", "--dest", "d"], exitcodes.USAGE, "give a key (at least --kind and --model)", "USAGE",
            id="fetch-without-key",
        ),
        pytest.param(
            ["jobs", "--state", "queud"], exitcodes.INVALID, "unknown state 'queud'; did you mean 'queued'?",
            "INVALID_ARGUMENT", id="job-state-typo",
        ),
        pytest.param(
            ["lookup", *KEY, "--allow", "longer_sequnce"], exitcodes.INVALID,
            "did you mean 'longer_sequence'?", "INVALID_ARGUMENT", id="policy-typo",
        ),
        pytest.param(
            ["show", "0" * 32], exitcodes.NOT_FOUND, "no artifact 0000", "NOT_FOUND", id="unknown-artifact",
        ),
        pytest.param(
            ["jobs", "show", "j-" + "0" * 24], exitcodes.NOT_FOUND, "j-000", "NOT_FOUND", id="unknown-job",
        ),
    ],
)  # fmt: skip
def test_command_line_mistakes(  # noqa: PLR0917 (parameters and fixtures)
    argv: list[str],
    code: int,
    message: str,
    error_code: str,
    server: BackgroundServer,
    prebake: PrebakeCli,
) -> None:
    ran = prebake("--server", server.address, *argv, "--json")
    assert ran.code == code, ran.err
    assert message in ran.err
    assert error_object(ran)["code"] == error_code


@pytest.mark.parametrize("url", ["http://127.0.0.1:1", "https://prebake.example:443/", "grpc://h:1"])
def test_a_url_for_server_is_refused_at_once_naming_the_accepted_forms(url: str, prebake: PrebakeCli) -> None:
    started = time.monotonic()
    ran = prebake("--server", url, "lookup", *KEY, "--json")
    assert ran.code == exitcodes.INVALID
    assert "is a URL; give HOST:PORT" in ran.err and "unix:PATH" in ran.err
    assert "did you mean" in ran.err and "usage: " in ran.err
    assert error_object(ran)["field"] == "server"
    assert time.monotonic() - started < 2, "refused before any connection attempt (no retries)"


def test_an_unreachable_server_still_prints_one_json_object(prebake: PrebakeCli) -> None:
    ran = prebake("--server", "127.0.0.1:9", "--timeout", "2", "lookup", *KEY, "--json")
    assert ran.code == exitcodes.UNAVAILABLE
    assert "cannot reach the prebake server at 127.0.0.1:9" in ran.err and "prebake serve" in ran.err
    assert error_object(ran) | {"message": ""} == {
        "code": "UNAVAILABLE",
        "message": "",
        "field": None,
        "exit_code": exitcodes.UNAVAILABLE,
    }


def test_publish_refuses_an_existing_key_before_uploading_anything(
    server: BackgroundServer, prebake: PrebakeCli, tmp_path: Path
) -> None:
    first = make_artifact_dir(tmp_path / "first", {"model.neff": 4096}, seed=1)
    assert prebake("--server", server.address, "publish", str(first), *KEY).code == exitcodes.OK
    before = data_files(server.config.data_dir)

    for sizes in ({"model.neff": 4096}, {"model.neff": 5000}, {"model.neff": 4096, "extra.bin": 10}):
        other = make_artifact_dir(tmp_path / f"other-{len(sizes)}-{sum(sizes.values())}", sizes, seed=2)
        ran = prebake("--server", server.address, "publish", str(other), *KEY, "--json")
        assert ran.code == exitcodes.ERROR, ran.err
        assert "already exists with a different file list" in ran.err
        assert "set --replace to replace it" in ran.err and "`replace`" not in ran.err
        assert error_object(ran)["code"] == "ALREADY_EXISTS"
        assert data_files(server.config.data_dir) == before, "nothing was uploaded"

    # The same files again are no conflict (an idempotent re-publish), and --replace replaces.
    again = prebake("--server", server.address, "publish", str(first), *KEY, "--json")
    assert again.code == exitcodes.OK and json.loads(again.out)["created"] is False
    replaced = prebake("--server", server.address, "publish", str(other), *KEY, "--replace", "--json")
    assert replaced.code == exitcodes.OK and json.loads(replaced.out)["created"] is True


def test_messages_name_flags_where_the_server_names_fields(
    server: BackgroundServer, prebake: PrebakeCli, tmp_path: Path
) -> None:
    source = make_artifact_dir(tmp_path / "src", {"model.neff": 100}, seed=3)
    published = json.loads(prebake("--server", server.address, "publish", str(source), *KEY, "--json").out)
    dest = make_artifact_dir(tmp_path / "dest", {"mine.txt": 5}, seed=4)

    ran = prebake("--server", server.address, "ensure", *KEY, "--dest", str(dest), "--json")
    assert ran.code == exitcodes.ERROR
    assert "set --overwrite to replace it" in ran.err
    assert error_object(ran)["code"] == "FAILED_PRECONDITION"

    artifact_id = published["artifact_id"]
    assert prebake("--server", server.address, "pin", artifact_id).code == exitcodes.OK
    ran = prebake("--server", server.address, "rm", artifact_id, "--json")
    assert ran.code == exitcodes.ERROR
    assert "unpin it or set --force" in ran.err and "prebake pin --unpin" in ran.err
    assert error_object(ran)["code"] == "FAILED_PRECONDITION"


def trailing_of(err: grpc.RpcError) -> dict[str, Any]:
    """A failed call's trailing metadata (a grpc.Call; the stubs type RpcError without it)."""
    assert isinstance(err, grpc.Call)
    return {key: value for key, value in err.trailing_metadata() or ()}


def test_the_server_names_the_bad_field_in_a_bad_request_detail(server: BackgroundServer) -> None:
    too_wide = dataclasses.replace(LLAMA3_8B_INF2, tensor_parallel_degree=32)
    with Client(server.address) as client, pytest.raises(InvalidArgument) as refused:
        client.lookup(too_wide)
    assert refused.value.field == "tensor_parallel_degree"
    assert "does not fit" in str(refused.value)

    # On the wire, for any language: a google.rpc.Status in grpc-status-details-bin holding a
    # google.rpc.BadRequest, beside the request id.
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as raw:
        registry_pb2_grpc.RegistryStub(channel).Lookup(registry_pb2.LookupRequest(key=too_wide.to_proto()))
    trailing = trailing_of(raw.value)
    assert REQUEST_ID_HEADER in trailing
    status = status_details._Status.FromString(trailing[status_details.DETAILS_KEY])
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "does not fit" in status.message
    [detail] = status.details
    assert detail.type_url == "type.googleapis.com/google.rpc.BadRequest"
    [violation] = status_details._BadRequest.FromString(detail.value).field_violations
    assert violation.field == "tensor_parallel_degree" and violation.description == status.message

    # A refusal that names no field carries no details.
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as raw:
        registry_pb2_grpc.RegistryStub(channel).GetArtifact(
            registry_pb2.GetArtifactRequest(artifact_id="0" * 32)
        )
    assert status_details.DETAILS_KEY not in trailing_of(raw.value)


def test_the_client_library_refuses_a_url_as_its_target_too() -> None:
    with pytest.raises(InvalidArgument, match="is a URL; give HOST:PORT"):
        Client("http://127.0.0.1:50051")
    for target in ("127.0.0.1:1", "[::1]:1", "unix:/tmp/x.sock", "unix:///tmp/x.sock", "dns:///h:1"):
        Client(target).close()


def test_unauthenticated_and_permission_denied_exit_with_the_denied_code(
    tmp_path: Path, prebake: PrebakeCli
) -> None:
    tokens = make_token_file(tmp_path / "tokens")
    reader = tmp_path / "reader.token"
    reader.write_text(tokens.tokens["reader"])
    with background_server(tmp_path / "data", auth_file=str(tokens.path)) as server:
        ran = prebake("--server", server.address, "lookup", *KEY, "--json")
        assert ran.code == exitcodes.DENIED, ran.err
        assert "--token-file" in ran.err
        assert error_object(ran)["code"] == "UNAUTHENTICATED"

        wrong = tmp_path / "wrong.token"
        wrong.write_text("not-a-token")
        ran = prebake("--server", server.address, "--token-file", str(wrong), "stats", "--json")
        assert ran.code == exitcodes.DENIED
        assert error_object(ran)["code"] == "UNAUTHENTICATED"

        ran = prebake("--server", server.address, "--token-file", str(reader), "gc", "--json")
        assert ran.code == exitcodes.DENIED
        assert error_object(ran)["code"] == "PERMISSION_DENIED"


def test_help_lists_every_exit_code(prebake: PrebakeCli) -> None:
    out = prebake("--help").out
    for code, text in exitcodes.DESCRIPTIONS.items():
        assert f"  {code:<3} {text}" in out
