"""Signed artifacts end to end: real servers on loopback, the real `prebake` command line.

Keys come from `prebake key generate`; artifacts are made-up directories published through
the real publish and complete paths (one test runs a real compile with `prebake worker
--signing-key`). What must hold: `ensure --trust` places only what a trusted key signed,
from the manifest it fetched, so neither a tampered registry nor a replaced blob reaches
`--dest`; several trusted keys allow rotation; a revoked signer's artifacts stop being served.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from contextlib import closing
from dataclasses import dataclass, replace
from pathlib import Path

import boto3
import pytest

from prebake.client import ArtifactKey, Client
from prebake.client.client import sign_manifest
from prebake.client.errors import (
    DownloadDigestMismatch,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    PrebakeError,
    UntrustedArtifact,
)
from prebake.client.exitcodes import UNTRUSTED
from prebake.core.digests import hash_bytes
from prebake.core.signing import (
    Signature,
    SigningKey,
    TrustSet,
    check_signed_key,
    files_digest,
    generate_key_files,
    signed_bytes,
    verify,
    verify_artifact,
)
from prebake.server import manifest_archive
from prebake.server.app import BackgroundServer, background_server
from prebake.server.blobs.cas import blob_key
from prebake.server.records import Digest
from prebake.v1 import blobs_pb2, registry_pb2, workers_pb2
from tests.aws_emulator import REGION, Emulator
from tests.conftest import LLAMA3_8B_INF2, make_artifact_dir, tree
from tests.contract.samples import make_artifact
from tests.plugin_cli import PrebakeCli
from tests.processes import WorkerProcess

KEY_ARGS = [
    "--kind", "neuron", "--model", "meta-llama/Meta-Llama-3-8B", "--instance-type", "ml.inf2.48xlarge",
    "--sequence-length", "8192", "--batch-size", "8", "--tp", "24", "--precision", "bf16",
]  # fmt: skip
OTHER = replace(LLAMA3_8B_INF2, batch_size=4)
OTHER_ARGS = [*KEY_ARGS[:-5], "4", *KEY_ARGS[-4:]]


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: Path
    key_id: str

    def load(self) -> SigningKey:
        return SigningKey.load(self.private)


def new_key(directory: Path, name: str) -> KeyPair:
    private, public, key_id = generate_key_files(directory / name)
    return KeyPair(private, public, key_id)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, KeyPair]:
    directory = tmp_path / "keys"
    directory.mkdir()
    return {name: new_key(directory, name) for name in ("a", "b", "c")}


def publish_dir(client: Client, root: Path, key: ArtifactKey, signer: KeyPair | None, seed: int = 0) -> str:
    directory = make_artifact_dir(root, {"model.neff": 3000, "bin/run.sh": 40}, seed=seed)
    response = client.publish(directory, key, signing_key=None if signer is None else signer.load())
    return response.artifact.artifact_id


def placed_nothing(dest: Path) -> bool:
    """`dest` absent, and nothing downloaded for it (no temporary directory beside it)."""
    return not dest.exists() and not partial_downloads(dest)


def partial_downloads(dest: Path) -> list[Path]:
    """The files of an interrupted download beside `dest` (kept to resume; never placed)."""
    return [f for p in dest.parent.glob(f".prebake-tmp-{dest.name}-*") for f in p.rglob("*") if f.is_file()]


# Keys and the format ---------------------------------------------------------------------


def test_key_generate_writes_a_private_key_0600_and_its_public_key(
    tmp_path: Path, prebake: PrebakeCli
) -> None:
    out = tmp_path / "signing.key"
    ran = prebake("key", "generate", "--out", str(out))
    assert ran.code == 0, ran.err
    key_id = ran.out.strip()
    assert key_id.startswith("ed25519:") and len(key_id) == len("ed25519:") + 32
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    public = tmp_path / "signing.key.pub"
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert SigningKey.load(out).key_id == key_id == TrustSet.load([public]).key_ids[0]
    # A signing key is never replaced silently.
    before = out.read_bytes()
    again = prebake("key", "generate", "--out", str(out))
    assert again.code == 1 and "exists" in again.err
    assert out.read_bytes() == before


def test_a_signature_covers_id_key_and_every_file_field(keys: dict[str, KeyPair]) -> None:
    signer = keys["a"].load()
    files = [
        registry_pb2.ArtifactFile(path="a.bin", digest=blobs_pb2.Digest(hash=hash_bytes(b"a"), size_bytes=1)),
        registry_pb2.ArtifactFile(
            path="run.sh", digest=blobs_pb2.Digest(hash=hash_bytes(b"r"), size_bytes=1)
        ),
    ]
    canonical = '{"model":"m","v":1}'
    artifact_id = hash_bytes(canonical.encode())
    sig = signer.sign(artifact_id, canonical, files_digest(files))
    assert verify(signer.public_key, sig, signed_bytes(artifact_id, canonical, files_digest(files)))
    assert files_digest(reversed(files)) == files_digest(files)  # order does not matter
    tampered = [files[0], registry_pb2.ArtifactFile(path="run.sh", digest=files[1].digest, executable=True)]
    for changed in (
        signed_bytes(artifact_id, canonical, files_digest(tampered)),
        signed_bytes(artifact_id, '{"model":"x","v":1}', files_digest(files)),
        signed_bytes("0" * 32, canonical, files_digest(files)),
    ):
        assert not verify(signer.public_key, sig, changed)
    assert not verify(
        keys["b"].load().public_key, replace(sig, key_id=keys["b"].key_id, public_key=b""), b"x"
    )


def test_the_thin_client_imports_no_cryptography() -> None:
    import subprocess
    import sys

    code = "import sys, prebake.client, prebake.client.cli; print('cryptography' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# Publish, record, verify ------------------------------------------------------------------


def test_a_signed_publish_is_recorded_and_ensure_trust_places_it(
    server: BackgroundServer, client: Client, keys: dict[str, KeyPair], tmp_path: Path, prebake: PrebakeCli
) -> None:
    source = make_artifact_dir(tmp_path / "src", {"model.neff": 5000, "bin/run.sh": 64})
    ran = prebake(
        "--server", server.address, "publish", str(source), *KEY_ARGS,
        "--signing-key", str(keys["a"].private), "--json",
    )  # fmt: skip
    assert ran.code == 0, ran.err
    artifact = client.get_artifact(client.lookup(LLAMA3_8B_INF2, on_miss="report").artifact.artifact_id)
    assert artifact.signature.key_id == keys["a"].key_id
    assert verify_artifact(TrustSet.load([keys["a"].public]), artifact) == keys["a"].key_id

    dest = tmp_path / "dest"
    ran = prebake(
        "--server", server.address, "ensure", *KEY_ARGS, "--dest", str(dest), "--trust", str(keys["a"].public)
    )
    assert ran.code == 0, ran.err
    assert tree(dest) == tree(source)


def test_an_imported_set_is_signed_with_the_signing_key(
    server: BackgroundServer, client: Client, keys: dict[str, KeyPair], tmp_path: Path, prebake: PrebakeCli
) -> None:
    make_artifact_dir(tmp_path / "set" / "a", {"model.neff": 3000})
    make_artifact_dir(tmp_path / "set" / "b", {"model.neff": 4000})
    fields = {
        "kind": "neuron",
        "model": LLAMA3_8B_INF2.model,
        "instance_type": LLAMA3_8B_INF2.instance_type,
        "sequence_length": LLAMA3_8B_INF2.sequence_length,
        "tensor_parallel_degree": LLAMA3_8B_INF2.tensor_parallel_degree,
        "precision": "bf16",
    }
    entries = [
        {"path": "a", **fields, "batch_size": LLAMA3_8B_INF2.batch_size},
        {"path": "b", **fields, "batch_size": OTHER.batch_size},
    ]
    set_file = tmp_path / "set" / "set.json"
    set_file.write_text(json.dumps(entries))
    missing = str(tmp_path / "nope")
    bad = prebake("--server", server.address, "import", str(set_file), "--signing-key", missing)
    assert bad.code == 2 and "--signing-key" in bad.err
    assert client.lookup(LLAMA3_8B_INF2, on_miss="report").status != registry_pb2.LOOKUP_STATUS_HIT

    ran = prebake(
        "--server", server.address, "import", str(set_file), "--signing-key", str(keys["a"].private), "--json"
    )
    assert ran.code == 0, ran.err
    imported = json.loads(ran.out)["imported"]
    assert [r["created"] for r in imported] == [True, True]
    trust = TrustSet.load([keys["a"].public])
    for entry in imported:
        artifact = client.get_artifact(entry["artifact_id"])
        assert verify_artifact(trust, artifact) == keys["a"].key_id
    dest = tmp_path / "dest"
    trusted = str(keys["a"].public)
    address = server.address
    placed = prebake("--server", address, "ensure", *OTHER_ARGS, "--dest", str(dest), "--trust", trusted)
    assert placed.code == 0, placed.err
    assert tree(dest) == tree(tmp_path / "set" / "b")


def test_unsigned_and_wrongly_signed_artifacts_are_refused_and_nothing_is_placed(
    server: BackgroundServer, client: Client, keys: dict[str, KeyPair], tmp_path: Path, prebake: PrebakeCli
) -> None:
    publish_dir(client, tmp_path / "unsigned", LLAMA3_8B_INF2, None)
    publish_dir(client, tmp_path / "other", OTHER, keys["b"])
    trust = ["--trust", str(keys["a"].public)]

    dest = tmp_path / "dest"
    ran = prebake("--server", server.address, "ensure", *KEY_ARGS, "--dest", str(dest), *trust)
    assert ran.code == UNTRUSTED, ran.err
    assert "is not signed" in ran.err and "nothing was placed" in ran.err
    assert placed_nothing(dest)

    ran = prebake("--server", server.address, "fetch", *OTHER_ARGS, "--dest", str(dest), *trust)
    assert ran.code == UNTRUSTED, ran.err
    assert f"signed by {keys['b'].key_id}, which is not trusted" in ran.err
    assert placed_nothing(dest)


def test_a_manifest_tampered_with_in_the_registry_is_refused(
    server: BackgroundServer, client: Client, keys: dict[str, KeyPair], tmp_path: Path, prebake: PrebakeCli
) -> None:
    artifact_id = publish_dir(client, tmp_path / "src", LLAMA3_8B_INF2, keys["a"])
    # Behind the server's back, as an attacker with the database would: the script becomes
    # another (stored) blob and loses nothing else.
    evil = make_artifact_dir(tmp_path / "evil", {"bin/run.sh": 40}, seed=9)
    evil_digest = client.upload_directory(evil)[0].digest
    with closing(sqlite3.connect(server.config.data_dir / "registry.sqlite3")) as db, db:
        changed = db.execute(
            "UPDATE artifact_files SET hash = ?, size = ?, executable = 1 WHERE artifact_id = ? AND path = ?",
            (evil_digest.hash, evil_digest.size_bytes, artifact_id, "bin/run.sh"),
        ).rowcount
    assert changed == 1
    served = client.get_artifact(artifact_id)
    assert [f.digest.hash for f in served.files if f.path == "bin/run.sh"] == [evil_digest.hash]

    dest = tmp_path / "dest"
    ran = prebake(
        "--server", server.address, "ensure", *KEY_ARGS, "--dest", str(dest), "--trust", str(keys["a"].public)
    )
    assert ran.code == UNTRUSTED, ran.err
    assert "signature does not match its key and files" in ran.err
    assert placed_nothing(dest)
    # The same through the API, with the trust set given to the fetch.
    with pytest.raises(UntrustedArtifact) as info:
        client.fetch(served, dest, trust=TrustSet.load([keys["a"].public]))
    assert info.value.signer == keys["a"].key_id
    assert placed_nothing(dest)


def test_a_genuinely_signed_artifact_of_another_model_is_refused(
    server: BackgroundServer, client: Client, keys: dict[str, KeyPair], tmp_path: Path
) -> None:
    # A server that answers a lookup with another key's (genuinely signed) artifact: the
    # signed key names another model than the deployer asked for.
    artifact = client.get_artifact(publish_dir(client, tmp_path / "src", LLAMA3_8B_INF2, keys["a"]))
    check_signed_key(artifact, LLAMA3_8B_INF2.model)
    check_signed_key(artifact, LLAMA3_8B_INF2.model, "")
    with pytest.raises(UntrustedArtifact, match="signed for model 'meta-llama/Meta-Llama-3-8B'"):
        check_signed_key(artifact, "evil/model")
    with pytest.raises(UntrustedArtifact, match="model_revision"):
        check_signed_key(artifact, LLAMA3_8B_INF2.model, "rev-b")


def test_a_blob_replaced_in_the_bucket_is_refused_by_the_clients_digest_check(
    aws_threaded: Emulator, keys: dict[str, KeyPair], tmp_path: Path
) -> None:
    bucket = aws_threaded.create_bucket()
    with (
        background_server(tmp_path / "data", store=f"s3://{bucket}/p") as server,
        Client(server.address, trust=TrustSet.load([keys["a"].public])) as client,
    ):
        artifact_id = publish_dir(client, tmp_path / "src", LLAMA3_8B_INF2, keys["a"])
        artifact = client.get_artifact(artifact_id)
        target = next(f for f in artifact.files if f.path == "model.neff")
        # The bucket is compromised: same key, same size, other bytes. S3 vouches for its own
        # objects, so only the deploying client's own digest check stands in the way.
        s3 = boto3.client("s3", endpoint_url=aws_threaded.endpoint, region_name=REGION)
        key = "p/" + blob_key(Digest(target.digest.hash, target.digest.size_bytes))
        s3.put_object(Bucket=bucket, Key=key, Body=b"\x7fELF" + b"\0" * (target.digest.size_bytes - 4))

        dest = tmp_path / "dest"
        assert client.trust is not None
        assert verify_artifact(client.trust, artifact) == keys["a"].key_id  # the manifest is genuine
        with pytest.raises(DownloadDigestMismatch, match="failed xxh3 verification"):
            client.ensure(LLAMA3_8B_INF2, dest)
        assert not dest.exists()
        # What stays for a resume is what verified; the replaced bytes were deleted.
        assert not any(f.read_bytes().startswith(b"\x7fELF") for f in partial_downloads(dest))


def test_a_blob_replaced_on_the_servers_disk_is_never_placed(
    server: BackgroundServer, keys: dict[str, KeyPair], tmp_path: Path
) -> None:
    with Client(server.address, trust=TrustSet.load([keys["a"].public])) as client:
        artifact_id = publish_dir(client, tmp_path / "src", LLAMA3_8B_INF2, keys["a"])
        target = next(f for f in client.get_artifact(artifact_id).files if f.path == "model.neff")
        stored = (
            server.config.data_dir / "cas" / blob_key(Digest(target.digest.hash, target.digest.size_bytes))
        )
        assert stored.is_file()
        stored.write_bytes(b"\x7fELF" + b"\0" * (target.digest.size_bytes - 4))
        dest = tmp_path / "dest"
        # The server re-hashes it and quarantines it; ensure then follows the rebuild the
        # failing read asked for (prebake.server.integrity), which no worker runs here.
        with pytest.raises(PrebakeError):
            client.ensure(LLAMA3_8B_INF2, dest, timeout=5)
        assert server.running is not None
        [quarantined] = server.running.state.blobs.list_quarantined()
        assert quarantined.digest == Digest(target.digest.hash, target.digest.size_bytes)
        assert client.lookup(LLAMA3_8B_INF2).status != registry_pb2.LOOKUP_STATUS_HIT
        assert not dest.exists()
        assert not any(f.read_bytes().startswith(b"\x7fELF") for f in partial_downloads(dest))


def test_rotation_a_trust_set_of_two_keys_accepts_either(  # noqa: PLR0917 (fixtures)
    server: BackgroundServer,
    client: Client,
    keys: dict[str, KeyPair],
    tmp_path: Path,
    prebake: PrebakeCli,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    publish_dir(client, tmp_path / "old", LLAMA3_8B_INF2, keys["a"])
    publish_dir(client, tmp_path / "new", OTHER, keys["b"], seed=1)
    publish_dir(client, tmp_path / "rogue", replace(LLAMA3_8B_INF2, batch_size=2), keys["c"], seed=2)
    trust = ["--trust", str(keys["a"].public), "--trust", str(keys["b"].public)]
    for args, dest in ((KEY_ARGS, "old"), (OTHER_ARGS, "new")):
        ran = prebake(
            "--server", server.address, "ensure", *args, "--dest", str(tmp_path / "d" / dest), *trust
        )
        assert ran.code == 0, ran.err
    rogue = [*KEY_ARGS[:-5], "2", *KEY_ARGS[-4:]]
    ran = prebake(
        "--server", server.address, "ensure", *rogue, "--dest", str(tmp_path / "d" / "rogue"), *trust
    )
    assert ran.code == UNTRUSTED and keys["c"].key_id in ran.err
    # The same trust set from the environment (a path list), as a deploy host configures it.
    monkeypatch.setenv("PREBAKE_TRUST", os.pathsep.join([str(keys["a"].public), str(keys["b"].public)]))
    ran = prebake("--server", server.address, "fetch", *OTHER_ARGS, "--dest", str(tmp_path / "env"))
    assert ran.code == 0, ran.err
    ran = prebake("--server", server.address, "fetch", *rogue, "--dest", str(tmp_path / "env-rogue"))
    assert ran.code == UNTRUSTED and placed_nothing(tmp_path / "env-rogue")


def test_a_bad_trust_file_is_a_usage_error(
    server: BackgroundServer, tmp_path: Path, prebake: PrebakeCli
) -> None:
    junk = tmp_path / "junk.pub"
    junk.write_text("not a key\n")
    ran = prebake(
        "--server", server.address, "ensure", *KEY_ARGS, "--dest", str(tmp_path / "d"), "--trust", str(junk)
    )
    assert ran.code == 2 and "is not a PEM public key" in ran.err


# The server's policy ------------------------------------------------------------------------


def test_the_server_refuses_bad_and_unwanted_signatures_and_publishes_nothing(
    keys: dict[str, KeyPair], tmp_path: Path
) -> None:
    with (
        background_server(
            tmp_path / "data", require_signatures=True, signer_keys=f"{keys['a'].public},{keys['b'].public}"
        ) as server,
        Client(server.address) as client,
    ):
        directory = make_artifact_dir(tmp_path / "src", {"model.neff": 100})
        files = client.upload_directory(directory)
        resolved = client.lookup(LLAMA3_8B_INF2, on_miss="report").key

        def nothing_published() -> bool:
            return client.lookup(LLAMA3_8B_INF2, on_miss="report").status == registry_pb2.LOOKUP_STATUS_MISS

        with pytest.raises(PermissionDenied, match="accepts only signed artifacts"):
            client.publish_artifact(LLAMA3_8B_INF2, files)
        good = sign_manifest(keys["a"].load(), resolved, files)
        flipped = replace(good, signature=bytes([good.signature[0] ^ 1]) + good.signature[1:])
        with pytest.raises(InvalidArgument, match="does not verify"):
            client.publish_artifact(LLAMA3_8B_INF2, files, signature=flipped)
        other_files = [registry_pb2.ArtifactFile(path="x", digest=files[0].digest)]
        with pytest.raises(InvalidArgument, match="does not verify"):  # signed for other files
            client.publish_artifact(LLAMA3_8B_INF2, other_files, signature=good)
        with pytest.raises(InvalidArgument, match="not 'ed25519:'"):
            client.publish_artifact(LLAMA3_8B_INF2, files, signature=replace(good, key_id="rsa:1"))
        with pytest.raises(PermissionDenied, match="not one of this server's signer keys"):
            client.publish_artifact(
                LLAMA3_8B_INF2, files, signature=sign_manifest(keys["c"].load(), resolved, files)
            )
        assert nothing_published()

        stored = client.publish_artifact(LLAMA3_8B_INF2, files, signature=good).artifact
        assert stored.signature.key_id == keys["a"].key_id
        # Without a public key the server finds it in its signer set.
        again = client.publish_artifact(LLAMA3_8B_INF2, files, signature=replace(good, public_key=b""))
        assert not again.created


def test_a_revoked_signer_is_not_served_and_its_artifacts_give_way_to_a_rebuild(
    keys: dict[str, KeyPair], tmp_path: Path, prebake: PrebakeCli
) -> None:
    data = tmp_path / "data"
    with background_server(data) as server, Client(server.address) as client:
        artifact_id = publish_dir(client, tmp_path / "src", LLAMA3_8B_INF2, keys["a"])
        client.pin_artifact(artifact_id)
    revoked = keys["a"].key_id
    with background_server(data, revoked_signers=revoked) as server, Client(server.address) as client:
        response = client.lookup(LLAMA3_8B_INF2)
        assert response.status == registry_pb2.LOOKUP_STATUS_MISS
        assert f"signed by revoked key {revoked}" in response.error
        with pytest.raises(FailedPrecondition, match=f"revoked key {revoked}"):
            client.get_artifact(artifact_id)
        ran = prebake(
            "--server", server.address, "fetch", "--artifact", artifact_id, "--dest", str(tmp_path / "d")
        )
        assert ran.code == 1 and revoked in ran.err and placed_nothing(tmp_path / "d")
        # The revoked key publishes nothing more.
        with pytest.raises(PermissionDenied, match="revoked"):
            publish_dir(client, tmp_path / "src2", LLAMA3_8B_INF2, keys["a"], seed=3)

        # The lookup enqueued the rebuild; a worker signing with the new key completes it (a
        # made-up output through the real lease and complete rpcs) and replaces the artifact.
        job = response.job
        lease = client.lease_job(
            "rebuilder", [workers_pb2.Capability(kind=job.key.key.kind, toolchain=job.key.key.toolchain)]
        )
        assert lease.job.job_id == job.job_id
        files = client.upload_directory(make_artifact_dir(tmp_path / "rebuilt", {"model.neff": 700}, seed=4))
        done = client.complete_job(
            job.job_id,
            lease.fencing_token,
            files,
            signature=sign_manifest(keys["b"].load(), lease.job.key, files),
        )
        assert done.artifact.signature.key_id == keys["b"].key_id
        hit = client.lookup(LLAMA3_8B_INF2)
        assert hit.status == registry_pb2.LOOKUP_STATUS_HIT and hit.artifact.pinned  # the pin is kept
        assert verify_artifact(TrustSet.load([keys["b"].public]), hit.artifact) == keys["b"].key_id


def test_a_bad_server_signing_setting_is_refused_at_start_up(tmp_path: Path, prebake: PrebakeCli) -> None:
    ran = prebake("serve", "--data-dir", str(tmp_path / "d"), "--revoked-signer", "ed25519:nothex")
    assert ran.code == 2 and "revoked_signers" in ran.err
    ran = prebake("serve", "--data-dir", str(tmp_path / "d"), "--signing-key", str(tmp_path / "missing.key"))
    assert ran.code == 2 and "signing_key" in ran.err and "cannot read key file" in ran.err


def test_the_manifest_archive_keeps_the_signer(keys: dict[str, KeyPair]) -> None:
    artifact = make_artifact()
    signature = keys["a"].load().sign(artifact.artifact_id, artifact.key.canonical, artifact.manifest_digest)
    signed = replace(artifact, signature=signature)
    assert manifest_archive.decode(manifest_archive.encode(signed)) == signed


# Workers ------------------------------------------------------------------------------------


def test_a_worker_with_a_bad_signing_key_does_not_start(tmp_path: Path, server: BackgroundServer) -> None:
    from prebake.compiler.probe import BackendStatus, WorkerSetupError
    from prebake.compiler.worker import Worker, WorkerConfig

    junk = tmp_path / "junk.key"
    junk.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    config = WorkerConfig(server=server.address, work_dir=tmp_path / "w", signing_key=junk)
    status = BackendStatus("inductor", True, toolchain="torch-2.13.0", compile_targets=("cpu-avx2",))
    with pytest.raises(WorkerSetupError, match="--signing-key"):
        Worker(config, backends={"inductor": status})


@pytest.mark.slow
def test_a_worker_with_a_signing_key_publishes_artifacts_that_verify(
    server: BackgroundServer, client: Client, keys: dict[str, KeyPair], tiny_model: Path, tmp_path: Path
) -> None:
    key = ArtifactKey(
        kind="inductor", model="tiny/llama", instance_type="ml.c6a.4xlarge",
        sequence_length=32, batch_size=1, precision="fp32",
    )  # fmt: skip
    worker = WorkerProcess(
        server.address, tmp_path, "signer", "--max-jobs", "1", "--signing-key", str(keys["a"].private)
    )
    try:
        result = client.ensure(
            key,
            tmp_path / "dest",
            model_source=str(tiny_model),
            timeout=300,
            trust=TrustSet.load([keys["a"].public]),
        )
        assert worker.proc.wait(timeout=60) == 0, worker.log()
    finally:
        worker.close()
    artifact = client.get_artifact(result.artifact_id)
    assert artifact.signature.key_id == keys["a"].key_id
    assert artifact.producer.worker == worker.worker_id
    with pytest.raises(UntrustedArtifact):
        verify_artifact(TrustSet.load([keys["b"].public]), artifact)


def test_signature_shape_is_checked_before_any_cryptography() -> None:
    bad = Signature(key_id="ed25519:" + "0" * 32, signature=b"short")
    with pytest.raises(InvalidArgument, match="64"):
        bad.check_shape()
