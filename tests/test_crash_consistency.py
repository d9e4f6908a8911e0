"""Crash consistency of the embedded default: SIGKILL `prebake serve` during uploads and publishes.

One data directory (SQLite registry, blobs on local disk) and one port, served by a real
`prebake serve` that each test kills with SIGKILL at a point of its own and restarts there.
Outside kills aim at what a client sees (bytes sent and stored, a request sent, a reply
received); kills planted in the server (`tests.crash_points`) aim between two storage steps
(assembled but not moved, registry row written but not answered, ...). After every restart:

- every artifact a client saw published (the rpc answered OK) is listed, with the files it was
  published with, every blob present; those the test touched are fetched (verified) and compared
  byte for byte, and their key hits;
- nothing else is listed but what an rpc cut by the kill may have published, and that whole;
- the server's blob counters (what its quota is checked against) match the blobs on disk;
- an upload resumes from what the server reports committed, and a publish of the same content
  then succeeds.

The last test collects what the kills left (partial uploads, temporary files, blobs no artifact
uses) with the graces set to zero, killed once mid-collection, and checks the data directory
holds nothing else. The module kills the server 36 times (at 24 points, the parametrized
ones at several bytes or moments). Tests run in order on the one data directory (an xdist group), each
leaving a server running for the next.
"""

from __future__ import annotations

import dataclasses
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from prebake.client import ArtifactKey, Client
from prebake.client.errors import PrebakeError
from prebake.client.publish import scan_directory
from prebake.client.transfer import upload_id_for
from prebake.core.digests import hash_bytes
from prebake.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    blobs_pb2,
    blobs_pb2_grpc,
    jobs_pb2,
    registry_pb2,
    registry_pb2_grpc,
)
from tests.conftest import INDUCTOR, INDUCTOR_KEY, LLAMA3_8B_INF2, data_files, make_artifact_dir, tree
from tests.crash_points import ENV as CRASH_AT
from tests.processes import ServerProcess, free_port, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("crash-consistency")]

KiB, MiB = 1 << 10, 1 << 20
PART = 8 * MiB  # the blob store's part size: uploads are stored (and resume) in whole parts
BIG = 20 * MiB  # two whole parts and a 4 MiB tail
CRASHING = [sys.executable, "-m", "tests.crash_points"]
HIT = registry_pb2.LOOKUP_STATUS_HIT
CAS = "prebake.server.blobs.cas:ContentAddressedStore"
LOCAL = "prebake.server.blobs.local_objects:LocalObjectStore"
INDEX = "prebake.server.storage.sqlite.artifact_index:SqliteArtifactIndex"
ZERO_GRACES = {"PREBAKE_STALE_UPLOAD_SECONDS": "0", "PREBAKE_UNREFERENCED_BLOB_GRACE_SECONDS": "0"}

Manifest = dict[str, tuple[str, int]]


def digest_of(data: bytes) -> blobs_pb2.Digest:
    return blobs_pb2.Digest(hash=hash_bytes(data), size_bytes=len(data))


def stored_blobs(data_dir: Path) -> set[str]:
    return {p for p in data_files(data_dir) if p.startswith("blobs/")}


def manifest_of(artifact: registry_pb2.Artifact) -> Manifest:
    return {f.path: (f.digest.hash, f.digest.size_bytes) for f in artifact.files}


@dataclasses.dataclass
class Published:
    """An artifact a client saw published, and the directories whose files it may hold."""

    key: ArtifactKey
    sources: list[Path]


