"""s3:// model sources: the revision from the listing, the worker's download cache, the errors.

Against moto's threaded server (`aws_threaded`), through boto3 over HTTP: nothing here races
conditional writes. Checkpoints are a few small files uploaded with boto3; the end-to-end test
uploads the session's tiny Llama and compiles it with a real `prebake worker` (slow).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import boto3
import pytest

from prebake.client import ArtifactKey, Client
from prebake.client.model_revision import revision_of
from prebake.client.s3_model_revision import (
    S3Checkpoint,
    list_checkpoint,
    revision_of_objects,
    s3_revision_of,
)
from prebake.compiler import s3_model_source
from prebake.compiler.backend import CompileError
from prebake.compiler.model_cache import MARKER, DownloadCache, cached, recorded_revision
from prebake.compiler.model_source import (
    CONTENT_REVISION_RE,
    checked_source,
    resolve_model_source,
    source_revision,
)
from prebake.core.errors import InvalidArgument, PermissionDenied, Unavailable
from prebake.core.s3_urls import parse_s3_url
from prebake.server.app import background_server
from prebake.v1 import jobs_pb2
from tests.aws_emulator import Emulator, running_emulator
from tests.processes import WorkerProcess, free_port

CHECKPOINT = {
    "config.json": b'{"model_type": "llama"}',
    "model.safetensors": b"\x00" * 1000,
    "tokenizer/tokenizer.json": b"tok",
}


def upload(bucket: str, prefix: str, files: dict[str, bytes]) -> str:
    """Put `files` under `prefix` of `bucket`; the s3:// URL of the prefix."""
    s3 = boto3.client("s3")
    for rel, data in files.items():
        s3.put_object(Bucket=bucket, Key=prefix + rel, Body=data)
    return f"s3://{bucket}/{prefix}"


