"""Import sets of artifacts compiled elsewhere (e.g. SageMaker-style precompiled sets).

A set file (JSON, or YAML with PyYAML) is a list of entries; each is a key in the
prewarm file's key syntax plus `path`, the directory holding that artifact's files
(relative paths are resolved against the set file's folder), and an optional `note`:

    - path: llama-3-8b-inf2-8192x8
      kind: neuron
      model: meta-textgeneration-llama-3-8b
      instance_type: ml.inf2.48xlarge
      sequence_length: 8192
      batch_size: 8
      tensor_parallel_degree: 24
      note: SageMaker precompiled set, 2026-11

Every entry is published exactly as `prebake publish` does (hash, upload what the server
lacks, publish atomically). Entries are independent: one that fails is reported and the
others still go in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prebake.client.artifact_key import ArtifactKey
from prebake.client.client import Client
from prebake.client.errors import PrebakeError
from prebake.client.matrix import MatrixError, decode, parse_matrix
from prebake.core.signing import SigningKey


@dataclass(frozen=True)
class ImportEntry:
    directory: Path
    key: ArtifactKey
    note: str


@dataclass(frozen=True)
class ImportResult:
    entry: ImportEntry
    artifact_id: str = ""
    created: bool = False
    error: str = ""


def load_set(path: Path) -> list[ImportEntry]:
    """Read a set file; raises MatrixError naming the file and the entry."""
    try:
        document = decode(path.read_text(encoding="utf-8"), path)
    except (OSError, UnicodeDecodeError) as exc:
        raise MatrixError(f"{path}: cannot read the set file: {exc}") from None
    if not isinstance(document, list) or not document:
        raise MatrixError(f"{path}: expected a non-empty list of entries (key fields plus path)")
    entries = []
    for i, item in enumerate(document):
        if not isinstance(item, dict) or not isinstance(item.get("path"), str) or not item["path"]:
            raise MatrixError(f"{path}: entry {i}: needs a `path` naming the artifact's directory")
        fields = {k: v for k, v in item.items() if k not in ("path", "note")}
        (parsed,) = parse_matrix([fields], source=f"{path}: entry {i}")
        directory = Path(item["path"])
        entries.append(
            ImportEntry(
                directory=directory if directory.is_absolute() else path.parent / directory,
                key=parsed.key,
                note=str(item.get("note", "")),
            )
        )
    return entries


def import_set(
    client: Client,
    entries: list[ImportEntry],
    on_result: Callable[[ImportResult], object] | None = None,
    signing_key: SigningKey | None = None,
) -> list[ImportResult]:
    """Publish every entry; a failing entry is recorded with its error and the rest go on.

    With `signing_key` every entry is signed with it, as `prebake publish --signing-key`
    signs one artifact.
    """
    results = []
    for entry in entries:
        try:
            response = client.publish(
                entry.directory, entry.key, producer_note=entry.note, signing_key=signing_key
            )
            result = ImportResult(entry, response.artifact.artifact_id, response.created)
        except (PrebakeError, OSError, ValueError) as exc:
            result = ImportResult(entry, error=str(exc))
        if on_result is not None:
            on_result(result)
        results.append(result)
    return results
