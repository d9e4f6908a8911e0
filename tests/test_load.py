"""A load test: concurrent lookups, fetches and publishes against one real server with authentication.

One `prebake serve` subprocess (SQLite and local disk, a token file) takes, for a bounded time,
readers looking up published keys (hits) and unpublished ones (report-only misses), fetching
artifacts (verified downloads) and trying to publish (refused: PERMISSION_DENIED); publishers
publishing new artifacts, re-publishing identical ones (unchanged), publishing another file
list for a taken key (ALREADY_EXISTS) and replacing one (refused: replace needs admin); an
admin pinning, unpinning, collecting garbage (dry runs, which recount the store while writes go
on) and verifying blobs. Every outcome is counted by kind; any other outcome is an error and
fails the test with the list.

Afterwards the registry and the blob store must agree, with each other and with what the
clients saw: every artifact a publisher was told it created is listed, nothing else is, each
fetches with the bytes published; the server's blob counters equal the files on disk, every file
re-hashes to its name, every blob an artifact names is there and nothing else is; no temporary
or partial file is left (server or client side); a restart on the same data directory serves
the same registry with the same counters.
"""

from __future__ import annotations

import random
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from prebake.client import ArtifactKey, Client
from prebake.client.errors import AlreadyExists, NotFound, PermissionDenied
from prebake.core.digests import hash_bytes
from prebake.server.auth.tokens import add_entry
from prebake.server.backends import BLOBS_DIR
from prebake.v1 import admin_pb2, registry_pb2
from tests.auth_fixtures import make_token_file
from tests.conftest import LLAMA3_8B_INF2, tree
from tests.processes import ServerProcess

pytestmark = pytest.mark.slow

SECONDS = 8.0
SEED = 20261202
READERS = 3
PUBLISHERS = 2
# Published before the clock starts, so that readers have hits from the first operation.
PRELOADED = 6
KiB = 1 << 10
# The same bytes in every artifact: concurrent uploads and publishes of one blob, and blobs
# shared between artifacts.
SHARED_CONFIG = b'{"architectures": ["LlamaForCausalLM"], "load_test": true}\n'
# Where the store keeps what is not a published blob yet (local_objects, cas).
SCRATCH = (".tmp", ".multipart", "uploads", "quarantine")


def key_for(name: str) -> ArtifactKey:
    """A distinct key per name (a new revision is a new artifact)."""
    return replace(LLAMA3_8B_INF2, model_revision=f"load-{name}")


def random_files(rng: random.Random) -> dict[str, bytes]:
    files = {"config.json": SHARED_CONFIG}
    for i in range(rng.randint(1, 3)):
        files[f"shard-{i}.bin"] = rng.randbytes(rng.choice([1, 100, 4 * KiB, rng.randint(1, 96 * KiB)]))
    if rng.random() < 0.3:
        files["empty.txt"] = b""
    return files