def write_files(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def files_of(root: Path) -> dict[str, bytes]:
    """The checkpoint files under `root` (the cache's hidden marker excluded)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.name != MARKER
    }


def stats(root: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every file: equal before and after means nothing was written."""
    return {p.as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def bucket(aws_threaded: Emulator) -> str:
    return aws_threaded.create_bucket("models")


@pytest.fixture
def model_source_roots(bucket: str) -> str:
    """Lookups to the `server` fixture may name sources in this module's bucket."""
    return f"s3://{bucket}"


@pytest.fixture
def url(bucket: str) -> str:
    return upload(bucket, "llama/", CHECKPOINT)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    return tmp_path / "work"


def job_cache(work: Path, job: str = "job-1") -> DownloadCache:
    """The cache a worker on `work` uses for one job (staging inside the job's directory)."""
    return DownloadCache.in_work_dir(work, work / "worker-1" / job)


# The revision --------------------------------------------------------------------------------


def test_the_revision_comes_from_the_listing_and_depends_on_content_not_location(
    aws_threaded: Emulator, bucket: str, url: str, tmp_path: Path
) -> None:
    revision = s3_revision_of(url)
    assert CONTENT_REVISION_RE.fullmatch(revision)
    assert s3_revision_of(url.rstrip("/")) == revision  # stable, however the prefix is spelled
    listing = list_checkpoint(parse_s3_url(url))
    assert [o.path for o in listing.objects] == sorted(CHECKPOINT)
    assert [o.size for o in listing.objects] == [len(CHECKPOINT[o.path]) for o in listing.objects]
    assert listing.revision == revision == revision_of_objects(reversed(listing.objects))

    # Same bytes uploaded the same way elsewhere: the same ETags, so the same revision.
    elsewhere = upload(aws_threaded.create_bucket("copy"), "deep/copy/of/llama/", CHECKPOINT)
    assert s3_revision_of(elsewhere) == revision
    # A scheme of its own: never the local revision of the same files by accident.
    assert revision != revision_of(write_files(tmp_path / "local", CHECKPOINT))


def test_the_revision_changes_with_any_object(bucket: str, url: str) -> None:
    base = s3_revision_of(url)
    variants = {
        "one-byte": {**CHECKPOINT, "model.safetensors": b"\x00" * 999 + b"\x01"},
        "added": {**CHECKPOINT, "extra.txt": b""},
        "removed": {k: v for k, v in CHECKPOINT.items() if k != "tokenizer/tokenizer.json"},
        "moved": {
            **{k: v for k, v in CHECKPOINT.items() if k != "tokenizer/tokenizer.json"},
            "tok.json": b"tok",
        },
    }
    revisions = {name: s3_revision_of(upload(bucket, f"{name}/", files)) for name, files in variants.items()}
    assert base not in revisions.values()
    assert len(set(revisions.values())) == len(revisions)

    upload(bucket, "llama/", {"model.safetensors": b"\x00" * 999 + b"\x02"})  # rewritten in place
    assert s3_revision_of(url) not in {base, *revisions.values()}


def test_hidden_objects_folder_markers_and_sibling_prefixes_do_not_count(bucket: str, url: str) -> None:
    base = s3_revision_of(url)
    upload(
        bucket,
        "llama/",
        {".gitattributes": b"x", ".cache/huggingface/x.lock": b"", "tokenizer/.DS_Store": b"y"},
    )
    upload(bucket, "llama/", {"tokenizer/": b""})  # a "folder" as the S3 console makes them
    upload(bucket, "llama-2/", {"config.json": b"{}"})  # shares the key prefix "llama", not the folder
    assert s3_revision_of(url) == base


# The worker's copy --------------------------------------------------------------------------


def test_a_checkpoint_is_downloaded_once_per_revision(url: str, work: Path, tmp_path: Path) -> None:
    revision = s3_revision_of(url)
    first = job_cache(work, "job-1")
    path = checked_source(url, revision, first)
    assert path == first.entry(revision)
    assert files_of(path) == CHECKPOINT
    # The marker is hidden: the copy's own content revision is that of the same files anywhere.
    assert revision_of(path) == revision_of(write_files(tmp_path / "local", CHECKPOINT))
    assert not first.staging.exists() or not any(first.staging.iterdir()), "staging left behind"

    # Another job (or worker) on the same work dir, same revision: nothing is downloaded.
    before = stats(work)
    assert checked_source(url, revision, job_cache(work, "job-2")) == path
    assert resolve_model_source(url, job_cache(work, "job-3")) == path
    assert stats(work) == before


def test_the_compile_child_accepts_the_copy_by_its_recorded_revision_without_s3(
    url: str, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    revision = s3_revision_of(url)
    path = checked_source(url, revision, job_cache(work))
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")  # S3 gone
    assert source_revision(path) == revision
    assert checked_source(path, revision) == path  # what a backend calls on its request

    # A copy someone changed is not vouched for any more: hashed, and refused.
    (path / "model.safetensors").write_bytes(b"\x01" * 10)
    assert recorded_revision(path) is None and source_revision(path) == revision_of(path)
    with pytest.raises(CompileError, match="not the key's model_revision") as info:
        checked_source(path, revision)
    assert info.value.deterministic


def test_a_changed_source_is_refused_before_anything_is_downloaded(bucket: str, url: str, work: Path) -> None:
    revision = s3_revision_of(url)
    upload(bucket, "llama/", {"model.safetensors": b"\x07" * 1000})
    new = s3_revision_of(url)
    with pytest.raises(CompileError) as info:
        checked_source(url, revision, job_cache(work))
    assert str(info.value) == (
        f"model source {url} has revision {new}, not the key's model_revision {revision}: "
        "the checkpoint changed since the key was made; look it up again with the new revision"
    )
    assert info.value.deterministic
    assert not work.exists(), "something was downloaded"
    # A revision that is no content digest (a commit hash) is not checked.
    assert files_of(checked_source(url, "a" * 40, job_cache(work)))["model.safetensors"] == b"\x07" * 1000


def test_an_object_rewritten_during_the_download_is_refused_and_nothing_installed(
    bucket: str, url: str, work: Path
) -> None:
    listing = list_checkpoint(parse_s3_url(url))
    upload(bucket, "llama/", {"tokenizer/tokenizer.json": b"new tokens"})
    cache = job_cache(work)
    with pytest.raises(CompileError, match="an object changed or was deleted after it was listed") as info:
        s3_model_source.fetch(listing, cache, boto3.client("s3"))
    assert info.value.deterministic
    assert cached(cache, listing.revision) is None and not cache.entry(listing.revision).exists()
    assert not any(cache.staging.iterdir())


def test_a_short_download_is_transient_and_nothing_installed(url: str, work: Path) -> None:
    listing = list_checkpoint(parse_s3_url(url))
    claims_more = tuple(
        replace(o, size=o.size + 1) if o.path == "config.json" else o for o in listing.objects
    )
    wrong = S3Checkpoint(listing.location, claims_more)
    cache = job_cache(work)
    with pytest.raises(CompileError, match=r"config\.json arrived with 23 bytes, S3 listed 24") as info:
        s3_model_source.fetch(wrong, cache, boto3.client("s3"))
    assert not info.value.deterministic
    assert not cache.entry(wrong.revision).exists()


def test_leftovers_of_a_killed_download_never_pass_for_a_checkpoint(url: str, work: Path) -> None:
    revision = s3_revision_of(url)
    cache = job_cache(work)
    # A half download in staging, and an entry that lost files (or never had its marker).
    write_files(cache.staging / f"s3-{revision}", {"config.json": b"{"})
    write_files(cache.entry(revision), {"config.json": CHECKPOINT["config.json"]})
    assert cached(cache, revision) is None
    path = checked_source(url, revision, cache)
    assert path == cache.entry(revision) and files_of(path) == CHECKPOINT
    assert cached(cache, revision) == path


# Errors --------------------------------------------------------------------------------------


def compile_error(url: str, work: Path) -> CompileError:
    with pytest.raises(CompileError) as info:
        checked_source(url, "", job_cache(work))
    return info.value


def test_what_only_the_sources_owner_can_fix_is_deterministic(
    aws_threaded: Emulator, bucket: str, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    absent = aws_threaded.unique_name("absent")
    cases = {
        f"s3://{absent}/llama": f"bucket '{absent}' does not exist at {aws_threaded.endpoint}",
        f"s3://{bucket}/nothing-here": "holds no checkpoint files; check the bucket and the prefix",
        upload(bucket, "weights-only/", {"model.safetensors": b""}): "has no config.json",
        upload(bucket, "odd/", {"config.json": b"{}", "a//b": b""}): "'odd/a//b' cannot be a checkpoint file",
        upload(bucket, "dot/", {"config.json": b"{}", "./config.json": b""}): "'dot/./config.json' cannot be",
        upload(bucket, "up/", {"config.json": b"{}", "a/../b": b""}): "'up/a/../b' cannot be a checkpoint",
        upload(
            bucket, "both/", {"config.json": b"{}", "a": b"", "a/b": b""}
        ): "'a' is both a file and a folder",
        "s3://Not_A_Bucket/x": "is not a valid bucket name",
    }
    for source, says in cases.items():
        error = compile_error(source, work)
        assert says in str(error), (source, str(error))
        assert error.deterministic, source
    monkeypatch.setattr("prebake.client.s3_model_revision.MAX_CHECKPOINT_OBJECTS", 2)
    error = compile_error(upload(bucket, "many/", CHECKPOINT), work)
    assert "holds more than 2 objects" in str(error) and error.deterministic
    assert not work.exists()


@pytest.fixture
def enforcing_auth(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Emulator]:
    """A moto server of its own that checks credentials (the shared ones accept anything)."""
    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "0")
    with running_emulator(serial=False, log_dir=tmp_path) as emulator:
        monkeypatch.delenv("INITIAL_NO_AUTH_ACTION_COUNT")
        for name, value in emulator.env.items():
            monkeypatch.setenv(name, value)
        yield emulator


def test_access_denied_is_deterministic_and_says_which_grants_are_missing(
    enforcing_auth: Emulator, work: Path
) -> None:
    error = compile_error("s3://private-models/llama", work)
    assert "access denied" in str(error) and error.deterministic
    assert "s3:ListBucket on arn:aws:s3:::private-models" in str(error)
    assert "s3:GetObject on arn:aws:s3:::private-models/llama/*" in str(error)
    assert "testing" not in str(error)  # the (fake) access key and secret
    with pytest.raises(PermissionDenied, match="or pass --revision"):
        s3_revision_of("s3://private-models/llama")


def test_an_unreachable_endpoint_is_transient(url: str, work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # boto3's own retries, from its standard settings
    error = compile_error(url, work)
    assert "cannot reach S3 at http://127.0.0.1:" in str(error) and "AWS_ENDPOINT_URL_S3" in str(error)
    assert not error.deterministic
    with pytest.raises(Unavailable, match="or pass --revision"):
        s3_revision_of(url)


def test_an_unusable_aws_configuration_is_transient_and_named(
    url: str, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    error = compile_error(url, work)
    assert "cannot set up an S3 client (ProfileNotFound); check AWS_PROFILE" in str(error)
    assert not error.deterministic
    with pytest.raises(Unavailable, match="or pass --revision"):
        s3_revision_of(url)


def test_without_boto3_the_client_says_what_to_install_and_the_worker_leaves_the_job_to_others(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # as if the aws extra were not installed
    monkeypatch.delitem(sys.modules, "prebake.compiler.s3_model_source")
    with pytest.raises(InvalidArgument, match=r"install prebake\[aws\], or pass --revision"):
        s3_revision_of("s3://models/llama")
    error = compile_error("s3://models/llama", work)
    assert "boto3 is not installed" in str(error) and not error.deterministic


# Through the client and a worker --------------------------------------------------------------

KEY = ArtifactKey(
    kind="inductor",
    model="tiny/llama",
    instance_type="ml.c6a.4xlarge",  # AVX2, like this host
    sequence_length=32,
    batch_size=1,
    precision="fp32",
)


def test_a_lookup_with_an_s3_source_gets_its_revision(client: Client, bucket: str, url: str) -> None:
    response = client.lookup(KEY, model_source=url)
    assert response.key.key.model_revision == s3_revision_of(url)
    assert response.job.model_source == url
    pinned = client.lookup(replace(KEY, model_revision="abc123"), model_source=url)
    assert pinned.key.key.model_revision == "abc123"


@pytest.mark.slow
def test_a_worker_compiles_from_an_s3_source_and_downloads_the_revision_once(
    bucket: str, tiny_model: Path, tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from prebake.compiler.inductor import load_and_run

    url = upload(bucket, "tiny-llama/", {p.name: p.read_bytes() for p in tiny_model.iterdir() if p.is_file()})
    revision = s3_revision_of(url)
    with (
        background_server(tmp_path / "data", model_source_roots=f"s3://{bucket}") as server,
        Client(server.address, timeout=30.0) as client,
    ):
        worker = WorkerProcess(server.address, tmp_path, "s3", "--max-jobs", "2")
        try:
            result = client.ensure(KEY, tmp_path / "dest", model_source=url, timeout=150.0)
            # A second job on the same revision: taken from the cache (the compile then
            # refuses the sequence length, quickly and deterministically).
            too_long = client.lookup(replace(KEY, sequence_length=4096), model_source=url)
            assert worker.proc.wait(timeout=120) == 0, worker.log()
        finally:
            worker.close()
        artifact = client.get_artifact(result.artifact_id)
        assert artifact.key.key.model_revision == revision
        failed = client.get_job(too_long.job.job_id)
        assert failed.state == jobs_pb2.JOB_STATE_FAILED, failed
        assert "max_position_embeddings" in failed.error, failed.error
    log = worker.log()
    assert log.count(f"model source {url}: downloaded") == 1, log
    assert log.count(f"model source {url}: revision {revision} is cached") == 1, log
    assert sorted(os.listdir(worker.work_dir)) == ["model-cache"]  # job directories gone
    assert sorted(os.listdir(worker.work_dir / "model-cache")) == [revision]

    input_ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(7))
    eager: Any = AutoModelForCausalLM.from_pretrained(str(tiny_model), local_files_only=True)
    eager.eval()
    with torch.no_grad():
        expected = eager(input_ids=input_ids, use_cache=False).logits
    torch.testing.assert_close(load_and_run(tmp_path / "dest", input_ids), expected, atol=1e-4, rtol=1e-4)


def test_a_worker_without_the_aws_extra_imports_no_boto3() -> None:
    code = (
        "import sys, prebake.compiler.worker, prebake.compiler.model_source, prebake.client.cli;"
        "aws = ('boto3', 'botocore', 's3transfer');"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in aws)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
