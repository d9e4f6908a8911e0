"""The evaluation store: measured evaluations of artifacts, listed newest first.

Primitives only. Validation of an evaluation (levels, percentiles, finite numbers) happens
above this interface (`prebake.server.evaluation_messages`), and so does the choice of its
id and time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from prebake.server.records import Evaluation
from prebake.server.storage.page_tokens import Page

# The list name in page tokens; the same on every backend.
TOKEN_TAG = "evaluations"


@dataclass(frozen=True)
class EvaluationQuery:
    """Filters of `EvaluationStore.list_page`; empty strings match everything. At most one
    of the two is set (the services refuse both)."""

    artifact_id: str = ""
    model: str = ""


class EvaluationStore(Protocol):
    """Evaluations, each stored whole under its id and bound to the artifact it evaluates.

    Lifetime: an evaluation belongs to one stored artifact, as it was when the evaluation
    was added. Deleting the artifact or replacing it (any `ArtifactIndex.put` over it, GC's
    evictions included) removes its evaluations from every read at the same instant: SQLite
    deletes them in the artifact's own transaction, DynamoDB ties them to the artifact's
    per-put nonce (they count for nothing once it changes) and deletes them right after.

    Thread safety: coroutines of one instance may run concurrently on one event loop;
    instances in several processes or replicas on one engine see each other's writes.
    Failures: see `prebake.server.storage` (a method that raises changed nothing; busy or
    unreachable engines raise `Unavailable`).
    """

    async def add(self, evaluation: Evaluation, *, expect_manifest: str) -> None:
        """Store `evaluation`, only if artifact `evaluation.artifact_id` exists and has the
        manifest digest `expect_manifest`; else raise `ConditionFailed` and store nothing.

        Ids are the caller's and must be unique (random, as the services make them); adding
        the same evaluation twice raises `ConditionFailed`.
        """
        ...

    async def list_page(self, query: EvaluationQuery, page_token: str, limit: int) -> Page[Evaluation]:
        """Evaluations newest first (created_at descending, then id), `limit` >= 1.

        Deterministic keyset pages; `page_token` is "" or a token from a previous page of the
        same query (else `InvalidArgument`). Only evaluations of artifacts as they are now
        (see the class docstring).
        """
        ...
