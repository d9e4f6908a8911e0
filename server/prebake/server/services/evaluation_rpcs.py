"""The evaluation rpcs of `prebake.v1.Registry` (`ListEvaluations`, `ImportEvaluation`) and the
evaluations `GetArtifact` returns; `RegistryService` delegates here to keep that module about
lookups and manifests."""

from __future__ import annotations

import secrets
import time

from prebake.core import request_ids
from prebake.core.errors import InvalidArgument, NotFound, Unavailable
from prebake.server import evaluation_messages as messages
from prebake.server.records import Evaluation
from prebake.server.services import pagination
from prebake.server.state import ServerState
from prebake.server.storage import ConditionFailed
from prebake.server.storage.evaluation_store import EvaluationQuery
from prebake.v1 import evaluations_pb2, registry_pb2

MAX_MODEL_FILTER = 256
# An import meets a concurrent replace of its artifact at most this often before it gives up
# (UNAVAILABLE: retry).
IMPORT_ATTEMPTS = 3


def new_evaluation_id() -> str:
    return "ev-" + secrets.token_hex(12)


def checked_artifact_id(artifact_id: str) -> str:
    if len(artifact_id) != 32 or any(c not in "0123456789abcdef" for c in artifact_id):
        raise messages.invalid(
            "artifact_id",
            f"{artifact_id[:64]!r} is not an artifact id (a key digest: 32 lowercase hex digits)",
        )
    return artifact_id


class EvaluationRpcs:
    def __init__(self, state: ServerState) -> None:
        self.s = state

    async def of_artifact(self, artifact_id: str) -> list[evaluations_pb2.Evaluation]:
        """The artifact's newest evaluations, as `Artifact.evaluations` carries them."""
        page = await self.s.storage.evaluations.list_page(
            EvaluationQuery(artifact_id=artifact_id), "", messages.ARTIFACT_EVALUATIONS
        )
        return [messages.evaluation(e) for e in page.items]

    async def list(
        self, request: registry_pb2.ListEvaluationsRequest
    ) -> registry_pb2.ListEvaluationsResponse:
        if request.artifact_id:
            checked_artifact_id(request.artifact_id)
            if request.model:
                raise InvalidArgument("set `artifact_id` or `model`, not both")
        if len(request.model) > MAX_MODEL_FILTER:
            raise messages.invalid("model", f"{len(request.model)} characters; at most {MAX_MODEL_FILTER}")
        limit = pagination.page_size(request.page_size)
        query = EvaluationQuery(request.artifact_id, request.model)
        page = await self.s.storage.evaluations.list_page(query, request.page_token, limit)
        return await self.s.run_blocking(
            lambda: registry_pb2.ListEvaluationsResponse(
                evaluations=[messages.evaluation(e) for e in page.items], next_page_token=page.next_token
            )
        )

    async def import_(self, request: registry_pb2.ImportEvaluationRequest) -> evaluations_pb2.Evaluation:
        artifact_id = checked_artifact_id(request.artifact_id)
        source = "import:" + request.evaluation.source.removeprefix("import:")
        return await self.store(artifact_id, request.evaluation, source)

    async def store(
        self,
        artifact_id: str,
        msg: evaluations_pb2.Evaluation,
        source: str,
        *,
        evaluation_id: str = "",
        request_id: str | None = None,
    ) -> evaluations_pb2.Evaluation:
        """Check `msg` and store it as an evaluation of `artifact_id` by `source` (`import:...`,
        or `worker:<id>` for an evaluation job's result); the stored evaluation.

        `evaluation_id` and `request_id` default to a new id and the current rpc's request id;
        an evaluation job passes the id its completion recorded and the job's request id.
        """
        # Every check before any read: a refused evaluation costs no database round trip.
        messages.check(msg, artifact_id)
        parts = messages.parts(msg)
        for _ in range(IMPORT_ATTEMPTS):
            artifact = await self.s.storage.artifacts.get(artifact_id)
            if artifact is None:
                raise NotFound(f"no artifact {artifact_id}")
            record = Evaluation(
                evaluation_id=evaluation_id or new_evaluation_id(),
                artifact_id=artifact_id,
                model=artifact.key.model,
                created_at=time.time(),
                source=source,
                request_id=(request_ids.current() or "") if request_id is None else request_id,
                **parts,
            )
            try:
                await self.s.storage.evaluations.add(record, expect_manifest=artifact.manifest_digest)
            except ConditionFailed:
                continue  # deleted or replaced meanwhile: read it again
            return messages.evaluation(record)
        raise Unavailable(f"artifact {artifact_id} kept changing while its evaluation was stored; retry")
