"""Exceptions raised by the prebake client.

Every failure a caller can see is a `PrebakeError`: rpc failures are translated in one
place (`from_rpc_error`), so users of the client never catch `grpc.RpcError`. The
subclasses follow the gRPC status codes the contract documents (`proto/prebake/v1`), plus
a few raised by the client itself (a download that fails verification, a compile that
failed, a destination that is in the way).
"""

from __future__ import annotations

import grpc

from prebake.v1 import jobs_pb2


class PrebakeError(Exception):
    """Base of every client error.

    `code` is the gRPC status name ("NOT_FOUND", ...) the error stands for; `details` is
    the server's message (or the client's, for errors raised locally). `str(err)` is
    the message to show a person.
    """

    code: str = "UNKNOWN"

    def __init__(self, details: str = "") -> None:
        super().__init__(details)
        self.details = details

    def __str__(self) -> str:
        return self.details or self.code.lower().replace("_", " ")


class InvalidArgument(PrebakeError):
    """The request is malformed or out of range; retrying it unchanged cannot succeed."""

    code = "INVALID_ARGUMENT"


class NotFound(PrebakeError):
    """The named artifact, job or blob does not exist."""

    code = "NOT_FOUND"


class AlreadyExists(PrebakeError):
    """Something different already exists under that name (e.g. another file list for a key)."""

    code = "ALREADY_EXISTS"


class FailedPrecondition(PrebakeError):
    """The system is not in a state that allows the operation (missing blob, pinned artifact)."""

    code = "FAILED_PRECONDITION"


class DestinationExists(FailedPrecondition):
    """`fetch` found its destination occupied by something else and `overwrite` was not set."""


class NoCapableWorker(FailedPrecondition):
    """No live worker can compile the key (kind, toolchain, compile target); `ensure`
    stops waiting instead of waiting in silence. The job stays queued for a worker
    that may still come; `job` is it, `details` names the missing capability."""

    def __init__(self, details: str = "", job: jobs_pb2.Job | None = None) -> None:
        super().__init__(details)
        self.job = job


class DataLoss(PrebakeError):
    """Bytes do not match their digest (on the server, or as received by the client)."""

    code = "DATA_LOSS"


class DigestMismatch(DataLoss):
    """A downloaded file failed size or xxh3 verification; it was deleted, never placed."""


class UnsafeManifest(DataLoss):
    """A manifest from the server names a path that must not be written (e.g. `../x`)."""


class QuotaExceeded(PrebakeError):
    """RESOURCE_EXHAUSTED: a blob is too large or the store's quota would be exceeded."""

    code = "RESOURCE_EXHAUSTED"


class Aborted(PrebakeError):
    """A concurrent operation conflicted (e.g. another stream writes the same upload)."""

    code = "ABORTED"


class OutOfRange(PrebakeError):
    """An offset lies past the end of a blob."""

    code = "OUT_OF_RANGE"


class Unavailable(PrebakeError):
    """The server could not be reached, after the bounded retries.

    `target` is the address that was tried, when known.
    """

    code = "UNAVAILABLE"

    def __init__(self, details: str = "", target: str | None = None) -> None:
        super().__init__(details)
        self.target = target


class DeadlineExceeded(PrebakeError):
    """A call (or `ensure`'s wait for a compile) ran out of time."""

    code = "DEADLINE_EXCEEDED"


class Cancelled(PrebakeError):
    """The call was cancelled."""

    code = "CANCELLED"


class PermissionDenied(PrebakeError):
    """The caller may not do this."""

    code = "PERMISSION_DENIED"


class Unauthenticated(PrebakeError):
    """The caller's credentials are missing or invalid."""

    code = "UNAUTHENTICATED"


class Unimplemented(PrebakeError):
    """The server does not implement this rpc (an older or different server)."""

    code = "UNIMPLEMENTED"


class Internal(PrebakeError):
    """The server failed unexpectedly; its message says what it knows."""

    code = "INTERNAL"


class CompileFailed(PrebakeError):
    """The compile job for a key failed (or the key's last compile failed deterministically).

    `job` is the failed job when the server returned one; its `error`, `error_class` and
    `log` say why.
    """

    code = "FAILED"

    def __init__(self, details: str = "", job: jobs_pb2.Job | None = None) -> None:
        super().__init__(details)
        self.job = job


class JobCancelled(PrebakeError):
    """The compile job being waited for was cancelled; `job.error` holds the reason."""

    code = "CANCELLED"

    def __init__(self, details: str = "", job: jobs_pb2.Job | None = None) -> None:
        super().__init__(details)
        self.job = job


_BY_CODE: dict[grpc.StatusCode, type[PrebakeError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.DATA_LOSS: DataLoss,
    grpc.StatusCode.RESOURCE_EXHAUSTED: QuotaExceeded,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.INTERNAL: Internal,
}


def from_rpc_error(err: grpc.RpcError, target: str | None = None) -> PrebakeError:
    """Translate a failed rpc into the matching `PrebakeError` (message = server's details).

    Codes without a dedicated class (UNKNOWN, OK in a broken call) give a plain
    `PrebakeError` whose `code` names the status. `target`, when given, is recorded on
    `Unavailable` so that a caller can say which address could not be reached.
    """
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    status = code_fn() if callable(code_fn) else None
    details = details_fn() if callable(details_fn) else None
    message = details if isinstance(details, str) else str(err)
    cls = _BY_CODE.get(status) if isinstance(status, grpc.StatusCode) else None
    if cls is Unavailable:
        return Unavailable(message, target=target)
    if cls is not None:
        return cls(message)
    error = PrebakeError(message)
    if isinstance(status, grpc.StatusCode):
        # A per-instance code keeps UNKNOWN and friends visible without a class each.
        error.code = status.name
    return error
