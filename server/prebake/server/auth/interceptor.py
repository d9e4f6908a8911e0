"""The one grpc.aio server interceptor that authenticates every call and enforces `RPC_ROLES`.

For each rpc it returns the service's handler wrapped, so that the check runs inside the
handler's own task, where `context.auth_context()` (the verified client certificate) is
available and where the principal is bound (`prebake.server.principal.bind`) for the
handler, rate limits and audit to read:

* open services (health, reflection; see `rpc_roles`) run as they are;
* no credentials, or a token the server does not accept: UNAUTHENTICATED;
* a known caller without a role the rpc allows: PERMISSION_DENIED, naming the caller,
  its roles and the roles that would do.

The token is read from the `authorization` metadata as `Bearer <token>`; it is never
logged or echoed. A malformed header is UNAUTHENTICATED. Unknown methods fall through
(gRPC answers UNIMPLEMENTED).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from prebake.core.errors import PermissionDenied, Unauthenticated
from prebake.server.auth.authenticator import Authenticator
from prebake.server.auth.rpc_roles import allowed, is_open, roles_for, split_method
from prebake.server.handler_wrapping import WrappedOnce, behaviour_of
from prebake.server.principal import Principal, bind, unbind

log = logging.getLogger("prebake.server.auth")

Ctx = grpc.aio.ServicerContext[Any, Any]
_BEARER = "bearer "
# The auth-context property that holds a verified peer certificate's subject.
_SUBJECT_PROPERTY = "x509_subject"


def bearer_token(metadata: Any) -> str | None:
    """The token of an `authorization: Bearer <token>` entry; None without one.

    Unauthenticated for an `authorization` entry of another shape.
    """
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
        if text[: len(_BEARER)].lower() != _BEARER or not text[len(_BEARER) :].strip():
            raise Unauthenticated("the authorization metadata must read 'Bearer <token>'")
        return text[len(_BEARER) :].strip()
    return None


def certificate_subjects(context: Ctx) -> list[str]:
    """The verified client certificate's subjects (empty without mutual TLS)."""
    try:
        properties = context.auth_context()
    except Exception:  # a transport without an auth context: no certificate
        return []
    return [v.decode("utf-8", "replace") for v in properties.get(_SUBJECT_PROPERTY, [])]


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]  # generic only in the stubs
    """Authenticates and authorises every call of a server (see the module docstring)."""

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator
        self._wrapped = WrappedOnce()

    def admit(self, method: str, context: Ctx) -> Principal:
        """The caller of `method`, if it may call it; Unauthenticated / PermissionDenied if not."""
        principal = self.authenticator.principal(
            bearer_token(context.invocation_metadata()), certificate_subjects(context)
        )
        if not allowed(method, principal.roles):
            service, rpc = split_method(method)
            held = ", ".join(sorted(principal.roles)) or "none"
            needed = ", ".join(sorted(roles_for(method)))
            raise PermissionDenied(
                f"{principal.name!r} (roles: {held}) may not call {service}/{rpc}; it needs one of: "
                f"{needed} (ask the server's operator)"
            )
        return principal

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or is_open(method):
            return handler
        return self._wrapped.get(method, handler, lambda: _guarded(handler, method, self))


async def _enter(gate: AuthInterceptor, method: str, context: Ctx) -> Any:
    """Admit the caller and bind it; abort the rpc with the status if it is refused."""
    try:
        principal = gate.admit(method, context)
    except (Unauthenticated, PermissionDenied) as exc:
        log.info("refused %s: %s", method, exc)
        code = grpc.StatusCode[exc.code]
        await context.abort(code, str(exc))
        raise  # unreachable: abort raises
    return bind(principal)


def _guarded(
    handler: grpc.RpcMethodHandler[Any, Any], method: str, gate: AuthInterceptor
) -> grpc.RpcMethodHandler[Any, Any]:
    """`handler` with the caller admitted (and bound) before its behaviour runs."""
    behaviour, rebuild = behaviour_of(handler)

    if inspect.isasyncgenfunction(behaviour):

        async def stream(request: Any, context: Ctx) -> AsyncIterator[Any]:
            token = await _enter(gate, method, context)
            try:
                async for item in behaviour(request, context):
                    yield item
            finally:
                # A generator closed from another context cannot reset the variable; the
                # rpc's task (and its binding) ends with the stream anyway.
                with contextlib.suppress(ValueError):
                    unbind(token)

        wrapped: Callable[..., Any] = stream
    else:

        async def call(request: Any, context: Ctx) -> Any:
            token = await _enter(gate, method, context)
            try:
                return await behaviour(request, context)
            finally:
                unbind(token)

        wrapped = call
    return rebuild(wrapped)
