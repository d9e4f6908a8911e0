"""Model sources: where a compile job reads the Hugging Face checkpoint it compiles.

A model source is a local directory (today) or an `s3://` prefix (with the S3 backend).
Nothing is ever fetched from a model hub. `revision_of` lives in the thin client (which
computes revisions for `--model-source PATH` without torch) and is re-exported here.
"""

from __future__ import annotations

import re
from pathlib import Path

from prebake.client.model_revision import checkpoint_files, revision_of
from prebake.compiler.backend import CompileError

__all__ = ["checked_source", "checkpoint_files", "resolve_model_source", "revision_of"]

# What `revision_of` computes (a git commit hash has 40 hex digits, so it is not checked).
CONTENT_REVISION_RE = re.compile(r"[0-9a-f]{32}")


def resolve_model_source(source: str) -> Path:
    """The local checkpoint directory that `source` names, resolved to an absolute path.

    Raises ValueError with an actionable message if `source` is empty, does not exist, is
    not a directory or has no config.json (not a Hugging Face checkpoint), and
    NotImplementedError for `s3://` sources until the S3 backend arrives. Other URL schemes
    (a hub id such as `meta-llama/Meta-Llama-3-8B` is just a missing directory) are rejected
    rather than downloaded.
    """
    text = source.strip()
    if not text:
        raise ValueError("model source is empty; give a local checkpoint directory")
    if text.startswith("s3://"):
        raise NotImplementedError("s3:// model sources arrive with the S3 backend")
    if "://" in text:
        raise ValueError(f"model source {text!r}: only local directories (and later s3://) are supported")
    path = Path(text).expanduser().resolve()
    if not path.exists():
        raise ValueError(
            f"model source {path} does not exist (model sources are local checkpoint directories; "
            "nothing is downloaded from a model hub)"
        )
    if not path.is_dir():
        raise ValueError(f"model source {path} is not a directory")
    if not (path / "config.json").is_file():
        raise ValueError(f"model source {path} has no config.json; it is not a Hugging Face checkpoint")
    return path


def checked_source(source: Path, revision: str) -> Path:
    """The resolved model source, verified against the key's revision when it is a content digest.

    If the directory no longer hashes to a 32-hex-digit revision, the checkpoint changed
    after the key was made, and an artifact built from it would be published under the
    wrong revision. Every problem here is a deterministic CompileError.
    """
    try:
        path = resolve_model_source(str(source))
    except (ValueError, NotImplementedError) as exc:
        raise CompileError(str(exc), True) from exc
    if CONTENT_REVISION_RE.fullmatch(revision):
        actual = revision_of(path)
        if actual != revision:
            raise CompileError(
                f"model source {path} has revision {actual}, not the key's model_revision {revision}: "
                "the checkpoint changed since the key was made; look it up again with the new revision",
                True,
            )
    return path
