"""Abuse limits against a real server: request sizes refused before parsing, per-caller
rate limits, the cap on open uploads and the idle timeout of a stalled upload.

No timings are asserted (the cost of a refused request, as a ratio to an idle lookup, is
measured in bench/limits.py); the tests wait for answers, never for clocks.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from prebake.client import Client, errors
from prebake.core.digests import hash_bytes
from prebake.server import principal
from prebake.server.app import BackgroundServer, background_server
from prebake.server.rate_limits import RateLimit, caller, peer_host
from prebake.server.request_limits import LARGE_REQUESTS, REQUEST_LIMIT
from prebake.server.upload_sessions import UploadSessions
from prebake.v1 import blobs_pb2, blobs_pb2_grpc, jobs_pb2, registry_pb2
from tests.conftest import INDUCTOR, INDUCTOR_KEY, LLAMA3_8B_INF2, data_files

LOOKUP = "/prebake.v1.Registry/Lookup"


def huge_lookup(entries: int = 1_000_000) -> bytes:
    """The issue's request: a lookup whose key carries a million options (about 13 MB)."""
    request = registry_pb2.LookupRequest(key=LLAMA3_8B_INF2.to_proto())
    for i in range(entries):
        request.key.options[f"o{i}"] = "x"
    return request.SerializeToString()


@pytest.fixture
def channel(server: BackgroundServer) -> Iterator[grpc.Channel]:
    # The client's own send limit must let the oversize requests reach the server.
    with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        yield ch


def raw_call(channel: grpc.Channel, method: str, body: bytes) -> grpc.RpcError | bytes:
    try:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        return call(body, timeout=60)  # type: ignore[no-any-return]
    except grpc.RpcError as exc:
        return exc


def test_a_huge_request_is_refused_unparsed_while_a_concurrent_lookup_is_answered(
    channel: grpc.Channel, client: Client
) -> None:
    body = huge_lookup()
    assert len(body) > 12 << 20
    stop = threading.Event()
    answers: list[grpc.RpcError | bytes] = []

    def flood() -> None:
        while not stop.is_set():
            answers.append(raw_call(channel, LOOKUP, body))

    with ThreadPoolExecutor(4) as pool:
        floods = [pool.submit(flood) for _ in range(4)]
        try:
            # A second client keeps looking up while the flood runs; each lookup is answered.
            for _ in range(5):
                assert client.lookup(LLAMA3_8B_INF2).status in (
                    registry_pb2.LOOKUP_STATUS_MISS,
                    registry_pb2.LOOKUP_STATUS_COMPILING,
                )
        finally:
            stop.set()
        for f in floods:
            f.result()
    assert answers
    for answer in answers:
        # Refused by gRPC as the message's length arrives, above what any rpc may carry.
        assert isinstance(answer, grpc.RpcError)
        assert answer.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"larger than max ({len(body)} vs. {REQUEST_LIMIT})" in (answer.details() or "")


def test_a_request_over_its_methods_limit_is_refused_unparsed(channel: grpc.Channel) -> None:
    body = huge_lookup(100_000)
    assert 65536 < len(body) < REQUEST_LIMIT
    answer = raw_call(channel, LOOKUP, body)
    assert isinstance(answer, grpc.RpcError)
    assert answer.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        answer.details()
        == f"prebake.v1.Registry/Lookup: a request message of {len(body)} bytes; at most 65536"
    )


@pytest.mark.parametrize(
    "body",
    [
        b"\xff\xff\xff\xff",  # a truncated varint
        b"\x12\x05ab",  # a length-delimited field longer than the message
        b"\x0a" + b"\x0a\x7f" * 20,  # nested lengths that lie
        b"\x0f",  # an invalid wire type
    ],
)
def test_a_malformed_message_is_invalid_argument_without_parser_details(
    channel: grpc.Channel, body: bytes
) -> None:
    answer = raw_call(channel, LOOKUP, body)
    assert isinstance(answer, grpc.RpcError)
    assert answer.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        answer.details()
        == "prebake.v1.Registry/Lookup: the request is not a valid prebake.v1.LookupRequest message"
    )


