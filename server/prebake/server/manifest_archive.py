"""The manifest archive: each published artifact as one object beside its blobs.

So that a lost registry is not lost artifacts (DESIGN: manifests written last with a
conditional put, so a lost table can be rebuilt from the bucket), every artifact the
registry holds is also an object in the blob store's object store::

    manifests/<artifact_id>/<manifest_digest>.json

holding UTF-8 JSON ``{"format": 1, "artifact": {...}}``, where ``artifact`` is the API's own
`prebake.v1.Artifact` message in protobuf's JSON mapping (`json_format`, proto field names):
the resolved key (digest, canonical text, every field), the files, the producer,
`created_at`, `pinned`, `manifest_digest` and the producer's `signature` — everything
needed to restore the artifact with the same id, files, signer and creation time.
Counters (`hit_count`, `last_accessed_at`) are not archived: a restored artifact starts
them afresh. A reader refuses a `format` it does not know (written by a newer prebake).

Written and removed by `prebake.server.storage.archived_index` around every index write;
read back by `prebake reindex`. Pure functions: no I/O here.
"""

from __future__ import annotations

import json
import re
from typing import Any

from google.protobuf import json_format

from prebake.core.errors import InvalidArgument
from prebake.server import convert
from prebake.server.job_lifecycle import manifest_digest
from prebake.server.records import Artifact
from prebake.v1 import registry_pb2

FORMAT_VERSION = 1
PREFIX = "manifests/"
_KEY_RE = re.compile(r"manifests/([0-9a-f]{32})/([0-9a-f]{32})\.json")


class UnreadableManifest(ValueError):
    """An archived object that is not a manifest this version can restore; the message says why."""


def artifact_prefix(artifact_id: str) -> str:
    """The prefix of every archived manifest of one artifact id."""
    return f"{PREFIX}{artifact_id}/"


def manifest_key(artifact_id: str, manifest: str) -> str:
    """The object key of the archived manifest `manifest` of artifact `artifact_id`."""
    return f"{artifact_prefix(artifact_id)}{manifest}.json"


def parse_manifest_key(key: str) -> tuple[str, str] | None:
    """(artifact id, manifest digest) of a well-formed archive key, else None (a foreign object)."""
    m = _KEY_RE.fullmatch(key)
    return (m.group(1), m.group(2)) if m else None


def encode(artifact: Artifact) -> bytes:
    """The archive object of `artifact` (with its files); deterministic for equal artifacts."""
    message = convert.artifact(artifact)
    # Counters change with every hit; the archive holds what identifies the artifact.
    message.ClearField("last_accessed_at")
    message.ClearField("hit_count")
    document = {
        "format": FORMAT_VERSION,
        "artifact": json_format.MessageToDict(message, preserving_proto_field_name=True),
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def decode(data: bytes) -> Artifact:
    """The artifact an archive object holds, checked whole; `UnreadableManifest` if it cannot be
    restored as it is (malformed, another format, an id or manifest digest that does not match
    its contents). Hit count 0, last access = creation."""
    try:
        document: Any = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise UnreadableManifest(f"not JSON: {exc}") from None
    if not isinstance(document, dict) or "artifact" not in document:
        raise UnreadableManifest('not a manifest archive object (no "artifact")')
    if document.get("format") != FORMAT_VERSION:
        raise UnreadableManifest(
            f"format {document.get('format')!r}, this prebake reads format {FORMAT_VERSION}: "
            "restore with the prebake version that wrote it"
        )
    message = registry_pb2.Artifact()
    try:
        json_format.ParseDict(document["artifact"], message, ignore_unknown_fields=True)
        key = convert.normalized_key(message.key)
        files = tuple(convert.file_entries(message.files))
        producer = convert.producer_from_proto(message.producer)
        signature = convert.signature_from_proto(message.signature) if message.HasField("signature") else None
    except (json_format.ParseError, InvalidArgument) as exc:
        raise UnreadableManifest(str(exc)) from None
    if message.artifact_id != key.digest:
        raise UnreadableManifest(f"artifact id {message.artifact_id!r} is not its key's digest {key.digest}")
    if not files:
        raise UnreadableManifest("no files")
    if manifest_digest(files) != message.manifest_digest:
        raise UnreadableManifest(f"manifest digest {message.manifest_digest!r} does not match its files")
    created_at = convert.seconds(message.created_at)
    return Artifact(
        artifact_id=key.digest,
        key=key,
        files=files,
        file_count=len(files),
        total_size=sum(f.digest.size for f in files),
        producer=producer,
        created_at=created_at,
        last_accessed_at=created_at,
        pinned=message.pinned,
        manifest_digest=message.manifest_digest,
        signature=signature,
    )
