"""Which registry and blob backends a configuration names, opened: the one place that decides.

`store` "" is local disk under `data_dir/cas`, `s3://BUCKET/PREFIX` is S3; `registry` "" is
SQLite at `data_dir/registry.sqlite3`, `dynamodb://TABLE_PREFIX` is DynamoDB. Any combination
is valid. Every combination gets the manifest archive (`storage.archived_index`): each
artifact's manifest is kept as an object in the blob store, so `prebake reindex` can rebuild
the registry from the blobs' store alone.

The AWS backends are imported only when named, so an installation without the `aws` extra
runs the embedded default and is told what to install when it asks for more. Endpoint, region
and credentials come from boto3's standard sources only.

Errors: `FailedPrecondition` for a missing extra, a missing bucket or tables (with the fix),
`Unavailable` when S3 or DynamoDB cannot be reached, `ValueError` for a malformed setting (as
`load_server_config` reports it).
"""

from __future__ import annotations

import importlib
from dataclasses import replace
from types import ModuleType
from typing import Any

from prebake.core.errors import FailedPrecondition
from prebake.server.blobs import ContentAddressedStore, LocalObjectStore, ObjectStore
from prebake.server.config import ServerConfig, parse_registry, parse_store
from prebake.server.registry_url import SCHEME as DYNAMODB_SCHEME
from prebake.server.storage.archived_index import ArchivedArtifactIndex
from prebake.server.storage.bundle import Storage
from prebake.server.storage.hit_cache import CachedArtifactIndex

AWS_HINT = "pip install 'prebake[aws]'"
REGISTRY_FILE = "registry.sqlite3"
BLOBS_DIR = "cas"


def _aws_module(name: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or name
        if missing.partition(".")[0] == "prebake":
            raise FailedPrecondition(
                f"{what} is not part of this prebake installation (no module {missing}); "
                "install a prebake version that has it"
            ) from None
        raise FailedPrecondition(
            f"{what} needs the AWS extra: {AWS_HINT} (missing module {missing})"
        ) from None


def keeps_local_state(config: ServerConfig) -> bool:
    """Whether the registry or the blobs live under `data_dir`: then one server per data dir
    (`data_dir_lock`). With both remote the server is stateless and any number of replicas may
    share one data dir, which then only holds the embedded workers' scratch space (`work/`,
    itself safe to share)."""
    return parse_store(config.store) is None or parse_registry(config.registry) is None


def describe(config: ServerConfig) -> str:
    """Where the registry and the blobs are, for start-up messages."""
    registry = config.registry.strip() or f"sqlite {config.data_dir.resolve() / REGISTRY_FILE}"
    store = config.store.strip() or f"{config.data_dir.resolve() / BLOBS_DIR}"
    return f"registry {registry}, blobs {store}"


def open_s3(config: ServerConfig) -> tuple[ObjectStore, str]:
    """The configured S3 object store, its bucket checked (one request), and the check's
    description of it ("s3://b/p/ in region r (endpoint e)"); the store must be S3."""
    location = parse_store(config.store)
    if location is None:
        raise ValueError("the store is local disk, not s3://")
    s3 = _aws_module("prebake.server.blobs.s3_objects", "an s3:// store")
    store: Any = s3.open_s3_store(str(location))
    checked: str = store.check_bucket()
    objects: ObjectStore = store
    return objects, checked


def open_object_store(config: ServerConfig) -> ObjectStore:
    """The object store blobs and archived manifests live in; an S3 bucket is checked first."""
    if parse_store(config.store) is None:
        config.data_dir.mkdir(parents=True, exist_ok=True)
        return LocalObjectStore(config.data_dir / BLOBS_DIR)
    objects, _ = open_s3(config)
    return objects


def open_blob_store(config: ServerConfig, objects: ObjectStore) -> ContentAddressedStore:
    return ContentAddressedStore(
        objects, max_blob_bytes=config.max_blob_bytes, max_store_bytes=config.max_store_bytes
    )


def open_registry(config: ServerConfig) -> Storage:
    """The registry's storage as the engine offers it, without the manifest archive (`reindex`
    restores into this: the manifests it reads are the archive)."""
    prefix = parse_registry(config.registry)
    if prefix is None:
        from prebake.server.storage.sqlite import open_sqlite

        config.data_dir.mkdir(parents=True, exist_ok=True)
        return open_sqlite(config.data_dir / REGISTRY_FILE)
    dynamodb = _aws_module("prebake.server.storage.dynamodb", f"a {DYNAMODB_SCHEME} registry")
    storage: Storage = dynamodb.open_dynamodb(prefix)
    return storage


def archived(storage: Storage, objects: ObjectStore) -> Storage:
    """`storage` whose artifact index keeps the manifest archive in `objects`."""
    return replace(storage, artifacts=ArchivedArtifactIndex(storage.artifacts, objects))


def open_storage(config: ServerConfig, objects: ObjectStore) -> Storage:
    """The registry a server uses: the configured engine, archiving manifests in `objects`, and
    with a shared (DynamoDB) registry the replica's hit cache in front (`hit_cache_seconds`)."""
    storage = archived(open_registry(config), objects)
    if parse_registry(config.registry) is None or config.hit_cache_seconds <= 0:
        return storage  # SQLite: a hit is one local point read; nothing to save
    return replace(storage, artifacts=CachedArtifactIndex(storage.artifacts, config.hit_cache_seconds))


def open_backends(config: ServerConfig) -> tuple[Storage, ContentAddressedStore]:
    """Everything a server stores in: the registry (archiving) and the blob store.

    The bucket is checked before the registry is opened, so a wrong store fails fast.
    """
    objects = open_object_store(config)
    blobs = open_blob_store(config, objects)
    return open_storage(config, objects), blobs


def create_tables(config: ServerConfig) -> list[tuple[str, str]]:
    """Create the DynamoDB tables of the configured registry if missing: (table, "created" |
    "exists") each. Idempotent; the registry must be DynamoDB."""
    prefix = parse_registry(config.registry)
    if prefix is None:
        raise ValueError(f"the registry is SQLite (created on start-up), not {DYNAMODB_SCHEME}")
    dynamodb = _aws_module("prebake.server.storage.dynamodb", f"a {DYNAMODB_SCHEME} registry")
    made: list[tuple[str, str]] = dynamodb.create_tables(prefix)
    return made
