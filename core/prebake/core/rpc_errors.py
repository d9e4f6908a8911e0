"""The mapping between prebake errors and gRPC status codes, in both directions.

One table, `BY_STATUS`, derived from the error classes' `code` (see `prebake.core.errors`):
the server answers a raised error with `to_status`, the client turns a failed rpc back
into an error with `from_rpc_error`. A status code and its class therefore cannot drift
apart between the two sides.

Pure functions, thread-safe.
"""

from __future__ import annotations

import grpc

from prebake.core import errors, status_details

# Every class that owns a status code, keyed by that code. Refinements (InvalidKey,
# Busy, ...) answer with their owner's code; the client only sees the owner.
BY_STATUS: dict[grpc.StatusCode, type[errors.PrebakeError]] = {
    grpc.StatusCode[name]: cls for name, cls in errors.status_owners().items()
}

# Nothing a client should see may leak from an unexpected exception: no message (it may
# hold paths, SQL or secrets), no traceback. The server logs those.
INTERNAL_MESSAGE = "internal error; see the server log"


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message that answer `exc` (server side).

    A `PrebakeError` is answered with its class's code and its message. Anything else is
    a bug: INTERNAL with a generic message that names no internals (callers log the
    exception itself).
    """
    if isinstance(exc, errors.PrebakeError):
        code = getattr(grpc.StatusCode, exc.code, None)
        if isinstance(code, grpc.StatusCode) and code is not grpc.StatusCode.OK:
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def to_details(exc: BaseException, code: grpc.StatusCode) -> tuple[tuple[str, bytes], ...]:
    """Trailing metadata that names the field `exc` is about (server side); () if none.

    A google.rpc.BadRequest in `grpc-status-details-bin` (`prebake.core.status_details`),
    so callers in any language can tell which field to fix without parsing the message.
    """
    field = getattr(exc, "field", None)
    if not isinstance(exc, errors.PrebakeError) or not isinstance(field, str) or not field:
        return ()
    return ((status_details.DETAILS_KEY, status_details.bad_request(code.value[0], str(exc), field)),)


def _field_of(err: grpc.RpcError) -> str | None:
    trailing_fn = getattr(err, "trailing_metadata", None)
    trailing = trailing_fn() if callable(trailing_fn) else None
    for key, value in trailing or ():
        if key == status_details.DETAILS_KEY and isinstance(value, bytes):
            return status_details.field_of(value)
    return None


def from_rpc_error(err: grpc.RpcError, target: str | None = None) -> errors.PrebakeError:
    """The `PrebakeError` a failed rpc stands for (client side); message = server's details.

    Codes without a class of their own (UNKNOWN, OK in a broken call) give a plain
    `PrebakeError` whose `code` names the status. `target`, when given, is recorded on
    `Unavailable` so that a caller can say which address could not be reached. The field
    a google.rpc.BadRequest detail names, if any, becomes the error's `field`.
    """
    error = _from_status(err, target)
    field = _field_of(err)
    if field:
        error.field = field
    return error


def _from_status(err: grpc.RpcError, target: str | None) -> errors.PrebakeError:
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    status = code_fn() if callable(code_fn) else None
    details = details_fn() if callable(details_fn) else None
    message = details if isinstance(details, str) else str(err)
    cls = BY_STATUS.get(status) if isinstance(status, grpc.StatusCode) else None
    if cls is errors.Unavailable:
        return errors.Unavailable(message, target=target)
    if cls is not None and cls is not errors.PrebakeError:
        return cls(message)
    error = errors.PrebakeError(message)
    if isinstance(status, grpc.StatusCode):
        # A per-instance code keeps UNKNOWN and friends visible without a class each.
        error.code = status.name
    return error
