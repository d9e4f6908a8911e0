"""Resumable, verified blob transfers over the Blobs service.

Uploads name their upload with an id derived from host and blob, so a rerun of an
interrupted upload (even in another process) continues from the server's committed size.
Downloads append to a partial file, re-seeding the hash from what is already there, and
verify size and xxh3-128 of every byte before reporting success.

Progress callbacks receive (done_bytes, total_bytes) for the blob. An exception raised by
a callback stops the transfer and propagates to the caller, after the bytes transferred
so far are kept (committed on the server, or flushed to the partial file) so that a
later attempt resumes. Upload progress is reported from a gRPC worker thread.
"""

from __future__ import annotations

import functools
import http.client
import io
import os
import socket
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import grpc
import xxhash

from prebake.client.channel import (
    Connection,
    IdleWatchdog,
    RetryPolicy,
    call_with_retry,
    cancel_call,
    stalled,
    status_of,
)
from prebake.client.errors import (
    DataLoss,
    DownloadDigestMismatch,
    InvalidArgument,
    PrebakeError,
    Unavailable,
    from_rpc_error,
)
from prebake.core import digests
from prebake.v1 import blobs_pb2

Progress = Callable[[int, int], object]
CHUNK = 1 << 20
# ABORTED means another stream holds the upload id: a concurrent upload of the same blob
# from this host, or a previous process's stream the server has not yet seen die. It is
# retried this many times longer than UNAVAILABLE.
_ABORTED_PATIENCE = 4


@dataclass(frozen=True)
class TransferSettings:
    """Per-client transfer knobs, shared by uploads and downloads."""

    policy: RetryPolicy
    unary_timeout: float
    idle_seconds: float
    target: str


@dataclass(frozen=True)
class UploadResult:
    digest: blobs_pb2.Digest
    # Bytes of the blob this call got the server to commit (size - bytes_resumed; bytes
    # re-sent after a failure are not counted twice).
    bytes_sent: int
    # Bytes the server already held for this upload id when we started.
    bytes_resumed: int
    # The server already held the whole blob; nothing was sent.
    already_present: bool


@dataclass(frozen=True)
class DownloadResult:
    bytes_downloaded: int
    # Bytes already in the partial file from an earlier, interrupted attempt.
    bytes_resumed: int
    # Of `bytes_downloaded`, the bytes read from a presigned URL rather than the server.
    bytes_direct: int = 0


def upload_id_for(digest: blobs_pb2.Digest) -> str:
    """Stable across processes on one host, so a rerun resumes rather than restarts."""
    name = f"prebake:{socket.gethostname()}:{digest.hash}:{digest.size_bytes}"
    return str(uuid.uuid5(uuid.NAMESPACE_URL, name))


