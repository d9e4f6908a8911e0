"""Re-wrapping a gRPC method handler's behaviour: what every server interceptor here needs.

An aio server interceptor that runs code around an rpc returns a new handler of the same
kind (unary or streaming on each side) with the same (de)serializers around a replacement
behaviour; `behaviour_of` does that bookkeeping once for all of them.
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
