"""`prebake.v1.Blobs`: content-addressed upload (resumable) and verified download."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from prebake.core.errors import DataLoss, InvalidArgument, NotFound, PrebakeError
from prebake.server import convert, integrity
from prebake.server.blobs import BlobWriter, PendingDigest, UploadDigest
from prebake.server.rate_limits import RateLimit, caller
from prebake.server.records import Digest
from prebake.server.state import ServerState
from prebake.server.status import streaming, unary
from prebake.server.upload_sessions import UploadIdle, UploadSessions, idle_limited
from prebake.v1 import blobs_pb2, blobs_pb2_grpc

MAX_FIND = 10_000
MAX_WRITE_CHUNK = 4 << 20
# Digests recorded as wanted per turn of the event loop (see FindMissingBlobs).
WANTED_SLICE = 500
READ_CHUNK = 1 << 20
Ctx = grpc.aio.ServicerContext[Any, Any]
log = logging.getLogger("prebake.server.blobs")


def _upload_digest(msg: blobs_pb2.Digest) -> UploadDigest:
    """A Write's or QueryWriteStatus's `digest`: an empty hash names a digest-late upload of
    `size_bytes` bytes (see `WriteRequest.digest`)."""
    if not msg.hash:
        try:
            return PendingDigest(msg.size_bytes)
        except InvalidArgument as exc:
            raise InvalidArgument(f"digest: {exc}") from None
    return convert.digest_from_proto(msg)


async def _lost(state: ServerState, digest: Digest, exc: NotFound | DataLoss, read_at: float) -> None:
    """A Read found the blob missing or corrupt: mark what names it before answering, so that
    the caller's next lookup no longer hits it (and follows the rebuild instead)."""
    problem = integrity.Problem.MISSING if isinstance(exc, NotFound) else integrity.Problem.CORRUPT
    try:
        await integrity.blob_lost(state, digest, problem, str(exc), detected_at=read_at)
    except PrebakeError as repair_error:  # the Read's own error is the answer
        log.warning("could not mark the artifacts of lost blob %s: %s", digest, repair_error)


