"""The revision of a model checkpoint directory: a digest of its files' names and contents.

A key's `model_revision` must change whenever the weights change. For a checkpoint that
has no commit hash (a local directory) the revision is computed from the files themselves,
so the thin client (`--model-source PATH` without `--revision`) and a compile worker that
reads the same bytes agree on it. Stdlib + `prebake.core.digests` only: the client must
not depend on torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePath

from prebake.core.digests import hash_bytes, hash_file

# Part of the hashed document: a change of the recipe must change every revision, never
# silently collide with revisions computed the old way.
REVISION_SCHEME = "prebake-model-revision-v1"
# Every Hugging Face checkpoint has one at its root; a source without it is not a checkpoint.
CONFIG_FILE = "config.json"


def is_checkpoint_path(rel: PurePath) -> bool:
    """Whether a file at `rel` (relative to the checkpoint's root) is part of the checkpoint.

    Hidden files are not: any path component starting with "." (`.git/`, `.cache/` left by
    `huggingface_hub`, editor files). The one rule for local directories and S3 prefixes.
    """
    return not any(part.startswith(".") for part in rel.parts)


def checkpoint_files(root: Path) -> list[Path]:
    """Every regular, non-hidden file under `root`, relative to it, sorted by posix path.

    Hidden files (`is_checkpoint_path`) are not part of the model. Symlinks to files
    are followed (a Hugging Face cache snapshot is all symlinks to blobs, and what counts is
    the content); symlinked directories are not descended into, so a link cycle cannot loop.
    """
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        # Prune hidden directories in place so os.walk does not descend into them.
        dirnames[:] = [d for d in dirnames if is_checkpoint_path(PurePath(d))]
        for name in filenames:
            path = base / name
            rel = path.relative_to(root)
            if is_checkpoint_path(rel) and path.is_file():
                found.append(rel)
    return sorted(found, key=lambda p: p.as_posix())


def revision_of(path: Path) -> str:
    """The xxh3-128 hex digest (32 characters) of the checkpoint directory `path`.

    Hashes the sorted list of (relative posix path, xxh3-128 of the content, size) of the
    files `checkpoint_files` selects. Identical bytes under identical names give an
    identical revision wherever the directory lives; changing, adding, removing or renaming
    a non-hidden file gives a new one. File times and permissions do not count.
    Raises NotADirectoryError if `path` is not a directory, ValueError if it holds no files.
    """
    if not path.is_dir():
        raise NotADirectoryError(f"model source {path} is not a directory")
    entries: list[list[str | int]] = []
    for rel in checkpoint_files(path):
        digest, size = hash_file(path / rel)
        entries.append([rel.as_posix(), digest, size])
    if not entries:
        raise ValueError(f"model source {path} holds no files")
    # JSON keeps the encoding unambiguous whatever characters the names contain.
    document = json.dumps({"scheme": REVISION_SCHEME, "files": entries}, separators=(",", ":"))
    return hash_bytes(document.encode())
