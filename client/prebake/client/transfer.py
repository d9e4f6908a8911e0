"""Resumable, verified blob transfers over the Blobs service.

Uploads name their upload with an id derived from host and blob, so a rerun of an
interrupted upload (even in another process) continues from the server's committed size.
A file whose digest is not known yet is uploaded digest-late (`upload_hashing`): hashed as
it is read for sending, its digest stated with the last message, so it is read once; its
upload id is derived from host, path and the file's stat identity instead.
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

from prebake.client import digest_memo
from prebake.client.channel import (
    Connection,
    IdleWatchdog,
    RetryPolicy,
    Stubs,
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


def hashing_upload_id(path: Path, st: os.stat_result) -> str:
    """The id of a digest-late upload of `path` as `st` describes it: stable across processes on
    one host while the file is unchanged (a rerun resumes), another once it changes. Unchanged
    means what it means to the digest memo: the same `digest_memo.identity`."""
    name = f"prebake-late:{socket.gethostname()}:{digest_memo.identity(path, st)}"
    return str(uuid.uuid5(uuid.NAMESPACE_URL, name))


class _Source:
    """What an upload sends (a file or bytes of `size` bytes) and, for a digest-late upload
    (`digest` None), the running hash of it: every byte is hashed once, when first read, in
    order, however often it is sent again after a failure."""

    def __init__(self, source: Path | bytes, size: int, digest: blobs_pb2.Digest | None) -> None:
        self.source = source
        self.size = size
        self.known = digest
        self.hasher = None if digest is not None else digests.new_hasher()
        self.hashed_to = 0  # the hasher has consumed [0, hashed_to)
        # The server held bytes of this digest-late upload that this call had not sent.
        self.resumed_foreign = False

    @property
    def late(self) -> bool:
        return self.known is None

    @property
    def named(self) -> blobs_pb2.Digest:
        """What the first Write message and QueryWriteStatus name: the digest, or (digest-late)
        an empty hash and the size."""
        return self.known if self.known is not None else blobs_pb2.Digest(hash="", size_bytes=self.size)

    @property
    def digest(self) -> blobs_pb2.Digest | None:
        """The blob's digest, once known (digest-late: once every byte has been read)."""
        if self.known is not None:
            return self.known
        if self.hasher is None or self.hashed_to < self.size:
            return None
        return blobs_pb2.Digest(hash=self.hasher.hexdigest(), size_bytes=self.size)

    def feed(self, offset: int, data: bytes) -> None:
        """`data` was read at `offset`: hash what of it the hasher has not consumed yet."""
        end = offset + len(data)
        if self.hasher is None or end <= self.hashed_to or offset > self.hashed_to:
            return
        with memoryview(data) as view:
            self.hasher.update(view[self.hashed_to - offset :])
        self.hashed_to = end

    def catch_up(self, offset: int) -> None:
        """Hash [hashed_to, offset) from the source: bytes the server already holds of this
        upload (an earlier process's), which this call does not send but must hash."""
        if self.hasher is None or offset <= self.hashed_to:
            return
        self.resumed_foreign = True
        with _open_source(self.source) as reader:
            reader.seek(self.hashed_to)
            while self.hashed_to < offset:
                data = reader.read(min(CHUNK, offset - self.hashed_to))
                if not data:
                    raise InvalidArgument(
                        f"{_what(self)} ended at byte {self.hashed_to} of {self.size} while being uploaded"
                    )
                self.feed(self.hashed_to, data)


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
    return _upload(
        conn, _Source(source, digest.size_bytes, digest), upload_id_for(digest), settings, progress
    )


def upload_hashing(
    conn: Connection,
    path: Path,
    settings: TransferSettings,
    progress: Progress | None = None,
) -> UploadResult:
    """Upload the file `path` as a blob whose digest is computed while it is read for sending
    (digest-late: see `Blobs.Write`), so that it is read once; `UploadResult.digest` is it.

    A file of at most one chunk is read whole and uploaded digest-first (nothing is sent if
    the server holds it). Otherwise the server checks the stated digest against what it
    received, and drops the upload as a duplicate if it holds that blob already. Failures
    are retried as by `upload_blob`; a resumed upload whose bytes on the server turn out not
    to be the file's (it changed in place, its stat identity intact) is sent once more from
    zero under a fresh upload id. What is uploaded is what was read: a file changed while
    being uploaded yields the digest of the bytes sent.
    """
    st = os.stat(path)
    size = st.st_size
    if size <= CHUNK:
        with open(path, "rb") as f:
            data = f.read(size)
        if len(data) != size:
            raise InvalidArgument(f"{path} ended at byte {len(data)} of {size} while being read")
        digest = blobs_pb2.Digest(hash=digests.hash_bytes(data), size_bytes=size)
        return upload_blob(conn, data, digest, settings, progress)
    source = _Source(path, size, None)
    try:
        return _upload(conn, source, hashing_upload_id(path, st), settings, progress)
    except InvalidArgument:
        if not source.resumed_foreign:
            raise
    # The bytes kept on the server under this file's upload id were not the file's: start over,
    # hashing again what is sent (the server's check is of the bytes it receives).
    return _upload(conn, _Source(path, size, None), f"prebake-late-{uuid.uuid4()}", settings, progress)


