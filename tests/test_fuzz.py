"""Property-based tests: random and malformed requests for every rpc of every prebake.v1
service (and of health and reflection), against one real server on loopback for the
whole module.

Nothing is reset between cases (that is the point: whatever one case leaves behind, the
next one meets). Two kinds of request body per rpc:
- raw: random bytes, and truncated or bit-flipped encodings of well-typed messages, sent
  through a raw channel call (no client-side serialisation);
- typed: messages built from the method's input descriptor, field by field: huge strings,
  maps and lists, NaN and infinities, negative numbers, unknown enum values, ids and page
  tokens the server really issued, and unknown fields appended.

Every answer must be a status prebake chose: never INTERNAL, UNKNOWN or UNIMPLEMENTED,
no traceback, no server path, no parser text, and no fencing token but the caller's own.
The read-only rpcs, and the fenced worker rpcs called with a wrong token, must change
nothing: registry counts, the seeded jobs and the files of the blob store are compared
before and after each such case.

Profiles (tests/conftest.py): "ci", the default, runs a few cases per test within `make
test`; "fuzz" (`make fuzz`) runs at least 10,000 in all, and the module's teardown checks
that and prints the count per rpc.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

import prebake.server
from prebake.client import Client
from prebake.server import reflection
from prebake.server.app import SERVICE_NAMES, BackgroundServer, background_server
from prebake.v1 import (
    admin_pb2,
    blobs_pb2,
    catalog_pb2,
    jobs_pb2,
    registry_pb2,
    workers_pb2,
)
from tests.conftest import (
    FUZZ_EXAMPLES,
    INDUCTOR,
    INDUCTOR_KEY,
    LLAMA3_8B_INF2,
    data_files,
    make_artifact_dir,
)

pytestmark = pytest.mark.xdist_group("fuzz")

METHODS: dict[str, MethodDescriptor] = {
    f"/{service.full_name}/{method.name}": method
    for module in (
        registry_pb2,
        blobs_pb2,
        jobs_pb2,
        admin_pb2,
        workers_pb2,
        catalog_pb2,
        health_pb2,
        reflection_pb2,
    )
    for service in module.DESCRIPTOR.services_by_name.values()
    for method in service.methods
} | {f"/{reflection.V1.full_name}/{method.name}": method for method in reflection.V1.methods}
# Read-only rpcs: a case must leave the registry and the blob store as they were.
READ_ONLY = {
    "/prebake.v1.Registry/GetArtifact",
    "/prebake.v1.Blobs/FindMissingBlobs",
    "/prebake.v1.Blobs/Read",
    "/prebake.v1.Blobs/QueryWriteStatus",
    "/prebake.v1.Jobs/GetJob",
    "/prebake.v1.Jobs/ListJobs",
    "/prebake.v1.Jobs/WatchJob",
    "/prebake.v1.Admin/ListArtifacts",
    "/prebake.v1.Admin/GetStats",
    "/prebake.v1.Workers/ListWorkers",
    "/prebake.v1.Catalog/ListModels",
    "/prebake.v1.Catalog/ListInstanceTypes",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
}
# Fenced rpcs: the strategies never draw a token any job holds, so these change nothing either.
FENCED = {
    "/prebake.v1.Workers/Heartbeat",
    "/prebake.v1.Workers/CompleteJob",
    "/prebake.v1.Workers/FailJob",
    "/prebake.v1.Workers/ReleaseJob",
}
UNCHANGING = READ_ONLY | FENCED
# Rpcs of a served service that the server does not implement: UNIMPLEMENTED, plainly.
NOT_SERVED = {"/grpc.health.v1.Health/List"}
# A leased job's token is its number of leases; no case here leases a job 100 times.
HELD_TOKENS = range(1, 100)
# The least the "fuzz" profile must run in all.
FUZZ_MINIMUM = 10_000
CASES: Counter[str] = Counter()
SOURCE_ROOT = str(Path(next(iter(prebake.server.__path__))).parent.parent)


@dataclasses.dataclass
class Seeded:
    """The one server of this module and what it was seeded with."""

    server: BackgroundServer
    channel: grpc.Channel
    client: Client
    data_dir: Path
    job_ids: list[str]
    artifact_ids: list[str]
    blob_hashes: list[str]
    page_tokens: list[str]

    def __repr__(self) -> str:  # failing cases print it: short
        return f"Seeded({self.server.address})"


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Seeded]:
    root = tmp_path_factory.mktemp("fuzz")
    data_dir = root / "data"
    # Leases that outlast the module: no background expiry changes a job between snapshots.
    with (
        background_server(data_dir, lease_seconds=1e6) as srv,
        Client(srv.address, timeout=60.0) as client,
        grpc.insecure_channel(
            srv.address,
            options=[
                ("grpc.max_send_message_length", 64 << 20),
                ("grpc.max_receive_message_length", 64 << 20),
            ],
        ) as channel,
    ):
        published = client.publish(
            make_artifact_dir(root / "artifact", {"model.bin": 3000, "cfg.json": 40}), LLAMA3_8B_INF2
        )
        artifact = published.artifact
        queued = client.lookup(dataclasses.replace(LLAMA3_8B_INF2, sequence_length=4096))
        client.lookup(INDUCTOR_KEY)
        leased = client.lease_job("seed-worker", [INDUCTOR])
        # Read once, so that the blob's verify-once stamp is written before any snapshot.
        for file in artifact.files:
            client.download_blob(file.digest, root / "download")
        tokens = [
            client.list_jobs(page_size=1).next_page_token,
            client.list_artifacts(page_size=1).next_page_token,
        ]
        yield Seeded(
            server=srv,
            channel=channel,
            client=client,
            data_dir=data_dir,
            job_ids=[queued.job.job_id, leased.job.job_id],
            artifact_ids=[artifact.artifact_id],
            blob_hashes=[f.digest.hash for f in artifact.files],
            page_tokens=[t for t in tokens if t],
        )
        # Still serving after everything the module sent it.
        assert client.get_stats().lookups >= 2
    report(request)


def report(request: pytest.FixtureRequest) -> None:
    total = sum(CASES.values())
    lines = [f"fuzz: {total} cases against one server, {len(CASES)} rpc x body kinds"]
    lines += [f"  {name}: {count}" for name, count in sorted(CASES.items())]
    # Shown even though pytest captures output (the count is what `make fuzz` reports).
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        print("\n" + "\n".join(lines), flush=True)
    ran_everything = len(CASES) == 2 * len(METHODS)
    profile = settings.default
    if ran_everything and profile is not None and profile.max_examples >= FUZZ_EXAMPLES:
        assert total >= FUZZ_MINIMUM, f"the fuzz profile ran only {total} cases"


# -- strategies from descriptors -----------------------------------------------------------

F = FieldDescriptor
INT_RANGES = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
    F.TYPE_FIXED64: (0, 2**64 - 1),
}
NASTY_TEXT = [
    "",
    " ",
    "../../../../etc/passwd",
    "/etc/passwd",
    "s3://bucket/prefix/../x",
    "file:///etc/shadow",
    "%s%n%x",
    "\x00",
    "a\u202eb",
    "\ufeff",
    "ml.inf2.48xlarge",
    "ml.c6a.4xlarge",
    "meta-llama/Meta-Llama-3-8B",
    "torch-2.13.0",
    "neuronx-cc-2",
    "cpu-avx2",
    "j-" + "0" * 24,
    "0" * 32,
    "9" * 600,
    "WzEsMWU5OTld",  # a base64 list holding 1e999
    "eyJhIjoxfQ",  # base64 of {"a":1}
]
HUGE_SIZES = st.sampled_from([1_000, 70_000, 300_000])


def text_for(name: str, seed: Seeded, huge: bool) -> st.SearchStrategy[str]:
    real: list[str] = []
    if "job_id" in name:
        real = seed.job_ids
    elif "artifact_id" in name:
        real = seed.artifact_ids
    elif name == "hash":
        real = seed.blob_hashes
    elif name == "page_token":
        real = seed.page_tokens
    choices = [
        st.text(st.characters(codec="utf-8"), max_size=40),
        st.sampled_from(NASTY_TEXT),
    ]
    if huge:
        choices.append(st.builds(lambda c, n: c * n, st.characters(codec="utf-8"), HUGE_SIZES))
    if real:
        choices.append(st.sampled_from(real))
    return st.one_of(*choices)


def scalar(field: FieldDescriptor, seed: Seeded, huge: bool) -> st.SearchStrategy[Any]:
    """Values of a scalar field; `huge` admits values of hundreds of kilobytes (not inside a
    repeated field or a map, where they would multiply)."""
    if field.name == "fencing_token":
        return st.one_of(st.just(0), st.integers(-(2**63), -1), st.integers(HELD_TOKENS.stop, 2**63 - 1))
    if field.name == "wait_seconds":
        # Valid waits are long polls; out-of-range ones are refused at once.
        return st.one_of(
            st.sampled_from([0.0, -0.0, math.nan, math.inf, -math.inf, 1e308]),
            st.floats(max_value=-1e-9),
            st.floats(min_value=60.001),
            st.floats(min_value=0.0, max_value=0.005),
        )
    t = field.type
    if t in INT_RANGES:
        lo, hi = INT_RANGES[t]
        return st.one_of(st.integers(lo, hi), st.sampled_from([lo, hi, 0, -1 if lo < 0 else 1]))
    if t == F.TYPE_DOUBLE:
        return st.floats(allow_nan=True, allow_infinity=True)
    if t == F.TYPE_FLOAT:
        return st.floats(allow_nan=True, allow_infinity=True, width=32)
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t == F.TYPE_STRING:
        return text_for(field.name, seed, huge)
    if t == F.TYPE_BYTES:
        small_bytes = st.binary(max_size=64)
        if not huge:
            return small_bytes
        return st.one_of(small_bytes, st.sampled_from([(4 << 20) + 1, 5 << 20]).map(lambda n: b"\0" * n))
    if t == F.TYPE_ENUM:
        assert field.enum_type is not None
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))
    raise AssertionError(f"no strategy for {field.full_name} (type {t})")


def message_type(field: Any) -> Descriptor:
    found: Descriptor | None = field.message_type
    assert found is not None, field.full_name
    return found


def is_map(field: Any) -> bool:
    return field.type == F.TYPE_MESSAGE and bool(message_type(field).GetOptions().map_entry)


def value_of(field: FieldDescriptor, seed: Seeded, depth: int, huge: bool) -> st.SearchStrategy[Any]:
    if field.type == F.TYPE_MESSAGE:
        return plan_of(message_type(field), seed, depth + 1, huge)
    return scalar(field, seed, huge)


def field_plan(field: FieldDescriptor, seed: Seeded, depth: int, huge: bool) -> st.SearchStrategy[Any]:
    if is_map(field):
        key_field, value_field = (
            message_type(field).fields_by_name["key"],
            message_type(field).fields_by_name["value"],
        )
        small: st.SearchStrategy[Any] = st.dictionaries(
            scalar(key_field, seed, False), value_of(value_field, seed, depth, False), max_size=6
        )
        if not huge or value_field.type != F.TYPE_STRING:
            return small
        # The case, scaled: many entries (a million would be 13 MB a case).
        many = st.sampled_from([33, 2_000, 20_000]).map(lambda n: {f"k{i}": "v" for i in range(n)})
        return st.one_of(small, many)
    if field.is_repeated:
        item = value_of(field, seed, depth, False)
        small_list: st.SearchStrategy[Any] = st.lists(item, max_size=4)
        if not huge:
            return small_list
        return st.one_of(
            small_list, st.tuples(item, st.sampled_from([17, 5_000])).map(lambda p: [p[0]] * p[1])
        )
    return value_of(field, seed, depth, huge)


def plan_of(
    descriptor: Descriptor, seed: Seeded, depth: int = 0, huge: bool = True
) -> st.SearchStrategy[dict[str, Any]]:
    """Which fields of `descriptor` to set, and to what (a nested plan for messages)."""
    if depth > 3:
        return st.just({})
    fields = {f.name: field_plan(f, seed, depth, huge) for f in descriptor.fields}
    return st.fixed_dictionaries({}, optional=fields)  # type: ignore[arg-type]


def apply(message: Message, plan: dict[str, Any]) -> None:
    descriptor = message.DESCRIPTOR
    for name, value in plan.items():
        field = descriptor.fields_by_name[name]
        target = getattr(message, name)
        if is_map(field):
            value_field = message_type(field).fields_by_name["value"]
            for k, v in value.items():
                if value_field.type == F.TYPE_MESSAGE:
                    apply(target[k], v)
                else:
                    target[k] = v
        elif field.is_repeated:
            if field.type == F.TYPE_MESSAGE:
                for item in value:
                    apply(target.add(), item)
            else:
                target.extend(value)
        elif field.type == F.TYPE_MESSAGE:
            target.SetInParent()
            apply(target, value)
        else:
            setattr(message, name, value)


def unknown_fields() -> st.SearchStrategy[bytes]:
    """Fields no message declares (numbers 1000-9999), of every wire type."""

    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            byte, n = n & 0x7F, n >> 7
            out.append(byte | (0x80 if n else 0))
            if not n:
                return bytes(out)

    def encode(number: int, wire: int, payload: bytes) -> bytes:
        body = {
            0: varint(len(payload)),
            1: payload[:8].ljust(8, b"\0"),
            2: varint(len(payload)) + payload,
            5: payload[:4].ljust(4, b"\0"),
        }[wire]
        return varint(number << 3 | wire) + body

    field = st.builds(encode, st.integers(1000, 9999), st.sampled_from([0, 1, 2, 5]), st.binary(max_size=16))
    return st.lists(field, max_size=3).map(b"".join)


def typed_bodies(method: MethodDescriptor, seed: Seeded) -> st.SearchStrategy[bytes]:
    cls = message_factory.GetMessageClass(method.input_type)

    def build(plan: dict[str, Any], extra: bytes) -> bytes:
        message = cls()
        apply(message, plan)
        return message.SerializeToString() + extra

    return st.builds(build, plan_of(method.input_type, seed), unknown_fields())


def raw_bodies(method: MethodDescriptor, seed: Seeded) -> st.SearchStrategy[bytes]:
    def damage(body: bytes, at: int, flip: int, cut: bool) -> bytes:
        if not body:
            return bytes([flip])
        i = at % len(body)
        return body[:i] if cut else body[:i] + bytes([body[i] ^ (flip or 1)]) + body[i + 1 :]

    damaged = st.builds(
        damage, typed_bodies(method, seed), st.integers(0, 2**16), st.integers(0, 255), st.booleans()
    )
    return st.one_of(st.binary(max_size=256), damaged)


# -- calling and checking ------------------------------------------------------------------


def call(seed: Seeded, path: str, bodies: list[bytes]) -> tuple[grpc.StatusCode, str]:
    """Send `bodies` (one, or a stream for a client-streaming rpc); the status and details."""
    method = METHODS[path]
    channel = seed.channel
    try:
        if method.client_streaming and method.server_streaming:
            replies: Any = channel.stream_stream(path, None, None)(iter(bodies), timeout=60)
            for _ in replies:
                replies.cancel()
                break
        elif method.client_streaming:
            channel.stream_unary(path, None, None)(iter(bodies), timeout=60)
        elif method.server_streaming:
            responses: Any = channel.unary_stream(path, None, None)(bodies[0], timeout=60)
            # The first response is enough (a watch of an active job goes on until it ends).
            for _ in responses:
                responses.cancel()
                break
        else:
            channel.unary_unary(path, None, None)(bodies[0], timeout=60)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def snapshot(seed: Seeded) -> tuple[object, ...]:
    """What a case that changes nothing leaves as it was."""
    stats = seed.client.get_stats()
    counts = (
        stats.artifacts,
        stats.pinned_artifacts,
        stats.blobs,
        stats.blob_bytes,
        dict(stats.jobs_by_state),
    )
    jobs = tuple(seed.client.get_job(j).SerializeToString(deterministic=True) for j in seed.job_ids)
    return counts, jobs, tuple(data_files(seed.data_dir))


FENCING_TOKEN_RE = re.compile(r"fencing token (-?\d+)")


def check(seed: Seeded, path: str, bodies: list[bytes], code: grpc.StatusCode, details: str) -> None:
    if path in NOT_SERVED:
        assert (code, details) == (grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        return
    assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNIMPLEMENTED), (
        f"{path} answered {code.name}: {details!r}"
    )
    assert code != grpc.StatusCode.DEADLINE_EXCEEDED, f"{path} did not answer within a minute"
    for leak in ("Traceback", 'File "', "DecodeError", "Error parsing", str(seed.data_dir), SOURCE_ROOT):
        assert leak not in details, f"{path} leaked {leak!r}: {details!r}"
    stated = {m.group(1) for m in FENCING_TOKEN_RE.finditer(details)}
    for token in stated:
        assert int(token) not in HELD_TOKENS, f"{path} named a token a job holds: {details!r}"


def run_case(seed: Seeded, path: str, bodies: list[bytes], kind: str) -> None:
    before = snapshot(seed) if path in UNCHANGING else None
    code, details = call(seed, path, bodies)
    CASES[f"{path} {kind}"] += 1
    check(seed, path, bodies, code, details)
    if before is not None:
        assert snapshot(seed) == before, (
            f"{path} changed the registry or the blob store ({code.name}: {details!r})"
        )


_STRATEGIES: dict[tuple[str, str], st.SearchStrategy[list[bytes]]] = {}


def bodies(seed: Seeded, path: str, kind: str) -> st.SearchStrategy[list[bytes]]:
    """The request bodies of one case of `path` (a stream of 1-3 for Write), built once."""
    if (path, kind) not in _STRATEGIES:
        method = METHODS[path]
        body = (raw_bodies if kind == "raw" else typed_bodies)(method, seed)
        _STRATEGIES[path, kind] = (
            st.lists(body, min_size=1, max_size=3) if method.client_streaming else body.map(lambda b: [b])
        )
    return _STRATEGIES[path, kind]


def test_every_service_of_the_server_is_fuzzed() -> None:
    # Every prebake service, and health and reflection, which the server also serves.
    assert {path.split("/")[1] for path in METHODS} == {
        *SERVICE_NAMES,
        "grpc.health.v1.Health",
        *reflection.SERVICE_NAMES,
    }
    assert set(METHODS) >= UNCHANGING


@pytest.mark.parametrize("path", sorted(METHODS))
@given(data=st.data())
def test_raw_bytes(seeded: Seeded, path: str, data: st.DataObject) -> None:
    run_case(seeded, path, data.draw(bodies(seeded, path, "raw")), "raw")


@pytest.mark.parametrize("path", sorted(METHODS))
@given(data=st.data())
def test_typed_messages(seeded: Seeded, path: str, data: st.DataObject) -> None:
    run_case(seeded, path, data.draw(bodies(seeded, path, "typed")), "typed")
