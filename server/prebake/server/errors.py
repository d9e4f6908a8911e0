"""Domain exceptions raised by the registry, the blob stores and key validation.

The gRPC layer turns them into status codes in exactly one place
(`prebake.server.status.to_status`); nothing below the services knows about gRPC.
Every message is written for the person who sent the request: it names the field or
object and says what would be valid.
"""

from __future__ import annotations


class PrebakeError(Exception):
    """Base of every domain error."""


class InvalidArgument(PrebakeError):
    """The request is malformed or out of range. Retrying it unchanged cannot succeed."""


class InvalidKey(InvalidArgument):
    """An artifact key failed normalisation or validation."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class DigestMismatch(InvalidArgument):
    """Uploaded bytes do not match the digest the uploader claimed."""


class NotFound(PrebakeError):
    """The named object (artifact, job, blob) does not exist."""


class AlreadyExists(PrebakeError):
    """A different object already exists under that name."""


class FailedPrecondition(PrebakeError):
    """The system is not in a state that allows the operation (e.g. a blob is missing)."""


class OutOfRange(PrebakeError):
    """An offset or position lies past the end of the object."""


class DataLoss(PrebakeError):
    """Stored bytes no longer match their digest; the object was quarantined."""


class QuotaExceeded(PrebakeError):
    """The operation would exceed a configured size limit or quota."""


class Busy(PrebakeError):
    """Another request holds the object right now (e.g. the same upload id)."""


class Unavailable(PrebakeError):
    """The storage engine is busy or unreachable right now; retrying later may succeed."""
