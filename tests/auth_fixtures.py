"""Token files and raw calls of every rpc, for the authentication and TLS tests."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor, message_factory

import prebake.v1
from prebake.server.auth.tokens import ROLE_NAMES, add_entry


@dataclass(frozen=True)
class TokenFile:
    path: Path
    # Role name -> the token of an entry holding only that role (entries named after it).
    tokens: dict[str, str]


def make_token_file(path: Path) -> TokenFile:
    tokens = {}
    for role in ROLE_NAMES:
        token = add_entry(path, role, [role])
        assert token is not None
        tokens[role] = token
    return TokenFile(path, tokens)


def prebake_services() -> Iterator[descriptor.ServiceDescriptor]:
    """Every service of every `prebake.v1` proto module."""
    for module in pkgutil.iter_modules(prebake.v1.__path__):
        if module.name.endswith("_pb2"):
            file = importlib.import_module(f"prebake.v1.{module.name}").DESCRIPTOR
            yield from file.services_by_name.values()


def prebake_methods() -> list[descriptor.MethodDescriptor]:
    return [m for service in prebake_services() for m in service.methods]


def call_empty(
    channel: grpc.Channel, method: descriptor.MethodDescriptor, metadata: tuple[tuple[str, str], ...] = ()
) -> grpc.StatusCode:
    """Call `method` with an empty request (one empty message for a client stream); its status."""
    request_type = message_factory.GetMessageClass(method.input_type)
    response_type = message_factory.GetMessageClass(method.output_type)
    path = f"/{method.containing_service.full_name}/{method.name}"
    kwargs: dict[str, Any] = {
        "request_serializer": request_type.SerializeToString,
        "response_deserializer": response_type.FromString,
    }
    try:
        if method.client_streaming and not method.server_streaming:
            channel.stream_unary(path, **kwargs)(iter([request_type()]), timeout=30, metadata=metadata)
        elif method.server_streaming and not method.client_streaming:
            for _ in channel.unary_stream(path, **kwargs)(request_type(), timeout=30, metadata=metadata):
                break
        elif not method.client_streaming:
            channel.unary_unary(path, **kwargs)(request_type(), timeout=30, metadata=metadata)
        else:  # pragma: no cover - prebake has no bidirectional rpc
            raise AssertionError(f"{path}: bidirectional streams are not handled")
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


REFUSED = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
