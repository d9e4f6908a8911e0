"""Interceptors wrap each method's handler once (`WrappedOnce`) and never mix handlers up."""

from __future__ import annotations

from typing import Any

import grpc

from prebake.server.handler_wrapping import WRAPPED_CAPACITY, WrappedOnce


def _handler() -> grpc.RpcMethodHandler[Any, Any]:
    async def behaviour(request: Any, context: Any) -> Any:
        return request

    return grpc.unary_unary_rpc_method_handler(behaviour)


def test_a_method_s_handler_is_wrapped_once_and_a_new_handler_afresh() -> None:
    cache = WrappedOnce()
    made: list[grpc.RpcMethodHandler[Any, Any]] = []

    def wrap() -> grpc.RpcMethodHandler[Any, Any]:
        made.append(_handler())
        return made[-1]

    first = _handler()
    assert cache.get("/s/A", first, wrap) is cache.get("/s/A", first, wrap) is made[0]
    assert len(made) == 1
    # Another handler for the same method (an interceptor that makes one per call) is not
    # answered with the first one's wrapper.
    second = _handler()
    assert cache.get("/s/A", second, wrap) is made[1]
    assert cache.get("/s/B", first, wrap) is made[2]
    assert cache.get("/s/A", second, wrap) is made[1] and len(made) == 3


def test_the_cache_is_bounded_but_still_wraps_beyond_its_capacity() -> None:
    cache = WrappedOnce()
    handler = _handler()
    for i in range(WRAPPED_CAPACITY):
        cache.get(f"/s/M{i}", handler, _handler)
    made: list[grpc.RpcMethodHandler[Any, Any]] = []

    def wrap() -> grpc.RpcMethodHandler[Any, Any]:
        made.append(_handler())
        return made[-1]

    one, two = cache.get("/s/extra", handler, wrap), cache.get("/s/extra", handler, wrap)
    assert (one, two) == (made[0], made[1]) and one is not two  # wrapped each time, not kept
