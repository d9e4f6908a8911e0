"""Server configuration precedence: flags > PREBAKE_* environment > file > defaults."""

from __future__ import annotations

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
