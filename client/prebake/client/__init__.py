"""prebake's thin client: look artifacts up, fetch them verified, publish, watch jobs.

Needs only grpcio, protobuf and xxhash; never imports the server.

    from prebake.client import ArtifactKey, Client

    key = ArtifactKey(kind="inductor", model="my/llama", instance_type="ml.c7i.4xlarge",
                      sequence_length=512, batch_size=1)
    with Client("127.0.0.1:50051") as client:
        result = client.ensure(key, "/opt/models/llama-aot")
"""

from __future__ import annotations

from prebake.client.artifact_key import ArtifactKey
from prebake.client.client import Client, EnsureResult
from prebake.client.errors import (
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
    NotFound,
    OutOfRange,
    PermissionDenied,
    PrebakeError,
    QuotaExceeded,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    UnsafeManifest,
    from_rpc_error,
)
from prebake.client.fetch import FetchResult
from prebake.client.hostcache import HostCache
from prebake.client.transfer import DownloadResult, UploadResult

__all__ = [
    "Aborted",
    "AlreadyExists",
    "ArtifactKey",
    "Cancelled",
    "Client",
    "CompileFailed",
    "DataLoss",
    "DeadlineExceeded",
    "DestinationExists",
    "DownloadDigestMismatch",
    "DownloadResult",
    "EnsureResult",
    "FailedPrecondition",
    "FetchResult",
    "HostCache",
    "Internal",
    "InvalidArgument",
    "JobCancelled",
    "NoCapableWorker",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "PrebakeError",
    "QuotaExceeded",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "UnsafeManifest",
    "UploadResult",
    "from_rpc_error",
]
