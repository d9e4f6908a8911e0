"""Which request field an error is about, carried as gRPC's standard rich error details.

A status carries at most a code and a message; gRPC's convention for more is the
`grpc-status-details-bin` trailer: a serialized `google.rpc.Status` whose `details` hold
`google.protobuf.Any` messages. For bad input the standard detail is
`google.rpc.BadRequest` (its `field_violations[].field` names the request field, its
`description` repeats the message), which every gRPC ecosystem can decode (Node's
`@grpc/grpc-js` with `google-proto-files`, Go's `status.Details()`, grpcurl).

The thin client may not depend on `googleapis-common-protos`, so the two messages are
declared here, with their field numbers as `google/rpc/status.proto` and
`google/rpc/error_details.proto` publish them (stable since 2015), in a descriptor pool
of their own: nothing is added to the default pool, so this never clashes with an
installed `googleapis-common-protos`. Only the fields prebake sets or reads are declared;
the rest of a received message is kept as unknown fields and ignored.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message_factory

DETAILS_KEY = "grpc-status-details-bin"
BAD_REQUEST_TYPE = "google.rpc.BadRequest"
_TYPE_URL_PREFIX = "type.googleapis.com/"

_POOL = descriptor_pool.DescriptorPool()
_POOL.AddSerializedFile(any_pb2.DESCRIPTOR.serialized_pb)


def _declare() -> None:
    f = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(
        name="prebake/core/google_rpc_subset.proto",
        package="google.rpc",
        syntax="proto3",
        dependency=["google/protobuf/any.proto"],
    )
    status = proto.message_type.add(name="Status")
    status.field.add(name="code", number=1, type=f.TYPE_INT32, label=f.LABEL_OPTIONAL)
    status.field.add(name="message", number=2, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    status.field.add(
        name="details",
        number=3,
        type=f.TYPE_MESSAGE,
        label=f.LABEL_REPEATED,
        type_name=".google.protobuf.Any",
    )
    bad_request = proto.message_type.add(name="BadRequest")
    violation = bad_request.nested_type.add(name="FieldViolation")
    violation.field.add(name="field", number=1, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    violation.field.add(name="description", number=2, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    bad_request.field.add(
        name="field_violations",
        number=1,
        type=f.TYPE_MESSAGE,
        label=f.LABEL_REPEATED,
        type_name=".google.rpc.BadRequest.FieldViolation",
    )
    _POOL.Add(proto)


_declare()
_Status: Any = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("google.rpc.Status"))
_BadRequest: Any = message_factory.GetMessageClass(_POOL.FindMessageTypeByName(BAD_REQUEST_TYPE))


def bad_request(code: int, message: str, field: str) -> bytes:
    """The `grpc-status-details-bin` value for a bad `field` (status `code`, its `message`)."""
    violation = _BadRequest(field_violations=[{"field": field, "description": message}])
    status = _Status(code=code, message=message)
    status.details.add(type_url=_TYPE_URL_PREFIX + BAD_REQUEST_TYPE, value=violation.SerializeToString())
    data: bytes = status.SerializeToString()
    return data


def field_of(details: bytes) -> str | None:
    """The first field a serialized `google.rpc.Status` names in a BadRequest, if any.

    Anything that does not decode (another server's details, garbage) names no field.
    """
    try:
        status = _Status.FromString(details)
        for detail in status.details:
            if detail.type_url.rpartition("/")[2] == BAD_REQUEST_TYPE:
                for violation in _BadRequest.FromString(detail.value).field_violations:
                    if violation.field:
                        return str(violation.field)
    except Exception:  # a decode error of any kind: the details are not ours to trust
        return None
    return None