class Stubs:
    """Raw stubs on one channel: streams cut at a chosen byte, calls left in flight."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.blobs = blobs_pb2_grpc.BlobsStub(self.channel)
        self.registry = registry_pb2_grpc.RegistryStub(self.channel)
        self.admin = admin_pb2_grpc.AdminStub(self.channel)

    def committed(self, data: bytes) -> blobs_pb2.QueryWriteStatusResponse:
        request = blobs_pb2.QueryWriteStatusRequest(
            upload_id=upload_id_for(digest_of(data)), digest=digest_of(data)
        )
        reply: blobs_pb2.QueryWriteStatusResponse = self.blobs.QueryWriteStatus(request, timeout=30)
        return reply

    def wait_committed(self, data: bytes, size: int) -> None:
        """Wait until the upload of `data` has stored at least `size` bytes (whole parts)."""

        def stored() -> bool:
            return self.committed(data).committed_size >= size

        wait_until(stored, 60, f"{size} bytes of the upload stored")

    def write(
        self, data: bytes, start: int, stop: int, *, finish: bool = False, hold: threading.Event | None = None
    ) -> grpc.Future[blobs_pb2.WriteResponse]:
        """A Write of data[start:stop] under the client's upload id, in 1 MiB messages, then
        (with `hold`) the stream kept open until it is set, else half-closed."""
        digest = digest_of(data)

        def requests() -> Iterator[blobs_pb2.WriteRequest]:
            offset = start
            while offset < stop:
                chunk = data[offset : min(stop, offset + MiB)]
                last = finish and offset + len(chunk) == len(data)
                request = blobs_pb2.WriteRequest(offset=offset, data=chunk, finish_write=last)
                if offset == start:
                    request.upload_id = upload_id_for(digest)
                    request.digest.CopyFrom(digest)
                yield request
                offset += len(chunk)
            if hold is not None:
                hold.wait(60)

        return self.blobs.Write.future(requests())

    def close(self) -> None:
        self.channel.close()


def outcome(future: grpc.Future[Any]) -> object | None:
    """The reply of a call the kill may have cut, or None if it failed."""
    try:
        reply: object = future.result(timeout=60)
        return reply
    except grpc.RpcError:
        return None


class Crashes:
    """The data directory, its port, the server on them, and what clients saw published."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.address = f"127.0.0.1:{free_port()}"
        self.starts = 0
        self.kills = 0
        self.server: ServerProcess | None = None
        self.planted = ""  # the crash point planted in the running server, if any
        self._client: Client | None = None
        self._stubs: Stubs | None = None
        self.expected: dict[str, Published] = {}
        self._manifests: dict[Path, Manifest] = {}
        self._batch = 100
        self._dirs = 0
        self._fetches = 0

    # -- the server ------------------------------------------------------------------

    def start(self, crash_at: str = "", env: dict[str, str] | None = None) -> ServerProcess:
        assert self.server is None or self.server.proc.poll() is not None
        self.starts += 1
        environment = dict(env or {})
        if crash_at:
            environment[CRASH_AT] = crash_at
        args = ["--data-dir", str(self.data_dir), "--gc-interval", "0", "--integrity-sweep-seconds", "0"]
        self.server = ServerProcess(
            self.root, f"{self.starts}", args, environment, address=self.address, program=CRASHING
        ).wait_ready()
        self.planted = crash_at
        return self.server

    def running(self) -> None:
        """A server without a planted crash (the previous test may have failed before its crash)."""
        if self.server is None or self.server.proc.poll() is not None or self.planted:
            self.restart()

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.address, timeout=30.0, retries=2)
        return self._client

    @property
    def stubs(self) -> Stubs:
        if self._stubs is None:
            self._stubs = Stubs(self.address)
        return self._stubs

    def _drop_connections(self) -> None:
        # Fresh channels after a restart: an old one may wait out its reconnect backoff.
        if self._client is not None:
            self._client.close()
        if self._stubs is not None:
            self._stubs.close()
        self._client = self._stubs = None

    def kill(self) -> None:
        """SIGKILL the server from outside, as when its host is lost."""
        assert self.server is not None and self.server.proc.poll() is None, "the server died before the kill"
        self.server.kill()
        self.kills += 1
        self._drop_connections()

    def crashed(self) -> None:
        """Wait for the server to reach its planted crash point (and so die of SIGKILL)."""
        server = self.server
        assert server is not None
        wait_until(lambda: server.proc.poll() is not None, 60, "the server to reach its crash point")
        assert server.proc.returncode == -signal.SIGKILL, f"the server exited otherwise:\n{server.log()}"
        self.kills += 1
        self._drop_connections()

    def restart(self, crash_at: str = "", env: dict[str, str] | None = None) -> None:
        """Start the server again (stopped first, cleanly, if it runs: to plant a crash)."""
        self._drop_connections()
        if self.server is not None and self.server.proc.poll() is None:
            assert self.server.stop() == 0, self.server.log()
        self.start(crash_at, env)

    # -- content ---------------------------------------------------------------------

    def key(self) -> ArtifactKey:
        self._batch += 1
        return dataclasses.replace(LLAMA3_8B_INF2, batch_size=self._batch)

    def directory(self, sizes: dict[str, int]) -> Path:
        self._dirs += 1
        return make_artifact_dir(self.root / f"artifact-{self._dirs}", sizes, seed=self._dirs)

    def big_directory(self) -> tuple[Path, bytes]:
        directory = self.directory({"model.bin": BIG})
        return directory, (directory / "model.bin").read_bytes()

    def manifest(self, directory: Path) -> Manifest:
        if directory not in self._manifests:
            self._manifests[directory] = {f.path: (f.hash, f.size) for f in scan_directory(directory)}
        return self._manifests[directory]

    def request(
        self, key: ArtifactKey, directory: Path, *, replace: bool = False
    ) -> registry_pb2.PublishArtifactRequest:
        files = [f.to_proto() for f in scan_directory(directory)]
        request = registry_pb2.PublishArtifactRequest(replace=replace, files=files)
        request.key.CopyFrom(key.to_proto())
        return request

    def publish(self, key: ArtifactKey, directory: Path, *, replace: bool = False) -> str:
        """Publish through the client (uploading what is missing); record it as published."""
        artifact_id = self.client.publish(directory, key, replace=replace).artifact.artifact_id
        self.expected[artifact_id] = Published(key, [directory])
        return artifact_id

    # -- the checks --------------------------------------------------------------------

    def check(self, fetch: Sequence[str] = (), may_exist: dict[str, Published] | None = None) -> None:
        """What the module docstring says holds after every restart."""
        may_exist = may_exist or {}
        client = self.client
        listed = {a.artifact_id for a in client.iter_artifacts()}
        lost = sorted(set(self.expected) - listed)
        assert not lost, f"published artifacts lost after kill {self.kills}: {lost}"
        unexpected = sorted(listed - set(self.expected) - set(may_exist))
        assert not unexpected, f"artifacts nobody published are listed: {unexpected}"
        for artifact_id in sorted(listed):
            published = self.expected.get(artifact_id) or may_exist[artifact_id]
            artifact = client.get_artifact(artifact_id)
            manifest = manifest_of(artifact)
            sources = [d for d in published.sources if self.manifest(d) == manifest]
            assert sources, f"artifact {artifact_id} holds files it was never published with: {manifest}"
            missing = client.find_missing_blobs(f.digest for f in artifact.files)
            assert missing == [], f"artifact {artifact_id} is listed without its blobs {missing}"
            if artifact_id in fetch:
                self._fetches += 1
                dest = self.root / f"fetched-{self._fetches}"
                assert client.fetch(artifact, dest).artifact_id == artifact_id
                assert tree(dest) == tree(sources[0])
                assert client.lookup(published.key, on_miss="report").status == HIT
        # The blob counters the server keeps (for its quota) agree with what the disk holds.
        stats, on_disk = client.get_stats(), stored_blobs(self.data_dir)
        sizes = [int(name.rsplit("-", 1)[1]) for name in on_disk]
        assert (stats.blobs, stats.blob_bytes) == (len(on_disk), sum(sizes))

    def leftovers(self) -> list[str]:
        """Partial uploads and temporary files in the blob store."""
        return [p for p in data_files(self.data_dir) if p.startswith((".multipart/", ".tmp/", "uploads/"))]


