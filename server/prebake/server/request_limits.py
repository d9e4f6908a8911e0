"""Request size limits that hold before any parsing work is done.

gRPC's receive limit is one number for the whole server (`REQUEST_LIMIT`, what a blob
chunk needs); gRPC refuses a longer message itself, as its length arrives. Most rpcs
carry a few strings, so each method also gets its own limit, checked on the raw bytes
before protobuf parses them: a 1 MB lookup costs a length comparison, not a hundred
thousand map entries.

The services are registered from their descriptors (`add_service`) with a deserializer
(`parser`) that never raises: bytes over the method's limit, or bytes that are not a
valid message, become a `RejectedRequest`, which the `unary` and `streaming` decorators
of `prebake.server.status` turn into INVALID_ARGUMENT before the handler runs. (A raising
deserializer would be answered by gRPC itself, with a status prebake does not choose.)
The answer names the method and the limit, never the parser's error text.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from prebake.core.errors import InvalidArgument
from prebake.server.services.blobs_service import MAX_FIND, MAX_WRITE_CHUNK
from prebake.server.status import RejectedRequest

# The largest message gRPC accepts at all: one blob chunk and its small header (upload id,
# digest, offset). Larger messages are refused by gRPC itself (RESOURCE_EXHAUSTED) as
# their length arrives, before any of their bytes reach Python: a 14 MB request costs the
# event loop nothing.
REQUEST_LIMIT = MAX_WRITE_CHUNK + (64 << 10)
# Methods whose requests are legitimately large, and the bytes each may carry. The rest
# get `ServerConfig.max_request_bytes`.
LARGE_REQUESTS: Mapping[str, int] = {
    "prebake.v1.Blobs/Write": REQUEST_LIMIT,
    # A manifest: about 40,000 files with 60-character paths fit (DynamoDB stores at most
    # 300 kB of them; see storage/dynamodb/items.py).
    "prebake.v1.Registry/PublishArtifact": REQUEST_LIMIT,
    "prebake.v1.Workers/CompleteJob": REQUEST_LIMIT,
    # Digests of about 50 bytes each (hash, size, field tags).
    "prebake.v1.Blobs/FindMissingBlobs": MAX_FIND * 64,
}


def method_path(method: MethodDescriptor) -> str:
    """ "package.Service/Method", as gRPC names the method on the wire."""
    return f"{method.containing_service.full_name}/{method.name}"


def parser(method: MethodDescriptor, max_bytes: int) -> Callable[[bytes], Message | RejectedRequest]:
    """A request deserializer for `method` that refuses more than `max_bytes` unparsed.

    Never raises: refused or undecodable bytes give a `RejectedRequest`. Thread-safe.
    """
    message_class = message_factory.GetMessageClass(method.input_type)
    name = method_path(method)

    def parse(data: bytes) -> Message | RejectedRequest:
        if len(data) > max_bytes:
            return RejectedRequest(
                InvalidArgument(f"{name}: a request message of {len(data)} bytes; at most {max_bytes}")
            )
        try:
            return message_class.FromString(data)
        except Exception:  # DecodeError, and whatever a hostile encoding provokes: never the handler's
            return RejectedRequest(
                InvalidArgument(f"{name}: the request is not a valid {method.input_type.full_name} message")
            )

    return parse


def add_service(
    server: grpc.aio.Server,
    servicer: object,
    service: ServiceDescriptor,
    default_max_bytes: int,
    *,
    foreign: bool = False,
) -> None:
    """Register every rpc of `service` on `server`, answered by `servicer`'s method of the
    same name, with request limits from `LARGE_REQUESTS` or `default_max_bytes`.

    What the generated `add_*Servicer_to_server` does, except for the deserializers.
    `foreign`: the servicer's methods are not wrapped by `prebake.server.status` (health,
    reflection), so each is guarded here: a refused request is answered INVALID_ARGUMENT
    before it runs; methods the servicer leaves to its generated base are not served.
    """
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        limit = LARGE_REQUESTS.get(method_path(method), default_max_bytes)
        response_class = message_factory.GetMessageClass(method.output_type)
        options: dict[str, Any] = {
            "request_deserializer": parser(method, limit),
            "response_serializer": response_class.SerializeToString,
        }
        behaviour = getattr(servicer, method.name)
        if foreign:
            if getattr(type(servicer), method.name).__module__.endswith("_pb2_grpc"):
                # The generated base's stub (health's List): gRPC answers UNIMPLEMENTED for
                # an unregistered method, without the stub's exception text.
                continue
            behaviour = _guarded(behaviour, method)
        if method.client_streaming and method.server_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(behaviour, **options)
        elif method.client_streaming:
            handlers[method.name] = grpc.stream_unary_rpc_method_handler(behaviour, **options)
        elif method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(behaviour, **options)
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(behaviour, **options)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    # As the generated code does (grpcio >= 1.63: served without the generic lookup); not in the stubs.
    server.add_registered_method_handlers(service.full_name, handlers)  # type: ignore[attr-defined]


async def _refuse(request: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    if isinstance(request, RejectedRequest):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request.error))


def _guarded(behaviour: Any, method: MethodDescriptor) -> Any:
    """`behaviour` with refused requests answered INVALID_ARGUMENT first, in the same shape
    (gRPC tells an async generator from a coroutine that writes to its context)."""
    if method.client_streaming:

        async def accepted(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async for item in requests:
                await _refuse(item, context)
                yield item

        if inspect.isasyncgenfunction(behaviour):

            async def each_of_stream(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                async for response in behaviour(accepted(requests, context), context):
                    yield response

            return each_of_stream

        async def all_of_stream(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            return await behaviour(accepted(requests, context), context)

        return all_of_stream
    if inspect.isasyncgenfunction(behaviour):

        async def each(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await _refuse(request, context)
            async for response in behaviour(request, context):
                yield response

        return each

    async def one(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await _refuse(request, context)
        return await behaviour(request, context)

    return one