def write_dir(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir(parents=True)
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    return root


@dataclass(frozen=True)
class Published:
    key: ArtifactKey
    artifact_id: str
    manifest_digest: str
    files: dict[str, bytes]
    # The file list as the server stored it.
    manifest: tuple[registry_pb2.ArtifactFile, ...]

    @classmethod
    def of(
        cls, key: ArtifactKey, reply: registry_pb2.PublishArtifactResponse, files: dict[str, bytes]
    ) -> Published:
        stored = reply.artifact
        return cls(key, stored.artifact_id, stored.manifest_digest, files, tuple(stored.files))


@dataclass
class Ledger:
    """What the clients were told, shared by the threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    published: list[Published] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    # Artifact id -> pinned, as the admin last set it.
    pins: dict[str, bool] = field(default_factory=dict)

    def add(self, artifact: Published) -> None:
        with self.lock:
            self.published.append(artifact)

    def pick(self, rng: random.Random) -> Published:
        with self.lock:
            return rng.choice(self.published)

    def count(self, outcome: str) -> None:
        with self.lock:
            self.outcomes[outcome] += 1

    def error(self, what: str) -> None:
        with self.lock:
            self.errors.append(what)

    def report(self) -> str:
        with self.lock:
            return ", ".join(f"{name} {n}" for name, n in sorted(self.outcomes.items()))


Op = Callable[[], str]
# The operations of a client role: (client, ledger, name, rng, scratch directory) -> weighted ops.
OpsFor = Callable[[Client, Ledger, str, random.Random, Path], list[tuple[int, Op]]]


def run_until(
    deadline: float, ledger: Ledger, name: str, rng: random.Random, ops: list[tuple[int, Op]]
) -> None:
    """Run weighted random `ops` until `deadline`; each returns its outcome (counted per role: the
    name without its number), anything raised is an error."""
    role = name.split("-", maxsplit=1)[0]
    names = [op for _, op in ops]
    weights = [w for w, _ in ops]
    while time.monotonic() < deadline:
        op = rng.choices(names, weights)[0]
        try:
            outcome = op()
        except Exception as exc:
            ledger.error(f"{name} {op.__name__}: {type(exc).__name__}: {exc}")
        else:
            ledger.count(f"{role} {op.__name__}: {outcome}")


def publisher_ops(
    client: Client, ledger: Ledger, name: str, rng: random.Random, scratch: Path
) -> list[tuple[int, Op]]:
    mine: list[Published] = []
    serial = iter(range(1_000_000))

    def publish_new() -> str:
        n = next(serial)
        files = random_files(rng)
        key = key_for(f"{name}-{n}")
        reply = client.publish(write_dir(scratch / f"new-{n}", files), key)
        assert reply.created, f"a first publish of {key.model_revision} did not create an artifact"
        artifact = Published.of(key, reply, files)
        mine.append(artifact)
        ledger.add(artifact)
        return "created"

    def republish_same() -> str:
        if not mine:
            return "skipped"
        artifact = rng.choice(mine)
        n = next(serial)
        reply = client.publish(write_dir(scratch / f"same-{n}", artifact.files), artifact.key)
        assert not reply.created, f"re-publishing {artifact.artifact_id} unchanged created it again"
        assert (reply.artifact.artifact_id, reply.artifact.manifest_digest) == (
            artifact.artifact_id,
            artifact.manifest_digest,
        )
        return "unchanged"

    def publish_other_files() -> str:
        # Another artifact's file list (blobs the server holds: nothing new is uploaded) for a
        # taken key, without replace: refused, the artifact stays as it is.
        if len(mine) < 2:
            return "skipped"
        taken, other = rng.sample(mine, 2)
        try:
            client.publish_artifact(taken.key, other.manifest)
        except AlreadyExists:
            return "already exists"
        raise AssertionError(f"a different file list replaced {taken.artifact_id} without replace")

    def replace_denied() -> str:
        # Replacing needs the admin role.
        if len(mine) < 2:
            return "skipped"
        taken, other = rng.sample(mine, 2)
        try:
            client.publish_artifact(taken.key, other.manifest, replace=True)
        except PermissionDenied:
            return "permission denied"
        raise AssertionError(f"a publisher's token replaced {taken.artifact_id}")

    return [(6, publish_new), (3, republish_same), (1, publish_other_files), (1, replace_denied)]


def reader_ops(
    client: Client, ledger: Ledger, name: str, rng: random.Random, scratch: Path
) -> list[tuple[int, Op]]:
    serial = iter(range(1_000_000))

    def lookup_hit() -> str:
        artifact = ledger.pick(rng)
        reply = client.lookup(artifact.key, on_miss="report")
        assert reply.status == registry_pb2.LOOKUP_STATUS_HIT, f"{artifact.artifact_id}: {reply.status}"
        assert reply.artifact.artifact_id == artifact.artifact_id
        return "hit"

    def lookup_miss() -> str:
        reply = client.lookup(key_for(f"never-{name}-{rng.randrange(1000)}"), on_miss="report")
        assert reply.status == registry_pb2.LOOKUP_STATUS_MISS and not reply.job_created, str(reply)
        return "miss"

    def fetch() -> str:
        artifact = ledger.pick(rng)
        dest = scratch / f"fetch-{next(serial)}"
        result = client.fetch(artifact.artifact_id, dest)
        assert result.artifact_id == artifact.artifact_id
        assert tree(dest) == artifact.files, f"{artifact.artifact_id} fetched other bytes"
        shutil.rmtree(dest)
        return "fetched"

    def get_unknown() -> str:
        try:
            client.get_artifact("0" * 32)
        except NotFound:
            return "not found"
        raise AssertionError("an unknown artifact id was found")

    def publish_denied() -> str:
        # Refused at the first rpc the publisher role needs (FindMissingBlobs): nothing uploaded.
        n = next(serial)
        try:
            client.publish(
                write_dir(scratch / f"denied-{n}", random_files(rng)), key_for(f"denied-{name}-{n}")
            )
        except PermissionDenied:
            return "permission denied"
        raise AssertionError("a reader's token published an artifact")

    def publish_manifest_denied() -> str:
        # Blobs the server holds already, straight to PublishArtifact.
        manifest = ledger.pick(rng).manifest
        try:
            client.publish_artifact(key_for(f"denied-{name}-{next(serial)}"), manifest)
        except PermissionDenied:
            return "permission denied"
        raise AssertionError("a reader's token published an artifact")

    return [
        (5, lookup_hit),
        (2, lookup_miss),
        (4, fetch),
        (1, get_unknown),
        (1, publish_denied),
        (1, publish_manifest_denied),
    ]


def admin_ops(client: Client, ledger: Ledger, rng: random.Random) -> list[tuple[int, Op]]:
    def pin() -> str:
        artifact = ledger.pick(rng)
        pinned = rng.random() < 0.5
        assert client.pin_artifact(artifact.artifact_id, pinned).pinned == pinned
        with ledger.lock:
            ledger.pins[artifact.artifact_id] = pinned
        return "pinned" if pinned else "unpinned"

    def collect_garbage() -> str:
        # A dry run changes nothing but recounts the store (rescan) while uploads and publishes go on.
        report = client.collect_garbage(dry_run=True)
        assert (report.orphaned_blobs, len(report.evicted_artifact_ids), report.stale_uploads) == (0, 0, 0), (
            str(report)
        )
        return "dry run"

    def verify() -> str:
        for progress in client.verify_blobs(limit=8):
            assert not progress.damaged, str(progress.damaged)
        return "verified"

    def stats() -> str:
        client.get_stats()
        return "stats"

    return [(4, pin), (1, collect_garbage), (1, verify), (2, stats)]


@dataclass
class Tokens:
    reader: str
    admin: str
    publishers: list[str]


def tokens_in(path: Path) -> Tokens:
    made = make_token_file(path)
    publishers = [made.tokens["publisher"]]
    # One principal per publisher: each has its own upload rate limit, as separate hosts would.
    for i in range(1, PUBLISHERS):
        token = add_entry(path, f"publisher-{i}", ["publisher"])
        assert token is not None
        publishers.append(token)
    return Tokens(made.tokens["reader"], made.tokens["admin"], publishers)


def start(tmp_path: Path, name: str, data_dir: Path, token_file: Path) -> ServerProcess:
    # No background collection or sweep: the admin thread runs them, at random times.
    args = ["--auth-file", str(token_file), "--data-dir", str(data_dir), "--gc-interval", "0"]
    return ServerProcess(tmp_path, name, [*args, "--integrity-sweep-seconds", "0"]).wait_ready()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ServerProcess, Tokens]]:
    tokens = tokens_in(tmp_path / "tokens")
    server = start(tmp_path, "load", tmp_path / "data", tmp_path / "tokens")
    try:
        yield server, tokens
    finally:
        server.kill()


def stored_blobs(cas: Path) -> dict[tuple[str, int], bytes]:
    """Every file under the store's blobs/, by the digest its name states."""
    found = {}
    for path in (cas / "blobs").rglob("*"):
        if path.is_file():
            digest, _, size = path.name.rpartition("-")
            assert path.parent.name == digest[:2], f"{path} is in the wrong shard"
            found[(digest, int(size))] = path.read_bytes()
    return found


def run_load(tmp_path: Path, address: str, tokens: Tokens) -> Ledger:
    """Preload a few artifacts, then run every client thread for SECONDS; what they were told."""
    ledger = Ledger()
    readers = [Client(address, token=tokens.reader) for _ in range(READERS)]
    publishers = [Client(address, token=token) for token in tokens.publishers]
    admin = Client(address, token=tokens.admin)
    try:
        rng = random.Random(SEED)
        for n in range(PRELOADED):
            files = random_files(rng)
            key = key_for(f"pre-{n}")
            ledger.add(
                Published.of(key, publishers[0].publish(write_dir(tmp_path / f"pre-{n}", files), key), files)
            )
        deadline = time.monotonic() + SECONDS
        threads = []
        roles: list[tuple[str, Client, OpsFor]] = [
            *((f"reader-{i}", c, reader_ops) for i, c in enumerate(readers)),
            *((f"publisher-{i}", c, publisher_ops) for i, c in enumerate(publishers)),
        ]
        for i, (name, client, ops_for) in enumerate(roles):
            scratch = tmp_path / name
            scratch.mkdir()
            rng = random.Random(SEED + i)
            ops = ops_for(client, ledger, name, rng, scratch)
            threads.append(threading.Thread(target=run_until, args=(deadline, ledger, name, rng, ops)))
        rng = random.Random(SEED + len(roles))
        ops = admin_ops(admin, ledger, rng)
        threads.append(threading.Thread(target=run_until, args=(deadline, ledger, "admin", rng, ops)))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(SECONDS + 120)
            assert not thread.is_alive(), f"a client thread is stuck; so far: {ledger.report()}"
    finally:
        for client in [*readers, *publishers, admin]:
            client.close()
    return ledger


@dataclass(frozen=True)
class Counted:
    """What the server says its store holds once the load is over."""

    # Its running counters (GetStats), kept up to date by every write since start-up.
    stats: admin_pb2.Stats
    # Its usage after a recount (a dry-run collection rescans the store first).
    usage: admin_pb2.StoreUsage


def check_registry(client: Client, admin: Client, ledger: Ledger, dest: Path) -> Counted:
    """Exactly what the publishers were told they created is listed, with its pins, file lists
    and bytes; the server's integrity check finds nothing wrong."""
    counts = ledger.report()
    expected = {a.artifact_id: a for a in ledger.published}
    assert len(expected) == len(ledger.published), "an artifact id was reported created twice"
    listed = {a.artifact_id: a for a in client.iter_artifacts()}
    assert set(listed) == set(expected), (
        f"listed, not created: {set(listed) - set(expected)}; created, not listed: "
        f"{set(expected) - set(listed)} ({counts})"
    )
    pinned = {a for a, on in ledger.pins.items() if on}
    assert {a for a, artifact in listed.items() if artifact.pinned} == pinned
    for artifact in expected.values():
        manifest = client.get_artifact(artifact.artifact_id)
        assert manifest.manifest_digest == artifact.manifest_digest
        assert {f.path: (f.digest.hash, f.digest.size_bytes) for f in manifest.files} == {
            path: (hash_bytes(data), len(data)) for path, data in artifact.files.items()
        }
        client.fetch(artifact.artifact_id, dest / artifact.artifact_id)
        assert tree(dest / artifact.artifact_id) == artifact.files
    checked = list(admin.verify_blobs(repair=False))
    assert checked[-1].done and checked[-1].blobs_checked == checked[-1].blobs_total
    assert checked[-1].blobs_total == len(referenced_blobs(ledger))
    assert not [d for p in checked for d in p.damaged]
    stats = admin.get_stats()
    assert (stats.artifacts, stats.pinned_artifacts) == (len(expected), len(pinned))
    # Report-only misses enqueued nothing.
    assert stats.queue_depth == 0 and not any(stats.jobs_by_state.values()), str(stats)
    return Counted(stats, admin.collect_garbage(dry_run=True).usage)


def referenced_blobs(ledger: Ledger) -> set[tuple[str, int]]:
    return {(hash_bytes(data), len(data)) for a in ledger.published for data in a.files.values()}


def check_store(cas: Path, counted: Counted, ledger: Ledger) -> None:
    """With the server stopped: the files under the store are the referenced blobs, each hashing
    to its name, and exactly what the server counted; no temporary or partial file is left."""
    counts = ledger.report()
    blobs = stored_blobs(cas)
    for (digest, size), data in blobs.items():
        assert (hash_bytes(data), len(data)) == (digest, size), (
            f"blob {digest}-{size} does not hash to its name"
        )
    # Nothing unreferenced: refused publishes uploaded nothing new, or nothing at all.
    assert set(blobs) == referenced_blobs(ledger)
    on_disk = (len(blobs), sum(size for _, size in blobs))
    stats, usage = counted.stats, counted.usage
    assert (stats.blobs, stats.blob_bytes) == on_disk, (
        f"the server's counters say {stats.blobs} blobs of {stats.blob_bytes} bytes; the disk holds "
        f"{on_disk[0]} of {on_disk[1]} (a recount found {usage.blob_bytes} bytes; {counts})"
    )
    assert usage.blob_bytes == on_disk[1], f"a recount found {usage.blob_bytes} bytes, not {on_disk[1]}"
    assert (usage.upload_bytes, usage.reserved_bytes) == (0, 0), f"{usage} with no upload in progress"
    leftovers = [str(p.relative_to(cas)) for d in SCRATCH if (cas / d).exists() for p in (cas / d).rglob("*")]
    assert not leftovers, f"temporary or partial files left: {leftovers}"


def test_concurrent_lookups_fetches_and_publishes_leave_registry_and_store_consistent(
    tmp_path: Path, served: tuple[ServerProcess, Tokens]
) -> None:
    server, tokens = served
    started = time.monotonic()
    ledger = run_load(tmp_path, server.address, tokens)
    counts = ledger.report()
    seconds = time.monotonic() - started
    print(f"\nload test: {sum(ledger.outcomes.values())} operations in {seconds:.1f} s: {counts}")
    shown = "\n".join(ledger.errors[:40])
    assert not ledger.errors, f"{len(ledger.errors)} unintended outcomes ({counts}); the first:\n{shown}"
    for outcome in (
        "reader lookup_hit: hit",
        "reader lookup_miss: miss",
        "reader fetch: fetched",
        "reader publish_denied: permission denied",
        "reader publish_manifest_denied: permission denied",
        "publisher replace_denied: permission denied",
        "publisher publish_new: created",
        "publisher republish_same: unchanged",
        "publisher publish_other_files: already exists",
        "admin collect_garbage: dry run",
    ):
        assert ledger.outcomes[outcome] > 0, f"no {outcome!r} in {counts}"
    for name in [*(f"reader-{i}" for i in range(READERS)), *(f"publisher-{i}" for i in range(PUBLISHERS))]:
        # The client side: no fetch left a temporary directory beside its destination.
        leftovers = [p.name for p in (tmp_path / name).iterdir() if p.name.startswith(".prebake")]
        assert not leftovers, f"{name}: {leftovers}"

    with (
        Client(server.address, token=tokens.reader) as reader,
        Client(server.address, token=tokens.admin) as admin,
    ):
        counted = check_registry(reader, admin, ledger, tmp_path / "final")
    assert server.stop() == 0, server.log()
    check_store(tmp_path / "data" / BLOBS_DIR, counted, ledger)

    # A restart recounts the store from disk and reads the registry back: the same as before.
    again = start(tmp_path, "restart", tmp_path / "data", tmp_path / "tokens")
    try:
        with Client(again.address, token=tokens.admin) as client:
            stats = client.get_stats()
            assert (stats.artifacts, stats.blobs, stats.blob_bytes) == (
                len(ledger.published),
                counted.stats.blobs,
                counted.stats.blob_bytes,
            )
            assert {a.artifact_id for a in client.iter_artifacts()} == {
                a.artifact_id for a in ledger.published
            }
    finally:
        assert again.stop() == 0, again.log()
