"""Server reflection answers as `grpc.reflection.v1` (what grpcurl and newer clients try
first) and as `grpc.reflection.v1alpha`, each through a real reflection client call."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from prebake.server import reflection
from prebake.server.app import BackgroundServer
from prebake.server.auth.rpc_roles import OPEN_SERVICES
from prebake.v1 import registry_pb2

PREBAKE_SERVICES = {"prebake.v1.Registry", "prebake.v1.Blobs", "prebake.v1.Jobs", "prebake.v1.Admin"}
BOTH = ["grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"]


@pytest.fixture
def channel(server: BackgroundServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


def ask(channel: grpc.Channel, service: str, *requests: reflection_pb2.ServerReflectionRequest) -> list:  # type: ignore[type-arg]
    """One ServerReflectionInfo stream to `service`. The two protocols are the same messages
    on the wire, so the v1alpha classes speak v1 too: only the method path differs."""
    call = channel.stream_stream(
        f"/{service}/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    return list(call(iter(requests), timeout=30))


@pytest.mark.parametrize("service", BOTH)
def test_both_protocols_list_and_describe_the_services(channel: grpc.Channel, service: str) -> None:
    listed, described, missing = ask(
        channel,
        service,
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="prebake.v1.Registry"),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="prebake.v1.NoSuchThing"),
    )
    names = {s.name for s in listed.list_services_response.service}
    assert PREBAKE_SERVICES | {"grpc.health.v1.Health", *BOTH} <= names
    files = {}
    for raw in described.file_descriptor_response.file_descriptor_proto:
        proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
        files[proto.name] = proto
    registry = files["prebake/v1/registry.proto"]
    methods = {m.name for s in registry.service for m in s.method}
    assert methods == {
        "Lookup",
        "GetArtifact",
        "PublishArtifact",
        "ListEvaluations",
        "ImportEvaluation",
        "Recommend",
    }
    # Its dependencies come along, so a client can build every message type.
    assert {"prebake/v1/key.proto", "prebake/v1/blobs.proto", "prebake/v1/evaluations.proto"} <= set(files)
    assert registry.options.go_package == registry_pb2.DESCRIPTOR.GetOptions().go_package
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_v1_describes_itself(channel: grpc.Channel) -> None:
    (reply,) = ask(
        channel,
        BOTH[0],
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection"),
    )
    (raw,) = reply.file_descriptor_response.file_descriptor_proto
    proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
    assert (proto.name, proto.package) == ("grpc/reflection/v1/reflection.proto", "grpc.reflection.v1")
    (method,) = proto.service[0].method
    assert (method.input_type, method.output_type) == (
        ".grpc.reflection.v1.ServerReflectionRequest",
        ".grpc.reflection.v1.ServerReflectionResponse",
    )


def test_grpcio_reflection_client_on_v1alpha(channel: grpc.Channel) -> None:
    db = ProtoReflectionDescriptorDatabase(channel)
    assert PREBAKE_SERVICES | set(BOTH) <= set(db.get_services())
    assert db.FindFileContainingSymbol("prebake.v1.Blobs").name == "prebake/v1/blobs.proto"


def test_both_protocols_are_open_without_credentials() -> None:
    assert set(reflection.SERVICE_NAMES) == set(BOTH) and set(BOTH) <= OPEN_SERVICES