class BlobsService(blobs_pb2_grpc.BlobsServicer):
    def __init__(self, state: ServerState) -> None:
        self.s = state
        c = state.config
        self.sessions = UploadSessions(c.max_uploads, c.max_uploads_per_caller)
        self.upload_starts = RateLimit("uploads started", c.upload_start_burst, c.upload_start_per_minute)

    @unary
    async def FindMissingBlobs(
        self, request: blobs_pb2.FindMissingBlobsRequest, context: Ctx
    ) -> blobs_pb2.FindMissingBlobsResponse:
        if len(request.digests) > MAX_FIND:
            raise InvalidArgument(f"{len(request.digests)} digests in one request; at most {MAX_FIND}")
        s = self.s

        def find() -> tuple[list[Digest], list[Digest]]:
            # Off the loop, conversions included (up to 10,000 digests): one stat (local) or
            # HEAD (object store) per digest.
            digests = [convert.digest_from_proto(d, f"digests[{i}]") for i, d in enumerate(request.digests)]
            missing = s.blobs.find_missing(digests)
            return missing, list(set(digests).difference(missing))

        missing, present = await s.run_blocking(find)
        # The caller may publish the present ones without uploading them: not garbage now.
        # Recorded on the loop (InUse is loop-only), a slice at a time between other rpcs.
        for start in range(0, len(present), WANTED_SLICE):
            s.in_use.wanted(present[start : start + WANTED_SLICE])
            await asyncio.sleep(0)

        def answer() -> blobs_pb2.FindMissingBlobsResponse:
            # One element at a time: a single call building 10,000 messages would hold the
            # GIL, and so stop the event loop, for its whole length.
            response = blobs_pb2.FindMissingBlobsResponse()
            for d in missing:
                response.missing.add(hash=d.hash, size_bytes=d.size)
            return response

        return await s.run_blocking(answer)

    @streaming
    async def Read(
        self, request: blobs_pb2.ReadRequest, context: Ctx
    ) -> AsyncIterator[blobs_pb2.ReadResponse]:
        digest = convert.digest_from_proto(request.digest)
        if request.offset < 0 or request.limit < 0:
            raise InvalidArgument(
                f"offset ({request.offset}) and limit ({request.limit}) must not be negative"
            )
        s = self.s
        # read() checks the blob before returning (hashing it where the backend cannot vouch for
        # it), so a corrupt blob is never served; off the loop, since that may read the whole blob.
        read_at = time.time()
        # Marked in use from before the check to the last chunk: eviction keeps its artifact.
        with s.in_use.reading(digest):
            try:
                chunks = await s.run_blocking(s.blobs.read, digest, request.offset, request.limit, READ_CHUNK)
            except (NotFound, DataLoss) as exc:
                await _lost(s, digest, exc, read_at)
                raise
            try:
                # Disk reads go to the I/O pool: a cold read must not stall every other rpc.
                while (chunk := await s.run_blocking(next, chunks, None)) is not None:
                    s.counters.bytes_served += len(chunk)
                    s.metrics.blob_read_bytes.inc(len(chunk))
                    yield blobs_pb2.ReadResponse(data=chunk)
            except DataLoss as exc:  # the stored blob ended early: quarantined by the store
                await _lost(s, digest, exc, read_at)
                raise
            finally:
                chunks.close()

    @unary
    async def Write(
        self, request_iterator: AsyncIterator[blobs_pb2.WriteRequest], context: Ctx
    ) -> blobs_pb2.WriteResponse:
        # Limits first: a session slot and a start per caller, and an idle timeout that
        # ends a stalled stream (its partial upload is then discarded; see _write).
        who = caller(context)
        self.upload_starts.take(who)
        with self.sessions.open(who):
            return await self._write(idle_limited(request_iterator, self.s.config.upload_idle_seconds))

    async def _write(
        self, request_iterator: AsyncIterator[blobs_pb2.WriteRequest]
    ) -> blobs_pb2.WriteResponse:
        s = self.s
        writer: BlobWriter | None = None
        upload_id = ""
        # The append running on an I/O thread, if any: the next message is received while it
        # writes (one append in flight, so at most two messages are held), and a cancelled
        # stream must not close the writer under it (see finally).
        appending: asyncio.Future[None] | None = None
        # Where the next message's data must start: what is committed plus the append in flight.
        expected = 0
        idle = False
        try:
            async for req in request_iterator:
                if writer is None:
                    if not req.upload_id or not req.HasField("digest"):
                        raise InvalidArgument("the first Write message must carry upload_id and digest")
                    upload_id = req.upload_id
                    writer = await s.run_blocking(s.blobs.open_write, upload_id, _upload_digest(req.digest))
                    if writer.complete:  # stored already (never so for a digest-late upload)
                        if isinstance(writer.digest, Digest):
                            s.in_use.wanted([writer.digest])  # as FindMissingBlobs: about to be published
                        return blobs_pb2.WriteResponse(committed_size=writer.digest.size, complete=True)
                    expected = writer.committed_size
                else:
                    self._check_consistent(req, upload_id, writer)
                if req.offset != expected:
                    raise InvalidArgument(
                        f"write offset {req.offset} does not match the upload's committed size "
                        f"{expected}; call QueryWriteStatus and continue from there"
                    )
                if len(req.data) > MAX_WRITE_CHUNK:
                    raise InvalidArgument(
                        f"a Write message carries {len(req.data)} bytes; at most {MAX_WRITE_CHUNK}"
                    )
                if req.data:
                    if appending is not None:
                        # Its error, if any, ends the stream here. Cancelled while waiting, this
                        # message is neither kept nor counted: the client sends it again.
                        await asyncio.shield(appending)
                    appending = asyncio.ensure_future(s.run_blocking(writer.append, req.data))
                    expected += len(req.data)
                    s.counters.bytes_received += len(req.data)
                    s.metrics.blob_written_bytes.inc(len(req.data))
                if req.finish_write:
                    stated = self._stated_digest(req, writer)
                    if appending is not None:
                        await asyncio.shield(appending)
                    await s.run_blocking(writer.commit, stated)
                    if stated is not None:
                        # Maybe a duplicate of a stored blob, which the caller publishes next.
                        s.in_use.wanted([stated])
                    return blobs_pb2.WriteResponse(committed_size=writer.committed_size, complete=True)
            if writer is None:
                raise InvalidArgument(
                    "empty Write stream: send at least one message with upload_id and digest"
                )
            if appending is not None:
                await asyncio.shield(appending)
            # Closed before answering, so the reply names what the store kept (a backend with a
            # minimum part size may keep less than arrived), the size a client continues from.
            await s.run_blocking(writer.close)
            return blobs_pb2.WriteResponse(committed_size=writer.committed_size, complete=False)
        except UploadIdle:
            idle = True
            raise
        finally:
            if appending is not None and not appending.done():
                # Cancelled mid-append: the thread still writes; let it finish first.
                with contextlib.suppress(Exception):
                    await appending
            elif appending is not None and not appending.cancelled():
                appending.exception()  # the stream failed first; its append's error is moot
            # Keep what the store can of what arrived, so the client can resume; after a
            # commit, an abort or the close above this is a no-op. A stalled stream's partial
            # upload is discarded instead: a client that stops sending holds nothing.
            if writer is not None:
                await s.run_blocking(writer.abort if idle else writer.close)

    @staticmethod
    def _check_consistent(req: blobs_pb2.WriteRequest, upload_id: str, writer: BlobWriter) -> None:
        if req.upload_id and req.upload_id != upload_id:
            raise InvalidArgument(f"upload_id changed mid-stream from {upload_id!r} to {req.upload_id!r}")
        if not req.HasField("digest"):
            return
        if isinstance(writer.digest, PendingDigest) and req.finish_write and req.digest.hash:
            return  # the digest a digest-late upload states (checked by `_stated_digest`)
        if _upload_digest(req.digest) != writer.digest:
            raise InvalidArgument("digest changed mid-stream; one Write stream uploads one blob")

    @staticmethod
    def _stated_digest(req: blobs_pb2.WriteRequest, writer: BlobWriter) -> Digest | None:
        """The digest a digest-late upload is committed under (None for a digest-first one)."""
        opened = writer.digest
        if not isinstance(opened, PendingDigest):
            return None
        if not req.HasField("digest") or not req.digest.hash:
            raise InvalidArgument(
                "this upload was started without `digest.hash`: its message with `finish_write` must "
                "carry the full `digest` (hash and size_bytes) of what was sent"
            )
        stated = convert.digest_from_proto(req.digest)
        if stated.size != opened.size:
            raise InvalidArgument(
                f"digest: size_bytes {stated.size} differs from the {opened.size} this upload was "
                "started with; one Write stream uploads one blob"
            )
        return stated

    @unary
    async def QueryWriteStatus(
        self, request: blobs_pb2.QueryWriteStatusRequest, context: Ctx
    ) -> blobs_pb2.QueryWriteStatusResponse:
        digest = _upload_digest(request.digest)
        s = self.s
        # Off the loop: on an object store this lists the upload's parts.
        committed, complete = await s.run_blocking(s.blobs.upload_status, request.upload_id, digest)
        return blobs_pb2.QueryWriteStatusResponse(committed_size=committed, complete=complete)
