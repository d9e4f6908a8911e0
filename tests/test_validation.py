"""Bad input gets the right status code, a message a person can act on, and changes nothing.

These tests talk to the server through raw generated stubs, as a client in another
language would, so that nothing in the Python client can mask what the server does.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from prebake.core.digests import hash_bytes
from prebake.server.app import BackgroundServer
from prebake.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    blobs_pb2,
    blobs_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    key_pb2,
    registry_pb2,
    registry_pb2_grpc,
)
from tests.conftest import data_files

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def good_key(**changes: object) -> key_pb2.ArtifactKey:
    key = key_pb2.ArtifactKey(
        kind=key_pb2.ARTIFACT_KIND_NEURON,
        model="meta-llama/Meta-Llama-3-8B",
        instance_type="ml.inf2.48xlarge",
        sequence_length=8192,
        batch_size=8,
        tensor_parallel_degree=24,
        precision="bf16",
    )
    for name, value in changes.items():
        if name == "options":
            key.options.update(value)  # type: ignore[call-overload]
        else:
            setattr(key, name, value)
    return key


class Stubs:
    def __init__(self, channel: grpc.Channel) -> None:
        self.registry = registry_pb2_grpc.RegistryStub(channel)
        self.blobs = blobs_pb2_grpc.BlobsStub(channel)
        self.jobs = jobs_pb2_grpc.JobsStub(channel)
        self.admin = admin_pb2_grpc.AdminStub(channel)


@pytest.fixture
def stubs(server: BackgroundServer) -> Iterator[Stubs]:
    with grpc.insecure_channel(server.address) as channel:
        yield Stubs(channel)


def upload(stubs: Stubs, data: bytes) -> blobs_pb2.Digest:
    digest = blobs_pb2.Digest(hash=hash_bytes(data), size_bytes=len(data))
    reply = stubs.blobs.Write(
        iter([blobs_pb2.WriteRequest(upload_id="t1", digest=digest, offset=0, data=data, finish_write=True)])
    )
    assert reply.complete
    return digest


def assert_nothing_stored(stubs: Stubs, server: BackgroundServer, blobs_before: list[str]) -> None:
    assert stubs.admin.ListArtifacts(admin_pb2.ListArtifactsRequest()).artifacts == []
    assert stubs.jobs.ListJobs(jobs_pb2.ListJobsRequest()).jobs == []
    assert data_files(server.config.data_dir) == blobs_before


def expect_error(call, request, code: grpc.StatusCode, *fragments: str) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call(request)
    assert info.value.code() == code, info.value.details()
    message = info.value.details() or ""
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


BAD_KEYS = [
    ({"kind": key_pb2.ARTIFACT_KIND_UNSPECIFIED}, ["kind"]),
    ({"model": ""}, ["model"]),
    ({"model": "x" * 300}, ["model", "256"]),
    ({"model": "bad model\n"}, ["model"]),
    (
        {"tensor_parallel_degree": 32},
        ["ml.inf2.48xlarge has 24 NeuronCores", "tensor_parallel_degree=32 does not fit"],
    ),
    ({"precision": "fp13"}, ["unknown precision", "bf16"]),
    ({"precision": "int4-awq"}, ["int4-awq"]),
    ({"instance_type": "ml.inf9.huge"}, ["unknown instance type"]),
    ({"instance_type": "ml.g5.12xlarge"}, ["ml.g5.12xlarge"]),
    ({"sequence_length": 0}, ["sequence_length"]),
    ({"sequence_length": -5}, ["sequence_length"]),
    ({"batch_size": -1}, ["batch_size"]),
    ({"batch_size": 10**12}, ["batch_size"]),
    ({"model_revision": "r" * 500}, ["model_revision"]),
    ({"options": {"k" * 100: "v"}}, ["option"]),
]


@pytest.mark.parametrize(("changes", "fragments"), BAD_KEYS, ids=[str(c) for c, _ in BAD_KEYS])
def test_bad_keys_are_invalid_argument_and_create_nothing(
    stubs: Stubs, server: BackgroundServer, changes: dict[str, object], fragments: list[str]
) -> None:
    before = data_files(server.config.data_dir)
    expect_error(
        stubs.registry.Lookup, registry_pb2.LookupRequest(key=good_key(**changes)), INVALID, *fragments
    )
    assert_nothing_stored(stubs, server, before)


BAD_PATHS = ["../../etc/passwd", "/etc/passwd", "a/../../b", "a//b", "./a", "", "a\\b", "nul\x00byte"]


@pytest.mark.parametrize("path", BAD_PATHS)
def test_unsafe_manifest_paths_are_refused(stubs: Stubs, server: BackgroundServer, path: str) -> None:
    digest = upload(stubs, b"payload")
    before = data_files(server.config.data_dir)
    request = registry_pb2.PublishArtifactRequest(
        key=good_key(), files=[registry_pb2.ArtifactFile(path=path, digest=digest)]
    )
    expect_error(stubs.registry.PublishArtifact, request, INVALID, "path")
    assert_nothing_stored(stubs, server, before)


def test_duplicate_and_conflicting_paths_are_refused(stubs: Stubs, server: BackgroundServer) -> None:
    digest = upload(stubs, b"payload")
    for paths in (["a", "a"], ["a", "a/b"]):
        files = [registry_pb2.ArtifactFile(path=p, digest=digest) for p in paths]
        request = registry_pb2.PublishArtifactRequest(key=good_key(), files=files)
        expect_error(stubs.registry.PublishArtifact, request, INVALID, "a")
    assert stubs.admin.ListArtifacts(admin_pb2.ListArtifactsRequest()).artifacts == []


def test_publish_with_missing_blob_is_failed_precondition(stubs: Stubs, server: BackgroundServer) -> None:
    ghost = blobs_pb2.Digest(hash=hash_bytes(b"never uploaded"), size_bytes=14)
    request = registry_pb2.PublishArtifactRequest(
        key=good_key(), files=[registry_pb2.ArtifactFile(path="w.bin", digest=ghost)]
    )
    expect_error(stubs.registry.PublishArtifact, request, grpc.StatusCode.FAILED_PRECONDITION, ghost.hash)
    assert stubs.admin.ListArtifacts(admin_pb2.ListArtifactsRequest()).artifacts == []


def test_upload_whose_bytes_do_not_match_the_digest_stores_nothing(
    stubs: Stubs, server: BackgroundServer
) -> None:
    before = data_files(server.config.data_dir)
    claimed = blobs_pb2.Digest(hash=hash_bytes(b"what I said"), size_bytes=11)
    request = iter(
        [blobs_pb2.WriteRequest(upload_id="u", digest=claimed, data=b"what I sent", finish_write=True)]
    )
    expect_error(stubs.blobs.Write, request, INVALID, "hash")
    assert data_files(server.config.data_dir) == before
    status = stubs.blobs.QueryWriteStatus(blobs_pb2.QueryWriteStatusRequest(upload_id="u", digest=claimed))
    assert (status.committed_size, status.complete) == (0, False)


def test_upload_longer_than_declared_is_refused(stubs: Stubs, server: BackgroundServer) -> None:
    claimed = blobs_pb2.Digest(hash=hash_bytes(b"abc"), size_bytes=3)
    request = iter([blobs_pb2.WriteRequest(upload_id="u", digest=claimed, data=b"abcdef", finish_write=True)])
    expect_error(stubs.blobs.Write, request, INVALID)
    assert stubs.blobs.FindMissingBlobs(blobs_pb2.FindMissingBlobsRequest(digests=[claimed])).missing == [
        claimed
    ]


@pytest.mark.parametrize(
    "digest",
    [
        blobs_pb2.Digest(hash="xyz", size_bytes=1),
        blobs_pb2.Digest(hash="A" * 32, size_bytes=1),
        blobs_pb2.Digest(hash="a" * 32, size_bytes=-1),
    ],
)
def test_malformed_digests_are_invalid_argument(stubs: Stubs, digest: blobs_pb2.Digest) -> None:
    expect_error(
        stubs.blobs.FindMissingBlobs, blobs_pb2.FindMissingBlobsRequest(digests=[digest]), INVALID, "digest"
    )
    read = stubs.blobs.Read(blobs_pb2.ReadRequest(digest=digest))
    with pytest.raises(grpc.RpcError) as info:
        next(iter(read))
    assert info.value.code() == INVALID


def test_read_errors(stubs: Stubs) -> None:
    digest = upload(stubs, b"0123456789")
    with pytest.raises(grpc.RpcError) as info:
        list(stubs.blobs.Read(blobs_pb2.ReadRequest(digest=digest, offset=11)))
    assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
    ghost = blobs_pb2.Digest(hash=hash_bytes(b"nope"), size_bytes=4)
    with pytest.raises(grpc.RpcError) as info:
        list(stubs.blobs.Read(blobs_pb2.ReadRequest(digest=ghost)))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    chunks = stubs.blobs.Read(blobs_pb2.ReadRequest(digest=digest, offset=3, limit=4))
    assert b"".join(c.data for c in chunks) == b"3456"


def test_write_offset_must_match_committed_size(stubs: Stubs) -> None:
    digest = blobs_pb2.Digest(hash=hash_bytes(b"abcdef"), size_bytes=6)
    request = iter([blobs_pb2.WriteRequest(upload_id="u2", digest=digest, offset=3, data=b"def")])
    expect_error(stubs.blobs.Write, request, INVALID, "QueryWriteStatus")


def test_ids_and_page_tokens_are_validated(stubs: Stubs) -> None:
    expect_error(
        stubs.registry.GetArtifact,
        registry_pb2.GetArtifactRequest(artifact_id="../x"),
        INVALID,
        "artifact id",
    )
    expect_error(
        stubs.registry.GetArtifact,
        registry_pb2.GetArtifactRequest(artifact_id="0" * 32),
        grpc.StatusCode.NOT_FOUND,
    )
    expect_error(stubs.jobs.GetJob, jobs_pb2.GetJobRequest(job_id="nope"), INVALID, "job id")
    expect_error(stubs.jobs.GetJob, jobs_pb2.GetJobRequest(job_id="j-" + "0" * 24), grpc.StatusCode.NOT_FOUND)
    expect_error(stubs.jobs.ListJobs, jobs_pb2.ListJobsRequest(page_token="garbage"), INVALID, "page_token")
    expect_error(
        stubs.admin.ListArtifacts, admin_pb2.ListArtifactsRequest(page_size=5000), INVALID, "page_size"
    )
    expect_error(
        stubs.admin.DeleteArtifact,
        admin_pb2.DeleteArtifactRequest(artifact_id="0" * 32),
        grpc.StatusCode.NOT_FOUND,
    )


def test_pinned_artifact_is_not_deleted_without_force(stubs: Stubs, tmp_path: Path) -> None:
    digest = upload(stubs, b"weights")
    request = registry_pb2.PublishArtifactRequest(
        key=good_key(), files=[registry_pb2.ArtifactFile(path="w", digest=digest)]
    )
    artifact_id = stubs.registry.PublishArtifact(request).artifact.artifact_id
    stubs.admin.PinArtifact(admin_pb2.PinArtifactRequest(artifact_id=artifact_id, pinned=True))
    expect_error(
        stubs.admin.DeleteArtifact,
        admin_pb2.DeleteArtifactRequest(artifact_id=artifact_id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "pinned",
    )
    deleted = stubs.admin.DeleteArtifact(admin_pb2.DeleteArtifactRequest(artifact_id=artifact_id, force=True))
    assert (deleted.blobs_deleted, deleted.bytes_freed) == (1, 7)
    assert stubs.blobs.FindMissingBlobs(blobs_pb2.FindMissingBlobsRequest(digests=[digest])).missing == [
        digest
    ]


# A Node client that renders the 128-bit value without padding sends 31 digits for one
# digest in 16; a Java one may send upper case. The message states the format.
@pytest.mark.parametrize(
    ("text", "what"),
    [
        (hash_bytes(b"30")[1:], "has 31 characters"),
        (hash_bytes(b"hello").upper(), "has upper-case digits"),
        ("0x" + hash_bytes(b"hello")[2:], "not hex digits"),
    ],
)
def test_a_malformed_digest_hash_is_answered_with_the_format(stubs: Stubs, text: str, what: str) -> None:
    assert hash_bytes(b"30").startswith("0")  # the example: its unpadded rendering is 31 digits
    digest = blobs_pb2.Digest(hash=text, size_bytes=2)
    message = expect_error(
        stubs.blobs.FindMissingBlobs,
        blobs_pb2.FindMissingBlobsRequest(digests=[digest]),
        INVALID,
        "digests[0]",
        what,
        "xxh3-128 (seed 0) as exactly 32 lowercase hex digits",
        "big-endian",
        "zero-padded",
    )
    assert repr(text) in message


def test_a_read_with_the_right_hash_and_a_wrong_size_names_the_size(stubs: Stubs) -> None:
    digest = upload(stubs, b"0123456789")
    wrong = blobs_pb2.Digest(hash=digest.hash, size_bytes=11)
    with pytest.raises(grpc.RpcError) as info:
        list(stubs.blobs.Read(blobs_pb2.ReadRequest(digest=wrong)))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    message = info.value.details() or ""
    assert "stored with size_bytes 10, not 11" in message and "content's length" in message
    # A hash the server does not hold at any size says just that.
    ghost = blobs_pb2.Digest(hash=hash_bytes(b"nope"), size_bytes=4)
    with pytest.raises(grpc.RpcError) as info:
        list(stubs.blobs.Read(blobs_pb2.ReadRequest(digest=ghost)))
    assert info.value.details() == f"blob {ghost.hash}/4 is not stored"


def test_kind_unset_names_the_enum_values_a_caller_may_send(stubs: Stubs, server: BackgroundServer) -> None:
    # What @grpc/proto-loader sends for kind: 'neuron' (an unknown name is dropped): kind unset.
    before = data_files(server.config.data_dir)
    expect_error(
        stubs.registry.Lookup,
        registry_pb2.LookupRequest(key=good_key(kind=key_pb2.ARTIFACT_KIND_UNSPECIFIED)),
        INVALID,
        "kind is required",
        "ARTIFACT_KIND_NEURON (1), ARTIFACT_KIND_AWQ (2), ARTIFACT_KIND_INDUCTOR (3)",
        "'neuron'",
    )
    assert_nothing_stored(stubs, server, before)


def test_unknown_enum_numbers_are_refused_not_read_as_unset(stubs: Stubs, server: BackgroundServer) -> None:
    before = data_files(server.config.data_dir)
    unknown_kind = expect_error(
        stubs.registry.Lookup, registry_pb2.LookupRequest(key=good_key(kind=7)), INVALID, "unknown kind 7"
    )
    assert "required" not in unknown_kind and "ARTIFACT_KIND_NEURON (1)" in unknown_kind
    expect_error(
        stubs.registry.PublishArtifact,
        registry_pb2.PublishArtifactRequest(key=good_key(kind=7)),
        INVALID,
        "unknown kind 7",
    )
    # An on_miss this server does not know must not enqueue (unset would mean ENQUEUE).
    expect_error(
        stubs.registry.Lookup,
        registry_pb2.LookupRequest(key=good_key(), on_miss=9),  # type: ignore[arg-type]
        INVALID,
        "on_miss: unknown OnMiss value 9",
        "ON_MISS_ENQUEUE (1), ON_MISS_REPORT (2)",
    )
    expect_error(
        stubs.registry.Lookup,
        registry_pb2.LookupRequest(key=good_key(), on_miss=registry_pb2.ON_MISS_REPORT, allow=[1, 5]),  # type: ignore[list-item]
        INVALID,
        "allow[1]: unknown CompatibilityPolicy value 5",
        "COMPATIBILITY_POLICY_LONGER_SEQUENCE (1)",
    )
    # Filters: an unknown kind would otherwise list every kind.
    expect_error(stubs.admin.ListArtifacts, admin_pb2.ListArtifactsRequest(kind=7), INVALID, "kind: unknown")  # type: ignore[arg-type]
    expect_error(stubs.jobs.ListJobs, jobs_pb2.ListJobsRequest(kind=7), INVALID, "kind: unknown")  # type: ignore[arg-type]
    expect_error(stubs.jobs.ListJobs, jobs_pb2.ListJobsRequest(states=[1, 42]), INVALID, "states[1]: unknown")  # type: ignore[list-item]
    assert_nothing_stored(stubs, server, before)


def test_an_unknown_jumpstart_id_points_at_the_rpc_not_the_cli(stubs: Stubs) -> None:
    message = expect_error(
        stubs.registry.Lookup,
        registry_pb2.LookupRequest(key=good_key(model="meta-textgeneration-llama-3-8x")),
        INVALID,
        "model: unknown JumpStart model id",
        "Catalog.ListModels",
    )
    assert "prebake " not in message and "--" not in message
