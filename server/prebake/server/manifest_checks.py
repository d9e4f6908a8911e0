"""Manifest path validation for the server: `prebake.core.manifest_paths` with domain errors.

The rules live in the client module so both sides enforce the same ones; this wrapper
only turns `UnsafePath` into `InvalidArgument`, which the gRPC layer maps to
INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from prebake.core import manifest_paths as _rules
from prebake.core.manifest_paths import MAX_COMPONENT_BYTES, MAX_FILES, MAX_PATH_BYTES, UnsafePath
from prebake.server.errors import InvalidArgument

__all__ = [
    "MAX_COMPONENT_BYTES",
    "MAX_FILES",
    "MAX_PATH_BYTES",
    "check_path",
    "safe_join",
    "validate_manifest_paths",
]


def check_path(path: str) -> None:
    """Raise InvalidArgument unless `path` is a safe manifest path (see `prebake.core.manifest_paths`)."""
    try:
        _rules.check_path(path)
    except UnsafePath as exc:
        raise InvalidArgument(str(exc)) from None


def validate_manifest_paths(paths: Sequence[str], max_files: int = MAX_FILES) -> None:
    """Raise InvalidArgument unless `paths` form a valid artifact file list.

    1..max_files safe paths, no duplicates, no path both a file and a directory.
    """
    try:
        _rules.validate_manifest_paths(paths, max_files)
    except UnsafePath as exc:
        raise InvalidArgument(str(exc)) from None


def safe_join(root: Path, rel: str) -> Path:
    """`root / rel`, guaranteed inside `root`; raises InvalidArgument for an unsafe `rel`."""
    try:
        return _rules.safe_join(root, rel)
    except UnsafePath as exc:
        raise InvalidArgument(str(exc)) from None
