"""Server reflection as both `grpc.reflection.v1` and `grpc.reflection.v1alpha`.

grpcurl and newer clients ask v1 first; older ones only know v1alpha. grpcio-reflection
ships v1alpha only, and the two protocols are the same messages under another package
name, so v1 is v1alpha's file descriptor with the package renamed (derived at import, not
retyped), added to the default pool (so reflection also describes itself), and served
by the same servicer, each message passed across by its bytes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1ALPHA: ServiceDescriptor = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]


def _v1_service() -> ServiceDescriptor:
    pool = descriptor_pool.Default()
    name = "grpc/reflection/v1/reflection.proto"
    try:
        return pool.FindFileByName(name).services_by_name["ServerReflection"]
    except KeyError:  # not there yet (or another library added it first: then it is used)
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old = f".{proto.package}."
    proto.name, proto.package = name, "grpc.reflection.v1"
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):  # (setting it, even to "", would mark it present)
                field.type_name = field.type_name.replace(old, ".grpc.reflection.v1.")
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, ".grpc.reflection.v1.")
            method.output_type = method.output_type.replace(old, ".grpc.reflection.v1.")
    proto.options.Clear()  # v1alpha's language options name v1alpha packages
    pool.AddSerializedFile(proto.SerializeToString())
    return pool.FindFileByName(name).services_by_name["ServerReflection"]


V1: ServiceDescriptor = _v1_service()
SERVICE_NAMES = (V1.full_name, V1ALPHA.full_name)


class _V1Servicer:
    """v1 requests and responses, answered by the v1alpha servicer."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        method = V1.methods_by_name["ServerReflectionInfo"]
        self._response: type[Message] = message_factory.GetMessageClass(method.output_type)

    async def ServerReflectionInfo(  # noqa: N802  # the rpc's name
        self, requests: AsyncIterator[Message], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Message]:
        # (Requests request_limits refused never get here: its guard answers them.)
        async def as_v1alpha() -> AsyncIterator[Any]:
            async for request in requests:
                yield reflection_pb2.ServerReflectionRequest.FromString(request.SerializeToString())

        async for response in self._inner.ServerReflectionInfo(as_v1alpha(), context):
            yield self._response.FromString(response.SerializeToString())


def servicers(service_names: Iterable[str]) -> list[tuple[object, ServiceDescriptor]]:
    """(servicer, service) for v1 and v1alpha, describing `service_names` and both reflections."""
    inner = reflection.aio.ReflectionServicer((*service_names, *SERVICE_NAMES))  # type: ignore[attr-defined]
    return [(_V1Servicer(inner), V1), (inner, V1ALPHA)]
