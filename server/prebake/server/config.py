"""Server configuration: one frozen dataclass, built once by the CLI and passed down.

Precedence (applied by `load_server_config`): command-line flags > `PREBAKE_*`
environment variables > a TOML file (`--config`, or `PREBAKE_CONFIG`) > defaults.

Each field's comment is its documentation: `settings()` reads the comments from this
source, so `prebake serve --help` (flag, environment variable, TOML key and default of
every field) and `prebake config show` cannot drift from the dataclass. A field without a
comment of its own fails tests/test_config.py.
A "# --- Title ---" comment starts a group of settings.
"""

from __future__ import annotations

import inspect
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path
from typing import Any

from prebake.core.errors import InvalidArgument
from prebake.core.logs import check_log_settings
from prebake.core.s3_urls import S3Location, parse_s3_url
from prebake.server.registry_url import SCHEME as DYNAMODB_SCHEME
from prebake.server.registry_url import validate_table_prefix

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_DATA_DIR = Path("./prebake-data")


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server reads at start-up. Immutable; passed to every component."""

    # HOST:PORT the gRPC server listens on (port 0: a free one). A non-loopback address
    # needs auth_file or insecure_allow_anonymous.
    listen: str = DEFAULT_LISTEN
    # Where a local registry (SQLite) and local blobs live, and the embedded workers'
    # scratch space.
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
    # Partial uploads untouched for this long are removed at start-up and by the garbage collector.
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
    # Server processes answering rpcs on the listen port (SO_REUSEPORT; see
    # prebake.server.serving_processes): one Python process uses one core, so N > 1 spreads
    # connections over N cores. GetStats counters since start-up and rate limits are then
    # per process; compiles, GC and sweeps stay with the first process.
    processes: int = 1
    # With blobs on local disk: serve blob downloads over plain HTTP on HOST:PORT (port 0: a
    # free one) from signed URLs valid for presign_seconds, handed out with manifests like
    # S3's presigned GETs (prebake.server.blob_http): fetches then bypass gRPC streaming.
    # "" = off. Not with TLS (the bytes would travel unencrypted) or an S3 store.
    blob_http_listen: str = ""
    # `prebake serve` runs this many in-process compile workers per backend whose toolchain
    # is installed here (0: none, compile on separate `prebake worker` hosts only).
    embedded_workers: int = 1
    # Log lines on stderr: "text" (for people) or "json" (one JSON object per line, for log
    # shippers); see `prebake.core.logs`. Every rpc logs one line (method, status code,
    # duration, peer, request id) at info level, health checks at debug level.
    log_format: str = "text"
    # The least severe level logged: debug, info, warning or error.
    log_level: str = "info"

    # --- Metrics and status page (prebake.server.http_endpoint) ---
    # HOST:PORT of an HTTP listener serving Prometheus metrics (/metrics) and a status page
    # (/: artifacts, jobs with their logs, workers, hit ratio, store usage); "" = off, port 0
    # picks a free port. It shows artifact names and job logs, so the gRPC rule applies: a
    # non-loopback address needs auth_file (then a token with the reader role, sent as
    # "Authorization: Bearer TOKEN" or as the password of HTTP basic authentication) or
    # insecure_allow_anonymous. With tls_cert/tls_key it serves HTTPS.
    metrics_listen: str = ""
    # How often the status page samples the lookup and hit counters for its hit-ratio
    # history (the last 360 samples are kept in memory).
    status_sample_seconds: float = 10.0

    # --- Authentication, roles and TLS (prebake.server.auth) ---
    # Token file that turns authentication on (JSON lines of hashed tokens and client
    # certificate subjects with their roles; `prebake token add` writes it): every rpc but
    # health and reflection then needs a token or certificate it names. Re-read when it
    # changes. "" = off, allowed only on a loopback address (see insecure_allow_anonymous).
    auth_file: str = ""
    # Serve without authentication on a non-loopback address (with a loud warning), for a
    # network trusted completely: anyone who reaches the port can replace artifacts.
    insecure_allow_anonymous: bool = False
    # Whether a miss looked up by a caller holding only the reader role enqueues a compile;
    # off, it answers the miss without a job and says why (publishers and admins still may).
    reader_may_enqueue: bool = True
    # TLS: the server's certificate chain and its private key (PEM files); both or neither.
    tls_cert: str = ""
    # The private key of tls_cert (PEM).
    tls_key: str = ""
    # Mutual TLS: a PEM bundle of CAs; every client must present a certificate one of them
    # signed (needs tls_cert). A certificate's subject may stand for a token-file entry.
    tls_client_ca: str = ""
    # --- Model source policy (issue 9, part 3) ---
    # Where a lookup's model_source may point: local checkpoint directories under these
    # directories (symbolic links must not lead out) and s3:// prefixes, comma-separated
    # (a TOML list also works). Empty: DATA_DIR/models only.
    model_source_roots: str = ""
    # The source of each model's jobs when a lookup names none, "MODEL=SOURCE,..." (a TOML
    # table also works): an absolute directory or an s3:// prefix, allowed as is.
    model_source_map: str = ""

    # --- quota, eviction and garbage collection (`prebake.server.garbage`) ---
    # Blobs no artifact or job references (uploaded, never published; left by a replace) are
    # removed this long after they were stored: the time an uploader has to publish (the
    # whole upload of a large artifact counts). Until then they count against
    # max_store_bytes, like unfinished uploads do.
    unreferenced_blob_grace_seconds: float = 6 * 3600.0
    # Quarantined blobs (bytes found corrupt, moved aside for inspection) are removed this
    # long after they were quarantined.
    quarantine_grace_seconds: float = 7 * 24 * 3600.0
    # With max_store_bytes set: once blobs and unfinished uploads take more than this
    # fraction of it, the collector evicts unpinned artifacts, least recently used first...
    eviction_high_water: float = 0.9
    # ...until they take at most this fraction (0 <= low <= high <= 1).
    eviction_low_water: float = 0.8
    # An artifact hit by a lookup or published within this long is never evicted: its
    # download may still be running (presigned downloads bypass the server).
    eviction_protect_seconds: float = 600.0
    # How often the background garbage collector runs (stale uploads, expired unreferenced
    # and quarantined blobs, eviction); 0 turns it off (`prebake gc` still works).
    gc_interval_seconds: float = 300.0

    # --- signed artifacts (issue 9, signing) ---
    # Refuse publishes and job completions without a signature (PERMISSION_DENIED).
    require_signatures: bool = False
    # Public key files (PEM; comma-separated) of the only signers accepted; empty: any
    # signer whose signature verifies with the public key it sends.
    signer_keys: str = ""
    # Key ids (comma-separated, "ed25519:..."): their artifacts are no longer served (no
    # lookup hits them, GetArtifact answers FAILED_PRECONDITION) and they publish nothing.
    revoked_signers: str = ""
    # Private key file (PEM PKCS#8) the embedded workers sign their artifacts with; empty:
    # they publish unsigned.
    signing_key: str = ""

    # --- Abuse limits (issue 9: limits that hold before work is done) ---
    # Largest request message, in bytes, of an rpc that carries no manifest or blob data
    # (lookups, job and worker calls); a larger one is refused unparsed (INVALID_ARGUMENT).
    max_request_bytes: int = 64 << 10
    # Compile jobs one caller (its principal, or its host without authentication) may
    # create through lookups: this many at once, refilled at job_create_per_minute
    # (0: no limit); beyond it RESOURCE_EXHAUSTED, saying when to retry.
    job_create_burst: int = 200
    # How many compile-job creations a caller gets back per minute, up to job_create_burst.
    job_create_per_minute: float = 600.0
    # Uploads (Write streams) one caller may start: this many at once, refilled at
    # upload_start_per_minute (0: no limit).
    upload_start_burst: int = 2000
    # How many upload starts a caller gets back per minute, up to upload_start_burst.
    upload_start_per_minute: float = 12000.0
    # Uploads in progress at once, on the server and per caller (0: no cap); beyond them
    # RESOURCE_EXHAUSTED until one finishes.
    max_uploads: int = 256
    # Uploads in progress at once per caller (0: no cap).
    max_uploads_per_caller: int = 64
    # An upload whose client sends nothing for this long is ended (ABORTED) and its partial
    # data discarded, freeing its file (0: never).
    upload_idle_seconds: float = 120.0
    # --- integrity sweep (issue 9: integrity and self-repair) ---
    # Every this many seconds the server re-hashes its stored blobs, least recently verified
    # first, quarantines corrupt ones, marks artifacts naming a lost blob unavailable and
    # re-enqueues their compiles (as `prebake verify` does); 0 turns the sweep off.
    integrity_sweep_seconds: float = 24 * 3600.0
    # Hashing rate of that sweep, in bytes per second (0: unlimited), so that it leaves the
    # disk and CPU to reads.
    integrity_sweep_bytes_per_second: int = 32 << 20
    # --- evaluation jobs (issue 12: `prebake evaluate`) ---
    # Instance price table for evaluation jobs' prices: a CSV file `instance_type,hourly_usd`
    # (`# source:` and `# recorded:` comments become the recorded price source), replacing the
    # shipped table of public on-demand prices (prebake/server/data/instance_prices.csv);
    # "" = the shipped table.
    price_table_file: str = ""


_ENV_PREFIX = "PREBAKE_"


def _coerce(name: str, value: Any) -> Any:
    kind = {f.name: f.type for f in fields(ServerConfig)}[name]
    try:
        if kind in ("Path", Path):
            return Path(value)
        if kind in ("bool", bool):
            return _boolean(value)
        if kind in ("int", int):
            return int(value)
        if kind in ("float", float):
            return float(value)
        if isinstance(value, list):  # TOML: a list for a comma-separated setting
            return ",".join(str(item) for item in value)
        if isinstance(value, dict):  # TOML: a table for a "KEY=VALUE,..." setting
            return ",".join(f"{k}={v}" for k, v in value.items())
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"configuration {name}={value!r}: expected {kind}") from exc


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError(f"{value!r} is not a boolean")


@dataclass(frozen=True)
class Setting:
    """One ServerConfig field as documented: `settings()`."""

    name: str  # the field, and its TOML key (in a [server] table or at the top level)
    section: str  # the "# --- Title ---" group it is in
    doc: str  # its comment, as one paragraph
    default: Any

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


ENV_PREFIX = _ENV_PREFIX
GENERAL_SECTION = "Server"
_SECTION_RE = re.compile(r"#\s*---\s*(.*?)\s*---\s*$")
_FIELD_RE = re.compile(r"([a-z_][a-z0-9_]*)\s*:")


@cache
def settings() -> tuple[Setting, ...]:
    """Every ServerConfig field with its comment and group, in field order.

    The comment right above a field documents it; each field has its own. Read from the
    source: knowledge lives in one place. Without the source (a bytecode-only install) the
    docs are empty.
    """
    try:
        lines = inspect.getsource(ServerConfig).splitlines()
    except (OSError, TypeError):
        lines = []
    docs: dict[str, tuple[str, str]] = {}
    section, pending = GENERAL_SECTION, list[str]()
    for line in (raw.strip() for raw in lines):
        heading = _SECTION_RE.fullmatch(line)
        field_match = _FIELD_RE.match(line)
        if heading:
            title = re.sub(r"\s*\(.*?\)", "", heading.group(1)).strip()
            section, pending = title[:1].upper() + title[1:], []
        elif line.startswith("#"):
            pending.append(line.lstrip("#").strip())
        else:
            if field_match and not line.startswith(("def ", "class ")):
                docs[field_match.group(1)] = (section, " ".join(pending))
            pending = []
    defaults = ServerConfig()
    return tuple(
        Setting(f.name, *docs.get(f.name, (GENERAL_SECTION, "")), getattr(defaults, f.name))
        for f in fields(ServerConfig)
    )


# Settings whose value may be a secret, or points at one (a private key): `prebake config
# show` prints only whether they are set. By name, so that a new `*_token` or `*_secret`
# setting is covered without a list to update.
_SECRET_RE = re.compile(r"token|secret|password|credential|(^|_)key$")


def is_secret(name: str) -> bool:
    return bool(_SECRET_RE.search(name))


@dataclass(frozen=True)
class Source:
    """Where a setting's value came from: layer "default", "file" (`origin`: its path),
    "env" (the variable) or "flag" (the field name; the CLI knows the flag's spelling)."""

    layer: str
    origin: str = ""


def load_server_config(
    flags: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> ServerConfig:
    """Merge flags (None means not given), environment and file into a ServerConfig.

    Raises ValueError with a readable message for unknown file keys or bad values.
    """
    return load_server_config_with_sources(flags, environ, config_file)[0]


def load_server_config_with_sources(
    flags: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> tuple[ServerConfig, dict[str, Source]]:
    """`load_server_config`, and where each field's value came from."""
    environ = os.environ if environ is None else environ
    names = {f.name for f in fields(ServerConfig)}
    merged: dict[str, Any] = {}
    sources = {name: Source("default") for name in names}
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
        sources.update({k: Source("file", str(file_path)) for k in section})
    for name in names:
        env_value = environ.get(_ENV_PREFIX + name.upper())
        if env_value is not None and env_value != "":
            merged[name] = _coerce(name, env_value)
            sources[name] = Source("env", _ENV_PREFIX + name.upper())
    for name, value in flags.items():
        if value is not None:
            if name not in names:
                raise ValueError(f"unknown server setting {name!r}")
            merged[name] = _coerce(name, value)
            sources[name] = Source("flag", name)
    config = ServerConfig(**merged)
    _check(config)
    return config, sources


def _check(config: ServerConfig) -> None:
    """ValueError for settings that cannot work together or cannot be used."""
    from prebake.server.key_normalization import DEFAULT_TOOLCHAINS

    # Refused now, readably, rather than when the server opens them.
    parse_default_toolchains(config.default_toolchains, DEFAULT_TOOLCHAINS)
    parse_store(config.store)
    parse_registry(config.registry)
    if config.integrity_sweep_seconds < 0 or config.integrity_sweep_bytes_per_second < 0:
        raise ValueError(
            "integrity_sweep_seconds and integrity_sweep_bytes_per_second must be >= 0 (0: off / unlimited)"
        )
    check_tls(config)
    check_log_settings(config.log_format, config.log_level)
    check_metrics(config)
    from prebake.server.model_sources import ModelSources

    ModelSources.from_config(config.model_source_roots, config.model_source_map, config.data_dir)
    check_gc_settings(config)
    check_signing(config)
    check_limits(config)
    if config.blob_http_listen and (config.tls_cert or parse_store(config.store) is not None):
        raise ValueError(
            "blob_http_listen serves blobs on local disk over plain HTTP: not with tls_cert "
            "(downloads would leave TLS) nor with an s3:// store (S3 presigns its own URLs)"
        )
    if config.processes < 1:
        raise ValueError(f"processes must be at least 1, got {config.processes}")
    if config.price_table_file:
        from prebake.server.price_table import load_price_table

        try:
            load_price_table(Path(config.price_table_file))
        except OSError as exc:
            raise ValueError(f"price_table_file {config.price_table_file}: {exc.strerror or exc}") from None


def check_tls(config: ServerConfig) -> None:
    """ValueError unless the TLS settings make sense together (files are read at start-up)."""
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ValueError("tls_cert and tls_key go together: give both (PEM files) or neither")
    if config.tls_client_ca and not config.tls_cert:
        raise ValueError("tls_client_ca (mutual TLS) needs TLS: give tls_cert and tls_key too")


def check_metrics(config: ServerConfig) -> None:
    """ValueError unless metrics_listen is "" or HOST:PORT and the sampling interval is positive."""
    if config.metrics_listen:
        host, sep, port = config.metrics_listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(
                f"metrics_listen {config.metrics_listen!r}: expected HOST:PORT (e.g. 127.0.0.1:9100; "
                "port 0 picks a free one), or empty for no metrics listener"
            )
    if not 0 < config.status_sample_seconds < float("inf"):
        raise ValueError(f"status_sample_seconds is {config.status_sample_seconds}; expected a number > 0")


def check_gc_settings(config: ServerConfig) -> None:
    """ValueError naming the setting if the garbage-collection settings are inconsistent."""
    for name in (
        "unreferenced_blob_grace_seconds",
        "quarantine_grace_seconds",
        "eviction_protect_seconds",
        "gc_interval_seconds",
    ):
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(config, name)}")
    low, high = config.eviction_low_water, config.eviction_high_water
    if not 0 <= low <= high <= 1:
        raise ValueError(
            f"eviction_low_water ({low}) and eviction_high_water ({high}) must satisfy "
            "0 <= low <= high <= 1 (fractions of max_store_bytes)"
        )


def check_signing(config: ServerConfig) -> None:
    """ValueError unless the signing settings can be used (key files readable, ids well-formed)."""
    from prebake.core.errors import PrebakeError
    from prebake.server.signatures import signature_policy

    signature_policy(config)
    if config.signing_key:
        from prebake.core.signing import SigningKey

        try:
            SigningKey.load(config.signing_key)
        except PrebakeError as exc:
            raise ValueError(f"signing_key: {exc}") from None


def check_limits(config: ServerConfig) -> None:
    """ValueError for abuse limits that cannot work (see the fields' comments)."""
    if config.max_request_bytes < 1024:
        raise ValueError(f"max_request_bytes is {config.max_request_bytes}; at least 1024 (1 KiB)")
    for name in ("job_create_burst", "upload_start_burst"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} is {getattr(config, name)}; at least 1")
    for name in (
        "job_create_per_minute",
        "upload_start_per_minute",
        "max_uploads",
        "max_uploads_per_caller",
        "upload_idle_seconds",
    ):
        value = getattr(config, name)
        if not value >= 0 or value == float("inf"):
            raise ValueError(f"{name} is {value}; expected a finite number >= 0 (0: no limit)")


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
    try:
        if prefix == raw:
            raise InvalidArgument(f"it does not start with {DYNAMODB_SCHEME}")
        return validate_table_prefix(prefix)
    except InvalidArgument as exc:
        raise ValueError(
            f"registry {raw!r}: expected {DYNAMODB_SCHEME}TABLE_PREFIX ({exc}), or empty for SQLite "
            "under data_dir"
        ) from None
