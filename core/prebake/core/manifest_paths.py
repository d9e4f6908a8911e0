"""Validation of artifact manifest paths, shared by the client and the server.

A manifest path names one file relative to the artifact root, in normalised POSIX form
("config.json", "neff/model.neff"). The server refuses to publish anything else, and the
client checks every path again before writing a downloaded file, so a hostile or broken
manifest can never make either side touch a file outside the artifact root.

`UnsafePath` is an `InvalidArgument`: on the server it answers INVALID_ARGUMENT as is;
the client, which checks manifests it received, re-raises it as `UnsafeManifest`.
Stdlib and `prebake.core` only: the thin client imports this module.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from prebake.core.errors import InvalidArgument
from prebake.core.text_safety import first_invisible

MAX_FILES = 100_000
MAX_COMPONENT_BYTES = 255  # NAME_MAX on Linux and most file systems
MAX_PATH_BYTES = 1024
# "C:x" is relative on POSIX but names another drive on Windows, where the client may run.
_DRIVE_RE = re.compile(r"^[A-Za-z]:")


class UnsafePath(InvalidArgument):
    """A manifest path (or list of paths) that must not be written or published."""


def check_path(path: str) -> None:
    """Raise UnsafePath unless `path` is a normalised relative POSIX path inside the root.

    Refused: empty paths, absolute paths (and Windows drive paths), backslashes, NUL and
    every other invisible character (`text_safety.INVISIBLE_CATEGORIES`: controls,
    bidirectional overrides and isolates, zero-width characters, line and paragraph
    separators), so that a name always displays as what it is; "", "." and ".."
    components, a component over 255 UTF-8 bytes and a path over 1024 UTF-8 bytes.
    """
    if not isinstance(path, str) or not path:
        raise UnsafePath("a manifest path is empty")
    shown = _show(path)
    bad = first_invisible(path)
    if bad is not None:
        raise UnsafePath(
            f"path {shown} contains {bad!r}; control, format (bidirectional, zero-width) and "
            "separator characters are not allowed"
        )
    if "\\" in path:
        raise UnsafePath(f"path {shown} contains a backslash; manifest paths use '/' as separator")
    if path.startswith("/") or _DRIVE_RE.match(path):
        raise UnsafePath(f"path {shown} is absolute; manifest paths are relative to the artifact root")
    if len(path.encode()) > MAX_PATH_BYTES:
        raise UnsafePath(f"path {shown} is longer than {MAX_PATH_BYTES} bytes")
    parts = path.split("/")
    depth = 0
    for part in parts:
        if part == "..":
            depth -= 1
            if depth < 0:
                raise UnsafePath(f"path {shown} escapes the artifact root")
        elif part not in ("", "."):
            depth += 1
    if ".." in parts or "." in parts or "" in parts:
        normal = "/".join(p for p in parts if p not in ("", "."))
        raise UnsafePath(
            f"path {shown} is not normalised (empty, '.' or '..' component); "
            f"manifest paths look like {normal or 'dir/file'!r}"
        )
    for part in parts:
        if len(part.encode()) > MAX_COMPONENT_BYTES:
            raise UnsafePath(f"path {shown} has a component longer than {MAX_COMPONENT_BYTES} bytes")


def validate_manifest_paths(paths: Sequence[str], max_files: int = MAX_FILES) -> None:
    """Raise UnsafePath unless `paths` can be written together as one artifact.

    Every path must pass `check_path`; there must be 1..max_files of them, no duplicates,
    and no path may be both a file and a directory of another ("a" and "a/b").
    """
    if isinstance(paths, str):
        raise TypeError("validate_manifest_paths takes a sequence of paths, not one string")
    if not paths:
        raise UnsafePath("an artifact needs at least one file")
    if len(paths) > max_files:
        raise UnsafePath(f"an artifact has {len(paths)} files; the limit is {max_files}")
    files: set[str] = set()
    for path in paths:
        check_path(path)
        if path in files:
            raise UnsafePath(f"path {_show(path)} is listed twice")
        files.add(path)
    for path in paths:
        # Every proper prefix ending at a "/" is a directory this path needs.
        for end in (i for i, c in enumerate(path) if c == "/"):
            if path[:end] in files:
                raise UnsafePath(
                    f"path {_show(path[:end])} is both a file and a directory (of {_show(path)})"
                )


def safe_join(root: Path, rel: str) -> Path:
    """`root / rel` after checking `rel` with `check_path`; raises UnsafePath otherwise.

    Also resolves symbolic links already on disk and refuses a result outside `root`
    (e.g. when `root/a` is a link to /etc). This guards against links that exist when it is
    called, not against another process replacing directories concurrently.
    """
    check_path(rel)
    joined = root / rel
    if not joined.resolve().is_relative_to(root.resolve()):
        raise UnsafePath(f"path {_show(rel)} leads outside {str(root)!r} through a symbolic link")
    return joined


def _show(path: str, limit: int = 120) -> str:
    """`path` quoted for an error message, shortened so a huge path cannot flood a log."""
    return repr(path if len(path) <= limit else f"{path[:limit]}...")