class _WriteState:
    """What the request generator (run on a gRPC thread) shares with the caller."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.watchdog: IdleWatchdog | None = None


def upload_blob(
    conn: Connection,
    source: Path | bytes,
    digest: blobs_pb2.Digest,
    settings: TransferSettings,
    progress: Progress | None = None,
) -> UploadResult:
    """Upload `source` (a file or bytes) as the blob `digest`, resuming a partial upload.

    The server verifies the digest; a mismatch is INVALID_ARGUMENT (raised, not
    retried). UNAVAILABLE and stalls are retried from the committed size, with the retry
    budget renewed whenever the committed size advanced. ABORTED (another process on
    this host is uploading the same blob under the same id) is waited out more
    patiently, since that upload may well complete the blob for us.
    """
    upload_id = upload_id_for(digest)
    size = digest.size_bytes
    query = blobs_pb2.QueryWriteStatusRequest(upload_id=upload_id, digest=digest)
    failures = aborts = 0
    resumed: int | None = None
    best_committed = -1
    while True:
        stubs = conn.stubs
        status = call_with_retry(
            functools.partial(stubs.blobs.QueryWriteStatus, query, timeout=settings.unary_timeout),
            settings.policy,
            settings.target,
        )
        if status.complete:
            if progress is not None:
                progress(size, size)
            if resumed is None:
                return UploadResult(digest, 0, 0, already_present=True)
            return UploadResult(digest, size - resumed, resumed, already_present=False)
        committed = status.committed_size
        if resumed is None:
            resumed = committed
        if committed > best_committed:
            failures = 0
            best_committed = committed
        if progress is not None:
            progress(committed, size)
        state = _WriteState()
        requests = _write_requests(
            source=source,
            digest=digest,
            upload_id=upload_id,
            offset=committed,
            settings=settings,
            state=state,
            progress=progress,
        )
        future = stubs.blobs.Write.future(requests)
        watchdog = state.watchdog = IdleWatchdog(future, settings.idle_seconds)
        try:
            with watchdog:
                response = future.result()
        except grpc.RpcError as err:
            if state.error is not None:
                raise state.error from None
            code = status_of(err)
            if code is grpc.StatusCode.ABORTED and aborts < settings.policy.retries * _ABORTED_PATIENCE:
                time.sleep(settings.policy.backoff(aborts))
                aborts += 1
                continue
            if not (code is grpc.StatusCode.UNAVAILABLE or stalled(err, watchdog)):
                raise from_rpc_error(err, target=settings.target) from None
            if watchdog.fired:
                conn.replace(stubs)
            error: PrebakeError = from_rpc_error(err, target=settings.target)
        else:
            if state.error is not None:
                raise state.error
            if response.complete:
                if progress is not None:
                    progress(size, size)
                return UploadResult(digest, size - resumed, resumed, already_present=False)
            error = Unavailable(
                f"the server stopped the upload of blob {digest.hash} at byte {response.committed_size}",
                settings.target,
            )
        if failures >= settings.policy.retries:
            raise error
        time.sleep(settings.policy.backoff(failures))
        failures += 1


def _write_requests(
    *,
    source: Path | bytes,
    digest: blobs_pb2.Digest,
    upload_id: str,
    offset: int,
    settings: TransferSettings,
    state: _WriteState,
    progress: Progress | None,
) -> Iterator[blobs_pb2.WriteRequest]:
    # gRPC swallows exceptions raised by a request iterator (it just cancels the call),
    # so every failure here is parked in `state` and re-raised by the caller; ending
    # the stream without finish_write makes the server keep what it received.
    size = digest.size_bytes
    try:
        with _open_source(source) as reader:
            reader.seek(offset)
            first = True
            while True:
                data = reader.read(min(CHUNK, size - offset))
                last = offset + len(data) >= size
                if not data and not last:
                    raise InvalidArgument(
                        f"the data for blob {digest.hash} ended at byte {offset} of {size}; "
                        "was the file changed after it was hashed?"
                    )
                request = blobs_pb2.WriteRequest(offset=offset, data=data, finish_write=last)
                if first:
                    request.upload_id = upload_id
                    request.digest.CopyFrom(digest)
                    first = False
                if state.watchdog is not None:
                    # After the last chunk the server fsyncs and renames: allow a unary's time.
                    state.watchdog.kick(settings.unary_timeout + settings.idle_seconds if last else None)
                yield request
                offset += len(data)
                if last:
                    return
                if progress is not None:
                    progress(offset, size)
    except GeneratorExit:
        raise
    except BaseException as exc:
        state.error = exc


def _open_source(source: Path | bytes) -> BinaryIO:
    if isinstance(source, bytes):
        return io.BytesIO(source)
    return open(source, "rb")


def download_blob(
    conn: Connection,
    digest: blobs_pb2.Digest,
    path: Path,
    settings: TransferSettings,
    progress: Progress | None = None,
    *,
    url: str = "",
) -> DownloadResult:
    """Download blob `digest` into `path`, resuming from whatever `path` already holds.

    With `url` (a presigned GET from the server's object store) the bytes come from there
    first; whatever it cannot deliver (unreachable, expired, cut off) is read through the
    server from the byte reached. Either way size and xxh3-128 are verified while
    streaming; the file is fsynced before returning. On a mismatch the file is deleted;
    if the mismatch may come from stale resumed bytes the blob is fetched once more from
    zero (through the server), otherwise `DownloadDigestMismatch` is raised.
    """
    downloaded = 0
    for from_scratch in (False, True):
        existing = path.stat().st_size if path.exists() else 0
        if existing > digest.size_bytes or from_scratch:
            path.unlink(missing_ok=True)
            existing = 0
        hasher = digests.seed_hasher(path, existing) if existing else digests.new_hasher()
        direct = 0
        try:
            with open(path, "ab") as out:
                start = existing
                # A second round (bad bytes somewhere) reads everything through the server.
                if url and not from_scratch:
                    start = _fetch_direct(
                        url=url,
                        digest=digest,
                        out=out,
                        hasher=hasher,
                        offset=existing,
                        settings=settings,
                        progress=progress,
                    )
                    direct = start - existing
                end = _stream_into(
                    conn=conn,
                    digest=digest,
                    out=out,
                    hasher=hasher,
                    offset=start,
                    settings=settings,
                    progress=progress,
                )
                downloaded += end - existing
                out.flush()
                os.fsync(out.fileno())
        except DownloadDigestMismatch:
            path.unlink(missing_ok=True)
            raise
        if hasher.hexdigest() == digest.hash:
            return DownloadResult(bytes_downloaded=downloaded, bytes_resumed=existing, bytes_direct=direct)
        path.unlink(missing_ok=True)
        if existing == 0 and direct == 0:
            break
    raise DownloadDigestMismatch(
        f"blob {digest.hash} ({digest.size_bytes} bytes) failed xxh3 verification after download; "
        "the file was deleted"
    )


def _fetch_direct(
    *,
    url: str,
    digest: blobs_pb2.Digest,
    out: BinaryIO,
    hasher: xxhash.xxh3_128,
    offset: int,
    settings: TransferSettings,
    progress: Progress | None,
) -> int:
    """Append what the presigned `url` delivers from `offset`; returns the size reached.

    Never raises for the URL's sake: any failure (connection refused, an expired or
    refused signature, a response that ignores the range, a body longer than the blob, a
    stall longer than the idle timeout) ends the direct part, and the caller reads the
    rest through the server. Bytes that arrive but do not verify are caught by the
    caller's hash, which then reads the whole blob through the server.
    """
    size = digest.size_bytes
    if offset >= size:
        return offset
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-{size - 1}"})
    try:
        with urllib.request.urlopen(request, timeout=settings.idle_seconds) as response:
            ranged = response.status == 206 and str(response.headers.get("Content-Range", "")).startswith(
                f"bytes {offset}-"
            )
            if not (ranged or (response.status == 200 and offset == 0)):
                return offset
            buffer = bytearray(CHUNK)
            view = memoryview(buffer)
            while offset < size:
                n = response.readinto(view)
                if not n:
                    break
                if offset + n > size:
                    raise DownloadDigestMismatch(
                        f"the object store sent more than {size} bytes for {digest.hash}"
                    )
                out.write(view[:n])
                hasher.update(view[:n])
                offset += n
                if progress is not None:
                    progress(offset, size)
    except (OSError, http.client.HTTPException, ValueError):
        # URLError/HTTPError are OSErrors; the URL itself is never repeated: it is a credential.
        pass
    return offset


def _stream_into(
    *,
    conn: Connection,
    digest: blobs_pb2.Digest,
    out: BinaryIO,
    hasher: xxhash.xxh3_128,
    offset: int,
    settings: TransferSettings,
    progress: Progress | None,
) -> int:
    """Append the blob's bytes from `offset` to `out`; returns the size reached (= blob size)."""
    size = digest.size_bytes
    failures = 0
    while offset < size:
        stubs = conn.stubs
        call = stubs.blobs.Read(blobs_pb2.ReadRequest(digest=digest, offset=offset))
        watchdog = IdleWatchdog(call, settings.idle_seconds)
        error: PrebakeError
        try:
            with watchdog:
                for message in call:
                    watchdog.kick()
                    data = message.data
                    if offset + len(data) > size:
                        raise DownloadDigestMismatch(
                            f"the server sent more than {size} bytes for blob {digest.hash}"
                        )
                    out.write(data)
                    hasher.update(data)
                    offset += len(data)
                    failures = 0
                    if progress is not None:
                        progress(offset, size)
            error = DataLoss(f"the stream of blob {digest.hash} ended at byte {offset} of {size}")
        except grpc.RpcError as err:
            if not stalled(err, watchdog):
                raise from_rpc_error(err, target=settings.target) from None
            error = (
                Unavailable(f"reading blob {digest.hash} stalled: no data for {settings.idle_seconds:g} s")
                if watchdog.fired
                else from_rpc_error(err, target=settings.target)
            )
            if watchdog.fired:
                conn.replace(stubs)
        finally:
            cancel_call(call)
        if offset < size:
            if failures >= settings.policy.retries:
                raise error
            time.sleep(settings.policy.backoff(failures))
            failures += 1
    return offset
