"""The one place where domain errors become gRPC status codes.

Services raise `prebake.server.errors` exceptions; the `unary` and `streaming`
decorators catch them and abort the rpc with `to_status`. Anything else is a bug: it
is logged with its traceback and answered INTERNAL without leaking internals.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from prebake.server import errors

log = logging.getLogger(__name__)

_CODES: tuple[tuple[type[errors.PrebakeError], grpc.StatusCode], ...] = (
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    (errors.DataLoss, grpc.StatusCode.DATA_LOSS),
    (errors.QuotaExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Busy, grpc.StatusCode.ABORTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
)


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map an exception to (status code, message). Unknown exceptions are INTERNAL."""
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"


Req = TypeVar("Req")
Resp = TypeVar("Resp")
Self = TypeVar("Self")


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException, method: str) -> None:
    code, message = to_status(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("%s failed", method, exc_info=exc)
    await context.abort(code, message)


def unary(
    fn: Callable[[Self, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]],
) -> Callable[[Self, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]]:
    """Wrap a unary (or client-streaming) aio handler with the error mapping."""

    @functools.wraps(fn)
    async def wrapper(self: Self, request: Req, context: grpc.aio.ServicerContext[Any, Any]) -> Resp:
        try:
            return await fn(self, request, context)
        except (errors.PrebakeError, Exception) as exc:
            if isinstance(exc, grpc.aio.AbortError | grpc.aio.UsageError):
                raise
            await _abort(context, exc, fn.__qualname__)
            raise  # unreachable: abort raises

    return wrapper


def streaming(
    fn: Callable[[Self, Req, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Resp]],
) -> Callable[[Self, Req, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Resp]]:
    """Wrap a server-streaming aio handler (an async generator) with the error mapping."""

    @functools.wraps(fn)
    async def wrapper(
        self: Self, request: Req, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Resp]:
        try:
            async for item in fn(self, request, context):
                yield item
        except (errors.PrebakeError, Exception) as exc:
            if isinstance(exc, grpc.aio.AbortError | grpc.aio.UsageError):
                raise
            await _abort(context, exc, fn.__qualname__)

    return wrapper