@pytest.fixture(scope="module")
def crashes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Crashes]:
    c = Crashes(tmp_path_factory.mktemp("crashes"))
    try:
        yield c
    finally:
        c._drop_connections()
        if c.server is not None:
            c.server.stop()


@pytest.fixture
def c(crashes: Crashes) -> Crashes:
    crashes.running()
    return crashes


def seeded_delay(name: str, low: float, high: float) -> float:
    return random.Random(name).uniform(low, high)


# -- uploads cut by an outside kill ------------------------------------------------------


def test_kill_while_the_first_part_is_buffered(c: Crashes) -> None:
    key, (directory, data) = c.key(), c.big_directory()
    hold = threading.Event()
    cut = c.stubs.write(data, 0, 3 * MiB, hold=hold)
    try:
        c.kill()
    finally:
        hold.set()
    assert outcome(cut) is None
    c.restart()
    status = c.stubs.committed(data)
    assert (status.committed_size, status.complete) == (0, False), "buffered bytes are not committed"
    c.check()
    artifact_id = c.publish(key, directory)
    c.check(fetch=[artifact_id])


@pytest.mark.parametrize("parts", [1, 2])
def test_kill_with_whole_parts_stored_then_resume(c: Crashes, parts: int) -> None:
    key, (directory, data) = c.key(), c.big_directory()
    hold = threading.Event()
    cut = c.stubs.write(data, 0, parts * PART + MiB, hold=hold)
    try:
        c.stubs.wait_committed(data, parts * PART)
        c.kill()
    finally:
        hold.set()
    assert outcome(cut) is None
    c.restart()
    assert c.stubs.committed(data).committed_size == parts * PART
    c.check()
    resumed = c.client.upload_blob(data, digest_of(data))
    assert (resumed.bytes_resumed, resumed.bytes_sent) == (parts * PART, BIG - parts * PART)
    artifact_id = c.publish(key, directory)
    c.check(fetch=[artifact_id])


