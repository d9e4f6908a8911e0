"""Re-wrapping a gRPC method handler's behaviour: what every server interceptor here needs.

An aio server interceptor that runs code around an rpc returns a new handler of the same
kind (unary or streaming on each side) with the same (de)serializers around a replacement
behaviour; `behaviour_of` does that bookkeeping once for all of them, and `WrappedOnce` lets
each wrap a method's handler once rather than on every call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

# (request streaming, response streaming) -> the handler's attribute and its factory.
_KINDS = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


def behaviour_of(
    handler: grpc.RpcMethodHandler[Any, Any],
) -> tuple[Callable[..., Any], Callable[[Callable[..., Any]], grpc.RpcMethodHandler[Any, Any]]]:
    """The handler's behaviour, and a function making a handler of the same kind and
    (de)serializers around a replacement for it."""
    attribute, make = _KINDS[(handler.request_streaming, handler.response_streaming)]

    def rebuild(wrapped: Callable[..., Any]) -> grpc.RpcMethodHandler[Any, Any]:
        return make(  # type: ignore[no-any-return,operator]
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    return getattr(handler, attribute), rebuild


# Methods a cache remembers: a server has a few dozen; unknown methods have no handler and
# are never cached, so this is only a backstop.
WRAPPED_CAPACITY = 1024


class WrappedOnce:
    """The wrapped handler of each method, made on its first call and reused after.

    Wrapping a handler builds closures and a new handler object: about 10 µs that every rpc
    would pay, though a server's handlers are fixed when it starts. The handler the
    continuation returned is kept with its wrapper and compared by identity, so a handler
    that changes (another interceptor making a new one per call) is wrapped afresh, never
    mixed up. Not thread-safe: used from the server's event loop.
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]] = {}

    def get(
        self,
        method: str,
        handler: grpc.RpcMethodHandler[Any, Any],
        wrap: Callable[[], grpc.RpcMethodHandler[Any, Any]],
    ) -> grpc.RpcMethodHandler[Any, Any]:
        entry = self._entries.get(method)
        if entry is not None and entry[0] is handler:
            return entry[1]
        wrapped = wrap()
        if entry is not None or len(self._entries) < WRAPPED_CAPACITY:
            self._entries[method] = (handler, wrapped)
        return wrapped
