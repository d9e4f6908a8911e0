"""The client's resilience against a real server, with real network faults in between.

Every test but the last section runs the real prebake server on loopback. Faults come
from `FaultProxy`, a TCP proxy between the client under test and the server that resets
or black-holes the connection after a chosen number of bytes, as a server restart, a
load balancer or a dying NAT entry would. What the server did is read back through a
second client connected directly (not through the proxy): `bytes_served` and
`bytes_received` in `GetStats` count the payload bytes the Blobs service sent and stored,
so a resumed transfer is told apart from one that started over.

Not here because they live elsewhere: an interrupted fetch or upload (a progress
callback raising) resuming later is in test_transfer.py, as is a blob that rotted on
the server's disk.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import xxhash

from prebake.client import Client, errors
from prebake.client.fetch import MARKER, read_marker, temp_dirs_for
from prebake.server.app import BackgroundServer
from prebake.v1 import blobs_pb2, blobs_pb2_grpc, jobs_pb2, registry_pb2
from tests.conftest import LLAMA3_8B_INF2, make_artifact_dir, tree
from tests.faultproxy import Fault, FaultProxy

MiB = 1 << 20
BIG = 24 * MiB
# Cut late: a client that started over instead of resuming would make the server send
# at least CUT bytes twice, far more than the few MiB in flight (HTTP/2 window, socket
# buffers) that a resumed download legitimately gets again.
CUT = 16 * MiB
SIZES = {"compiled/model.neff": BIG, "config.json": 1234, "bin/run.sh": 64, "tokenizer/empty.txt": 0}
TOTAL = sum(SIZES.values())


@pytest.fixture
def proxy(server: BackgroundServer) -> Iterator[FaultProxy]:
    with FaultProxy(server.address) as p:
        yield p


@pytest.fixture
def proxied(proxy: FaultProxy) -> Iterator[Client]:
    """A client that reaches the server only through the fault proxy."""
    with Client(proxy.address, timeout=10.0) as c:
        yield c


@pytest.fixture
def big_src(tmp_path: Path) -> Path:
    src = make_artifact_dir(tmp_path / "src", SIZES, seed=11)
    (src / "bin/run.sh").chmod(0o755)
    return src


@pytest.fixture
def published(client: Client, big_src: Path) -> str:
    """The id of an artifact of ~24 MiB, published directly (no faults)."""
    return client.publish(big_src, LLAMA3_8B_INF2).artifact.artifact_id


def served(client: Client) -> int:
    return client.get_stats().bytes_served


# Connection reset mid-transfer --------------------------------------------------------------


def test_fetch_resumes_from_its_offset_after_the_connection_is_reset(  # noqa: PLR0917 (fixtures)
    client: Client, proxied: Client, proxy: FaultProxy, published: str, big_src: Path, tmp_path: Path
) -> None:
    cut = proxy.cut_after(CUT)
    before = served(client)
    dest = tmp_path / "deploy" / "model"
    result = proxied.fetch(published, dest)
    resent = served(client) - before - TOTAL

    assert cut.fired == 1 and proxy.connections == 2, "one reset, then one new connection"
    assert tree(dest) == tree(big_src)
    assert os.access(dest / "bin/run.sh", os.X_OK)
    marker = read_marker(dest)
    assert marker is not None and marker["artifact_id"] == published
    assert result.bytes_downloaded == TOTAL and result.bytes_resumed == 0
    # Resumed, not restarted: only what was in flight at the reset went twice (and < 2x).
    assert 0 <= resent < CUT
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model"], "no temporary directory left"


def test_upload_resumes_from_the_committed_size_after_the_connection_is_reset(
    client: Client, proxied: Client, proxy: FaultProxy, big_src: Path, tmp_path: Path
) -> None:
    cut = proxy.cut_after(CUT, direction="up")
    response = proxied.publish(big_src, LLAMA3_8B_INF2)
    received = client.get_stats().bytes_received

    assert cut.fired == 1 and proxy.connections == 2
    assert response.created
    # The server received every byte exactly once: the upload went on from the
    # committed size instead of sending the first part again.
    assert received == TOTAL
    dest = tmp_path / "out"
    client.fetch(response.artifact.artifact_id, dest)
    assert tree(dest) == tree(big_src)


def test_watch_reconnects_after_a_reset_and_sees_the_job_succeed(
    client: Client, proxied: Client, proxy: FaultProxy, big_src: Path
) -> None:
    job_id = client.lookup(LLAMA3_8B_INF2).job.job_id
    assert job_id
    first = threading.Event()
    states: list[str] = []

    def watch() -> None:
        for event in proxied.watch_job(job_id, timeout=30.0):
            states.append(jobs_pb2.JobState.Name(event.job.state))
            first.set()

    with futures.ThreadPoolExecutor(1) as pool:
        watching = pool.submit(watch)
        assert first.wait(10.0), "the watch delivered the job's current state"
        # The watch is quiet now; the next byte the server sends it (the job's completion)
        # is where the connection dies.
        cut = proxy.cut_after(0)
        client.publish(big_src, LLAMA3_8B_INF2)
        watching.result(timeout=20.0)

    assert cut.fired == 1 and proxy.connections == 2
    assert states == ["JOB_STATE_QUEUED", "JOB_STATE_SUCCEEDED"], "each state once, none lost"


def test_ensure_survives_a_reset_during_its_download(
    client: Client, proxied: Client, proxy: FaultProxy, big_src: Path, tmp_path: Path
) -> None:
    # A miss: ensure enqueues a compile job and waits; "the compiler" (a direct client)
    # publishes; ensure then downloads the artifact, and the connection dies mid-way.
    cut = proxy.cut_after(CUT)
    waiting = threading.Event()
    dest = tmp_path / "model"
    with futures.ThreadPoolExecutor(1) as pool:
        ensuring = pool.submit(
            proxied.ensure, LLAMA3_8B_INF2, dest, timeout=30.0, on_event=lambda e: waiting.set()
        )
        assert waiting.wait(10.0), "ensure is waiting for the compile job"
        published = client.publish(big_src, LLAMA3_8B_INF2).artifact.artifact_id
        result = ensuring.result(timeout=30.0)

    assert cut.fired == 1 and proxy.connections == 2
    assert result.status == "MISS" and result.job_id and result.artifact_id == published
    assert result.fetch.bytes_downloaded == TOTAL
    assert tree(dest) == tree(big_src)


# Black-holed connection -------------------------------------------------------------------


def test_a_stalled_fetch_gives_up_in_bounded_time_and_a_later_fetch_resumes(
    client: Client, proxy: FaultProxy, published: str, big_src: Path, tmp_path: Path
) -> None:
    stall = proxy.stall_after(CUT)
    black_holes: list[Fault] = []

    def black_hole_every_new_connection() -> None:
        # Once the first connection stalls, so does every replacement the client opens.
        if stall.wait(10.0):
            black_holes.append(proxy.stall_after(0, times=10))

    arming = threading.Thread(target=black_hole_every_new_connection)
    arming.start()
    dest = tmp_path / "model"
    started = time.monotonic()
    with (
        Client(proxy.address, timeout=10.0, retries=1, idle_timeout=0.5) as stalled,
        pytest.raises(errors.Unavailable, match="stalled"),
    ):
        stalled.fetch(published, dest)
    elapsed = time.monotonic() - started
    arming.join(timeout=10.0)

    assert stall.fired == 1 and black_holes and black_holes[0].fired >= 1, "the retry used a new connection"
    assert elapsed < 5.0, "the idle watchdog ended the stalled stream; it did not hang"
    assert not dest.exists()
    [partial_dir] = temp_dirs_for(dest, published)
    partial = partial_dir / "compiled/model.neff"
    kept = partial.stat().st_size
    assert 0 < kept < BIG, "the bytes received before the stall are kept"

    # The network heals: new connections through the proxy pass traffic again.
    proxy.clear_faults()
    before = served(client)
    with Client(proxy.address, timeout=10.0) as later:
        result = later.fetch(published, dest)
    assert tree(dest) == tree(big_src)
    assert result.bytes_resumed >= kept and result.bytes_resumed + result.bytes_downloaded == TOTAL
    assert served(client) - before == result.bytes_downloaded


def test_fetch_recovers_from_a_stalled_connection_within_one_call(
    proxy: FaultProxy, published: str, big_src: Path, tmp_path: Path
) -> None:
    # A black-holed connection (NAT entry dropped): the idle watchdog gives up on it and
    # the retry opens a fresh connection instead of stalling on the same one again.
    stall = proxy.stall_after(CUT)
    dest = tmp_path / "model"
    started = time.monotonic()
    with Client(proxy.address, timeout=10.0, retries=2, idle_timeout=1.0) as c:
        c.fetch(published, dest)
    assert stall.fired == 1 and proxy.connections == 2
    assert time.monotonic() - started < 8.0
    assert tree(dest) == tree(big_src)


# Many fetches, one destination ------------------------------------------------------------


def test_concurrent_fetches_to_one_destination_download_once(
    server: BackgroundServer, client: Client, published: str, big_src: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "model"
    start = threading.Barrier(4)
    before = served(client)

    def fetch() -> tuple[int, bool]:
        with Client(server.address, timeout=10.0) as c:
            start.wait(timeout=10.0)
            result = c.fetch(published, dest)
            return result.bytes_downloaded, result.already_present

    with futures.ThreadPoolExecutor(4) as pool:
        results = [f.result(timeout=30.0) for f in [pool.submit(fetch) for _ in range(4)]]

    assert tree(dest) == tree(big_src)
    assert served(client) - before == TOTAL, "the server sent the bytes once"
    assert sum(downloaded for downloaded, _ in results) == TOTAL
    assert sorted(present for _, present in results) == [False, True, True, True]
    assert not list(tmp_path.glob(".prebake-*")), "no temporary directory left"


# Destination protection -------------------------------------------------------------------


@pytest.fixture
def small(client: Client, tmp_path: Path) -> tuple[str, Path]:
    src = make_artifact_dir(tmp_path / "small-src", {"a.bin": 100_000, "b/c.txt": 10}, seed=5)
    return client.publish(src, LLAMA3_8B_INF2).artifact.artifact_id, src


def test_fetch_does_not_replace_other_content_unless_asked(
    client: Client, small: tuple[str, Path], tmp_path: Path
) -> None:
    artifact_id, src = small
    dest = tmp_path / "deploy" / "out"
    dest.mkdir(parents=True)
    (dest / "mine.txt").write_text("keep")
    before = served(client)
    with pytest.raises(errors.DestinationExists, match="overwrite"):
        client.fetch(artifact_id, dest)
    assert served(client) == before, "refused before downloading anything"
    assert (dest / "mine.txt").read_text() == "keep"

    client.fetch(artifact_id, dest, overwrite=True)
    assert tree(dest) == tree(src) and not (dest / "mine.txt").exists()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["out"], "nothing set aside is left"


def test_fetch_into_an_empty_directory_needs_no_overwrite(
    client: Client, small: tuple[str, Path], tmp_path: Path
) -> None:
    artifact_id, src = small
    dest = tmp_path / "mount"
    dest.mkdir()
    result = client.fetch(artifact_id, dest)
    assert tree(dest) == tree(src) and not result.already_present


def test_publish_refuses_symbolic_links_before_sending_anything(client: Client, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "real.bin").write_bytes(b"x" * 1000)
    (src / "link.bin").symlink_to(src / "real.bin")
    with pytest.raises(errors.InvalidArgument, match="symbolic link"):
        client.publish(src, LLAMA3_8B_INF2)
    assert client.get_stats().bytes_received == 0
    assert client.lookup(LLAMA3_8B_INF2, on_miss="report").status == registry_pb2.LOOKUP_STATUS_MISS


# A hostile manifest -----------------------------------------------------------------------

# The real server refuses to publish these paths, so the manifest is doctored by hand
# here; it still names real blobs, so without the client's own check the download would
# succeed and write outside `dest`.
UNSAFE_PATHS = ["../escape", "{tmp}/escape", "a/../../escape", "x/../../../escape", MARKER]


@pytest.mark.parametrize("bad", UNSAFE_PATHS)
def test_unsafe_manifest_paths_are_refused_before_writing(
    client: Client, small: tuple[str, Path], tmp_path: Path, bad: str
) -> None:
    artifact_id, _ = small
    manifest = client.get_artifact(artifact_id)
    manifest.files[0].path = bad.format(tmp=tmp_path)
    before = served(client)
    with pytest.raises(errors.UnsafeManifest):
        client.fetch(manifest, tmp_path / "box" / "out")
    assert not (tmp_path / "box").exists()
    assert not (tmp_path / "escape").exists()
    assert served(client) == before


# A lying server ---------------------------------------------------------------------------
#
# The one failure the real server cannot be made to produce: bytes that do not match the
# digest they are served under. The real server re-hashes a blob before serving its first
# chunk (and quarantines it on a mismatch, see test_transfer.py), so the client's own
# verification of what arrives, its last line of defence against a broken server, proxy
# or disk, can only be reached with a deliberately dishonest Blobs service.


class LyingBlobs(blobs_pb2_grpc.BlobsServicer):
    """Serves `data` for any digest, with its last byte flipped."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.reads = 0

    def Read(  # noqa: N802 (rpc name)
        self, request: blobs_pb2.ReadRequest, context: grpc.ServicerContext
    ) -> Iterator[blobs_pb2.ReadResponse]:
        self.reads += 1
        lie = self.data[:-1] + bytes([self.data[-1] ^ 1])
        yield blobs_pb2.ReadResponse(data=lie[request.offset :])


def test_bytes_that_do_not_match_the_digest_are_deleted_and_never_placed(tmp_path: Path) -> None:
    data = os.urandom(100_000)
    digest = blobs_pb2.Digest(hash=xxhash.xxh3_128_hexdigest(data), size_bytes=len(data))
    artifact = registry_pb2.Artifact(
        artifact_id="0" * 32,
        files=[registry_pb2.ArtifactFile(path="a.bin", digest=digest)],
        file_count=1,
        total_size_bytes=len(data),
    )
    # Only Read is served; the other rpcs answer UNIMPLEMENTED (the generated base class).
    liar = LyingBlobs(data)  # type: ignore[abstract]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    blobs_pb2_grpc.add_BlobsServicer_to_server(liar, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=5.0) as c, pytest.raises(errors.DownloadDigestMismatch):
            c.fetch(artifact, tmp_path / "out")
    finally:
        server.stop(grace=None)
    assert liar.reads == 1, "a mismatch on a fresh download is an answer, not retried"
    assert not (tmp_path / "out").exists()
    assert not any((d / "a.bin").exists() for d in temp_dirs_for(tmp_path / "out", artifact.artifact_id))