def test_kill_during_a_resumed_upload_then_resume_again(c: Crashes) -> None:
    key, (directory, data) = c.key(), c.big_directory()
    for stored in (PART, 2 * PART):  # a kill during the first stream, then during its resume
        hold = threading.Event()
        cut = c.stubs.write(data, stored - PART, stored + MiB, hold=hold)
        try:
            c.stubs.wait_committed(data, stored)
            c.kill()
        finally:
            hold.set()
        assert outcome(cut) is None
        c.restart()
        assert c.stubs.committed(data).committed_size == stored
        c.check()
    assert c.client.upload_blob(data, digest_of(data)).bytes_resumed == 2 * PART
    artifact_id = c.publish(key, directory)
    c.check(fetch=[artifact_id])


def test_kill_with_every_byte_sent_but_not_finished(c: Crashes) -> None:
    key, (directory, data) = c.key(), c.big_directory()
    hold = threading.Event()
    cut = c.stubs.write(data, 0, BIG, hold=hold)  # no finish_write: the 4 MiB tail stays buffered
    try:
        c.stubs.wait_committed(data, 2 * PART)
        c.kill()
    finally:
        hold.set()
    assert outcome(cut) is None
    c.restart()
    status = c.stubs.committed(data)
    assert (status.committed_size, status.complete) == (2 * PART, False)
    assert c.client.find_missing_blobs([digest_of(data)]) == [digest_of(data)]
    c.check()
    artifact_id = c.publish(key, directory)
    c.check(fetch=[artifact_id])


def test_kill_after_a_stream_ended_unfinished(c: Crashes) -> None:
    key, (directory, data) = c.key(), c.big_directory()
    ended = c.stubs.write(data, 0, 5 * MiB).result(timeout=60)  # half-closed: the tail is kept
    assert (ended.committed_size, ended.complete) == (5 * MiB, False)
    c.kill()
    c.restart()
    assert c.stubs.committed(data).committed_size == 5 * MiB
    c.check()
    assert c.client.upload_blob(data, digest_of(data)).bytes_resumed == 5 * MiB
    artifact_id = c.publish(key, directory)
    c.check(fetch=[artifact_id])


def test_kill_leaving_an_upload_nobody_resumes(c: Crashes) -> None:
    """Its parts stay until garbage collection (the last test)."""
    _, data = c.big_directory()
    hold = threading.Event()
    cut = c.stubs.write(data, 0, 2 * PART + MiB, hold=hold)
    try:
        c.stubs.wait_committed(data, 2 * PART)
        c.kill()
    finally:
        hold.set()
    assert outcome(cut) is None
    c.restart()
    assert c.stubs.committed(data).committed_size == 2 * PART
    assert any(p.startswith(".multipart/") for p in c.leftovers())
    c.check()


