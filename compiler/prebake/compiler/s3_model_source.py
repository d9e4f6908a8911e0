"""Reading `s3://BUCKET/PREFIX` model sources on a worker: list, check, download into the cache.

`checked_s3_source(url, revision, cache)` lists the checkpoint (one paginated call, see
`prebake.client.s3_model_revision` for the revision and which objects count), compares its
revision with the key's before anything is downloaded, and returns the local copy in the
worker's `DownloadCache`: taken as it is when the revision is cached (nothing downloaded),
else downloaded into staging with boto3's managed transfer (at most MAX_CONCURRENCY
requests in flight; every GET carries `If-Match` with the listed ETag, so the bytes are the
ones the revision names), each file's size checked, the marker written, and renamed into
place (model_cache.py).

Every failure is a CompileError: deterministic for what only the source's owner can fix
(missing bucket or prefix, no config.json, access denied, another revision than the key's,
an object that changed while it was downloaded); transient for what may pass or what
another worker may not suffer (S3 unreachable, throttling, 5xx, no credentials here, a
short download, local disk errors). Messages never hold a credential.

The only compiler module that imports boto3; `model_source` imports it lazily, so a worker
without the `aws` extra still serves local model sources. Thread-safe (boto3 clients are);
concurrent fetches of one revision in processes sharing a work dir are safe (model_cache).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3.s3.transfer
from botocore.exceptions import BotoCoreError, ClientError
from s3transfer.exceptions import RetriesExceededError, S3DownloadFailedError
from s3transfer.futures import TransferFuture
from s3transfer.subscribers import BaseSubscriber

from prebake.client.s3_model_revision import (
    S3Checkpoint,
    SourceObject,
    changed_since_listed,
    list_checkpoint,
    s3_client,
    s3_error,
)
from prebake.compiler.backend import CompileError
from prebake.compiler.model_cache import DownloadCache, cached, install, write_marker
from prebake.compiler.model_source import CONTENT_REVISION_RE, revision_mismatch
from prebake.core.errors import PrebakeError, Unavailable
from prebake.core.s3_urls import parse_s3_url

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger("prebake.worker")

# Requests in flight per download (parts of big files, several small files at once).
MAX_CONCURRENCY = 8


def compile_error(exc: PrebakeError) -> CompileError:
    """`exc` as a CompileError: transient if it is `Unavailable`, else deterministic."""
    return CompileError(str(exc), not isinstance(exc, Unavailable))


def checked_s3_source(url: str, revision: str, cache: DownloadCache, s3: S3Client | None = None) -> Path:
    """The local copy of the checkpoint at `url`, whose revision must be `revision` if that
    is a content digest (32 hex digits; other revisions, such as commit hashes, are not
    checked). Raises CompileError (see the module docstring)."""
    try:
        client = s3 if s3 is not None else s3_client()
        checkpoint = list_checkpoint(parse_s3_url(url, "model source"), client)
    except PrebakeError as exc:
        raise compile_error(exc) from None
    actual = checkpoint.revision
    if CONTENT_REVISION_RE.fullmatch(revision) and actual != revision:
        raise revision_mismatch(checkpoint.location, actual, revision)
    return fetch(checkpoint, cache, client)


def fetch(checkpoint: S3Checkpoint, cache: DownloadCache, s3: S3Client) -> Path:
    """The cache entry of `checkpoint`, downloaded first unless its revision is cached."""
    revision = checkpoint.revision
    hit = cached(cache, revision)
    if hit is not None:
        log.info("model source %s: revision %s is cached in %s", checkpoint.location, revision, hit)
        return hit
    staged = cache.staging / f"s3-{revision}"
    shutil.rmtree(staged, ignore_errors=True)
    started = time.monotonic()
    try:
        staged.mkdir(parents=True)
        _download(checkpoint, staged, s3)
        write_marker(staged, checkpoint)
        entry = install(cache, staged, revision)
    except OSError as exc:
        # This worker's disk, not the source: another worker (or a later attempt) may do.
        raise CompileError(
            f"cannot store model source {checkpoint.location} under {cache.root}: {exc}", False
        ) from None
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    log.info(
        "model source %s: downloaded %d files (%d bytes) in %.1f s into %s",
        checkpoint.location,
        len(checkpoint.objects),
        checkpoint.total_size,
        time.monotonic() - started,
        entry,
    )
    return entry


def _download(checkpoint: S3Checkpoint, into: Path, s3: S3Client) -> None:
    """Every object of `checkpoint` into `into`, its sizes checked. Raises CompileError.

    Every GET carries `If-Match` with the listed ETag, so the bytes are those the revision
    names or the download fails (412). s3transfer sends If-Match with the ETag it is given
    only on its ranged path, so every non-empty object takes that path (threshold 1 byte);
    empty objects need no GET at all (S3 refuses a range on them).
    """
    config = boto3.s3.transfer.TransferConfig(multipart_threshold=1, max_concurrency=MAX_CONCURRENCY)
    location = checkpoint.location
    pending = []
    try:
        with boto3.s3.transfer.create_transfer_manager(s3, config) as manager:
            for obj in checkpoint.objects:
                dest = into / obj.path
                dest.parent.mkdir(parents=True, exist_ok=True)
                if obj.size == 0:
                    dest.touch()
                    continue
                future = manager.download(
                    location.bucket, checkpoint.key(obj), str(dest), subscribers=[_Listed(obj)]
                )
                pending.append(future)
            for future in pending:
                future.result()
    except (ClientError, BotoCoreError) as exc:
        raise compile_error(s3_error(exc, location, s3.meta.endpoint_url, "download")) from None
    except S3DownloadFailedError:  # s3transfer's word for a GET refused by If-Match
        raise compile_error(changed_since_listed(location, "download", "PreconditionFailed")) from None
    except RetriesExceededError as exc:
        failure = type(exc.last_exception).__name__
        raise CompileError(
            f"cannot download model source {location}: reads kept failing ({failure}); "
            "the download will be retried",
            False,
        ) from None
    for obj in checkpoint.objects:
        size = (into / obj.path).stat().st_size
        if size != obj.size:
            raise CompileError(
                f"model source {location}: {obj.path} arrived with {size} bytes, "
                f"S3 listed {obj.size}; the download will be retried",
                False,
            )


class _Listed(BaseSubscriber):
    """Gives the transfer the object's size and ETag from the listing: no HeadObject, and
    If-Match with the listed ETag on every GET."""

    def __init__(self, obj: SourceObject) -> None:
        self.obj = obj

    def on_queued(self, future: TransferFuture, **kwargs: Any) -> None:
        future.meta.provide_transfer_size(self.obj.size)
        future.meta.provide_object_etag(f'"{self.obj.etag}"')
