"""The one server interceptor that observes every rpc once: request id, log line, latency.

For each rpc, inside the handler's own task and around everything else (authentication
included, so refusals are observed too), it

* takes the caller's ``x-request-id`` metadata, or generates an id when it is absent or
  malformed (`prebake.core.request_ids`), binds it for the rpc (handlers read it with
  `request_ids.current()`, e.g. a lookup records it on the job it creates; log lines
  carry it) and returns it in the trailing metadata;
* when the rpc ends, observes its duration in ``prebake_rpc_duration_seconds{method, code}``
  (`prebake.server.metrics`) and logs one line on the ``prebake.server.rpc`` logger with
  method, status code, duration, peer and request id (structured fields in the JSON log
  format). Health checks and reflection log at debug level, everything else at info.

Cheap by design: one metadata scan, one clock pair, a cached histogram child, and a log
line that is skipped (no formatting, no peer lookup) when its level is off. Otherwise the
lines of one loop turn are written on the next, after the responses have been handed to
gRPC, and together: where the only handler is prebake's own, formatted from their parts and
written in one write, without a LogRecord each (`prebake.core.logs.direct_handler`; about
25 µs a line less), else logged one by one through `logging`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from prebake.core import logs, request_ids
from prebake.core.request_ids import REQUEST_ID_HEADER
from prebake.server.handler_wrapping import WrappedOnce, behaviour_of
from prebake.server.metrics import ServerMetrics

log = logging.getLogger("prebake.server.rpc")

Ctx = grpc.aio.ServicerContext[Any, Any]
# Services whose rpcs log at debug level (probes and tooling, not traffic).
_QUIET_PREFIXES = ("/grpc.health.", "/grpc.reflection.")


def request_id_of(metadata: Any) -> str:
    """The caller's valid ``x-request-id``, or a fresh id."""
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER:
            text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
            if request_ids.is_valid(text):
                return text
            break
    return request_ids.new_request_id()


def _code_of(context: Ctx, exc: BaseException | None) -> str:
    """The status the rpc ends with: what the handler set or aborted with, else from `exc`."""
    # A stream closed or cancelled under us: its call is over, and the context must not be
    # touched any more (grpc's aio context may already be freed).
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if exc is None:
        return "OK"
    # An exception no decorator mapped: gRPC answers it UNKNOWN.
    return "UNKNOWN"


@dataclass(frozen=True)
class RpcLine:
    """What the log line of one rpc says."""

    level: int
    method: str
    code: str
    seconds: float
    peer: str
    request_id: str

    def message(self) -> str:
        return f"rpc {self.method} {self.code} {self.seconds * 1000:.2f} ms from {self.peer}"

    def fields(self) -> dict[str, object]:
        duration_ms = round(self.seconds * 1000, 3)
        return {"method": self.method, "code": self.code, "duration_ms": duration_ms, "peer": self.peer}


class RpcLines:
    """The rpc lines of one loop turn, written on the next (event-loop only)."""

    def __init__(self) -> None:
        self._pending: list[RpcLine] = []

    def add(self, line: RpcLine) -> None:
        if not self._pending:
            asyncio.get_running_loop().call_soon(self.write)
        self._pending.append(line)

    def write(self) -> None:
        lines, self._pending = self._pending, []
        now = time.time()
        direct = logs.direct_handler(log, min(line.level for line in lines))
        if direct is not None:
            with contextlib.suppress(Exception):  # logged below instead, which reports the error
                name = log.name
                direct.write_lines(
                    [logs.Line(now, x.level, name, x.message(), x.request_id, x.fields()) for x in lines]
                )
                return
        for x in lines:
            log.log(x.level, "%s", x.message(), extra={"request_id": x.request_id, "fields": x.fields()})


class RpcObserver(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]  # generic only in the stubs
    """Request ids, rpc log lines and rpc latency for every call of a server (module docstring)."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self._wrapped = WrappedOnce()
        self._lines = RpcLines()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        level = logging.DEBUG if method.startswith(_QUIET_PREFIXES) else logging.INFO
        return self._wrapped.get(
            method, handler, lambda: _observed(handler, method.lstrip("/"), level, self.metrics, self._lines)
        )


def _observed(
    handler: grpc.RpcMethodHandler[Any, Any], method: str, level: int, metrics: ServerMetrics, lines: RpcLines
) -> grpc.RpcMethodHandler[Any, Any]:
    behaviour, rebuild = behaviour_of(handler)

    def begin(context: Ctx) -> tuple[str, Any, float, str]:
        rid = request_id_of(context.invocation_metadata())
        context.set_trailing_metadata(((REQUEST_ID_HEADER, rid),))
        # Read while the call is surely alive (see _code_of); only when it will be logged.
        peer = context.peer() if log.isEnabledFor(level) else ""
        return rid, request_ids.bind(rid), time.perf_counter(), peer

    def end(context: Ctx, rid: str, peer: str, started: float, exc: BaseException | None) -> None:
        seconds = time.perf_counter() - started
        code = _code_of(context, exc)
        metrics.rpc(method, code, seconds)
        if log.isEnabledFor(level):
            # Written on the loop's next turn, once the response is on its way (see RpcLines).
            lines.add(RpcLine(level, method, code, seconds, peer, rid))

    if inspect.isasyncgenfunction(behaviour):

        async def stream(request: Any, context: Ctx) -> AsyncIterator[Any]:
            rid, token, started, peer = begin(context)
            failure: BaseException | None = None
            try:
                async for item in behaviour(request, context):
                    yield item
            except BaseException as exc:
                failure = exc
                raise
            finally:
                end(context, rid, peer, started, failure)
                # A generator closed from another context cannot reset the variable; the
                # rpc's task (and its binding) ends with the stream anyway.
                with contextlib.suppress(ValueError):
                    request_ids.unbind(token)

        wrapped: Callable[..., Any] = stream
    else:

        async def call(request: Any, context: Ctx) -> Any:
            rid, token, started, peer = begin(context)
            failure: BaseException | None = None
            try:
                return await behaviour(request, context)
            except BaseException as exc:
                failure = exc
                raise
            finally:
                end(context, rid, peer, started, failure)
                request_ids.unbind(token)

        wrapped = call
    return rebuild(wrapped)