@pytest.mark.parametrize("seed", range(3))
def test_kill_while_a_finished_upload_is_assembled(c: Crashes, seed: int) -> None:
    key, (directory, data) = c.key(), c.big_directory()
    cut = c.stubs.write(data, 0, BIG, finish=True)
    c.stubs.wait_committed(data, 2 * PART)
    # The rest (4 MiB, then assembling 20 MiB, verifying, moving) takes tens of milliseconds.
    time.sleep(seeded_delay(f"assembled-{seed}", 0.0, 0.06))
    c.kill()
    answered = outcome(cut)
    c.restart()
    status = c.stubs.committed(data)
    if answered is not None:
        assert status.complete, "an upload answered complete was lost"
    if status.complete:
        assert c.client.find_missing_blobs([digest_of(data)]) == []
    else:
        assert status.committed_size in (2 * PART, BIG)  # parts, or assembled and not yet moved
        assert c.client.find_missing_blobs([digest_of(data)]) == [digest_of(data)]
    c.check()
    artifact_id = c.publish(key, directory)
    c.check(fetch=[artifact_id])


def test_kill_while_a_one_message_blob_is_stored(c: Crashes) -> None:
    key = c.key()
    directory = c.directory({"small.bin": 512 * KiB})
    data = (directory / "small.bin").read_bytes()
    cut = c.stubs.write(data, 0, len(data), finish=True)
    time.sleep(seeded_delay("one-message", 0.0, 0.02))
    c.kill()
    answered = outcome(cut)
    c.restart()
    present = c.client.find_missing_blobs([digest_of(data)]) == []
    assert present or answered is None, "a blob answered complete was lost"
    c.check()
    artifact_id = c.publish(key, directory)
    c.check(fetch=[artifact_id])


# -- publishes cut by an outside kill -----------------------------------------------------


def test_kill_between_upload_and_publish(c: Crashes) -> None:
    key, directory = c.key(), c.directory({"model.bin": 96 * KiB, "config.json": KiB})
    files = c.client.upload_directory(directory)
    c.kill()
    c.restart()
    assert c.client.find_missing_blobs(f.digest for f in files) == [], "uploaded blobs were lost"
    c.check()
    reply = c.client.publish_artifact(key, files)
    assert reply.created
    c.expected[reply.artifact.artifact_id] = Published(key, [directory])
    c.check(fetch=[reply.artifact.artifact_id])


def test_kill_with_some_blobs_of_an_artifact_uploaded(c: Crashes) -> None:
    key, directory = c.key(), c.directory({"a.bin": 40 * KiB, "b.bin": 50 * KiB, "c.bin": 60 * KiB})
    files = scan_directory(directory)
    for f in files[:2]:
        c.client.upload_blob(f.source, f.digest)
    c.kill()
    c.restart()
    missing = c.client.find_missing_blobs(f.digest for f in files)
    assert missing == [files[2].digest]
    c.check()
    artifact_id = c.publish(key, directory)
    c.check(fetch=[artifact_id])


@pytest.mark.parametrize("seed", range(3))
def test_kill_with_a_publish_in_flight(c: Crashes, seed: int) -> None:
    key, directory = c.key(), c.directory({"model.bin": 64 * KiB, "config.json": KiB})
    c.client.upload_directory(directory)
    call = c.stubs.registry.PublishArtifact.future(c.request(key, directory))
    time.sleep(seeded_delay(f"publish-{seed}", 0.0, 0.01))
    c.kill()
    answered = outcome(call)
    c.restart()
    artifact_id = c.client.lookup(key, on_miss="report").key.digest
    if answered is not None:
        c.expected[artifact_id] = Published(key, [directory])
    c.check(may_exist={artifact_id: Published(key, [directory])}, fetch=[artifact_id])
    artifact_id = c.publish(key, directory)  # again: stored once, whole
    c.check(fetch=[artifact_id])


