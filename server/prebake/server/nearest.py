"""Artifacts near a key, computed above the artifact index (no SQL, any backend).

Used for miss explanations ("compiled for batch_size 4, you asked 8") and as the
candidates of compatibility policies (`prebake.server.compat`). Both consider the newest
`SCAN_LIMIT` artifacts of the key's kind and model; compatibility ranks them here, and the
ranking of near misses (`rank_nearest`) is pushed down to the index, which may do it
without decoding every candidate (SQLite ranks in SQL).
"""

from __future__ import annotations

from collections.abc import Sequence

from prebake.server.records import Artifact, NormalizedKey
from prebake.server.storage import ArtifactIndex

# Bounds the work of one miss; a model with more artifacts than this is explained from
# its newest ones (and their compatible artifacts found among them). A miss on a model with
# 100k artifacts then costs about what it does on one with a few hundred.
SCAN_LIMIT = 500

# Fields whose difference counts towards the distance, as NormalizedKey attributes.
DISTANCE_FIELDS = (
    "model_revision",
    "compile_target",
    "sequence_length",
    "batch_size",
    "tensor_parallel_degree",
    "precision",
    "toolchain",
    "options",
)
# What a compatible candidate must share with the key exactly.
_SAME_FOR_COMPAT = (
    "model_revision",
    "batch_size",
    "tensor_parallel_degree",
    "precision",
    "toolchain",
    "options",
)


def distance(a: NormalizedKey, b: NormalizedKey) -> int:
    return sum(getattr(a, name) != getattr(b, name) for name in DISTANCE_FIELDS)


async def nearest(index: ArtifactIndex, key: NormalizedKey, limit: int = 5) -> list[Artifact]:
    """Artifacts of the key's kind and model other than its own, closest first.

    Distance is the number of differing fields among model_revision, compile_target,
    sequence_length, batch_size, tensor_parallel_degree, precision, toolchain and
    options; ties go to the newest, then the smaller id. Pushed down to the index (it runs
    on every miss; SQLite ranks in SQL, see `ArtifactIndex.nearest`), which ranks the
    model's newest SCAN_LIMIT artifacts as `rank_nearest` does.
    """
    return await index.nearest(key, limit)


def rank_nearest(candidates: Sequence[Artifact], key: NormalizedKey, limit: int) -> list[Artifact]:
    """The ranking of `nearest` over `candidates` (a backend without a faster way uses it)."""
    others = [a for a in candidates if a.artifact_id != key.digest]
    others.sort(key=lambda a: (distance(a.key, key), -a.created_at, a.artifact_id))
    return others[:limit]


async def compatible_candidates(
    index: ArtifactIndex, key: NormalizedKey, compile_targets: Sequence[str], limit: int = 50
) -> list[Artifact]:
    """Artifacts that differ from `key` at most in sequence length (not shorter) and
    compile target (one of `compile_targets`), smallest sequence length first."""
    if not compile_targets:
        return []
    found = await index.of_model(key.kind, key.model, SCAN_LIMIT)
    matching = [
        a
        for a in found
        if all(getattr(a.key, name) == getattr(key, name) for name in _SAME_FOR_COMPAT)
        and a.key.sequence_length >= key.sequence_length
        and a.key.compile_target in compile_targets
    ]
    matching.sort(key=lambda a: (a.key.sequence_length, a.created_at, a.artifact_id))
    return matching[:limit]
