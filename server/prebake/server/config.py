"""Server configuration: one frozen dataclass, built once by the CLI and passed down.

Precedence (applied by `load_server_config`): command-line flags > `PREBAKE_*`
environment variables > a TOML file (`--config`, or `PREBAKE_CONFIG`) > defaults.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from prebake.core.errors import InvalidArgument
from prebake.core.s3_urls import S3Location, parse_s3_url

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_DATA_DIR = Path("./prebake-data")


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server reads at start-up. Immutable; passed to every component."""

    listen: str = DEFAULT_LISTEN
    data_dir: Path = DEFAULT_DATA_DIR
    # Where blobs and the manifest archive live: "" = local disk under data_dir (cas/), or
    # "s3://BUCKET/PREFIX". Endpoint, region and credentials: boto3's standard sources.
    store: str = ""
    # Where the registry (artifacts, jobs, workers) lives: "" = SQLite under data_dir
    # (registry.sqlite3), or "dynamodb://TABLE_PREFIX" (tables TABLE_PREFIX-artifacts, ...;
    # `prebake init-aws` creates them). With both remote the server keeps no state of its
    # own and any number of replicas may run; data_dir then only holds scratch space for
    # embedded workers.
    registry: str = ""
    # A single blob larger than this is refused with RESOURCE_EXHAUSTED.
    max_blob_bytes: int = 64 << 30
    # Total blob bytes the store may hold; 0 means no limit.
    max_store_bytes: int = 0
    # How long the presigned download URLs of a hit stay valid, with a blob store that can
    # make them (S3) and a client that asks for them; 0 turns them off (every download then
    # streams through the server).
    presign_seconds: int = 900
    # With a shared registry (DynamoDB), how long a replica answers a repeated hit from
    # memory: deletes, replaces and pins made through other replicas show within this time
    # (this replica's own at once; a publish anywhere is a hit everywhere at once). 0: off.
    hit_cache_seconds: float = 5.0
    # How long a deterministic compile failure answers FAILED before a lookup retries.
    negative_cache_seconds: float = 3600.0
    # Attempts a job gets before a transient failure becomes final.
    job_max_attempts: int = 3
    # How long a worker's lease lasts without a heartbeat.
    lease_seconds: float = 60.0
    # A transiently failed job waits base * 2**attempts seconds (at most 300) before a retry.
    retry_backoff_seconds: float = 5.0
    # Partial uploads untouched for this long are removed at start-up.
    stale_upload_seconds: float = 24 * 3600.0
    # How often lazily-recorded artifact access times are written to the registry.
    access_flush_seconds: float = 5.0
    # Toolchain a key of each kind gets when the request leaves it unset, as
    # "kind=toolchain,..." (e.g. "neuron=neuronx-cc-2.15"). Kinds not named get the newest
    # toolchain a live worker serves for the key's compile target, else the built-in
    # default (neuronx-cc-2, llmcompressor-0.14, torch-2.13.0).
    default_toolchains: str = ""
    # A worker counts as live for this long after its last lease poll or heartbeat.
    worker_ttl_seconds: float = 90.0
    # For this long after start-up a job no live worker serves is not reported as such
    # (in-process and remote workers need a moment to register).
    worker_grace_seconds: float = 20.0
    # Seconds given to in-flight rpcs on shutdown.
    shutdown_grace_seconds: float = 10.0
    # Thread pool for blocking work (hashing, fsync) off the event loop.
    io_threads: int = 4
    # `prebake serve` runs this many in-process compile workers per backend whose toolchain
    # is installed here (0: none, compile on separate `prebake worker` hosts only).
    embedded_workers: int = 1

    # --- integrity sweep (issue 9: integrity and self-repair) ---
    # Every this many seconds the server re-hashes its stored blobs, least recently verified
    # first, quarantines corrupt ones, marks artifacts naming a lost blob unavailable and
    # re-enqueues their compiles (as `prebake verify` does); 0 turns the sweep off.
    integrity_sweep_seconds: float = 24 * 3600.0
    # Hashing rate of that sweep, in bytes per second (0: unlimited), so that it leaves the
    # disk and CPU to reads.
    integrity_sweep_bytes_per_second: int = 32 << 20


