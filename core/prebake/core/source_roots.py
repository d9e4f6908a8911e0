"""Whether a model source lies inside a set of allowed roots: local directories and
`s3://` prefixes. Shared by the server (its policy, `prebake.server.model_sources`) and
workers (which re-check a local source before reading it), so both decide alike.

Two checks for a local path, both needed:

* lexical (`lexical_path`, `lexically_within`): an absolute path with no `..` component,
  normalised, under a root. Decided on the text alone, so it reveals nothing about the
  file system.
* real (`really_within`): the path with every symbolic link resolved still lies under a
  root with its links resolved (a link inside a root pointing out of it is an escape).
  Decided with `os.path.realpath(strict=False)`, which follows the links that exist and
  keeps the rest of the path as text, so a path outside the roots is outside whether or
  not it exists.

An S3 source is inside a prefix when its bucket is the prefix's and its key prefix
starts with the prefix's whole segments (`s3://b/models` admits `s3://b/models/llama`,
not `s3://b/models-private`). Pure functions; thread-safe.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from prebake.core.s3_urls import S3Location


def lexical_path(text: str) -> str | None:
    """`text` as a normalised absolute path, or None if it is relative or has a `..`
    component (refused rather than normalised away: `a/link/..` is not `a` on disk)."""
    if not os.path.isabs(text) or ".." in text.replace("\\", "/").split("/"):
        return None
    return os.path.normpath(text)


def lexically_within(path: str, roots: Iterable[str]) -> bool:
    """Whether the normalised absolute `path` is one of `roots` or below one."""
    return any(_below(path, os.path.normpath(root)) for root in roots)


def really_within(path: str, roots: Iterable[str]) -> bool:
    """Whether `path` with its symbolic links resolved lies under one of `roots` with theirs
    resolved. Reads the file system (lstat/readlink of the path's components)."""
    real = os.path.realpath(path)
    return any(_below(real, os.path.realpath(root)) for root in roots)


def s3_within(location: S3Location, prefixes: Iterable[S3Location]) -> bool:
    """Whether `location` is one of `prefixes` or under one (whole segments)."""
    return any(location.bucket == p.bucket and location.prefix.startswith(p.prefix) for p in prefixes)


def _below(path: str, root: str) -> bool:
    return path == root or path.startswith(root if root.endswith(os.sep) else root + os.sep)
