"""Blob transfers against their floors, alternating subject and baseline each round.

- time to first byte of a large blob (`Client.read_blob`, first chunk) and the read of its
  last MiB (a resume: `read_blob(offset=size - 1 MiB)`) vs the bare grpc.aio server
  streaming the same bytes from the source file (same 1 MiB chunks);
- publish (`Client.publish` of a directory holding one large file, new bytes each round)
  vs `cp` + `sync` of the file, and vs a bare gRPC upload to the bare server (written,
  fsynced, renamed). How often the source is read: `rchar` of /proc/self/io (bytes passed
  through read(2), page cache included) of this process during the call, over the size;
  the server's own reads likewise from its /proc/PID/io;
- fetch to tmpfs (/dev/shm): `Client.fetch` of an artifact of 1 file, and of one of 32
  files of the same total, vs nginx serving the same files (read in 1 MiB, fsynced; the 32
  files over 4 connections at once), and vs the bare grpc stream of the same files (one at a time);
- the server's peak resident memory while 4 clients fetch the large file at once, vs idle.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.baselines import BareServer, Nginx, cp_and_sync, nginx_binary
from bench.common import ServerProcess, descendants, tree_rss_mib
from bench.report import Row
from prebake.client import ArtifactKey, Client
from prebake.core.digests import hash_file
from prebake.v1 import blobs_pb2

MIB = 1 << 20
NGINX_CONNECTIONS = 4


def _key(name: str, i: int) -> ArtifactKey:
    return ArtifactKey(
        kind="inductor",
        model=f"bench/transfer-{name}",
        instance_type="ml.c6a.4xlarge",
        sequence_length=1 + i,
        batch_size=1,
        precision="fp32",
    )


def _seconds(fn: Callable[..., object], *args: object) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def _rchar(pid: int | None = None) -> int:
    """Bytes passed through read(2) by this process, or by `pid` and its descendants (a server
    of several processes): page-cache reads included, which is what "read the source N times" means."""
    total = 0
    for p in [None] if pid is None else descendants(pid):
        try:
            text = Path(f"/proc/{p or 'self'}/io").read_text()
        except OSError:
            continue
        total += next(int(line.split()[1]) for line in text.splitlines() if line.startswith("rchar:"))
    return total


def _fill(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        block = os.urandom(8 * MIB)
        left = size
        while left > 0:
            f.write(block[: min(left, len(block))])
            left -= len(block)
        # Distinct blocks, so the file does not deduplicate against itself anywhere.
        for off in range(0, size, 8 * MIB):
            f.seek(off)
            f.write(os.urandom(16))


def _renew(path: Path, i: int) -> None:
    """New bytes for round `i` (a new digest) at the cost of 16 bytes, not a rewrite."""
    with open(path, "r+b") as f:
        f.write(i.to_bytes(8, "little") + os.urandom(8))


class Transfers:
    """Files, artifacts and baseline servers shared by the transfer rows."""

    def __init__(self, server: ServerProcess, client: Client, work: Path, size: int) -> None:
        self.server = server
        self.client = client
        self.size = size
        self.work = work
        self.files = work / "files"  # served by nginx and the bare server
        self.one = self.files / "one"
        self.many = self.files / "many"
        self.one.mkdir(parents=True)
        self.many.mkdir()
        _fill(self.one / "model.bin", size)
        for i in range(32):
            _fill(self.many / f"part-{i:02d}.bin", size // 32)
        self.one_id = client.publish(self.one, _key("one", 0)).artifact.artifact_id
        self.many_id = client.publish(self.many, _key("many", 0)).artifact.artifact_id
        h, n = hash_file(self.one / "model.bin")
        self.digest = blobs_pb2.Digest(hash=h, size_bytes=n)
        self.bare = BareServer()
        self.shm = Path(tempfile.mkdtemp(prefix="prebake-bench-", dir="/dev/shm"))

    def close(self) -> None:
        self.bare.close()
        shutil.rmtree(self.shm, ignore_errors=True)

    def ttfb(self, rounds: int) -> list[Row]:
        path = self.one / "model.bin"
        first = Row(
            "ttfb", f"time to first byte, {self.size / MIB:.0f} MiB blob", "bare grpc.aio stream", "ms"
        )
        last = Row("resume", "read of the last MiB (resume)", "bare grpc.aio stream", "ms")
        offset = self.size - MIB

        def prebake_first() -> None:
            chunks = self.client.read_blob(self.digest)
            next(iter(chunks))
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

        def prebake_last() -> None:
            for _ in self.client.read_blob(self.digest, offset=offset):
                pass

        def bare_last() -> None:
            for _ in self.bare.stream(path, offset):
                pass

        prebake_first()
        self.bare.first_byte(path)
        for r in range(rounds):
            pairs = [(prebake_first, lambda: self.bare.first_byte(path)), (prebake_last, bare_last)]
            for row, (subject, base) in zip((first, last), pairs, strict=True):
                if r % 2:
                    b = _seconds(base)
                    a = _seconds(subject)
                else:
                    a = _seconds(subject)
                    b = _seconds(base)
                row.add(a * 1e3, b * 1e3)
        return [first, last]

    def publish(self, rounds: int) -> list[Row]:
        src_dir = self.work / "publish-src"
        src_dir.mkdir()
        src = src_dir / "model.bin"
        _fill(src, self.size)
        copies = self.work / "copies"
        copies.mkdir()
        vs_cp = Row("publish-cp", f"publish {self.size / MIB:.0f} MiB", "cp + sync", "s")
        vs_bare = Row("publish-bare", f"publish {self.size / MIB:.0f} MiB", "bare grpc.aio upload", "s")
        reads_row = Row("publish-reads", "source bytes read per byte published", "bare gRPC upload's", "x")
        reads: list[float] = []
        server_reads: list[float] = []
        bare_reads: list[float] = []
        for r in range(rounds):
            _renew(src, r)
            times: dict[str, float] = {}

            def publish(r: int = r, times: dict[str, float] = times) -> None:
                client0, server0 = _rchar(), _rchar(self.server.proc.pid)
                times["publish"] = _seconds(self.client.publish, src_dir, _key("publish", r))
                reads.append((_rchar() - client0) / self.size)
                server_reads.append((_rchar(self.server.proc.pid) - server0) / self.size)

            def cp(r: int = r, times: dict[str, float] = times) -> None:
                dest = copies / f"cp-{r}"
                times["cp"] = _seconds(cp_and_sync, src, dest)
                dest.unlink()

            def bare(r: int = r, times: dict[str, float] = times) -> None:
                dest = copies / f"bare-{r}"
                client0 = _rchar()
                times["bare"] = _seconds(self.bare.upload, src, dest)
                bare_reads.append((_rchar() - client0) / self.size)
                dest.unlink()

            # Who writes right after another 512 MiB write pays for its writeback (page-cache
            # writes on this VM vary 0.2-2.6 s per 512 MiB): the order turns round by round.
            steps = [publish, cp, bare]
            for step in steps if r % 2 == 0 else steps[::-1]:
                step()
            reads_row.add(reads[-1], bare_reads[-1])
            vs_cp.add(times["publish"], times["cp"])
            vs_bare.add(times["publish"], times["bare"])
        for row in (vs_cp, vs_bare, reads_row):
            row.extra = {
                "source_reads_client": reads,
                "source_reads_server": server_reads,
                "bare_upload_reads_client": bare_reads,
            }
        reads_row.note = (
            f"bytes read(2) per source byte: client {sorted(reads)[len(reads) // 2]:.2f}, "
            f"server {sorted(server_reads)[len(server_reads) // 2]:.2f} (bare upload client "
            f"{sorted(bare_reads)[len(bare_reads) // 2]:.2f})"
        )
        shutil.rmtree(src_dir)
        return [vs_cp, vs_bare, reads_row]

    def fetch(self, rounds: int) -> list[Row]:
        rows: list[Row] = []
        layouts = (("1", self.one_id, self.one), ("32", self.many_id, self.many))
        have_nginx = nginx_binary() is not None
        nginx = Nginx(self.files) if have_nginx else None
        try:
            for files, artifact_id, directory in layouts:
                names = sorted(p.name for p in directory.iterdir())
                what = f"fetch {self.size / MIB:.0f} MiB to tmpfs, {files} file{'s' if files != '1' else ''}"
                vs_nginx = Row(f"fetch-{files}-nginx", what, "nginx on loopback", "MiB/s")
                vs_bare = Row(f"fetch-{files}-bare", what, "bare grpc.aio stream", "MiB/s")
                manifest = self.client.get_artifact(artifact_id)

                def prebake(r: int, manifest: object = manifest) -> None:
                    self.client.fetch(manifest, self.shm / f"fetch-{r}")  # type: ignore[arg-type]

                def by_nginx(r: int, directory: Path = directory, names: list[str] = names) -> None:
                    assert nginx is not None
                    out = self.shm / f"nginx-{r}"
                    out.mkdir()
                    prefix = directory.name
                    with ThreadPoolExecutor(min(NGINX_CONNECTIONS, len(names))) as pool:
                        list(pool.map(lambda n: nginx.download(f"{prefix}/{n}", out / n), names))

                def by_bare(r: int, directory: Path = directory, names: list[str] = names) -> None:
                    out = self.shm / f"bare-{r}"
                    out.mkdir()
                    for n in names:
                        self.bare.download(directory / n, out / n)

                steps: dict[str, Callable[[int], None]] = {"prebake": prebake, "bare": by_bare}
                if nginx is not None:
                    steps["nginx"] = by_nginx
                for r in range(rounds + 1):  # round 0 warms up
                    # Each writes 512 MiB more to tmpfs before the round's cleanup: the order
                    # turns round by round, as for publish, so no one always writes last.
                    order = list(steps)
                    order = order[r % len(order) :] + order[: r % len(order)]
                    t = {name: _seconds(steps[name], r) for name in order}
                    for p in self.shm.iterdir():
                        shutil.rmtree(p)
                    if r:
                        mib = self.size / MIB
                        if nginx is not None:
                            vs_nginx.add(mib / t["prebake"], mib / t["nginx"])
                        vs_bare.add(mib / t["prebake"], mib / t["bare"])
                if nginx is None:
                    vs_nginx.note = "SKIPPED: nginx is not installed (apt-get install nginx-light)"
                rows.extend([vs_nginx, vs_bare])
        finally:
            if nginx is not None:
                nginx.close()
        return rows

    def memory(self, rounds: int, clients: int = 4) -> Row:
        """Peak server RSS while `clients` clients fetch the large artifact at once, vs before."""
        row = Row(
            "fetch-memory",
            f"server RSS while {clients} clients fetch {self.size / MIB:.0f} MiB each",
            "server RSS idle",
            "MiB",
        )
        for r in range(rounds):
            idle = tree_rss_mib(self.server.proc.pid)
            peak = idle
            with ThreadPoolExecutor(clients) as pool:
                futures = [
                    pool.submit(self._fetch_with_own_client, self.shm / f"mem-{r}-{c}")
                    for c in range(clients)
                ]
                while not all(f.done() for f in futures):
                    peak = max(peak, tree_rss_mib(self.server.proc.pid))
                    time.sleep(0.02)
                for f in futures:
                    f.result()
            for p in self.shm.iterdir():
                shutil.rmtree(p)
            row.add(peak, idle)
        growth = statistics.median(s - b for s, b in zip(row.subject, row.base, strict=True))
        row.note = f"peak minus idle: {growth:.0f} MiB"
        return row

    def _fetch_with_own_client(self, dest: Path) -> None:
        with Client(self.server.address) as client:
            client.fetch(self.one_id, dest)