def test_kill_right_after_a_publish_returns(c: Crashes) -> None:
    key, directory = c.key(), c.directory({"model.bin": 128 * KiB, "tokenizer.json": 2 * KiB})
    artifact_id = c.publish(key, directory)
    c.kill()
    c.restart()
    c.check(fetch=[artifact_id])


@pytest.mark.parametrize("seed", range(2))
def test_kill_with_a_replace_in_flight(c: Crashes, seed: int) -> None:
    key = c.key()
    old, new = c.directory({"model.bin": 64 * KiB}), c.directory({"model.bin": 80 * KiB, "extra.bin": KiB})
    artifact_id = c.publish(key, old)
    c.client.upload_directory(new)
    call = c.stubs.registry.PublishArtifact.future(c.request(key, new, replace=True))
    time.sleep(seeded_delay(f"replace-{seed}", 0.0, 0.01))
    c.kill()
    answered = outcome(call)
    c.restart()
    c.expected[artifact_id] = Published(key, [new] if answered is not None else [old, new])
    c.check(fetch=[artifact_id])  # the old files or the new ones, whole
    c.publish(key, new, replace=True)
    c.check(fetch=[artifact_id])


def test_kill_right_after_a_replace_returns(c: Crashes) -> None:
    key = c.key()
    old, new = c.directory({"model.bin": 70 * KiB}), c.directory({"model.bin": 90 * KiB})
    c.publish(key, old)
    artifact_id = c.publish(key, new, replace=True)
    c.kill()
    c.restart()
    c.check(fetch=[artifact_id])
    assert c.client.get_artifact(artifact_id).files[0].digest.size_bytes == 90 * KiB


def test_kill_right_after_a_worker_completes_its_job(c: Crashes) -> None:
    key = INDUCTOR_KEY
    assert c.client.lookup(key).job_created
    leased = c.client.lease_job("crash-worker", [INDUCTOR])
    assert leased.HasField("job")
    directory = c.directory({"model.pt2": 200 * KiB})
    files = c.client.upload_directory(directory)
    done = c.client.complete_job(leased.job.job_id, leased.fencing_token, files)
    c.expected[done.artifact.artifact_id] = Published(key, [directory])
    c.kill()
    c.restart()
    c.check(fetch=[done.artifact.artifact_id])
    assert c.client.get_job(leased.job.job_id).state == jobs_pb2.JOB_STATE_SUCCEEDED


@pytest.mark.parametrize("seed", range(2))
def test_kill_with_a_delete_in_flight(c: Crashes, seed: int) -> None:
    key, directory = c.key(), c.directory({"model.bin": 48 * KiB})
    artifact_id = c.publish(key, directory)
    published = c.expected.pop(artifact_id)
    call = c.stubs.admin.DeleteArtifact.future(admin_pb2.DeleteArtifactRequest(artifact_id=artifact_id))
    time.sleep(seeded_delay(f"delete-{seed}", 0.0, 0.01))
    c.kill()
    answered = outcome(call)
    c.restart()
    if answered is None:
        c.check(may_exist={artifact_id: published}, fetch=[artifact_id])  # gone, or there whole
    else:
        c.check()
    if artifact_id in {a.artifact_id for a in c.client.iter_artifacts()}:
        c.client.delete_artifact(artifact_id)
    c.check()


@pytest.mark.parametrize("seed", range(2))
def test_kill_at_a_random_moment_of_a_publish_loop(c: Crashes, seed: int) -> None:
    acknowledged: dict[str, Published] = {}
    attempted: dict[str, Published] = {}
    stop = threading.Event()
    keys_and_dirs = [(c.key(), c.directory({"model.bin": 24 * KiB, "config.json": 512})) for _ in range(40)]
    loop_client = Client(c.address, timeout=30.0, retries=0)

    def publish_in_a_loop() -> None:
        for key, directory in keys_and_dirs:
            if stop.is_set():
                return
            try:
                artifact_id = loop_client.lookup(key, on_miss="report").key.digest
                attempted[artifact_id] = Published(key, [directory])
                loop_client.publish(directory, key)
            except PrebakeError:  # the kill: the loop ends there
                return
            acknowledged[artifact_id] = attempted[artifact_id]

    worker = threading.Thread(target=publish_in_a_loop)
    worker.start()
    try:
        time.sleep(seeded_delay(f"loop-{seed}", 0.2, 0.6))
        c.kill()
    finally:
        stop.set()
        worker.join(60)
        loop_client.close()
    assert acknowledged, "the loop published something before the kill"
    c.restart()
    c.expected.update(acknowledged)
    c.check(fetch=list(acknowledged)[-2:], may_exist=attempted)
    for artifact_id, published in attempted.items():  # what the kill cut, published again
        c.publish(published.key, published.sources[0])
        assert artifact_id in c.expected
    c.check(fetch=list(attempted)[-1:])


