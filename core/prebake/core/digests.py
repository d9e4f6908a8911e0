"""xxh3-128 digests of bytes and files, the identity of every blob.

Used by the client to name what it uploads and to verify what it downloads, and by
the server to verify what it stores.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import xxhash

CHUNK = 1 << 20
HASH_RE = re.compile(r"^[0-9a-f]{32}$")
# What HASH_RE accepts, for people (and callers in other languages; `Digest.hash` in
# blobs.proto says the same): xxhash's hexdigest is exactly this form.
HASH_FORMAT = (
    "xxh3-128 (seed 0) as exactly 32 lowercase hex digits, the 128-bit value big-endian "
    "and zero-padded on the left"
)


def hash_problem(text: str) -> str | None:
    """None if `text` is a well-formed digest hash, else what is wrong with it and the format."""
    if HASH_RE.match(text):
        return None
    shown = repr(text if len(text) <= 80 else text[:80] + "...")
    if len(text) != 32:
        what = f"has {len(text)} characters"
    elif re.fullmatch(r"[0-9a-fA-F]{32}", text):
        what = "has upper-case digits"
    else:
        what = "has characters that are not hex digits"
    return f"{shown} {what}; a digest hash is {HASH_FORMAT}"


def new_hasher() -> xxhash.xxh3_128:
    return xxhash.xxh3_128()


def hash_bytes(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def manifest_digest(files: Iterable[tuple[str, str, int, bool]]) -> str:
    """xxh3-128 of a canonical file list, each file `(path, hash, size, executable)`.

    The text hashed is `[[path, hash, size, executable], ...]` sorted by path, as compact
    JSON (UTF-8, no whitespace, non-ASCII kept); the order of `files` does not matter. The
    server stores it as an artifact's `manifest_digest`; a signature covers it
    (`prebake.core.signing`), and a verifying client recomputes it from the files it got.
    """
    entries = [[path, hash_, size, executable] for path, hash_, size, executable in sorted(files)]
    return hash_bytes(json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def hash_file(path: Path, limit: int | None = None) -> tuple[str, int]:
    """Return (xxh3-128 hex, size) of a file, or of its first `limit` bytes."""
    hasher = xxhash.xxh3_128()
    size = 0
    with open(path, "rb") as f:
        while limit is None or size < limit:
            want = CHUNK if limit is None else min(CHUNK, limit - size)
            chunk = f.read(want)
            if not chunk:
                break
            hasher.update(chunk)
            size += len(chunk)
    return hasher.hexdigest(), size


def seed_hasher(path: Path, length: int) -> xxhash.xxh3_128:
    """A hasher that has already consumed the first `length` bytes of `path` (for resumes)."""
    hasher = xxhash.xxh3_128()
    remaining = length
    with open(path, "rb") as f:
        while remaining > 0:
            chunk = f.read(min(CHUNK, remaining))
            if not chunk:
                raise ValueError(f"{path} is shorter than {length} bytes")
            hasher.update(chunk)
            remaining -= len(chunk)
    return hasher
