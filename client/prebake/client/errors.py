"""The exceptions a prebake client raises: the classes of `prebake.core.errors`.

Every failure a caller can see is a `PrebakeError`; rpc failures are translated in one
place (`from_rpc_error`, from `prebake.core.rpc_errors`), so users of the client never
catch `grpc.RpcError`. `err.code` names the gRPC status ("NOT_FOUND", ...) and
`err.retryable` says whether trying again later may help. Besides the status classes
the contract documents (`proto/prebake/v1`), the client raises a few of its own:
`DownloadDigestMismatch` (a downloaded file failed verification), `UnsafeManifest`,
`DestinationExists`, `CompileFailed`, `JobCancelled` and, for signed artifacts,
`UntrustedArtifact` (refused by the trust set; nothing placed) and `SigningUnavailable`
(the `signing` extra is not installed).
"""

from __future__ import annotations

from prebake.core.errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    CompileFailed,
    DataLoss,
    DeadlineExceeded,
    DestinationExists,
    DownloadDigestMismatch,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    JobCancelled,
    NoCapableWorker,
    NoRecommendation,
    NotFound,
    OutOfRange,
    PermissionDenied,
    PrebakeError,
    QuotaExceeded,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    UnsafeManifest,
)
from prebake.core.rpc_errors import from_rpc_error
from prebake.core.signing import SigningUnavailable, UntrustedArtifact

__all__ = [
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "CompileFailed",
    "DataLoss",
    "DeadlineExceeded",
    "DestinationExists",
    "DownloadDigestMismatch",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "JobCancelled",
    "NoCapableWorker",
    "NoRecommendation",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "PrebakeError",
    "QuotaExceeded",
    "SigningUnavailable",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "UnsafeManifest",
    "UntrustedArtifact",
    "from_rpc_error",
]
