"""Server configuration precedence: flags > PREBAKE_* environment > file > defaults."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from prebake.core.s3_urls import S3Location
from prebake.server.config import (
    DEFAULT_LISTEN,
    ServerConfig,
    load_server_config,
    parse_registry,
    parse_store,
)
from tests.plugin_cli import PrebakeCli


def test_defaults() -> None:
    config = load_server_config({}, environ={})
    assert config == ServerConfig()
    assert config.listen == DEFAULT_LISTEN == "127.0.0.1:50051"
    assert config.data_dir == Path("./prebake-data")


def test_flags_beat_environment_beat_file(tmp_path: Path) -> None:
    file = tmp_path / "prebake.toml"
    file.write_text('[server]\nlisten = "127.0.0.1:1"\ndata_dir = "/from/file"\nmax_blob_bytes = 10\n')
    environ = {"PREBAKE_LISTEN": "127.0.0.1:2", "PREBAKE_MAX_BLOB_BYTES": "20"}
    config = load_server_config({"listen": "127.0.0.1:3", "data_dir": None}, environ, file)
    assert config.listen == "127.0.0.1:3"  # flag
    assert config.max_blob_bytes == 20  # environment over file
    assert config.data_dir == Path("/from/file")  # file, as the flag was not given


def test_config_file_from_environment(tmp_path: Path) -> None:
    file = tmp_path / "c.toml"
    file.write_text("negative_cache_seconds = 5.5\n")
    config = load_server_config({}, {"PREBAKE_CONFIG": str(file)})
    assert config.negative_cache_seconds == 5.5


@pytest.mark.parametrize(
    ("flags", "environ", "text", "message"),
    [
        ({}, {}, "bogus = 1\n", "unknown keys ['bogus']"),
        ({}, {"PREBAKE_MAX_BLOB_BYTES": "lots"}, None, "max_blob_bytes='lots'"),
        ({}, {}, "listen = [\n", "cannot read config file"),
        ({"nonsense": 1}, {}, None, "unknown server setting"),
    ],
)
def test_bad_configuration_is_a_readable_error(
    tmp_path: Path, flags: dict[str, object], environ: dict[str, str], text: str | None, message: str
) -> None:
    file = None
    if text is not None:
        file = tmp_path / "c.toml"
        file.write_text(text)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_server_config(flags, environ, file)


def test_default_toolchains_are_parsed_and_checked() -> None:
    config = load_server_config({}, {"PREBAKE_DEFAULT_TOOLCHAINS": "neuron=neuronx-cc-2.15"})
    assert config.default_toolchains == "neuron=neuronx-cc-2.15"
    for bad in ("neuron", "gpu=cuda-12", "neuron="):
        with pytest.raises(ValueError, match="KIND=TOOLCHAIN"):
            load_server_config({}, {"PREBAKE_DEFAULT_TOOLCHAINS": bad})


def test_a_configured_default_toolchain_fills_unset_keys(tmp_path: Path) -> None:
    from prebake.client import ArtifactKey, Client
    from prebake.server.app import background_server

    key = ArtifactKey(
        kind="neuron",
        model="meta-llama/Meta-Llama-3-8B",
        instance_type="ml.inf2.48xlarge",
        sequence_length=2048,
        batch_size=1,
        tensor_parallel_degree=2,
    )
    with (
        background_server(tmp_path / "data", default_toolchains="neuron=neuronx-cc-2.15") as server,
        Client(server.address) as client,
    ):
        resolved = client.lookup(key, on_miss="report").key
        assert resolved.key.toolchain == "neuronx-cc-2.15"
        explicit = client.lookup(dataclasses.replace(key, toolchain="neuronx-cc-2.14"), on_miss="report")
        assert explicit.key.key.toolchain == "neuronx-cc-2.14"
        inductor = ArtifactKey(
            kind="inductor", model="m/x", instance_type="ml.c6a.4xlarge", sequence_length=8, batch_size=1
        )
        assert client.lookup(inductor, on_miss="report").key.key.toolchain == "torch-2.13.0"


def test_store_and_registry_default_to_the_data_dir() -> None:
    config = load_server_config({}, environ={})
    assert (config.store, config.registry) == ("", "")
    assert parse_store(config.store) is None and parse_registry(config.registry) is None


def test_store_and_registry_from_flags_environment_and_file(tmp_path: Path) -> None:
    file = tmp_path / "prebake.toml"
    file.write_text('[server]\nstore = "s3://from-file/p"\nregistry = "dynamodb://from-file"\n')
    from_file = load_server_config({}, {}, file)
    assert parse_store(from_file.store) == S3Location("from-file", "p/")
    assert parse_registry(from_file.registry) == "from-file"
    environ = {"PREBAKE_STORE": "s3://from-env/a/b", "PREBAKE_REGISTRY": "dynamodb://from.env_1"}
    from_env = load_server_config({}, environ, file)
    assert parse_store(from_env.store) == S3Location("from-env", "a/b/")
    assert parse_registry(from_env.registry) == "from.env_1"
    flags = load_server_config({"store": "s3://from-flag", "registry": "dynamodb://from-flag"}, environ, file)
    assert (flags.store, flags.registry) == ("s3://from-flag", "dynamodb://from-flag")
    assert parse_store(flags.store) == S3Location("from-flag", "")


@pytest.mark.parametrize(
    ("store", "registry"),
    [("s3://bucket/p", ""), ("", "dynamodb://tables"), ("s3://bucket", "dynamodb://tables")],
)
def test_every_combination_of_local_and_aws_is_valid(store: str, registry: str) -> None:
    config = load_server_config({"store": store, "registry": registry}, {})
    assert (config.store, config.registry) == (store, registry)


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("store", "/var/lib/blobs", "is not an s3:// URL"),
        ("store", "s3://Bad_Bucket/p", "not a valid bucket name"),
        ("store", "s3://bucket/a//b", "empty, '.' or '..' segment"),
        ("registry", "sqlite:///x.db", "expected dynamodb://TABLE_PREFIX"),
        ("registry", "dynamodb://", "expected dynamodb://TABLE_PREFIX"),
        ("registry", "dynamodb://has space", "expected dynamodb://TABLE_PREFIX"),
        ("registry", "dynamodb://a/b", "expected dynamodb://TABLE_PREFIX"),
        ("registry", "dynamodb://" + "t" * 246, "1-245 letters"),
    ],
)
def test_bad_store_or_registry_is_refused_when_the_config_is_built(
    tmp_path: Path, setting: str, value: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        load_server_config({setting: value}, {})
    with pytest.raises(ValueError, match=message):
        load_server_config({}, {f"PREBAKE_{setting.upper()}": value})
    file = tmp_path / "c.toml"
    file.write_text(f"{setting} = {value!r}\n".replace("'", '"'))
    with pytest.raises(ValueError, match=message):
        load_server_config({}, {}, file)


def test_the_longest_table_prefix_is_accepted() -> None:
    assert parse_registry("dynamodb://" + "t" * 245) == "t" * 245


def test_serve_refuses_a_bad_store_as_a_usage_error(prebake: PrebakeCli) -> None:
    ran = prebake("serve", "--store", "file:///tmp/x")
    assert ran.code == 2
    assert "store 'file:///tmp/x' is not an s3:// URL" in ran.err


# --- Documented configuration: `serve --help` and `config show` (issue 11, item 4) ---


def test_every_setting_is_documented_with_its_flag_environment_variable_and_key(
    prebake: PrebakeCli, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prebake.server.cli import flag_of
    from prebake.server.config import settings

    monkeypatch.setenv("COLUMNS", "100")
    ran = prebake("serve", "--help")
    assert ran.code == 0, ran.err
    text = " ".join(ran.out.split())  # argparse wraps the help lines
    docs = {s.name: s.doc for s in settings()}
    for f in dataclasses.fields(ServerConfig):
        assert docs[f.name], f"ServerConfig.{f.name} has no comment to document it"
        assert " ".join(docs[f.name].split()[:4]) in text, f.name
        flag, env = flag_of(f.name), f"PREBAKE_{f.name.upper()}"
        assert f"{flag} " in ran.out, f"no {flag} for {f.name}"
        assert f"[env {env}; key {f.name}; default " in text, f.name


def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("PREBAKE_"):
            monkeypatch.delenv(name)


def test_config_show_names_the_source_of_every_value(
    prebake: PrebakeCli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _clean_environment(monkeypatch)
    file = tmp_path / "prebake.toml"
    file.write_text('[server]\nlisten = "127.0.0.1:1"\nmax_blob_bytes = 10\nlease_seconds = 7.5\n')
    monkeypatch.setenv("PREBAKE_MAX_BLOB_BYTES", "20")
    monkeypatch.setenv("PREBAKE_TLS_CERT", str(tmp_path / "server.pem"))
    monkeypatch.setenv("PREBAKE_TLS_KEY", "/very/secret/server.key")
    ran = prebake(
        "config", "show", "--config", str(file), "--listen", "127.0.0.1:3", "--workers", "0", "--json"
    )
    assert ran.code == 0, ran.err
    shown = json.loads(ran.out)
    assert shown["config_file"] == str(file)
    rows = {row["name"]: row for row in shown["settings"]}
    assert [row["name"] for row in shown["settings"]] == [f.name for f in dataclasses.fields(ServerConfig)]
    assert rows["listen"] == {"name": "listen", "value": "127.0.0.1:3", "source": "flag", "from": "--listen"}
    assert rows["embedded_workers"] == {
        "name": "embedded_workers",
        "value": 0,
        "source": "flag",
        "from": "--workers",
    }
    assert (rows["max_blob_bytes"]["value"], rows["max_blob_bytes"]["source"]) == (20, "env")
    assert rows["max_blob_bytes"]["from"] == "PREBAKE_MAX_BLOB_BYTES"
    assert rows["lease_seconds"] == {
        "name": "lease_seconds",
        "value": 7.5,
        "source": "file",
        "from": str(file),
    }
    assert rows["io_threads"] == {"name": "io_threads", "value": 4, "source": "default", "from": ""}
    # A private key's path is never printed, only that it is set.
    assert rows["tls_key"] == {"name": "tls_key", "value": "set", "source": "env", "from": "PREBAKE_TLS_KEY"}
    assert rows["signing_key"]["value"] == ""
    assert "secret" not in ran.out

    text = prebake("config", "show", "--config", str(file), "--workers", "0")
    assert text.code == 0, text.err
    lines = {line.split()[0]: line.split()[1:] for line in text.out.splitlines()[1:]}
    assert lines["listen"] == ["127.0.0.1:1", "file", str(file)]
    assert lines["max_blob_bytes"] == ["20", "env", "PREBAKE_MAX_BLOB_BYTES"]
    assert lines["embedded_workers"] == ["0", "flag", "--workers"]
    assert lines["io_threads"] == ["4", "default"]
    assert lines["tls_key"] == ["set", "env", "PREBAKE_TLS_KEY"]
    assert "secret" not in text.out


def test_generated_flags_parse_as_the_setting_does(
    prebake: PrebakeCli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _clean_environment(monkeypatch)
    ran = prebake(
        "config", "show", "--json", "--no-reader-may-enqueue", "--job-create-per-minute", "5",
        "--negative-cache-seconds", "30", "--max-request-bytes", "2K",
        "--model-source-root", str(tmp_path / "a"), "--model-source-root", str(tmp_path / "b"),
    )  # fmt: skip
    assert ran.code == 0, ran.err
    values = {row["name"]: row["value"] for row in json.loads(ran.out)["settings"]}
    assert values["reader_may_enqueue"] is False
    assert (values["job_create_per_minute"], values["negative_cache_seconds"]) == (5.0, 30.0)
    assert values["max_request_bytes"] == 2048
    assert values["model_source_roots"] == f"{tmp_path / 'a'},{tmp_path / 'b'}"


def test_config_show_refuses_bad_settings_as_serve_does(
    prebake: PrebakeCli, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clean_environment(monkeypatch)
    monkeypatch.setenv("PREBAKE_PROCESSES", "0")
    ran = prebake("config", "show")
    assert ran.code == 2
    assert "processes must be at least 1" in ran.err
