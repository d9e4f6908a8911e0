"""Quota, eviction and garbage collection against a real server on loopback.

Partial uploads count against max_store_bytes; an unpublished blob counts until its grace
passes, then is collected; eviction takes unpinned artifacts least recently used first, never a
pinned one or one being downloaded; `gc --dry-run` changes nothing; a full store refuses writes
and keeps serving reads; the background collector runs on its own.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from prebake.client import ArtifactKey, Client
from prebake.core.digests import hash_bytes
from prebake.core.errors import QuotaExceeded
from prebake.server.app import BackgroundServer, background_server
from prebake.server.config import load_server_config
from prebake.v1 import admin_pb2, admin_pb2_grpc, blobs_pb2, blobs_pb2_grpc, registry_pb2
from tests.aws_emulator import Emulator
from tests.conftest import LLAMA3_8B_INF2, data_files, make_artifact_dir
from tests.plugin_cli import PrebakeCli
from tests.processes import ServerProcess, wait_until

KiB = 1 << 10
MiB = 1 << 20
# Nothing runs by itself unless a test asks: collections happen when the test says so.
QUIET = {"gc_interval_seconds": 0.0}


@contextmanager
def serving(data_dir: Path, **overrides: Any) -> Iterator[tuple[BackgroundServer, Client, Stubs]]:
    with (
        background_server(data_dir, **{**QUIET, **overrides}) as server,
        Client(server.address, timeout=30.0) as client,
        grpc.insecure_channel(server.address) as channel,
    ):
        yield server, client, Stubs(channel)


class Stubs:
    def __init__(self, channel: grpc.Channel) -> None:
        self.blobs = blobs_pb2_grpc.BlobsStub(channel)
        self.admin = admin_pb2_grpc.AdminStub(channel)

    def gc(self, dry_run: bool = False) -> admin_pb2.CollectGarbageResponse:
        return self.admin.CollectGarbage(admin_pb2.CollectGarbageRequest(dry_run=dry_run))

    def usage(self) -> admin_pb2.StoreUsage:
        return self.gc(dry_run=True).usage


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def digest_of(data: bytes) -> blobs_pb2.Digest:
    return blobs_pb2.Digest(hash=hash_bytes(data), size_bytes=len(data))


def write(stubs: Stubs, data: bytes, upload_id: str, upto: int | None = None) -> blobs_pb2.WriteResponse:
    """Upload `data`, or only its first `upto` bytes (then the stream ends unfinished)."""
    sent = data if upto is None else data[:upto]
    request = blobs_pb2.WriteRequest(
        upload_id=upload_id, digest=digest_of(data), offset=0, data=sent, finish_write=upto is None
    )
    reply: blobs_pb2.WriteResponse = stubs.blobs.Write(iter([request]))
    return reply


def key(batch_size: int) -> ArtifactKey:
    return replace(LLAMA3_8B_INF2, batch_size=batch_size)


def publish(client: Client, root: Path, batch_size: int, size: int) -> str:
    directory = make_artifact_dir(root / f"artifact-{batch_size}", {"model.bin": size}, seed=batch_size)
    return client.publish(directory, key(batch_size)).artifact.artifact_id


def listed(client: Client) -> set[str]:
    return {a.artifact_id for a in client.iter_artifacts()}


def test_partial_uploads_count_against_the_quota(tmp_path: Path) -> None:
    with serving(tmp_path / "data", max_store_bytes=MiB) as (_, _, stubs):
        first = payload(600 * KiB, seed=1)
        assert write(stubs, first, "partial", upto=400 * KiB).committed_size == 400 * KiB
        usage = stubs.usage()
        assert (usage.blob_bytes, usage.upload_bytes, usage.reserved_bytes) == (0, 400 * KiB, 0)

        # 400 KiB held by the unfinished upload + 700 KiB > 1 MiB.
        with pytest.raises(grpc.RpcError) as refused:
            write(stubs, payload(700 * KiB, seed=2), "other")
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"{400 * KiB} by unfinished uploads" in str(refused.value.details())
        # Finishing the upload needs only the rest.
        request = blobs_pb2.WriteRequest(
            upload_id="partial", digest=digest_of(first), offset=400 * KiB, data=first[400 * KiB :]
        )
        request.finish_write = True
        assert stubs.blobs.Write(iter([request])).complete
        usage = stubs.usage()
        assert (usage.blob_bytes, usage.upload_bytes) == (600 * KiB, 0)


def test_stale_uploads_are_collected_and_stop_counting(tmp_path: Path) -> None:
    with serving(tmp_path / "data", max_store_bytes=MiB, stale_upload_seconds=0.0) as (server, _, stubs):
        write(stubs, payload(600 * KiB, seed=3), "stalled", upto=300 * KiB)
        assert any(p.startswith(".multipart") for p in data_files(server.config.data_dir))
        report = stubs.gc()
        assert (report.stale_uploads, report.stale_upload_bytes) == (1, 300 * KiB)
        assert report.usage.upload_bytes == 0
        assert not any(p.startswith(".multipart") for p in data_files(server.config.data_dir))


def test_an_unpublished_blob_counts_until_its_grace_passes(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    blocker = payload(800 * KiB, seed=4)
    with serving(data_dir, max_store_bytes=MiB, unreferenced_blob_grace_seconds=3600.0) as (_, client, stubs):
        assert write(stubs, blocker, "never-published").complete
        report = stubs.gc()
        assert (report.orphaned_blobs, report.usage.blob_bytes) == (0, 800 * KiB)  # within its grace
        with pytest.raises(QuotaExceeded, match="blob store is full"):
            publish(client, tmp_path, 1, 300 * KiB)
    # The same store, once the grace has passed (a server configured with none left).
    with serving(data_dir, max_store_bytes=MiB, unreferenced_blob_grace_seconds=0.0) as (_, client, stubs):
        report = stubs.gc()
        assert (report.orphaned_blobs, report.orphaned_bytes) == (1, 800 * KiB)
        assert report.usage.blob_bytes == 0
        assert client.find_missing_blobs([digest_of(blocker)]) == [digest_of(blocker)]
        published = publish(client, tmp_path, 1, 300 * KiB)
        # Published blobs are referenced: never collected, whatever the grace.
        assert stubs.gc().orphaned_blobs == 0
        assert listed(client) == {published}


def test_eviction_takes_least_recently_used_unpinned_artifacts(tmp_path: Path) -> None:
    # Five artifacts of 20 KiB against 200 KiB: 100 KiB used > high water 80, evict to <= 60.
    settings = {
        "max_store_bytes": 200 * KiB,
        "eviction_high_water": 0.4,
        "eviction_low_water": 0.3,
        "eviction_protect_seconds": 0.0,
    }
    with serving(tmp_path / "data", **settings) as (_, client, stubs):
        a, b, c, d, e = (publish(client, tmp_path, n, 20 * KiB) for n in range(1, 6))
        client.pin_artifact(a)  # the oldest, but pinned
        assert (
            client.lookup(key(2)).status == registry_pb2.LOOKUP_STATUS_HIT
        )  # b becomes the most recently used
        before_files = data_files(tmp_path / "data")

        dry = stubs.gc(dry_run=True)
        assert list(dry.evicted_artifact_ids) == [c, d]
        assert (dry.evicted_blobs, dry.evicted_bytes) == (2, 40 * KiB)
        assert listed(client) == {a, b, c, d, e}
        assert data_files(tmp_path / "data") == before_files

        report = stubs.gc()
        assert list(report.evicted_artifact_ids) == [c, d]
        assert (report.evicted_blobs, report.evicted_bytes) == (2, 40 * KiB)
        assert report.usage.blob_bytes == 60 * KiB
        assert listed(client) == {a, b, e}
        assert client.lookup(key(3), on_miss="report").status == registry_pb2.LOOKUP_STATUS_MISS
        # Below the high-water mark nothing more goes.
        assert list(stubs.gc().evicted_artifact_ids) == []


def test_pinned_and_recently_used_artifacts_are_never_evicted(tmp_path: Path) -> None:
    settings = {"max_store_bytes": 100 * KiB, "eviction_high_water": 0.1, "eviction_low_water": 0.0}
    with serving(tmp_path / "data", **settings) as (_, client, stubs):
        pinned = publish(client, tmp_path, 1, 20 * KiB)
        client.pin_artifact(pinned)
        recent = publish(client, tmp_path, 2, 20 * KiB)  # published now: within eviction_protect_seconds
        report = stubs.gc()
        assert list(report.evicted_artifact_ids) == []
        assert report.kept_in_use == 1
        assert listed(client) == {pinned, recent}


def test_an_artifact_being_downloaded_is_not_evicted(tmp_path: Path) -> None:
    settings = {
        "max_store_bytes": 100 * MiB,
        "eviction_high_water": 0.01,
        "eviction_low_water": 0.0,
        "eviction_protect_seconds": 0.0,
    }
    with serving(tmp_path / "data", **settings) as (_, client, stubs):
        # Bigger than any transport buffer, so the server is still streaming it below.
        downloading = publish(client, tmp_path, 1, 32 * MiB)
        other = publish(client, tmp_path, 2, 10 * KiB)
        blob = client.get_artifact(downloading).files[0].digest
        chunks = client.read_blob(blob)
        first = next(chunks)
        assert first
        try:
            report = stubs.gc()
            assert list(report.evicted_artifact_ids) == [other]
            assert report.kept_in_use == 1
            assert listed(client) == {downloading}
            rest = b"".join(chunks)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        assert len(first) + len(rest) == 32 * MiB
        # Once the download is over it is evictable like any other.
        assert list(stubs.gc().evicted_artifact_ids) == [downloading]


def test_gc_dry_run_changes_nothing(tmp_path: Path, prebake: PrebakeCli) -> None:
    data_dir = tmp_path / "data"
    settings = {"stale_upload_seconds": 0.0, "unreferenced_blob_grace_seconds": 0.0}
    with serving(data_dir, **settings) as (server, client, stubs):
        published = publish(client, tmp_path, 1, 10 * KiB)
        write(stubs, payload(5 * KiB, seed=5), "orphan")
        write(stubs, payload(50 * KiB, seed=6), "stalled", upto=20 * KiB)
        before = data_files(data_dir)

        ran = prebake("gc", "--dry-run", "--json", "--server", server.address)
        assert ran.code == 0, ran.err
        report = json.loads(ran.out)
        assert report["dry_run"] is True
        assert report["orphaned_blobs"] == {"count": 1, "bytes": 5 * KiB}
        assert report["stale_uploads"] == {"count": 1, "bytes": 20 * KiB}
        assert report["evicted_artifacts"]["ids"] == []
        assert data_files(data_dir) == before

        text = prebake("gc", "--server", server.address)
        assert text.code == 0, text.err
        assert "unreferenced blobs" in text.out and "5.0 KiB" in text.out
        assert data_files(data_dir) != before
        assert not any(p.startswith((".multipart", "uploads/")) for p in data_files(data_dir))
        assert listed(client) == {published}
        assert client.fetch(published, tmp_path / "dest").artifact_id == published


def test_a_full_store_refuses_writes_and_serves_reads(tmp_path: Path) -> None:
    with serving(tmp_path / "data", max_store_bytes=100 * KiB) as (_, client, stubs):
        kept = publish(client, tmp_path, 1, 90 * KiB)
        with pytest.raises(grpc.RpcError) as refused:
            write(stubs, payload(20 * KiB, seed=7), "too-much")
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        message = str(refused.value.details())
        assert "blob store is full" in message and "max_store_bytes" in message
        assert "prebake gc" in message and "reads still work" in message
        with pytest.raises(QuotaExceeded):
            publish(client, tmp_path, 2, 20 * KiB)
        assert listed(client) == {kept}
        # Reads go on: lookups hit, downloads verify and place the files.
        assert client.lookup(key(1)).status == registry_pb2.LOOKUP_STATUS_HIT
        fetched = client.fetch(kept, tmp_path / "dest")
        assert fetched.artifact_id == kept
        assert (tmp_path / "dest" / "model.bin").stat().st_size == 90 * KiB


def test_the_background_collector_runs(tmp_path: Path) -> None:
    settings = {"gc_interval_seconds": 0.05, "unreferenced_blob_grace_seconds": 0.0}
    with serving(tmp_path / "data", **settings) as (server, client, stubs):
        orphan = payload(4 * KiB, seed=8)
        write(stubs, orphan, "orphan")
        deadline = time.monotonic() + 60
        while client.find_missing_blobs([digest_of(orphan)]) == [] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.find_missing_blobs([digest_of(orphan)]) == [digest_of(orphan)]
        assert server.running is not None and server.running.state.collector.runs >= 1


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"eviction_low_water": "0.9", "eviction_high_water": "0.5"}, "eviction_low_water"),
        ({"eviction_high_water": "1.5"}, "eviction_high_water"),
        ({"unreferenced_blob_grace_seconds": "-1"}, "unreferenced_blob_grace_seconds"),
        ({"gc_interval_seconds": "-5"}, "gc_interval_seconds"),
    ],
)
def test_inconsistent_gc_settings_are_refused_at_start_up(settings: dict[str, str], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        load_server_config(settings, environ={})
    assert load_server_config({"gc_interval_seconds": "0"}, environ={}).gc_interval_seconds == 0


@pytest.mark.slow
def test_after_a_sigkill_partial_and_orphaned_uploads_are_collected(
    tmp_path: Path, prebake: PrebakeCli
) -> None:
    data_dir = tmp_path / "data"
    common = ["--data-dir", str(data_dir), "--max-store-bytes", str(64 * MiB), "--gc-interval", "0"]
    stalled = payload(20 * MiB, seed=9)
    orphan = payload(64 * KiB, seed=10)
    release = threading.Event()

    def stream() -> Iterator[blobs_pb2.WriteRequest]:
        for offset in range(0, 9 * MiB, 3 * MiB):  # past the 8 MiB part: one part is stored
            yield blobs_pb2.WriteRequest(
                upload_id="cut",
                digest=digest_of(stalled),
                offset=offset,
                data=stalled[offset : offset + 3 * MiB],
            )
        release.wait(60)

    first = ServerProcess(tmp_path, "first", common).wait_ready()
    try:
        with grpc.insecure_channel(first.address) as channel:
            stubs = Stubs(channel)
            assert write(stubs, orphan, "orphan").complete
            cut = stubs.blobs.Write.future(stream())
            status = blobs_pb2.QueryWriteStatusRequest(upload_id="cut", digest=digest_of(stalled))
            wait_until(
                lambda: stubs.blobs.QueryWriteStatus(status).committed_size == 8 * MiB, 60, "a stored part"
            )
            first.kill()  # mid-upload
            release.set()
            with pytest.raises(grpc.RpcError):
                cut.result(timeout=30)
    finally:
        release.set()
        first.kill()

    # Restarted once the grace and the stale-upload age have passed: the cut upload is removed at
    # start-up, the unpublished blob by `prebake gc`; nothing of either is left.
    env = {"PREBAKE_STALE_UPLOAD_SECONDS": "0"}
    second = ServerProcess(tmp_path, "second", [*common, "--unreferenced-blob-grace", "0"], env).wait_ready()
    try:
        ran = prebake("gc", "--json", "--server", second.address)
        assert ran.code == 0, ran.err
        report = json.loads(ran.out)
        assert report["orphaned_blobs"] == {"count": 1, "bytes": 64 * KiB}
        assert report["usage"] == {
            "blob_bytes": 0,
            "upload_bytes": 0,
            "reserved_bytes": 0,
            "used_bytes": 0,
            "max_store_bytes": 64 * MiB,
        }
        assert not any(p.startswith((".multipart", "uploads/", "blobs/")) for p in data_files(data_dir))
    finally:
        second.stop()


def test_on_s3_and_dynamodb_collection_and_eviction_work_alike(
    aws_serial: Emulator, tmp_path: Path, prebake: PrebakeCli
) -> None:
    store, registry = f"s3://{aws_serial.create_bucket()}/p", f"dynamodb://{aws_serial.unique_name('gc')}"
    ran = prebake("init-aws", "--store", store, "--registry", registry)
    assert ran.code == 0, ran.err
    settings = {
        "store": store,
        "registry": registry,
        "max_store_bytes": 200 * KiB,
        "eviction_high_water": 0.4,
        "eviction_low_water": 0.3,
        "eviction_protect_seconds": 0.0,
        "unreferenced_blob_grace_seconds": 0.0,
    }
    with serving(tmp_path / "data", **settings) as (_, client, stubs):
        a, b, c = (publish(client, tmp_path, n, 30 * KiB) for n in (1, 2, 3))
        client.pin_artifact(a)
        assert write(stubs, payload(10 * KiB, seed=11), "orphan").complete
        with pytest.raises(grpc.RpcError) as refused:
            write(stubs, payload(150 * KiB, seed=12), "too-much")
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        # 100 KiB used: the orphan goes (90 KiB, still above 80), then b, the least recently
        # used unpinned artifact (60 KiB, the low-water mark).
        report = stubs.gc()
        assert (report.orphaned_blobs, report.orphaned_bytes) == (1, 10 * KiB)
        assert list(report.evicted_artifact_ids) == [b]
        assert report.usage.blob_bytes == 60 * KiB
        assert listed(client) == {a, c}
        assert client.fetch(c, tmp_path / "dest").artifact_id == c


def age(data_dir: Path, digest: blobs_pb2.Digest, seconds: float) -> None:
    """Make a local blob look stored `seconds` ago (the collector reads the object's last write)."""
    path = data_dir / "cas" / "blobs" / digest.hash[:2] / f"{digest.hash}-{digest.size_bytes}"
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_a_blob_a_client_was_told_is_present_is_kept_for_its_publish(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with serving(data_dir, unreferenced_blob_grace_seconds=3600.0) as (_, client, stubs):
        expired, promised = payload(3 * KiB, seed=13), payload(4 * KiB, seed=14)
        for data in (expired, promised):
            assert write(stubs, data, "old").complete
            age(data_dir, digest_of(data), 7200)
        # A publisher asks what to upload: `promised` is present, so it will not send it again.
        assert client.find_missing_blobs([digest_of(promised)]) == []
        report = stubs.gc()
        assert (report.orphaned_blobs, report.orphaned_bytes) == (1, 3 * KiB)
        assert client.find_missing_blobs([digest_of(expired)]) == [digest_of(expired)]
        # ...and its publish finds it.
        directory = tmp_path / "promised"
        directory.mkdir()
        (directory / "weights.bin").write_bytes(promised)
        published = client.publish(directory, key(7)).artifact.artifact_id
        assert listed(client) == {published}
        assert stubs.gc().orphaned_blobs == 0
