"""Model sources: where a compile job reads the Hugging Face checkpoint it compiles.

A model source is a local checkpoint directory or an `s3://BUCKET/PREFIX` holding one.
Nothing is ever fetched from a model hub. An S3 source is listed, checked against the
key's revision and downloaded by the worker, into the cache under its work directory
(`s3_model_source`, `model_cache`); the compile then runs on that local copy. `revision_of`
lives in the thin client (which computes revisions for `--model-source PATH` without
torch) and is re-exported here; the S3 revision is `prebake.client.s3_model_revision`'s.
"""

from __future__ import annotations

import re
from pathlib import Path

from prebake.client.model_revision import CONFIG_FILE, checkpoint_files, revision_of
from prebake.compiler.backend import CompileError
from prebake.compiler.model_cache import DownloadCache, recorded_revision
from prebake.core.s3_urls import is_s3_url

__all__ = [
    "DownloadCache",
    "checked_source",
    "checkpoint_files",
    "resolve_model_source",
    "revision_of",
    "source_revision",
]

# What `revision_of` and the S3 revision compute (a git commit hash has 40 hex digits, so
# it is not checked).
CONTENT_REVISION_RE = re.compile(r"[0-9a-f]{32}")
# What the `aws` extra installs; without them, this worker cannot read S3.
_AWS_MODULES = ("boto3", "botocore", "s3transfer")


def resolve_model_source(source: str, cache: DownloadCache | None = None) -> Path:
    """The local checkpoint directory that `source` names, resolved to an absolute path.

    A local source: raises ValueError with an actionable message if `source` is empty, does
    not exist, is not a directory or has no config.json (not a Hugging Face checkpoint).
    Other URL schemes (a hub id such as `meta-llama/Meta-Llama-3-8B` is just a missing
    directory) are rejected rather than downloaded.

    An `s3://` source is downloaded into `cache` (unless its revision is there already) and
    its copy returned, without a revision check (`checked_source` makes one); problems are
    CompileErrors as `checked_source` describes. Without a cache, ValueError.
    """
    text = source.strip()
    if not text:
        raise ValueError("model source is empty; give a local checkpoint directory or an s3:// prefix")
    if is_s3_url(text):
        return checked_source(text, "", cache)
    if "://" in text:
        raise ValueError(f"model source {text!r}: only local directories and s3:// prefixes are supported")
    path = Path(text).expanduser().resolve()
    if not path.exists():
        raise ValueError(
            f"model source {path} does not exist (model sources are local checkpoint directories "
            "or s3:// prefixes; nothing is downloaded from a model hub)"
        )
    if not path.is_dir():
        raise ValueError(f"model source {path} is not a directory")
    if not (path / CONFIG_FILE).is_file():
        raise ValueError(f"model source {path} has no {CONFIG_FILE}; it is not a Hugging Face checkpoint")
    return path


def source_revision(path: Path) -> str:
    """The content revision of the local checkpoint `path`: that of the S3 source it is an
    intact cached copy of (see `model_cache.recorded_revision`; no hashing), else `revision_of`."""
    return recorded_revision(path) or revision_of(path)


def revision_mismatch(source: object, actual: str, revision: str) -> CompileError:
    """The deterministic failure of a source whose revision is not the key's."""
    return CompileError(
        f"model source {source} has revision {actual}, not the key's model_revision {revision}: "
        "the checkpoint changed since the key was made; look it up again with the new revision",
        True,
    )


def checked_source(source: Path | str, revision: str, cache: DownloadCache | None = None) -> Path:
    """The resolved model source, verified against the key's revision when it is a content digest.

    If the source no longer has the 32-hex-digit revision, the checkpoint changed after the
    key was made, and an artifact built from it would be published under the wrong
    revision. A local directory is hashed (`source_revision`). An `s3://` source is listed
    and its revision compared before anything is downloaded into `cache`; the local copy is
    returned (see `s3_model_source`).

    Every problem is a CompileError: deterministic for the source's own (missing, not a
    checkpoint, access denied, another revision); transient for S3 being unreachable or
    throttling, no AWS credentials or no boto3 on this worker, and local disk errors.
    """
    text = str(source)
    if is_s3_url(text):
        if cache is None:
            raise CompileError(
                f"model source {text}: s3:// sources are read by workers, into their download cache", True
            )
        try:
            from prebake.compiler.s3_model_source import checked_s3_source
        except ImportError as exc:
            if exc.name not in _AWS_MODULES:
                raise
            # Another worker (one with the aws extra) can read it: worth another attempt.
            raise CompileError(
                f"this worker cannot read the s3:// model source {text}: boto3 is not installed "
                "(install prebake[aws])",
                False,
            ) from None
        return checked_s3_source(text, revision, cache)
    try:
        path = resolve_model_source(text)
    except ValueError as exc:
        raise CompileError(str(exc), True) from exc
    if CONTENT_REVISION_RE.fullmatch(revision):
        actual = source_revision(path)
        if actual != revision:
            raise revision_mismatch(path, actual, revision)
    return path
