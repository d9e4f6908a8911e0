"""Authentication and roles against real servers on loopback.

The role x rpc matrix is generated from the service descriptors: every rpc of every
`prebake.v1` service is called with no token, a wrong token and a token of each role;
only the pairs `RPC_ROLES` allows (admin: all) get past authentication ("past" = any
status but UNAUTHENTICATED / PERMISSION_DENIED: an empty request may well be invalid).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from prebake.client import Client, FailedPrecondition, PermissionDenied, Unauthenticated
from prebake.core.errors import FailedPrecondition as ServerFailedPrecondition
from prebake.server.app import BackgroundServer, background_server
from prebake.server.auth.rpc_roles import OPEN_SERVICES, RPC_ROLES
from prebake.server.auth.tokens import TokenFileError, add_entry, read_entries, revoke_entry, token_hash
from prebake.server.config import ServerConfig
from prebake.server.principal import Role
from prebake.v1 import registry_pb2
from tests.auth_fixtures import REFUSED, TokenFile, bearer, call_empty, make_token_file, prebake_methods
from tests.conftest import LLAMA3_8B_INF2, make_artifact_dir
from tests.plugin_cli import PrebakeCli
from tests.processes import ServerProcess, free_port, wait_until

WRONG_TOKEN = "pbk_" + "x" * 43


@pytest.fixture(scope="module")
def auth_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BackgroundServer, TokenFile]]:
    root = tmp_path_factory.mktemp("auth")
    tokens = make_token_file(root / "tokens")
    with background_server(root / "data", auth_file=str(tokens.path)) as srv:
        yield srv, tokens


@pytest.fixture(scope="module")
def raw_channel(auth_world: tuple[BackgroundServer, TokenFile]) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(auth_world[0].address) as channel:
        yield channel


METHODS = prebake_methods()
CREDENTIALS = ["none", "wrong", *[r.value for r in Role]]


def test_rpc_roles_covers_exactly_the_services_rpcs() -> None:
    described = {m.full_name for m in METHODS}
    assert described, "no prebake.v1 services found"
    assert set(RPC_ROLES) == described
    assert not {m.containing_service.full_name for m in METHODS} & OPEN_SERVICES


@pytest.mark.parametrize("credential", CREDENTIALS)
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.full_name.removeprefix("prebake.v1."))
def test_role_matrix(
    raw_channel: grpc.Channel,
    auth_world: tuple[BackgroundServer, TokenFile],
    method: object,
    credential: str,
) -> None:
    tokens = auth_world[1].tokens
    if credential == "none":
        metadata: tuple[tuple[str, str], ...] = ()
    else:
        metadata = bearer(WRONG_TOKEN if credential == "wrong" else tokens[credential])
    code = call_empty(raw_channel, method, metadata)  # type: ignore[arg-type]
    if credential in ("none", "wrong"):
        assert code is grpc.StatusCode.UNAUTHENTICATED
        return
    role = Role(credential)
    if role is Role.ADMIN or role in RPC_ROLES[method.full_name]:  # type: ignore[attr-defined]
        assert code not in REFUSED, f"{role} should get past auth, got {code}"
    else:
        assert code is grpc.StatusCode.PERMISSION_DENIED


def test_health_and_reflection_need_no_token(raw_channel: grpc.Channel) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    reply = health_pb2_grpc.HealthStub(raw_channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2

    for service in ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"):
        call = raw_channel.stream_stream(
            f"/{service}/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        (listed,) = call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30)
        assert "prebake.v1.Registry" in {s.name for s in listed.list_services_response.service}


def test_messages_are_actionable_and_never_echo_the_token(
    auth_world: tuple[BackgroundServer, TokenFile],
) -> None:
    server, tokens = auth_world
    with Client(server.address, retries=0) as anonymous, pytest.raises(Unauthenticated) as none:
        anonymous.get_stats()
    assert "token" in str(none.value) and "prebake token add" in str(none.value)
    with Client(server.address, retries=0, token=WRONG_TOKEN) as wrong, pytest.raises(Unauthenticated) as bad:
        wrong.get_stats()
    assert WRONG_TOKEN not in str(bad.value) and "revoked" in str(bad.value)
    reader_token = tokens.tokens["reader"]
    with Client(server.address, token=reader_token) as reader, pytest.raises(PermissionDenied) as denied:
        reader.delete_artifact("0" * 32)
    message = str(denied.value)
    assert "'reader'" in message and "admin" in message and "DeleteArtifact" in message
    assert reader_token not in message


def test_malformed_authorization_header_is_unauthenticated(raw_channel: grpc.Channel) -> None:
    get_stats = next(m for m in METHODS if m.name == "GetStats")
    assert (
        call_empty(raw_channel, get_stats, (("authorization", "Basic abc"),))
        is grpc.StatusCode.UNAUTHENTICATED
    )


# Per-request rules ---------------------------------------------------------------------------


def test_replace_needs_admin_and_a_pinned_artifact_also_force(
    auth_world: tuple[BackgroundServer, TokenFile], tmp_path: Path
) -> None:
    server, tokens = auth_world
    key = dataclasses.replace(LLAMA3_8B_INF2, model="auth/replace")
    first = make_artifact_dir(tmp_path / "first", {"w": 10}, seed=1)
    second = make_artifact_dir(tmp_path / "second", {"w": 10}, seed=2)
    third = make_artifact_dir(tmp_path / "third", {"w": 10}, seed=3)
    with (
        Client(server.address, token=tokens.tokens["publisher"]) as publisher,
        Client(server.address, token=tokens.tokens["admin"]) as admin,
    ):
        artifact_id = publisher.publish(first, key).artifact.artifact_id
        with pytest.raises(PermissionDenied, match="admin"):
            publisher.publish(second, key, replace=True)
        assert admin.publish(second, key, replace=True).created
        admin.pin_artifact(artifact_id)
        with pytest.raises(FailedPrecondition, match="pinned"):
            admin.publish(third, key, replace=True)
        before = admin.get_artifact(artifact_id).manifest_digest
        replaced = admin.publish(third, key, replace=True, force=True)
        assert replaced.created and replaced.artifact.pinned
        assert replaced.artifact.manifest_digest != before


def test_pinned_artifact_needs_force_without_auth_too(client: Client, tmp_path: Path) -> None:
    artifact_id = client.publish(make_artifact_dir(tmp_path / "a", {"w": 10}, seed=1), LLAMA3_8B_INF2)
    client.pin_artifact(artifact_id.artifact.artifact_id)
    other = make_artifact_dir(tmp_path / "b", {"w": 10}, seed=2)
    with pytest.raises(FailedPrecondition, match="pinned"):
        client.publish(other, LLAMA3_8B_INF2, replace=True)
    assert client.get_artifact(artifact_id.artifact.artifact_id).manifest_digest == (
        artifact_id.artifact.manifest_digest
    )


@pytest.mark.parametrize("reader_may_enqueue", [True, False])
def test_reader_may_enqueue(tmp_path: Path, reader_may_enqueue: bool) -> None:
    tokens = make_token_file(tmp_path / "tokens")
    with (
        background_server(
            tmp_path / "data", auth_file=str(tokens.path), reader_may_enqueue=reader_may_enqueue
        ) as server,
        Client(server.address, token=tokens.tokens["reader"]) as reader,
        Client(server.address, token=tokens.tokens["admin"]) as admin,
    ):
        response = reader.lookup(LLAMA3_8B_INF2)
        assert response.status == registry_pb2.LOOKUP_STATUS_MISS
        if reader_may_enqueue:
            assert response.job_created and response.job.job_id
            return
        assert not response.job.job_id and "reader_may_enqueue" in response.error
        assert list(admin.iter_jobs()) == []
        created = admin.lookup(LLAMA3_8B_INF2)
        assert created.job_created, "an admin's miss still enqueues"


# The token file on a running server ----------------------------------------------------------


def test_revoke_and_add_take_effect_on_a_running_server(tmp_path: Path) -> None:
    tokens = make_token_file(tmp_path / "tokens")
    with background_server(tmp_path / "data", auth_file=str(tokens.path)) as server:
        with Client(server.address, token=tokens.tokens["reader"], retries=0) as reader:
            reader.get_stats()
            revoke_entry(tokens.path, "reader")
            with pytest.raises(Unauthenticated):
                reader.get_stats()
        late = add_entry(tokens.path, "late-reader", ["reader"])
        with Client(server.address, token=late) as newcomer:
            newcomer.get_stats()


def test_a_token_file_broken_while_serving_fails_closed(tmp_path: Path) -> None:
    tokens = make_token_file(tmp_path / "tokens")
    with (
        background_server(tmp_path / "data", auth_file=str(tokens.path)) as server,
        Client(server.address, token=tokens.tokens["admin"], retries=0) as admin,
    ):
        admin.get_stats()
        tokens.path.write_text(tokens.path.read_text() + "{not json\n")
        with pytest.raises(Unauthenticated, match="operator"):
            admin.get_stats()
        # Fixed by removing the bad line: served again, no restart.
        tokens.path.write_text("".join(tokens.path.read_text().splitlines(keepends=True)[:-1]))
        admin.get_stats()


def test_a_bad_token_file_is_refused_at_start_up_naming_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(
        '# comment\n{"name": "a", "roles": ["reader"], "sha256": "' + "0" * 64 + '"}\n{"name": 3}\n'
    )
    config = ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data", auth_file=str(path))
    server = BackgroundServer(config)
    try:
        with pytest.raises(TokenFileError, match=f"{path}:3"):
            server.start()
    finally:
        server.stop()
    with pytest.raises(TokenFileError, match="cannot read token file"):
        read_entries(tmp_path / "missing")


def test_token_file_stores_only_hashes(tmp_path: Path) -> None:
    tokens = make_token_file(tmp_path / "tokens")
    text = tokens.path.read_text()
    for token in tokens.tokens.values():
        assert token not in text and token_hash(token) in text
    assert stat.S_IMODE(os.stat(tokens.path).st_mode) == 0o600


# Listening without authentication ------------------------------------------------------------


def test_non_loopback_without_auth_is_refused_at_start_up(tmp_path: Path) -> None:
    server = BackgroundServer(ServerConfig(listen="0.0.0.0:0", data_dir=tmp_path / "data"))
    try:
        with pytest.raises(ServerFailedPrecondition, match="--auth-file") as refused:
            server.start()
        assert "--insecure-allow-anonymous" in str(refused.value)
    finally:
        server.stop()
    assert not (tmp_path / "data" / "registry.sqlite3").exists(), "nothing is opened before the refusal"


def test_non_loopback_is_allowed_with_auth_or_the_explicit_flag(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokens = make_token_file(tmp_path / "tokens")
    with background_server(tmp_path / "a", listen="0.0.0.0:0", auth_file=str(tokens.path)) as server:
        port = server.address.rpartition(":")[2]
        with Client(f"127.0.0.1:{port}", token=tokens.tokens["reader"]) as reader:
            reader.get_stats()
    with (
        caplog.at_level(logging.WARNING, logger="prebake.server.auth"),
        background_server(tmp_path / "b", listen="0.0.0.0:0", insecure_allow_anonymous=True) as server,
    ):
        port = server.address.rpartition(":")[2]
        with Client(f"127.0.0.1:{port}") as anonymous:
            anonymous.get_stats()
    assert "WITHOUT AUTHENTICATION" in caplog.text


@pytest.mark.slow
def test_serve_command_refuses_and_allows_anonymous_non_loopback(prebake: PrebakeCli, tmp_path: Path) -> None:
    refused = prebake("serve", "--listen", "0.0.0.0:0", "--data-dir", str(tmp_path / "d"), "--workers", "0")
    assert refused.code == 1 and "--auth-file" in refused.err
    port = free_port()
    server = ServerProcess(
        tmp_path,
        "anon",
        ["--listen", f"0.0.0.0:{port}", "--insecure-allow-anonymous", "--data-dir", str(tmp_path / "e")],
    )
    server.address = f"127.0.0.1:{port}"
    try:
        server.wait_ready()
        with Client(server.address) as anonymous:
            anonymous.get_stats()
    finally:
        assert server.stop() == 0, server.log()
    assert "WITHOUT AUTHENTICATION" in server.log()


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_serve_with_auth_file_authenticates_its_embedded_workers(tmp_path: Path, processes: int) -> None:
    # With serving processes on the port, only the primary knows the token it minted for its
    # embedded workers: they must reach it over its own socket, never the shared port.
    tokens = make_token_file(tmp_path / "tokens")
    server = ServerProcess(
        tmp_path,
        "auth",
        [
            *("--auth-file", str(tokens.path), "--workers", "1", "--data-dir", str(tmp_path / "d")),
            *("--processes", str(processes)),
        ],
    )
    try:
        server.wait_ready()
        if processes > 1:
            wait_until(lambda: "processes on one port" in server.log(), 60, "the serving processes")
        with Client(server.address, token=tokens.tokens["reader"]) as reader:
            wait_until(
                lambda: any("embedded" in w.worker_id for w in reader.list_workers()),
                60,
                "the embedded worker to lease with its minted token",
            )
    finally:
        assert server.stop() == 0, server.log()
    assert "refused" not in server.log()


# The token command ---------------------------------------------------------------------------


def test_token_command(prebake: PrebakeCli, tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    added = prebake("token", "add", str(path), "--role", "reader", "--role", "publisher", "--name", "ci")
    assert added.code == 0, added.err
    token = added.out.strip()
    assert added.out == token + "\n" and token.startswith("pbk_")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert token not in path.read_text()
    [entry] = read_entries(path)
    assert entry.name == "ci" and entry.roles == ("reader", "publisher") and entry.sha256 == token_hash(token)

    before = path.read_text()
    duplicate = prebake("token", "add", str(path), "--role", "admin", "--name", "ci")
    assert duplicate.code == 2 and "exists already" in duplicate.err and path.read_text() == before
    assert prebake("token", "add", str(path), "--role", "root", "--name", "x").code == 10  # invalid value

    cert = prebake("token", "add", str(path), "--role", "worker", "--name", "gpu", "--cert-subject", "CN=gpu")
    assert cert.code == 0 and cert.out == ""
    listed = prebake("token", "list", str(path))
    assert listed.code == 0 and "ci" in listed.out and "reader,publisher" in listed.out
    assert "cert CN=gpu" in listed.out and entry.sha256 not in listed.out
    as_json = prebake("token", "list", str(path), "--json")
    assert entry.sha256 not in as_json.out and '"name": "gpu"' in as_json.out

    assert prebake("token", "revoke", str(path), "ci").code == 0
    assert [e.name for e in read_entries(path)] == ["gpu"]
    missing = prebake("token", "revoke", str(path), "ci")
    assert missing.code == 2 and "no entry named 'ci'" in missing.err

    nowhere = prebake("token", "add", str(tmp_path / "no-dir" / "t"), "--role", "reader", "--name", "x")
    assert nowhere.code == 1 and "cannot write token file" in nowhere.err

    path.write_text(path.read_text() + "garbage\n")
    broken = prebake("token", "list", str(path))
    assert broken.code == 1 and f"{path}:2" in broken.err


def test_client_cli_sends_the_token(
    prebake: PrebakeCli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = make_token_file(tmp_path / "tokens")
    token_file = tmp_path / "reader.token"
    token_file.write_text(tokens.tokens["reader"] + "\n")
    with background_server(tmp_path / "data", auth_file=str(tokens.path)) as server:
        assert prebake("--server", server.address, "stats").code == 11  # unauthenticated
        assert prebake("--server", server.address, "--token-file", str(token_file), "stats").code == 0
        assert prebake("stats", "--server", server.address, "--token", tokens.tokens["reader"]).code == 0
        denied = prebake("--server", server.address, "--token-file", str(token_file), "rm", "0" * 32)
        assert denied.code == 11 and "admin" in denied.err  # permission denied
        monkeypatch.setenv("PREBAKE_TOKEN", tokens.tokens["admin"])
        assert prebake("--server", server.address, "pin", "0" * 32).code == 6  # past auth: not found
        monkeypatch.delenv("PREBAKE_TOKEN")
        monkeypatch.setenv("PREBAKE_TOKEN_FILE", str(token_file))
        assert prebake("--server", server.address, "stats").code == 0


# Configuration -------------------------------------------------------------------------------


def test_security_settings_from_flags_environment_and_checks(tmp_path: Path) -> None:
    from prebake.server.config import load_server_config

    config = load_server_config(
        {}, {"PREBAKE_AUTH_FILE": "/etc/prebake/tokens", "PREBAKE_READER_MAY_ENQUEUE": "false"}
    )
    assert config.auth_file == "/etc/prebake/tokens" and config.reader_may_enqueue is False
    assert load_server_config({"insecure_allow_anonymous": True}, {}).insecure_allow_anonymous is True
    assert ServerConfig().reader_may_enqueue is True and not ServerConfig().auth_file
    with pytest.raises(ValueError, match="reader_may_enqueue"):
        load_server_config({}, {"PREBAKE_READER_MAY_ENQUEUE": "perhaps"})
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        load_server_config({"tls_cert": "server.pem"}, {})
    with pytest.raises(ValueError, match="needs TLS"):
        load_server_config({"tls_client_ca": "ca.pem"}, {})
    missing = ServerConfig(
        listen="127.0.0.1:0",
        data_dir=tmp_path / "d",
        tls_cert=str(tmp_path / "no.pem"),
        tls_key=str(tmp_path / "k"),
    )
    server = BackgroundServer(missing)
    try:
        with pytest.raises(ServerFailedPrecondition, match=r"no\.pem"):
            server.start()
    finally:
        server.stop()
