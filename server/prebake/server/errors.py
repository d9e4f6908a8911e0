"""Transitional re-export of `prebake.core.errors` (the one error model); import that instead.

Kept only so that modules still naming `prebake.server.errors` keep working while they
move over; it adds nothing. `DigestMismatch` is the old server name of
`UploadDigestMismatch` (bytes sent to the server do not match the claimed digest).
"""

from __future__ import annotations

from prebake.core.errors import (
    AlreadyExists,
    Busy,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    InvalidKey,
    NoCapableWorker,
    NotFound,
    OutOfRange,
    PrebakeError,
    QuotaExceeded,
    Unavailable,
    UploadDigestMismatch,
)

DigestMismatch = UploadDigestMismatch

__all__ = [
    "AlreadyExists",
    "Busy",
    "DataLoss",
    "DigestMismatch",
    "FailedPrecondition",
    "InvalidArgument",
    "InvalidKey",
    "NoCapableWorker",
    "NotFound",
    "OutOfRange",
    "PrebakeError",
    "QuotaExceeded",
    "Unavailable",
    "UploadDigestMismatch",
]
