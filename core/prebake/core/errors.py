"""The one error model of prebake, shared by the client, the server and the workers.

Every failure that crosses a module boundary is a `PrebakeError`. Each class has one
meaning, wherever it is raised, and carries:

* `code`: the name of the gRPC status it stands for ("INVALID_ARGUMENT", ...). A
  subclass either inherits its parent's code (a refinement: `InvalidKey` is an
  `InvalidArgument`) or introduces a code no other class has; `__init_subclass__`
  enforces this, so exactly one class "owns" each status code and the mapping to and
  from gRPC (`prebake.core.rpc_errors`) is derived from these classes, not retyped.
* `retryable`: whether sending the same request again, later, may succeed. True only for
  `Unavailable` (the server or its database is busy or unreachable) and `Aborted` (a
  concurrent operation conflicted, e.g. another stream writes the same upload). Bad
  input, missing objects and failed compiles are answers, not accidents.

`str(err)` is the message for a person: it names the field or object and says what
would be valid. `details` holds the same text; `field`, when set, names the request
field (as the contract spells it) that the error is about. A message that tells the
caller to set a request field names it in backquotes ("set `replace` to replace it"), so
that the CLI can show the flag instead (`prebake.client.cli_errors`).

The two digest checks are two different errors:

* `UploadDigestMismatch` (INVALID_ARGUMENT): bytes sent *to* the server do not match the
  digest the uploader claimed. The uploader is wrong; nothing was stored.
* `DownloadDigestMismatch` (DATA_LOSS): a file received *from* the server failed size or
  xxh3 verification on the client. It was deleted, never placed.

At run time this module depends on nothing but the standard library (so both sides, and
core's own modules such as `manifest_paths`, import it without cycles or cost).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # only for annotations: at run time this module imports nothing of prebake
    from prebake.v1 import jobs_pb2

# Status name -> the class that owns it. Filled by `PrebakeError.__init_subclass__`.
_OWNERS: dict[str, type[PrebakeError]] = {}


class PrebakeError(Exception):
    """Base of every prebake error; `code` UNKNOWN when nothing more specific is known.

    `details` is the message (the server's, for an error received over gRPC). A plain
    `PrebakeError` received for a status without a class of its own (UNKNOWN, or OK in a
    broken call) records that status name in its per-instance `code`.
    """

    code: str = "UNKNOWN"
    retryable: ClassVar[bool] = False
    # The request field the error is about ("tensor_parallel_degree"), when one is; the
    # server sends it as a google.rpc.BadRequest detail (`prebake.core.status_details`).
    field: str | None = None

    def __init__(self, details: str = "") -> None:
        super().__init__(details)
        self.details = details

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "code" not in vars(cls):
            return  # a refinement of its parent's status
        owner = _OWNERS.get(cls.code)
        if owner is not None:
            raise TypeError(
                f"{cls.__qualname__} declares code {cls.code} that {owner.__qualname__} already owns; "
                f"subclass {owner.__qualname__} instead"
            )
        _OWNERS[cls.code] = cls

    def __str__(self) -> str:
        return self.details or self.code.lower().replace("_", " ")


_OWNERS[PrebakeError.code] = PrebakeError


def status_owners() -> dict[str, type[PrebakeError]]:
    """Status name -> the one class that stands for it (a copy; see the module docstring)."""
    return dict(_OWNERS)


# --- the request is wrong ------------------------------------------------------------


class InvalidArgument(PrebakeError):
    """The request is malformed or out of range. Retrying it unchanged cannot succeed."""

    code = "INVALID_ARGUMENT"


class InvalidKey(InvalidArgument):
    """An artifact key failed normalisation or validation; `field` names the key field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class UploadDigestMismatch(InvalidArgument):
    """Bytes uploaded to the server do not match the digest the uploader claimed.

    Raised by the blob store when an upload runs past its declared size or its hash
    differs at commit; what was received is discarded, nothing was stored.
    """


class OutOfRange(PrebakeError):
    """An offset or position lies past the end of the object."""

    code = "OUT_OF_RANGE"


class QuotaExceeded(PrebakeError):
    """RESOURCE_EXHAUSTED: a blob is too large, or the store's quota would be exceeded."""

    code = "RESOURCE_EXHAUSTED"


class PermissionDenied(PrebakeError):
    """The caller may not do this."""

    code = "PERMISSION_DENIED"


class Unauthenticated(PrebakeError):
    """The caller's credentials are missing or invalid."""

    code = "UNAUTHENTICATED"


# --- the world is not as the request assumes -------------------------------------------


class NotFound(PrebakeError):
    """The named object (artifact, job, blob) does not exist."""

    code = "NOT_FOUND"


class AlreadyExists(PrebakeError):
    """Something different already exists under that name (e.g. another file list for a key)."""

    code = "ALREADY_EXISTS"


class FailedPrecondition(PrebakeError):
    """The system is not in a state that allows the operation (missing blob, pinned artifact)."""

    code = "FAILED_PRECONDITION"


class NoCapableWorker(FailedPrecondition):
    """No live worker can run this job (none serves its kind, toolchain or compile target).

    Waiting cannot help unless a capable worker joins; the message names what is missing
    and what the live workers do serve. `job` is the queued `prebake.v1.Job` that stays
    queued for such a worker, when there is one.
    """

    def __init__(self, details: str = "", job: jobs_pb2.Job | None = None) -> None:
        super().__init__(details)
        self.job = job


class NoRecommendation(FailedPrecondition):
    """`Recommend` found no evaluated artifact that qualifies; the message says why (the
    filters, the concurrency, the limits and the closest level). More evaluations, or other
    constraints, may give one; retrying as is cannot."""


class DestinationExists(FailedPrecondition):
    """`fetch` found its destination occupied by something else and `overwrite` was not set."""


class CompileFailed(FailedPrecondition):
    """The compile job for a key failed (or the key's last compile failed deterministically).

    An answer about the key, not about the rpc: the artifact cannot be had until the key
    is compiled again (lookup with force). `job` is the failed `prebake.v1.Job` when the
    server returned one; its `error`, `error_class` and `log` say why.
    """

    def __init__(self, details: str = "", job: jobs_pb2.Job | None = None) -> None:
        super().__init__(details)
        self.job = job


# --- bytes are not what they should be --------------------------------------------------


class DataLoss(PrebakeError):
    """Bytes do not match their digest: stored on the server (then quarantined), or as received."""

    code = "DATA_LOSS"


class DownloadDigestMismatch(DataLoss):
    """A downloaded file failed size or xxh3 verification; it was deleted, never placed."""


class UnsafeManifest(DataLoss):
    """A manifest from the server names a path that must not be written (e.g. `../x`)."""


# --- try again ---------------------------------------------------------------------------


class Aborted(PrebakeError):
    """A concurrent operation conflicted; retrying after it finished may succeed."""

    code = "ABORTED"
    retryable = True


class Busy(Aborted):
    """Another request holds the object right now (e.g. writes the same upload id)."""


class Unavailable(PrebakeError):
    """The server (or its database) cannot answer now: unreachable, restarting or locked.

    `target` is the address that was tried, when known. The client retries these a
    bounded number of times before raising one.
    """

    code = "UNAVAILABLE"
    retryable = True

    def __init__(self, details: str = "", target: str | None = None) -> None:
        super().__init__(details)
        self.target = target


# --- the call itself -------------------------------------------------------------------


class DeadlineExceeded(PrebakeError):
    """A call (or `ensure`'s wait for a compile) ran out of time."""

    code = "DEADLINE_EXCEEDED"


class Cancelled(PrebakeError):
    """The operation was cancelled: the call by its caller, or a job by whoever cancelled it."""

    code = "CANCELLED"


class JobCancelled(Cancelled):
    """The compile job being waited for was cancelled; `job.error` holds the reason."""

    def __init__(self, details: str = "", job: jobs_pb2.Job | None = None) -> None:
        super().__init__(details)
        self.job = job


class Unimplemented(PrebakeError):
    """The server does not implement this rpc (an older or different server)."""

    code = "UNIMPLEMENTED"


class Internal(PrebakeError):
    """The server failed unexpectedly; its message says what it knows (never a traceback)."""

    code = "INTERNAL"
