"""Blob downloads over HTTP from signed URLs (`serve --blob-http-listen`), on a real server.

The client takes the URLs a lookup hands out, verifies what it downloads and reads through
gRPC what a URL does not deliver; the endpoint answers nothing but a URL it signed.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from prebake.client import Client
from prebake.server.app import background_server
from prebake.server.blobs.blob_urls import SECRET_FILE
from prebake.server.config import load_server_config
from tests.conftest import LLAMA3_8B_INF2

KEY = LLAMA3_8B_INF2


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    src = tmp_path / "artifact"
    (src / "shards").mkdir(parents=True)
    (src / "model.neff").write_bytes(os.urandom(3 << 20))
    for i in range(6):
        (src / "shards" / f"{i}.bin").write_bytes(os.urandom(100_000 + i))
    return src


def test_a_fetch_reads_every_byte_from_the_signed_urls(tmp_path: Path, artifact: Path) -> None:
    with (
        background_server(tmp_path / "d", embedded_workers=0, blob_http_listen="127.0.0.1:0") as server,
        Client(server.address) as client,
    ):
        published = client.publish(artifact, KEY).artifact.artifact_id
        fetched = client.fetch(published, tmp_path / "placed")
        assert fetched.bytes_direct == fetched.total_bytes == fetched.bytes_downloaded
        for f in artifact.rglob("*"):
            if f.is_file():
                assert (tmp_path / "placed" / f.relative_to(artifact)).read_bytes() == f.read_bytes()
    assert (tmp_path / "d" / SECRET_FILE).stat().st_mode & 0o077 == 0


def test_the_endpoint_serves_only_what_it_signed_while_it_is_valid(tmp_path: Path, artifact: Path) -> None:
    with (
        background_server(tmp_path / "d", embedded_workers=0, blob_http_listen="127.0.0.1:0") as server,
        Client(server.address) as client,
    ):
        client.publish(artifact, KEY)
        neff = next(f for f in client.lookup(KEY).artifact.files if f.path == "model.neff")
        url = neff.download_url
        assert url.startswith("http://127.0.0.1:")
        data = (artifact / "model.neff").read_bytes()
        status, body, headers = get(url)
        assert status == 200 and body == data
        # A resume: the rest from a byte on.
        status, body, headers = get(url, {"Range": f"bytes={len(data) - 1000}-"})
        assert status == 206 and body == data[-1000:]
        assert headers["Content-Range"] == f"bytes {len(data) - 1000}-{len(data) - 1}/{len(data)}"
        status, body, _ = get(url, {"Range": f"bytes={len(data)}-"})
        assert status == 416

        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qs(parts.query)
        base = f"{parts.scheme}://{parts.netloc}"
        other = next(f for f in client.lookup(KEY).artifact.files if f.path != "model.neff")
        other_path = urllib.parse.urlsplit(other.download_url).path
        forged = {
            "another blob under this signature": f"{base}{other_path}?{parts.query}",
            "a stretched expiry": f"{base}{parts.path}?expires={int(query['expires'][0]) + 3600}"
            f"&signature={query['signature'][0]}",
            "no signature": f"{base}{parts.path}",
            "a path outside the blobs": f"{base}/../blob-urls.secret?{parts.query}",
            "the secret file": f"{base}/{SECRET_FILE}?{parts.query}",
        }
        for what, bad in forged.items():
            status, body, _ = get(bad)
            assert status == 403, what
            assert b"Traceback" not in body and b"not signed" in body, what
        assert get(url)[0] == 200  # the real one still works


def test_blob_urls_are_refused_with_tls_or_an_s3_store(tmp_path: Path) -> None:
    for extra in ({"tls_cert": "c.pem", "tls_key": "k.pem"}, {"store": "s3://bucket/prefix"}):
        with pytest.raises(ValueError, match="blob_http_listen"):
            load_server_config({"blob_http_listen": "127.0.0.1:0", "data_dir": str(tmp_path), **extra}, {})


def test_a_lookup_carries_urls_only_from_a_server_that_can_sign_them(tmp_path: Path, artifact: Path) -> None:
    for name, http in (("plain", ""), ("signing", "127.0.0.1:0")):
        with (
            background_server(tmp_path / name, embedded_workers=0, blob_http_listen=http) as server,
            Client(server.address, direct_download=True) as client,
        ):
            client.publish(artifact, KEY)
            files = client.lookup(KEY, on_miss="report").artifact.files
            assert len(files) == 7
            assert all(bool(f.download_url) == bool(http) for f in files), name
            assert all(f.HasField("download_url_expires_at") == bool(http) for f in files), name