# -- kills planted between two storage steps ----------------------------------------------


def test_crash_between_assembling_an_upload_and_removing_its_parts(c: Crashes) -> None:
    key, (directory, data) = c.key(), c.big_directory()
    c.restart(crash_at=f"{LOCAL}._discard:before")  # its first call: complete_upload, once assembled
    cut = c.stubs.write(data, 0, BIG, finish=True)
    c.crashed()
    assert outcome(cut) is None
    c.restart()
    status = c.stubs.committed(data)
    assert (status.committed_size, status.complete) == (BIG, False)  # assembled, not yet a blob
    assert c.client.find_missing_blobs([digest_of(data)]) == [digest_of(data)]
    c.check()
    resumed = c.client.upload_blob(data, digest_of(data))
    assert (resumed.bytes_resumed, resumed.bytes_sent) == (BIG, 0)
    # Nothing of the upload is left: neither the assembled object nor the parts it was made of.
    session = f"uploads/{upload_id_for(digest_of(data))}--"
    assert not [p for p in data_files(c.data_dir) if p.startswith(session)]
    multipart = c.data_dir / "cas" / ".multipart"
    assert not [d.name for d in multipart.glob("*/key") if d.read_text().startswith(session)]
    artifact_id = c.publish(key, directory)
    c.check(fetch=[artifact_id])


def test_crash_between_assembling_an_upload_and_publishing_the_blob(c: Crashes) -> None:
    key, (directory, data) = c.key(), c.big_directory()
    c.restart(crash_at=f"{LOCAL}.complete_upload:after")
    cut = c.stubs.write(data, 0, BIG, finish=True)
    c.crashed()
    assert outcome(cut) is None
    c.restart()
    assert c.stubs.committed(data).committed_size == BIG
    assert c.client.find_missing_blobs([digest_of(data)]) == [digest_of(data)]
    c.check()
    assert c.client.upload_blob(data, digest_of(data)).bytes_sent == 0  # verified and moved, not resent
    artifact_id = c.publish(key, directory)
    c.check(fetch=[artifact_id])


def test_crash_after_the_blob_is_published_before_the_reply(c: Crashes) -> None:
    key, (directory, data) = c.key(), c.big_directory()
    c.restart(crash_at=f"{LOCAL}.move:after")
    cut = c.stubs.write(data, 0, BIG, finish=True)
    c.crashed()
    assert outcome(cut) is None
    c.restart()
    assert c.stubs.committed(data).complete
    c.check()
    assert c.client.upload_blob(data, digest_of(data)).already_present
    artifact_id = c.publish(key, directory)
    c.check(fetch=[artifact_id])


def test_crash_before_a_small_blob_is_renamed_into_place(c: Crashes) -> None:
    """Its fsynced temporary file stays until garbage collection (the last test)."""
    key = c.key()
    directory = c.directory({"small.bin": 300 * KiB})
    data = (directory / "small.bin").read_bytes()
    c.restart(crash_at=f"{LOCAL}._install:before")
    cut = c.stubs.write(data, 0, len(data), finish=True)
    c.crashed()
    assert outcome(cut) is None
    c.restart()
    assert c.client.find_missing_blobs([digest_of(data)]) == [digest_of(data)]
    assert any(p.startswith(".tmp/") for p in c.leftovers())
    c.check()
    artifact_id = c.publish(key, directory)
    c.check(fetch=[artifact_id])