def test_too_many_options_are_refused_before_they_are_copied(client: Client) -> None:
    key = dataclasses.replace(LLAMA3_8B_INF2, options={f"o{i}": "x" for i in range(1000)})
    with pytest.raises(errors.InvalidArgument, match="1000 options given; the limit is 32"):
        client.lookup(key)


def test_large_requests_stay_allowed_where_they_belong(client: Client, tmp_path: Path) -> None:
    # A blob chunk of the full 4 MiB and a manifest above the small-request limit pass.
    data = os.urandom(4 << 20)
    assert client.upload_blob(
        data, blobs_pb2.Digest(hash=hash_bytes(data), size_bytes=len(data))
    ).bytes_sent == len(data)
    assert LARGE_REQUESTS["prebake.v1.Blobs/Write"] > 4 << 20
    files = [
        registry_pb2.ArtifactFile(
            path=f"dir-{i:05d}/" + "p" * 60,
            digest=blobs_pb2.Digest(hash=hash_bytes(data), size_bytes=len(data)),
        )
        for i in range(2000)
    ]
    published = client.publish_artifact(LLAMA3_8B_INF2, files)
    assert published.created and len(published.artifact.files) == 2000


def test_job_creation_beyond_the_rate_limit_is_resource_exhausted(tmp_path: Path) -> None:
    with (
        background_server(tmp_path / "data", job_create_burst=3, job_create_per_minute=1.0) as srv,
        Client(srv.address, timeout=30.0) as client,
    ):
        keys = [dataclasses.replace(LLAMA3_8B_INF2, sequence_length=n) for n in (1024, 2048, 4096, 8192)]
        for key in keys[:3]:
            assert client.lookup(key).job_created
        with pytest.raises(errors.QuotaExceeded, match=r"at most 3 compile jobs created .* retry in \d"):
            client.lookup(keys[3])
        # Joining a job, hits and reports cost nothing: they are answered as before.
        assert client.lookup(keys[0]).status == registry_pb2.LOOKUP_STATUS_COMPILING
        assert client.lookup(keys[3], on_miss="report").status == registry_pb2.LOOKUP_STATUS_MISS
        assert len(client.list_jobs().jobs) == 3, "the refused lookup enqueued nothing"


def test_upload_starts_beyond_the_rate_limit_are_resource_exhausted(tmp_path: Path) -> None:
    with (
        background_server(tmp_path / "data", upload_start_burst=2, upload_start_per_minute=1.0) as srv,
        Client(srv.address, timeout=30.0) as client,
    ):
        blobs = [os.urandom(100) for _ in range(3)]
        for data in blobs[:2]:
            client.upload_blob(data, blobs_pb2.Digest(hash=hash_bytes(data), size_bytes=len(data)))
        with pytest.raises(errors.QuotaExceeded, match=r"at most 2 uploads started .* retry in \d"):
            client.upload_blob(blobs[2], blobs_pb2.Digest(hash=hash_bytes(blobs[2]), size_bytes=100))


class StalledUpload:
    """A Write stream that sends `first` and then nothing until `release()`."""

    def __init__(self, stub: blobs_pb2_grpc.BlobsStub, first: blobs_pb2.WriteRequest) -> None:
        self._release = threading.Event()

        def requests() -> Iterator[blobs_pb2.WriteRequest]:
            yield first
            self._release.wait(60)

        self.call = stub.Write.future(requests(), timeout=60)

    def release(self) -> None:
        self._release.set()

    def outcome(self) -> grpc.RpcError | blobs_pb2.WriteResponse:
        try:
            return self.call.result()  # type: ignore[no-any-return]
        except grpc.RpcError as exc:
            return exc


