"""The one place where the server's exceptions become gRPC status codes.

Services raise `prebake.core.errors` exceptions; the `unary` and `streaming` decorators
catch them and abort the rpc with `prebake.core.rpc_errors.to_status`, the mapping the
client reverses. One server-only translation comes first: SQLite's "database is locked"
(`sqlite3.OperationalError` after the busy timeout) is a transient condition, answered
UNAVAILABLE so that clients retry it, never INTERNAL. Anything else unexpected is a bug:
it is logged with its traceback and answered INTERNAL without leaking internals. An
error that names a request field (`InvalidKey.field`) also carries it as a
google.rpc.BadRequest detail (`prebake.core.rpc_errors.to_details`).

A request the deserializer refused (`prebake.server.request_limits`: too many bytes for
its method, or not a valid message) reaches a handler as a `RejectedRequest`, in place
of the message or as an item of a request stream; the decorators raise its error before
the handler sees it, so it is answered INVALID_ARGUMENT like any other bad input.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from prebake.core import errors
from prebake.core.rpc_errors import to_details, to_status

log = logging.getLogger(__name__)

# SQLITE_BUSY and SQLITE_LOCKED, as the sqlite3 module words them.
_BUSY_MESSAGES = ("database is locked", "database is busy", "database table is locked")


def domain_error(exc: BaseException) -> BaseException:
    """`exc`, or the domain error it stands for when it is a known transient storage failure."""
    if isinstance(exc, sqlite3.OperationalError) and any(m in str(exc).lower() for m in _BUSY_MESSAGES):
        return errors.Unavailable(
            "the registry database is busy (another writer holds its lock); retry shortly"
        )
    return exc


@dataclass(frozen=True)
class RejectedRequest:
    """Stands in for a request message whose bytes were refused; `error` says why."""

    error: errors.InvalidArgument


async def _accepted(stream: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for item in stream:
        if isinstance(item, RejectedRequest):
            raise item.error
        yield item


def _accepted_request(request: Any) -> Any:
    """The request, a request stream that raises at a refused item, or the refusal raised."""
    if isinstance(request, RejectedRequest):
        raise request.error
    if hasattr(request, "__aiter__"):
        return _accepted(request)
    return request


Req = TypeVar("Req")
Resp = TypeVar("Resp")
Self = TypeVar("Self")


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException, method: str) -> None:
    translated = domain_error(exc)
    code, message = to_status(translated)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("%s failed", method, exc_info=exc)
    elif translated is not exc:
        log.warning("%s: %s (%s)", method, message, exc)
    details = to_details(translated, code)
    if details:
        # Given to abort, trailing metadata replaces what was set before: keep the request id.
        await context.abort(code, message, (*(context.trailing_metadata() or ()), *details))
    await context.abort(code, message)


def unary(
    fn: Callable[[Self, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]],
) -> Callable[[Self, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]]:
    """Wrap a unary (or client-streaming) aio handler with the error mapping."""

    @functools.wraps(fn)
    async def wrapper(self: Self, request: Req, context: grpc.aio.ServicerContext[Any, Any]) -> Resp:
        try:
            return await fn(self, _accepted_request(request), context)
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
            async for item in fn(self, _accepted_request(request), context):
                yield item
        except (errors.PrebakeError, Exception) as exc:
            if isinstance(exc, grpc.aio.AbortError | grpc.aio.UsageError):
                raise
            await _abort(context, exc, fn.__qualname__)

    return wrapper
