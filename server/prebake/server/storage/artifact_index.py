"""The artifact index: published manifests by key digest.

Primitives only. Whether a publish may replace, which blobs a delete frees and which
artifacts are "nearest" are decided above this interface (`prebake.server.job_lifecycle`,
`prebake.server.nearest`).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

from prebake.server.records import Artifact, Digest, Job, NormalizedKey, RegistryCounts
from prebake.server.storage.page_tokens import Page


@dataclass(frozen=True)
class JobWrite:
    """A job compare-and-set carried inside another atomic write.

    Stores `job` (its revision bumped to `expect_revision + 1`, with a job event
    appended) only if the stored job's revision is still `expect_revision`.
    """

    job: Job
    expect_revision: int

    def stored(self) -> Job:
        """`job` as the write stores it (its revision bumped), once the write succeeded."""
        return replace(self.job, revision=self.expect_revision + 1)


@dataclass(frozen=True)
class ArtifactQuery:
    """Filters of `ArtifactIndex.list_page`; empty strings match everything."""

    kind: str = ""
    model: str = ""
    pinned_only: bool = False


class ArtifactIndex(Protocol):
    """Artifact manifests, each stored whole under its id (the key digest).

    Thread safety: coroutines of one instance may run concurrently on one event loop;
    instances in several processes or replicas on one engine are consistent with each
    other through the engine's conditional writes. Reads never return part of an
    artifact: its files and its row are written and removed in one atomic step.
    Failures: see `prebake.server.storage`.
    """

    async def get(self, artifact_id: str) -> Artifact | None:
        """The artifact with its files sorted by path, or None."""
        ...

    def change_marker(self) -> Hashable | None:
        """A value read now that differs from every earlier one once any change to what the
        engine stores has been committed since, by this process or any other: artifacts and,
        since the seams of one `Storage` share the engine, jobs and workers too. None when
        the engine cannot tell cheaply.

        Synchronous and cheap (one local read): a lookup's answer may be reused for as long
        as the marker read before computing it is unchanged (`RegistryService.Lookup`). None
        means: reuse nothing derived from reads. Markers are comparable only with markers
        of the same instance, read on the same thread.
        """
        ...

    async def put(
        self, artifact: Artifact, *, expect_manifest: str | None, complete: JobWrite | None = None
    ) -> None:
        """Store `artifact` (row and files) in one atomic write, conditionally.

        `expect_manifest` None: only if no artifact has this id (conditional create).
        A string: only if the stored artifact has that manifest digest (conditional
        replace). `complete`, when given, is applied in the same atomic write. Raises
        `ConditionFailed` when either condition does not hold; `InvalidArgument` for
        repeated file paths.
        """
        ...

    async def delete(self, artifact_id: str, *, expect_manifest: str, expect_pinned: bool) -> None:
        """Remove the artifact only if its manifest and pin are still as expected.

        Raises `ConditionFailed` otherwise (including when it is gone).
        """
        ...

    async def set_pinned(self, artifact_id: str, pinned: bool) -> Artifact | None:
        """Set the pin; return the artifact with its files, or None if unknown."""
        ...

    async def record_hits(self, hits: Mapping[str, tuple[int, float]]) -> None:
        """Add hit counts and advance last-access times: id -> (hits, latest access).

        Unknown ids are ignored; an access time never moves backwards. Not
        conditional: counters may lose increments in a crash, never artifacts.
        """
        ...

    async def record_lookups(self, lookups: int, hits: int) -> None:
        """Add to the lifetime lookup and hit totals that `counts` reports.

        Called with batches (never once per lookup); not conditional, like `record_hits`.
        """
        ...

    async def list_page(self, query: ArtifactQuery, page_token: str, limit: int) -> Page[Artifact]:
        """Artifacts newest first (created_at descending, then id), without files.

        Deterministic; `page_token` is "" or a token from a previous page of the same
        query (else `InvalidArgument`).
        """
        ...

    async def of_model(self, kind: str, model: str, limit: int) -> list[Artifact]:
        """Up to `limit` artifacts of one kind and model, newest first, without files.

        The candidates of nearest-artifact explanations and compatibility policies.
        """
        ...

    async def nearest(self, key: NormalizedKey, limit: int) -> list[Artifact]:
        """Up to `limit` artifacts of the key's kind and model but not the key's own, closest
        to `key` first, without files: among the model's newest `nearest.SCAN_LIMIT`, ranked
        exactly as `prebake.server.nearest.rank_nearest` ranks them.

        A query of `of_model` pushed down because every miss runs it: a backend may rank
        without decoding every candidate (SQLite does, in SQL); else it ranks `of_model`.
        """
        ...

    async def is_referenced(self, digest: Digest) -> bool:
        """Whether any artifact's file or producer log, or any job's log, names `digest`."""
        ...

    async def least_recently_used(self, limit: int) -> list[Artifact]:
        """Up to `limit` unpinned artifacts, least recently accessed first, without files.

        Ordered by `last_accessed_at` ascending, then id: the eviction order
        (`prebake.server.garbage`). `limit` < 1 returns nothing. A scan of every artifact
        where the engine has no index for it (DynamoDB): meant for the periodic collector,
        not for request paths.
        """
        ...

    async def counts(self) -> RegistryCounts:
        """Artifact totals, jobs per state (every state present, zeros included) and the
        lifetime lookup and hit totals."""
        ...

    async def artifacts_using(self, digest: Digest, limit: int) -> list[str]:
        """Ids of up to `limit` artifacts whose files or producer log name `digest`, sorted.

        What the integrity sweep marks unavailable when that blob is lost. Job logs do not
        count (no artifact depends on them).
        """
        ...

    async def mark_unavailable(
        self, artifact_id: str, reason: str, *, expect_manifest: str
    ) -> Artifact | None:
        """Record why the artifact cannot be served (`reason`, non-empty; `Artifact.unavailable`),
        only if it still has the manifest `expect_manifest`.

        Returns the artifact as stored now, with its files; None if it is gone or was replaced
        meanwhile (then nothing changed: a new manifest is judged on its own). A later `put` of
        the id stores the new artifact's own `unavailable` ("" for a fresh publish), which is how
        a republish makes the key available again. Not otherwise conditional: marking twice keeps
        the last reason.
        """
        ...