@pytest.mark.parametrize("when", ["before", "after"])
def test_crash_around_the_registry_write_of_a_publish(c: Crashes, when: str) -> None:
    key, directory = c.key(), c.directory({"model.bin": 32 * KiB, "config.json": KiB})
    c.client.upload_directory(directory)
    c.restart(crash_at=f"{INDEX}.put:{when}")
    call = c.stubs.registry.PublishArtifact.future(c.request(key, directory))
    c.crashed()
    assert outcome(call) is None
    c.restart()
    artifact_id = c.client.lookup(key, on_miss="report").key.digest
    if when == "after":  # written, never answered: there, whole
        c.expected[artifact_id] = Published(key, [directory])
    c.check(fetch=[artifact_id] if when == "after" else ())
    reply = c.client.publish(directory, key)
    assert reply.created == (when == "before")
    c.expected[artifact_id] = Published(key, [directory])
    c.check(fetch=[artifact_id])


def test_crash_between_deleting_the_registry_row_and_the_blobs(c: Crashes) -> None:
    """The blobs it leaves are nobody's: garbage collection removes them (the last test)."""
    key, directory = c.key(), c.directory({"model.bin": 56 * KiB})
    artifact_id = c.publish(key, directory)
    c.restart(crash_at=f"{CAS}.delete:before")
    del c.expected[artifact_id]
    call = c.stubs.admin.DeleteArtifact.future(admin_pb2.DeleteArtifactRequest(artifact_id=artifact_id))
    c.crashed()
    assert outcome(call) is None
    c.restart()
    c.check()  # gone: its row went first
    files = scan_directory(directory)
    assert c.client.find_missing_blobs(f.digest for f in files) == [], "its blobs wait for the collector"


# -- what the kills left, collected --------------------------------------------------------


def referenced(client: Client) -> set[str]:
    names: set[str] = set()
    for listed in client.iter_artifacts():
        for f in client.get_artifact(listed.artifact_id).files:
            names.add(f"blobs/{f.digest.hash[:2]}/{f.digest.hash}-{f.digest.size_bytes}")
    return names


def test_garbage_left_by_the_kills_is_collected_even_when_a_kill_cuts_the_collection(c: Crashes) -> None:
    # What this test collects, made here too (the test may run alone): an upload cut by a
    # kill, and a blob uploaded and never published.
    _, data = c.big_directory()
    hold = threading.Event()
    cut = c.stubs.write(data, 0, PART + MiB, hold=hold)
    try:
        c.stubs.wait_committed(data, PART)
        c.kill()
    finally:
        hold.set()
    outcome(cut)
    c.restart()
    for never_published in (b"never published" * 1000, b"nor this" * 999):
        c.client.upload_blob(never_published, digest_of(never_published))
    assert c.leftovers()
    orphans = stored_blobs(c.data_dir) - referenced(c.client)
    assert orphans

    # Restarted with no grace left: partial uploads go at start-up; a collection killed after
    # its first blob delete, and the next one, take the rest.
    c.kill()
    c.restart(crash_at=f"{CAS}.delete:after", env=ZERO_GRACES)
    call = c.stubs.admin.CollectGarbage.future(admin_pb2.CollectGarbageRequest())
    c.crashed()
    assert outcome(call) is None
    c.restart(env=ZERO_GRACES)
    c.check()
    report = c.client.collect_garbage()
    assert report.orphaned_blobs >= 1
    assert (report.usage.upload_bytes, report.usage.reserved_bytes) == (0, 0)
    assert c.leftovers() == [], "partial uploads or temporary files survived the collection"
    assert stored_blobs(c.data_dir) == referenced(c.client), "blobs no artifact uses survived"
    assert c.client.collect_garbage(dry_run=True).orphaned_blobs == 0

    # Nothing published was collected: every artifact fetches, verifies, and the server's own
    # re-hash of every blob finds nothing damaged.
    c.check(fetch=list(c.expected))
    progress = list(c.client.verify_blobs())
    assert [d for p in progress for d in p.damaged] == []
    assert progress[-1].done and progress[-1].blobs_checked == len(stored_blobs(c.data_dir))