_ENV_PREFIX = "PREBAKE_"
DYNAMODB_SCHEME = "dynamodb://"
# DynamoDB table names are 3-255 characters of A-Z a-z 0-9 _ . -; the registry's are
# PREFIX-SUFFIX and the longest suffix is "-blob-refs" (10 characters).
_TABLE_PREFIX_RE = re.compile(r"[A-Za-z0-9_.-]{1,245}")


def _coerce(name: str, value: Any) -> Any:
    kind = {f.name: f.type for f in fields(ServerConfig)}[name]
    try:
        if kind in ("Path", Path):
            return Path(value)
        if kind in ("int", int):
            return int(value)
        if kind in ("float", float):
            return float(value)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"configuration {name}={value!r}: expected {kind}") from exc


def load_server_config(
    flags: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> ServerConfig:
    """Merge flags (None means not given), environment and file into a ServerConfig.

    Raises ValueError with a readable message for unknown file keys or bad values.
    """
    environ = os.environ if environ is None else environ
    names = {f.name for f in fields(ServerConfig)}
    merged: dict[str, Any] = {}
    file_path = config_file or (
        Path(environ[f"{_ENV_PREFIX}CONFIG"]) if f"{_ENV_PREFIX}CONFIG" in environ else None
    )
    if file_path is not None:
        try:
            data = tomllib.loads(file_path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"cannot read config file {file_path}: {exc}") from exc
        section = data.get("server", data)
        unknown = sorted(set(section) - names)
        if unknown:
            raise ValueError(f"config file {file_path}: unknown keys {unknown}; known: {sorted(names)}")
        merged.update({k: _coerce(k, v) for k, v in section.items()})
    for name in names:
        env_value = environ.get(_ENV_PREFIX + name.upper())
        if env_value is not None and env_value != "":
            merged[name] = _coerce(name, env_value)
    for name, value in flags.items():
        if value is not None:
            if name not in names:
                raise ValueError(f"unknown server setting {name!r}")
            merged[name] = _coerce(name, value)
    config = ServerConfig(**merged)
    from prebake.server.key_normalization import DEFAULT_TOOLCHAINS

    # Refused now, readably, rather than when the server opens them.
    parse_default_toolchains(config.default_toolchains, DEFAULT_TOOLCHAINS)
    parse_store(config.store)
    parse_registry(config.registry)
    if config.integrity_sweep_seconds < 0 or config.integrity_sweep_bytes_per_second < 0:
        raise ValueError(
            "integrity_sweep_seconds and integrity_sweep_bytes_per_second must be >= 0 (0: off / unlimited)"
        )
    return config


def parse_default_toolchains(text: str, known_kinds: Mapping[str, str]) -> dict[str, str]:
    """The kinds `default_toolchains` names, with their toolchains; ValueError if malformed."""
    result: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, sep, toolchain = item.partition("=")
        if not sep or kind.strip() not in known_kinds or not toolchain.strip():
            raise ValueError(
                f"default_toolchains entry {item!r}: expected KIND=TOOLCHAIN with KIND one of "
                f"{', '.join(sorted(known_kinds))}"
            )
        result[kind.strip()] = toolchain.strip()
    return result


def parse_store(text: str) -> S3Location | None:
    """The S3 location of `store`, or None for local disk (""); ValueError if neither."""
    if not text.strip():
        return None
    try:
        return parse_s3_url(text, "store")
    except InvalidArgument as exc:
        raise ValueError(f"{exc}; leave store empty for local disk under data_dir") from None


def parse_registry(text: str) -> str | None:
    """The DynamoDB table prefix of `registry`, or None for SQLite (""); ValueError if neither."""
    raw = text.strip()
    if not raw:
        return None
    prefix = raw.removeprefix(DYNAMODB_SCHEME)
    if prefix == raw or not _TABLE_PREFIX_RE.fullmatch(prefix):
        raise ValueError(
            f"registry {raw!r}: expected {DYNAMODB_SCHEME}TABLE_PREFIX with TABLE_PREFIX 1-245 "
            "letters, digits, '_', '-' or '.' (e.g. dynamodb://prebake-prod), or empty for SQLite "
            "under data_dir"
        )
    return prefix