def open_descriptors_under(root: Path) -> list[str]:
    """Files under `root` this process holds open (the server runs in it)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with_target = os.path.join("/proc/self/fd", fd)
        try:
            target = os.readlink(with_target)
        except OSError:
            continue
        if target.startswith(str(root)):
            found.append(target)
    return found


def test_a_stalled_upload_is_ended_after_the_idle_timeout_and_its_partial_file_is_gone(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    with (
        background_server(data_dir, upload_idle_seconds=0.5) as srv,
        grpc.insecure_channel(srv.address) as channel,
    ):
        stub = blobs_pb2_grpc.BlobsStub(channel)
        data = os.urandom(300_000)
        digest = blobs_pb2.Digest(hash=hash_bytes(data), size_bytes=len(data))
        # A first stream stores a part and ends: the partial upload is kept for a resume.
        first = stub.Write(iter([blobs_pb2.WriteRequest(upload_id="u1", digest=digest, data=data[:100_000])]))
        assert (first.committed_size, first.complete) == (100_000, False)
        partial = data_files(data_dir)
        assert partial, "the partial upload is on disk"
        # The resume sends a chunk and then stalls: the server ends it and discards the upload.
        stalled = StalledUpload(
            stub,
            blobs_pb2.WriteRequest(upload_id="u1", digest=digest, offset=100_000, data=data[100_000:200_000]),
        )
        outcome = stalled.outcome()
        stalled.release()
        assert isinstance(outcome, grpc.RpcError)
        assert outcome.code() == grpc.StatusCode.ABORTED
        assert "nothing arrived on this upload for 0.5 s" in (outcome.details() or "")
        assert data_files(data_dir) == [], "the partial file is gone"
        assert open_descriptors_under(data_dir / "cas") == [], "and no descriptor is left open on it"
        status = stub.QueryWriteStatus(blobs_pb2.QueryWriteStatusRequest(upload_id="u1", digest=digest))
        assert (status.committed_size, status.complete) == (0, False)
        # The upload can start again and complete.
        done = stub.Write(
            iter([blobs_pb2.WriteRequest(upload_id="u1", digest=digest, data=data, finish_write=True)])
        )
        assert done.complete


def test_the_open_upload_cap_refuses_more_until_one_finishes(tmp_path: Path) -> None:
    with (
        background_server(tmp_path / "data", max_uploads_per_caller=2) as srv,
        grpc.insecure_channel(srv.address) as channel,
    ):
        stub = blobs_pb2_grpc.BlobsStub(channel)

        def first(upload_id: str) -> blobs_pb2.WriteRequest:
            data = upload_id.encode() * 10
            return blobs_pb2.WriteRequest(
                upload_id=upload_id, digest=blobs_pb2.Digest(hash=hash_bytes(data), size_bytes=len(data))
            )

        def probe() -> grpc.RpcError | blobs_pb2.WriteResponse:
            try:
                return stub.Write(iter([first("probe")]), timeout=30)  # type: ignore[no-any-return]
            except grpc.RpcError as exc:
                return exc

        stalled = [StalledUpload(stub, first(f"held-{i}")) for i in range(2)]
        try:
            # The stalled streams are admitted in their own time: probe until the cap shows
            # (by a deadline, not a count: on a loaded machine 500 probes may all be early).
            deadline = time.monotonic() + 30
            while not isinstance(refused := probe(), grpc.RpcError) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert isinstance(refused, grpc.RpcError)
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "2 of your uploads are in progress, the limit per caller" in (refused.details() or "")
        finally:
            for s in stalled:
                s.release()
        for s in stalled:
            assert isinstance(s.outcome(), blobs_pb2.WriteResponse), "the held uploads end normally"
        assert isinstance(probe(), blobs_pb2.WriteResponse), "finished uploads free their slots"


# -- the pieces, directly ------------------------------------------------------------------


class _Peer:
    def __init__(self, peer: str) -> None:
        self._peer = peer

    def peer(self) -> str:
        return self._peer


def test_callers_are_principals_when_authenticated_else_hosts_without_ports() -> None:
    assert peer_host("ipv4:127.0.0.1:50123") == "127.0.0.1"
    assert peer_host("ipv6:[::1]:50123") == "::1"
    assert peer_host("unix:/tmp/sock") == "unix:/tmp/sock"
    context = _Peer("ipv4:10.0.0.7:40000")
    assert caller(context) == "host 10.0.0.7"  # type: ignore[arg-type]
    token = principal.bind(principal.Principal("ci-worker", frozenset({principal.Role.WORKER})))
    try:
        assert caller(context) == "principal ci-worker"  # type: ignore[arg-type]
    finally:
        principal.unbind(token)


def test_a_token_bucket_refills_at_its_rate_and_keys_are_independent() -> None:
    now = [0.0]
    limit = RateLimit("things", burst=2, per_minute=60.0, clock=lambda: now[0], max_callers=2)
    limit.take("a")
    limit.take("a")
    with pytest.raises(errors.QuotaExceeded, match="retry in 1 s"):
        limit.take("a")
    limit.take("b")  # another caller has its own bucket
    now[0] = 1.0
    limit.check("a")  # one refilled; checking spends nothing
    limit.take("a")
    limit.spend("a")  # overdrawn by a concurrent action: the debt is refilled first
    now[0] = 2.0
    with pytest.raises(errors.QuotaExceeded, match="retry in 1 s"):
        limit.check("a")
    now[0] = 3.0
    limit.take("a")
    assert not RateLimit("off", burst=1, per_minute=0).enabled


def test_upload_sessions_cap_in_total_and_per_caller() -> None:
    sessions = UploadSessions(total=3, per_caller=2)
    with sessions.open("a"), sessions.open("a"):
        with pytest.raises(errors.QuotaExceeded, match="per caller"):
            sessions.open("a").__enter__()
        with (
            sessions.open("b"),
            pytest.raises(errors.QuotaExceeded, match="3 uploads are in progress on this server"),
        ):
            sessions.open("c").__enter__()
    assert sessions.open_count == 0


@pytest.mark.parametrize(
    ("setting", "value", "fragment"),
    [
        ("max_request_bytes", "100", "at least 1024"),
        ("job_create_burst", "0", "job_create_burst is 0; at least 1"),
        ("upload_start_per_minute", "-1", "expected a finite number >= 0"),
        ("upload_idle_seconds", "nan", "expected a finite number >= 0"),
        ("max_uploads", "-5", "expected a finite number >= 0"),
    ],
)
def test_limits_that_cannot_work_are_refused_when_the_config_is_built(
    setting: str, value: str, fragment: str
) -> None:
    from prebake.server.config import ServerConfig, load_server_config

    assert load_server_config({}, {}).max_request_bytes == ServerConfig().max_request_bytes
    with pytest.raises(ValueError, match=re.escape(fragment)):
        load_server_config({setting: value}, {})


def test_a_wrong_fencing_token_is_refused_without_naming_the_right_one(client: Client) -> None:
    client.lookup(INDUCTOR_KEY)
    leased = client.lease_job("w1", [INDUCTOR])
    wrong = leased.fencing_token + 1000
    attempts: list[Callable[[], object]] = [
        lambda: client.heartbeat(leased.job.job_id, wrong, 0.5, "working"),
        lambda: client.fail_job(leased.job.job_id, wrong, "boom", deterministic=True),
        lambda: client.release_job(leased.job.job_id, wrong),
    ]
    for attempt in attempts:
        with pytest.raises(errors.FailedPrecondition) as refused:
            attempt()
        assert re.findall(r"token (\d+)", str(refused.value)) == [str(wrong)]
    assert client.get_job(leased.job.job_id).state == jobs_pb2.JOB_STATE_LEASED


@pytest.mark.parametrize("token", ["9" * 500, "A" * 5000, "WzEsMWU5OTld", "W1swXV0", "%%%"])
def test_a_huge_or_malformed_page_token_is_invalid_argument(client: Client, token: str) -> None:
    with pytest.raises(errors.InvalidArgument, match="is not a token this server issued"):
        client.list_jobs(page_token=token)
    with pytest.raises(errors.InvalidArgument, match="is not a token this server issued"):
        client.list_artifacts(page_token=token)