def _upload(
    conn: Connection, source: _Source, upload_id: str, settings: TransferSettings, progress: Progress | None
) -> UploadResult:
    size = source.size
    query = blobs_pb2.QueryWriteStatusRequest(upload_id=upload_id, digest=source.named)
    failures = aborts = 0
    resumed: int | None = None
    best_committed = -1
    while True:
        stubs = conn.stubs
        status = _write_status(stubs, query, source, settings)
        if status.complete:
            if progress is not None:
                progress(size, size)
            digest = source.digest
            assert digest is not None  # complete is never reported before the digest is known
            if resumed is None:
                return UploadResult(digest, 0, 0, already_present=True)
            return UploadResult(digest, size - resumed, resumed, already_present=False)
        committed = status.committed_size
        if resumed is None:
            resumed = committed
        source.catch_up(committed)
        if committed > best_committed:
            failures = 0
            best_committed = committed
        if progress is not None:
            progress(committed, size)
        state = _WriteState()
        requests = _write_requests(
            source=source,
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
                digest = source.digest
                assert digest is not None  # the stream finished: every byte was read
                return UploadResult(digest, size - resumed, resumed, already_present=False)
            error = Unavailable(
                f"the server stopped the upload of {_what(source)} at byte {response.committed_size}",
                settings.target,
            )
        if failures >= settings.policy.retries:
            raise error
        time.sleep(settings.policy.backoff(failures))
        failures += 1


def _what(source: _Source) -> str:
    if source.known is not None:
        return f"blob {source.known.hash}"
    return str(source.source) if isinstance(source.source, Path) else "the data"


def _write_status(
    stubs: Stubs, query: blobs_pb2.QueryWriteStatusRequest, source: _Source, settings: TransferSettings
) -> blobs_pb2.QueryWriteStatusResponse:
    """QueryWriteStatus of the upload. A digest-late one is never reported complete, so once its
    digest is known (a finish may have been lost) the server is first asked about the blob."""

    def ask(request: blobs_pb2.QueryWriteStatusRequest) -> blobs_pb2.QueryWriteStatusResponse:
        return call_with_retry(
            functools.partial(stubs.blobs.QueryWriteStatus, request, timeout=settings.unary_timeout),
            settings.policy,
            settings.target,
        )

    digest = source.digest
    if source.late and digest is not None:
        stored = ask(blobs_pb2.QueryWriteStatusRequest(upload_id=query.upload_id, digest=digest))
        if stored.complete:
            return stored
    return ask(query)


def _write_requests(
    *,
    source: _Source,
    upload_id: str,
    offset: int,
    settings: TransferSettings,
    state: _WriteState,
    progress: Progress | None,
) -> Iterator[blobs_pb2.WriteRequest]:
    # gRPC swallows exceptions raised by a request iterator (it just cancels the call),
    # so every failure here is parked in `state` and re-raised by the caller; ending
    # the stream without finish_write makes the server keep what it received.
    size = source.size
    try:
        with _open_source(source.source) as reader:
            reader.seek(offset)
            first = True
            while True:
                data = reader.read(min(CHUNK, size - offset))
                last = offset + len(data) >= size
                if not data and not last:
                    raise InvalidArgument(
                        f"the data of {_what(source)} ended at byte {offset} of {size}; "
                        + (
                            "was the file changed after it was hashed?"
                            if not source.late
                            else "did it shrink?"
                        )
                    )
                source.feed(offset, data)
                request = blobs_pb2.WriteRequest(offset=offset, data=data, finish_write=last)
                if first:
                    opening = blobs_pb2.WriteRequest(upload_id=upload_id, digest=source.named, offset=offset)
                    if last and source.late:
                        # A digest-late stream states its digest in a later message than its first.
                        if state.watchdog is not None:
                            state.watchdog.kick()
                        yield opening
                    else:
                        request.MergeFrom(opening)
                    first = False
                if last and source.late:
                    digest = source.digest
                    assert digest is not None
                    request.digest.CopyFrom(digest)
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
