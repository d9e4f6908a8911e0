"""Blob downloads over plain HTTP for a local-disk store (`serve --blob-http-listen`).

A gRPC stream costs Python work per chunk on both ends: on this machine kind a bare
grpc.aio stream delivered a third of what nginx did from the same file. This endpoint
answers the signed URLs of `prebake.server.blobs.blob_urls` with `sendfile` (the bytes never
enter Python), honours `Range: bytes=N-[M]` (so a cut download resumes), and nothing else:
no listing, no other path, no write. Lookups hand the URLs out with manifests when the
client asks for direct downloads (it does by default), exactly as for S3; the client
verifies size and hash and reads through gRPC whatever a URL does not deliver.

Runs on its own threads (`ThreadingHTTPServer`), never on the gRPC event loop. Answers: 200
or 206 with the bytes, 403 for a URL this server did not sign or that expired, 404 for a
blob no longer stored, 416 for a range outside the blob, 405 for other methods.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prebake.server.blobs.blob_urls import BlobUrlSigner
from prebake.server.blobs.local_objects import LocalObjectStore

log = logging.getLogger("prebake.server.blob_http")

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")
_SENDFILE_CHUNK = 64 << 20


class BlobHttpServer:
    """The endpoint on `host:port` (0: a free port; OSError if taken); `address` is what it
    bound. Serves once `start`ed with the signer whose URLs it accepts."""

    def __init__(self, host: str, port: int, objects: LocalObjectStore) -> None:
        self._objects = objects
        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.blob_server = self  # type: ignore[attr-defined]  # read by _Handler
        self.address = f"{host}:{self.httpd.server_address[1]}"
        self.signer: BlobUrlSigner | None = None
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="prebake-blob-http", daemon=True
        )

    def start(self, signer: BlobUrlSigner) -> None:
        self.signer = signer
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self.httpd.shutdown()
            self._thread.join(timeout=10)
        self.httpd.server_close()

    def path_of(self, key: str) -> str | None:
        """The file of a blob's object key; None for any other key."""
        if not key.startswith("blobs/"):
            return None
        try:
            return str(self._objects.path(key))
        except ValueError:
            return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "prebake-blobs"
    sys_version = ""

    def log_message(self, format: str, *args: object) -> None:  # the base class's name
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # http.server's naming
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _refuse(self, code: int, message: str) -> None:
        data = (message + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _serve(self, body: bool) -> None:
        endpoint: BlobHttpServer = self.server.blob_server  # type: ignore[attr-defined]
        path, _, query = self.path.partition("?")
        key = endpoint.signer.check(path, query) if endpoint.signer is not None else None
        file = endpoint.path_of(key) if key is not None else None
        if file is None:
            self._refuse(403, "this URL was not signed by this server for a blob, or it expired")
            return
        try:
            fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            self._refuse(404, "the server no longer stores this blob; read it through the server")
            return
        try:
            size = os.fstat(fd).st_size
            start, end = 0, size
            wanted = self.headers.get("Range")
            if wanted is not None:
                m = _RANGE.fullmatch(wanted.strip())
                if m is None or int(m.group(1)) >= size or (m.group(2) and int(m.group(2)) < int(m.group(1))):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = int(m.group(1))
                end = min(size, int(m.group(2)) + 1) if m.group(2) else size
            self.send_response(206 if wanted is not None else 200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(end - start))
            self.send_header("Accept-Ranges", "bytes")
            if wanted is not None:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            self.end_headers()
            if not body:
                return
            offset = start
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                while offset < end:
                    sent = os.sendfile(
                        self.connection.fileno(), fd, offset, min(end - offset, _SENDFILE_CHUNK)
                    )
                    if sent == 0:  # the file shrank under us (removed and reused): stop short
                        self.close_connection = True
                        return
                    offset += sent
        finally:
            os.close(fd)
