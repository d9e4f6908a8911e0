"""`prebake.v1.Admin`: list, delete and pin artifacts; statistics; verify blobs."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from prebake.core.errors import InvalidArgument
from prebake.server import convert, integrity
from prebake.server.garbage import GcReport
from prebake.server.records import JobState
from prebake.server.services import pagination
from prebake.server.services.registry_service import check_artifact_id
from prebake.server.state import ServerState
from prebake.server.status import streaming, unary
from prebake.server.storage import ArtifactQuery
from prebake.v1 import admin_pb2, admin_pb2_grpc, key_pb2, registry_pb2

MAX_MODEL_FILTER = 256
# VerifyBlobs sends progress at least this often (and on every damaged blob).
VERIFY_PROGRESS_SECONDS = 1.0
PROBLEMS = {
    integrity.Problem.MISSING: admin_pb2.BLOB_PROBLEM_MISSING,
    integrity.Problem.CORRUPT: admin_pb2.BLOB_PROBLEM_CORRUPT,
}
Ctx = grpc.aio.ServicerContext[Any, Any]


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(self, state: ServerState) -> None:
        self.s = state

    @unary
    async def ListArtifacts(
        self, request: admin_pb2.ListArtifactsRequest, context: Ctx
    ) -> admin_pb2.ListArtifactsResponse:
        if len(request.model) > MAX_MODEL_FILTER:
            raise InvalidArgument(
                f"model filter is {len(request.model)} characters; at most {MAX_MODEL_FILTER}"
            )
        limit = pagination.page_size(request.page_size)
        # An unknown kind would read as "any kind": refused instead.
        kind = convert.kind_name(convert.enum_value(key_pb2.ArtifactKind.DESCRIPTOR, request.kind, "kind"))
        query = ArtifactQuery(kind, request.model, request.pinned_only)
        page = await self.s.storage.artifacts.list_page(query, request.page_token, limit)
        # Up to a thousand messages: built beside the loop, not in the way of other rpcs.
        return await self.s.run_blocking(
            lambda: admin_pb2.ListArtifactsResponse(
                artifacts=[convert.artifact(a) for a in page.items], next_page_token=page.next_token
            )
        )

    @unary
    async def DeleteArtifact(
        self, request: admin_pb2.DeleteArtifactRequest, context: Ctx
    ) -> admin_pb2.DeleteArtifactResponse:
        s = self.s
        # Registry rows go first: once they are gone no lookup can hand out the blobs,
        # and a crash before the blob deletes only leaves garbage, never a broken artifact.
        async with s.blob_refs:
            unreferenced = await s.lifecycle.delete_artifact(
                check_artifact_id(request.artifact_id), request.force
            )
            deleted = [d for d in unreferenced if s.blobs.delete(d)]
        return admin_pb2.DeleteArtifactResponse(
            blobs_deleted=len(deleted), bytes_freed=sum(d.size for d in deleted)
        )

    @unary
    async def PinArtifact(self, request: admin_pb2.PinArtifactRequest, context: Ctx) -> registry_pb2.Artifact:
        return convert.artifact(
            await self.s.lifecycle.set_pinned(check_artifact_id(request.artifact_id), request.pinned)
        )

    @unary
    async def GetStats(self, request: admin_pb2.GetStatsRequest, context: Ctx) -> admin_pb2.Stats:
        s = self.s
        await s.tracker.flush()
        counts = await s.storage.artifacts.counts()
        blob_count, blob_bytes = s.blobs.stats()
        c = s.counters
        return admin_pb2.Stats(
            artifacts=counts.artifacts,
            pinned_artifacts=counts.pinned_artifacts,
            blobs=blob_count,
            blob_bytes=blob_bytes,
            lookups=c.lookups,
            hits=c.hits,
            misses=c.misses,
            hit_rate=c.hits / c.lookups if c.lookups else 0.0,
            jobs_by_state={state.value: counts.jobs_by_state.get(state.value, 0) for state in JobState},
            queue_depth=counts.jobs_by_state.get(JobState.QUEUED.value, 0),
            bytes_served=c.bytes_served,
            bytes_received=c.bytes_received,
            started_at=convert.timestamp(c.started_at),
        )

    @unary
    async def CollectGarbage(
        self, request: admin_pb2.CollectGarbageRequest, context: Ctx
    ) -> admin_pb2.CollectGarbageResponse:
        return gc_response(await self.s.collector.collect(dry_run=request.dry_run))

    @streaming
    async def VerifyBlobs(
        self, request: admin_pb2.VerifyBlobsRequest, context: Ctx
    ) -> AsyncIterator[admin_pb2.VerifyBlobsProgress]:
        if request.limit < 0 or request.bytes_per_second < 0:
            raise InvalidArgument(
                f"limit ({request.limit}) and bytes_per_second ({request.bytes_per_second}) must not be "
                "negative; 0 means every blob / unlimited"
            )
        sent_damage = 0
        sent_at = 0.0
        run = integrity.sweep(
            self.s, limit=request.limit, bytes_per_second=request.bytes_per_second, repair=request.repair
        )
        try:
            async for progress in run:
                fresh = progress.damaged[sent_damage:]
                now = time.monotonic()
                if fresh or progress.done or sent_at == 0.0 or now - sent_at >= VERIFY_PROGRESS_SECONDS:
                    sent_damage, sent_at = len(progress.damaged), now
                    yield admin_pb2.VerifyBlobsProgress(
                        blobs_total=progress.blobs_total,
                        blobs_checked=progress.blobs_checked,
                        bytes_hashed=progress.bytes_hashed,
                        damaged=[_damaged(d) for d in fresh],
                        done=progress.done,
                    )
        finally:
            await run.aclose()


def gc_response(report: GcReport) -> admin_pb2.CollectGarbageResponse:
    usage = report.usage
    return admin_pb2.CollectGarbageResponse(
        dry_run=report.dry_run,
        stale_uploads=report.stale_uploads.items,
        stale_upload_bytes=report.stale_uploads.bytes,
        quarantined_blobs=report.quarantined_blobs.items,
        quarantined_bytes=report.quarantined_blobs.bytes,
        orphaned_blobs=report.orphaned_blobs.items,
        orphaned_bytes=report.orphaned_blobs.bytes,
        evicted_artifact_ids=report.evicted_artifact_ids,
        evicted_blobs=report.evicted_blobs.items,
        evicted_bytes=report.evicted_blobs.bytes,
        kept_in_use=report.kept_in_use,
        usage=admin_pb2.StoreUsage(
            blob_bytes=usage.blob_bytes,
            upload_bytes=usage.upload_bytes,
            reserved_bytes=usage.reserved_bytes,
            max_store_bytes=usage.max_store_bytes,
        ),
    )


def _damaged(damage: integrity.Damage) -> admin_pb2.DamagedBlob:
    return admin_pb2.DamagedBlob(
        digest=convert.digest(damage.digest),
        problem=PROBLEMS[damage.problem],
        detail=damage.detail,
        artifact_ids=damage.artifact_ids,
        job_ids=damage.job_ids,
    )
