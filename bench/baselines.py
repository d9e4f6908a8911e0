"""The floors transfers are compared with: a bare grpc.aio file server, nginx, and `cp`.

- `BareServer`: a grpc.aio server in its own process doing only what a transfer must: `Read`
  streams a file (from an offset) in 1 MiB `ReadResponse` messages from an async generator,
  as prebake's server does; `Write` takes `WriteRequest` messages, writes them to a temporary
  file, fsyncs and renames it into place. No hashing, no registry, no verification.
- `Nginx`: the Debian package's nginx serving a directory on a free loopback port, with a
  configuration generated here (sendfile on, no access log); None where nginx is not installed.
- `cp_and_sync`: coreutils `cp` then `sync FILE` (an fsync of the copy).
"""

from __future__ import annotations

import asyncio
import http.client
import multiprocessing
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc

from bench.common import free_address
from prebake.client.channel import cancel_call
from prebake.v1 import blobs_pb2

CHUNK = 1 << 20  # prebake's READ_CHUNK and the client's upload chunk
READ = "/bare.Files/Read"
WRITE = "/bare.Files/Write"
_OPTIONS = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]


def _read_request(path: str, offset: int = 0) -> bytes:
    # The path rides in the digest's hash field: a bare server needs no schema of its own.
    return blobs_pb2.ReadRequest(digest=blobs_pb2.Digest(hash=path), offset=offset).SerializeToString()


async def _serve(address: str, ready: multiprocessing.synchronize.Event) -> None:
    async def read(request: blobs_pb2.ReadRequest, context: object) -> AsyncIterator[blobs_pb2.ReadResponse]:
        with open(request.digest.hash, "rb") as f:
            f.seek(request.offset)
            while chunk := f.read(CHUNK):
                yield blobs_pb2.ReadResponse(data=chunk)

    async def write(
        requests: AsyncIterator[blobs_pb2.WriteRequest], context: object
    ) -> blobs_pb2.WriteResponse:
        target = ""
        size = 0
        fd = -1
        tmp = ""
        async for req in requests:
            if fd < 0:
                target = req.upload_id
                tmp = f"{target}.partial"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, req.data)
            size += len(req.data)
        os.fsync(fd)
        os.close(fd)
        os.rename(tmp, target)
        return blobs_pb2.WriteResponse(committed_size=size, complete=True)

    server = grpc.aio.server(options=_OPTIONS)
    handlers = {
        "Read": grpc.unary_stream_rpc_method_handler(
            read,
            request_deserializer=blobs_pb2.ReadRequest.FromString,
            response_serializer=blobs_pb2.ReadResponse.SerializeToString,
        ),
        "Write": grpc.stream_unary_rpc_method_handler(
            write,
            request_deserializer=blobs_pb2.WriteRequest.FromString,
            response_serializer=blobs_pb2.WriteResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bare.Files", handlers),))
    server.add_insecure_port(address)
    await server.start()
    ready.set()
    await server.wait_for_termination()


def _run(address: str, ready: multiprocessing.synchronize.Event) -> None:
    asyncio.run(_serve(address, ready))


class BareServer:
    """The bare grpc.aio file server in a spawned process, and a sync client for it."""

    def __init__(self) -> None:
        self.address = free_address()
        ctx = multiprocessing.get_context("spawn")
        ready = ctx.Event()
        self._proc = ctx.Process(target=_run, args=(self.address, ready), daemon=True)
        self._proc.start()
        if not ready.wait(60):
            raise RuntimeError("the bare grpc server did not start")
        self._channel = grpc.insecure_channel(self.address, options=_OPTIONS)
        self._read = self._channel.unary_stream(READ, None, blobs_pb2.ReadResponse.FromString)
        self._write = self._channel.stream_unary(WRITE, blobs_pb2.WriteRequest.SerializeToString, None)

    @property
    def pid(self) -> int:
        assert self._proc.pid is not None
        return self._proc.pid

    def stream(self, path: Path, offset: int = 0) -> Iterator[bytes]:
        call = self._read(_read_request(str(path), offset))
        try:
            for message in call:
                yield message.data
        finally:
            cancel_call(call)

    def first_byte(self, path: Path) -> None:
        for _ in self.stream(path):
            return

    def download(self, path: Path, dest: Path, offset: int = 0) -> int:
        """Stream `path` into `dest`, fsynced; returns the bytes written."""
        size = 0
        with open(dest, "wb") as out:
            for data in self.stream(path, offset):
                out.write(data)
                size += len(data)
            out.flush()
            os.fsync(out.fileno())
        return size

    def upload(self, src: Path, dest: Path) -> None:
        """Send `src` in 1 MiB messages; the server stores it durably at `dest`."""

        def messages() -> Iterator[blobs_pb2.WriteRequest]:
            first = True
            with open(src, "rb") as f:
                while chunk := f.read(CHUNK):
                    yield blobs_pb2.WriteRequest(upload_id=str(dest) if first else "", data=chunk)
                    first = False

        self._write(messages(), timeout=600)

    def close(self) -> None:
        self._channel.close()
        self._proc.terminate()
        self._proc.join(timeout=10)

    def __enter__(self) -> BareServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


NGINX_CONF = """
worker_processes auto;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
{user}
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen {address};
        root {root};
    }}
}}
"""


class Nginx:
    """nginx serving `root` on a free loopback port; `nginx_binary()` says whether it exists."""

    def __init__(self, root: Path) -> None:
        binary = nginx_binary()
        if binary is None:
            raise FileNotFoundError("nginx is not installed")
        self.address = free_address()
        self._prefix = Path(tempfile.mkdtemp(prefix="bench-nginx-"))
        conf = self._prefix / "nginx.conf"
        # As root, workers would drop to `nobody`, who cannot read a private temporary directory.
        user = "user root;" if os.geteuid() == 0 else ""
        conf.write_text(NGINX_CONF.format(prefix=self._prefix, address=self.address, root=root, user=user))
        self._proc = subprocess.Popen(
            [binary, "-c", str(conf), "-p", str(self._prefix)], stderr=subprocess.DEVNULL
        )
        host, _, port = self.address.rpartition(":")
        deadline = time.monotonic() + 10
        while True:
            try:
                conn = http.client.HTTPConnection(host, int(port), timeout=5)
                conn.request("HEAD", "/")
                conn.getresponse().read()
                conn.close()
                break
            except OSError:
                if time.monotonic() > deadline or self._proc.poll() is not None:
                    raise RuntimeError(f"nginx did not start; see {self._prefix}/error.log") from None
                time.sleep(0.05)

    def download(self, name: str, dest: Path) -> int:
        """GET /name into `dest` in 1 MiB reads, fsynced (as the fetch it is compared with)."""
        host, _, port = self.address.rpartition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        buffer = bytearray(CHUNK)
        view = memoryview(buffer)
        size = 0
        try:
            conn.request("GET", f"/{name}")
            response = conn.getresponse()
            if response.status != 200:
                raise RuntimeError(f"nginx answered {response.status} for {name}")
            with open(dest, "wb") as out:
                while n := response.readinto(buffer):
                    out.write(view[:n])
                    size += n
                out.flush()
                os.fsync(out.fileno())
        finally:
            conn.close()
        return size

    def close(self) -> None:
        self._proc.terminate()
        self._proc.wait(timeout=10)
        shutil.rmtree(self._prefix, ignore_errors=True)

    def __enter__(self) -> Nginx:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def cp_and_sync(src: Path, dest: Path) -> None:
    subprocess.run(["cp", str(src), str(dest)], check=True)
    subprocess.run(["sync", str(dest)], check=True)
