"""Several files of one artifact download at once (`fetch._download_all`), with a downloader
that writes real files and can be told to fail; the end-to-end fetch paths (resume, verify,
host cache, faults) are in test_transfer.py and test_client_faults.py."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from prebake.client.fetch import PARALLEL_FILES, _download_all
from prebake.client.transfer import DownloadResult, Progress
from prebake.core.digests import hash_bytes
from prebake.v1 import blobs_pb2, registry_pb2

CHUNK = 1000


def artifact_of(contents: dict[str, bytes]) -> registry_pb2.Artifact:
    return registry_pb2.Artifact(
        artifact_id="a" * 32,
        files=[
            registry_pb2.ArtifactFile(
                path=path, digest=blobs_pb2.Digest(hash=hash_bytes(data), size_bytes=len(data))
            )
            for path, data in contents.items()
        ],
    )


class Downloads:
    """Writes each file chunk by chunk, reporting progress like `download_blob`; records how
    many ran at once, and fails the file named `fail` after its first chunk."""

    def __init__(self, contents: dict[str, bytes], fail: str = "") -> None:
        self.by_hash = {hash_bytes(data): data for data in contents.values()}
        self.fail = fail
        self.lock = threading.Lock()
        self.running = 0
        self.most_at_once = 0
        self.started: list[str] = []
        self.stopped: list[str] = []

    def __call__(
        self, entry: registry_pb2.ArtifactFile, target: Path, report: Progress | None
    ) -> DownloadResult:
        data = self.by_hash[entry.digest.hash]
        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            self.started.append(entry.path)
        try:
            with open(target, "wb") as out:
                for offset in range(0, len(data), CHUNK):
                    out.write(data[offset : offset + CHUNK])
                    time.sleep(0.002)  # a chunk's network time, so downloads overlap
                    if entry.path == self.fail:
                        raise ConnectionError(f"lost the stream of {entry.path}")
                    try:
                        if report is not None:
                            report(min(offset + CHUNK, len(data)), len(data))
                    except BaseException:
                        self.stopped.append(entry.path)
                        raise
            return DownloadResult(bytes_downloaded=len(data), bytes_resumed=0)
        finally:
            with self.lock:
                self.running -= 1


def test_files_download_at_once_with_one_rising_progress_and_duplicates_copied(tmp_path: Path) -> None:
    contents = {f"shard-{i}.bin": bytes([i]) * (20 * CHUNK) for i in range(8)}
    contents["copy-of-shard-0.bin"] = contents["shard-0.bin"]
    downloads = Downloads(contents)
    reported: list[int] = []
    total = sum(map(len, contents.values()))
    downloaded, resumed, cached, direct = _download_all(
        artifact_of(contents), tmp_path, downloads, lambda done, _total: reported.append(done)
    )
    assert downloads.most_at_once == PARALLEL_FILES
    # The duplicate was not downloaded, but copied from its twin.
    assert "copy-of-shard-0.bin" not in downloads.started
    assert downloaded == total - len(contents["copy-of-shard-0.bin"]) and resumed == cached == direct == 0
    for path, data in contents.items():
        assert (tmp_path / path).read_bytes() == data
    assert reported == sorted(reported) and reported[-1] == total


def test_the_first_failure_stops_the_other_files_and_is_raised(tmp_path: Path) -> None:
    contents = {f"shard-{i}.bin": bytes([i]) * (50 * CHUNK) for i in range(6)}
    downloads = Downloads(contents, fail="shard-1.bin")
    with pytest.raises(ConnectionError, match=r"lost the stream of shard-1\.bin"):
        _download_all(artifact_of(contents), tmp_path, downloads, lambda done, total: None)
    assert downloads.running == 0, "a download thread outlived the failed fetch"
    # Those running stopped at their next chunk; those not started never started.
    assert set(downloads.stopped) <= set(downloads.started) - {"shard-1.bin"}
    assert downloads.stopped, "no other download was running when one failed"
    assert len(downloads.started) < len(contents)
    for path in downloads.stopped:  # what they received is kept for the next attempt
        assert 0 < (tmp_path / path).stat().st_size < len(contents[path])
