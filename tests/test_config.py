"""Server configuration precedence: flags > PREBAKE_* environment > file > defaults."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from prebake.server.config import DEFAULT_LISTEN, ServerConfig, load_server_config


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
