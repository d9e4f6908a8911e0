"""Server configuration precedence: flags > PREBAKE_* environment > file > defaults."""

from __future__ import annotations

import dataclasses
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
