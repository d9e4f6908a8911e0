"""Client and CLI behaviour that needs no prebake server.

The command line (help, key options, exit codes, an unreachable server), error mapping,
keys, the client's import hygiene, and the transfer logic (resume after UNAVAILABLE or a
stall, verification, atomic placement) against small in-process fakes of the Blobs and
Jobs services that inject the failures a real server cannot be made to produce on cue.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import xxhash

from prebake.client import ArtifactKey, Client, errors, exitcodes
from prebake.client.cli import build_parser, main
from prebake.client.fetch import MARKER, temp_dir_for
from prebake.v1 import blobs_pb2, blobs_pb2_grpc, jobs_pb2, jobs_pb2_grpc, key_pb2, registry_pb2

ROOT = Path(__file__).resolve().parent.parent
KEY_ARGS = ["--kind", "neuron", "--model", "m/x", "--instance-type", "ml.inf2.xlarge"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Command line ---------------------------------------------------------------------------


def _command_paths(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _command_paths(sub, (*prefix, name))


COMMANDS = sorted(_command_paths(build_parser()))


def test_every_command_is_covered() -> None:
    names = {" ".join(path) for path in COMMANDS}
    expected = {"serve", "lookup", "fetch", "ensure", "publish", "ls", "show", "rm", "pin", "stats"}
    expected |= {"jobs", "jobs list", "jobs show", "jobs watch", "jobs cancel"}
    assert expected <= names


@pytest.mark.parametrize("path", [(), *COMMANDS], ids=lambda p: " ".join(p) or "prebake")
def test_help_exits_0_with_description_and_examples(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*path, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: prebake")
    assert "examples:" in out and "exit codes:" in out
    description = out.split("\n\n")[1]
    assert len(description.split()) >= 3, f"no description in {path}: {description!r}"


def test_top_level_help_documents_every_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--help"])
    out = capsys.readouterr().out
    for code in (0, 1, 2, 3, 4, 5, 6, 7):
        assert f"\n  {code} " in out


def test_exit_code_constants_are_distinct_and_as_documented() -> None:
    codes = [exitcodes.OK, exitcodes.ERROR, exitcodes.USAGE, exitcodes.MISS, exitcodes.COMPILING]
    codes += [exitcodes.FAILED, exitcodes.NOT_FOUND, exitcodes.UNAVAILABLE]
    assert codes == [0, 1, 2, 3, 4, 5, 6, 7]
    assert len(set(codes)) == len(codes)


def test_key_options_build_the_key() -> None:
    from prebake.client.commands import key_from_args

    args = build_parser().parse_args(
        [
            *("lookup", *KEY_ARGS, "--sequence-length", "512", "--batch-size", "2", "--tp", "2"),
            *("--precision", "bf16", "--revision", "abc", "--toolchain", "neuronx-cc-2"),
            *("--option", "a=1", "--option", "b=x=y"),
        ]
    )
    key = key_from_args(args)
    assert key == ArtifactKey(
        kind="neuron",
        model="m/x",
        model_revision="abc",
        instance_type="ml.inf2.xlarge",
        sequence_length=512,
        batch_size=2,
        tensor_parallel_degree=2,
        precision="bf16",
        toolchain="neuronx-cc-2",
        options={"a": "1", "b": "x=y"},
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["lookup", *KEY_ARGS, "--option", "x"],
        ["lookup", *KEY_ARGS, "--option", "=1"],
        ["lookup", *KEY_ARGS, "--batch-size", "many"],
        ["lookup", "--model", "m/x"],  # --kind is required
        ["lookup", *KEY_ARGS, "--option", "a=1", "--option", "a=2"],
        ["fetch", "--dest", "d"],  # neither a key nor --artifact
        ["fetch", *KEY_ARGS, "--artifact", "ab" * 16, "--dest", "d"],
        ["jobs", "--state", "sleeping"],
        ["ls", "--kind", "tpu"],
        ["serve", "--max-blob-bytes", "lots"],
        ["frobnicate"],
    ],
)
def test_bad_command_lines_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # Port 9 (discard) is never a prebake server; a usage error must not get as far as connecting.
    assert main(["--server", "127.0.0.1:9", *argv]) == exitcodes.USAGE
    assert "error:" in capsys.readouterr().err


def test_server_option_is_accepted_before_and_after_the_command() -> None:
    parser = build_parser()
    before = parser.parse_args(["--server", "h:1", "--timeout", "3", "stats"])
    after = parser.parse_args(["stats", "--server", "h:1", "--timeout", "3"])
    assert (before.server, before.timeout) == (after.server, after.timeout) == ("h:1", 3.0)
    assert parser.parse_args(["jobs", "--state", "queued", "leased"]).states == ["queued", "leased"]
    assert parser.parse_args(["jobs", "list", "--state", "queued", "--state", "failed"]).states == [
        "queued",
        "failed",
    ]
    assert parser.parse_args(["jobs", "--kind", "awq", "list"]).kind == "awq"


def test_server_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREBAKE_SERVER", "example:1234")
    assert build_parser().parse_args(["stats"]).server == "example:1234"


def test_lookup_against_a_closed_port_exits_7_naming_the_address(capsys: pytest.CaptureFixture[str]) -> None:
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    assert main(["--server", address, "lookup", *KEY_ARGS]) == exitcodes.UNAVAILABLE
    err = capsys.readouterr().err
    assert err.startswith("error: ") and address in err and "prebake serve" in err
    assert time.monotonic() - started < 15, "bounded retries"


def test_main_works_as_a_console_script(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / d) for d in ("proto", "client"))}
    code = "import sys; from prebake.client.cli import main; raise SystemExit(main())"
    result = subprocess.run(
        [sys.executable, "-c", code, "show", "--help"], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and "usage: prebake show" in result.stdout


def test_importing_the_client_loads_no_server_or_heavy_dependency() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / d) for d in ("proto", "client", "server"))}
    code = (
        "import sys, prebake.client, prebake.client.cli, prebake.client.commands;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore', 'sqlite_utils')"
        " or m.startswith('prebake.server'));"
        "print(','.join(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


# Errors and keys --------------------------------------------------------------------------


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


EXPECTED_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.DATA_LOSS: errors.DataLoss,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.QuotaExceeded,
    grpc.StatusCode.ABORTED: errors.Aborted,
    grpc.StatusCode.OUT_OF_RANGE: errors.OutOfRange,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
    grpc.StatusCode.CANCELLED: errors.Cancelled,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.UNIMPLEMENTED: errors.Unimplemented,
    grpc.StatusCode.INTERNAL: errors.Internal,
    grpc.StatusCode.UNKNOWN: errors.PrebakeError,
}


@pytest.mark.parametrize("code", list(grpc.StatusCode), ids=lambda c: c.name)
def test_from_rpc_error_maps_every_status_code(code: grpc.StatusCode) -> None:
    err = errors.from_rpc_error(FakeRpcError(code, f"server says {code.name}"), target="h:1")
    assert type(err) is EXPECTED_ERRORS.get(code, errors.PrebakeError)
    assert isinstance(err, errors.PrebakeError)
    assert str(err) == err.details == f"server says {code.name}"
    assert err.code == code.name
    if code is grpc.StatusCode.UNAVAILABLE:
        assert isinstance(err, errors.Unavailable) and err.target == "h:1"


def test_client_side_errors_belong_to_their_status_family() -> None:
    assert issubclass(errors.DigestMismatch, errors.DataLoss)
    assert issubclass(errors.UnsafeManifest, errors.DataLoss)
    assert issubclass(errors.DestinationExists, errors.FailedPrecondition)
    assert issubclass(errors.CompileFailed, errors.PrebakeError)
    assert issubclass(errors.JobCancelled, errors.PrebakeError)


def test_artifact_key_round_trips_through_the_proto() -> None:
    key = ArtifactKey(
        kind="awq",
        model="meta-llama/Meta-Llama-3-8B",
        model_revision="r1",
        instance_type="ml.g5.12xlarge",
        sequence_length=4096,
        batch_size=4,
        tensor_parallel_degree=4,
        precision="int4-awq",
        toolchain="llmcompressor-0.14",
        options={"group_size": "128", "zero_point": "true"},
    )
    proto = key.to_proto()
    assert proto.kind == key_pb2.ARTIFACT_KIND_AWQ and dict(proto.options) == dict(key.options)
    assert ArtifactKey.from_proto(proto) == key
    assert ArtifactKey.from_proto(key_pb2.ArtifactKey.FromString(proto.SerializeToString())) == key


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("neuron", key_pb2.ARTIFACT_KIND_NEURON),
        ("inductor", key_pb2.ARTIFACT_KIND_INDUCTOR),
        ("AWQ", key_pb2.ARTIFACT_KIND_AWQ),
        ("tpu", key_pb2.ARTIFACT_KIND_UNSPECIFIED),
        ("", key_pb2.ARTIFACT_KIND_UNSPECIFIED),
        ("unspecified", key_pb2.ARTIFACT_KIND_UNSPECIFIED),
    ],
)
def test_unknown_kinds_are_left_for_the_server_to_reject(kind: str, expected: int) -> None:
    assert ArtifactKey(kind=kind, model="m").to_proto().kind == expected


def test_artifact_keys_are_immutable_values() -> None:
    import copy
    import pickle

    options = {"a": "1"}
    key = ArtifactKey(kind="neuron", model="m", options=options)
    options["a"] = "2"
    assert key.options == {"a": "1"}
    assert {key: 1}[ArtifactKey(kind="neuron", model="m", options={"a": "1"})] == 1
    assert copy.deepcopy(key) == key == pickle.loads(pickle.dumps(key))
    with pytest.raises(TypeError):
        key.options["a"] = "3"  # type: ignore[index]


# Transfers against fake services -----------------------------------------------------------

SMALL_CHUNK = 64 << 10


def digest_of(data: bytes) -> blobs_pb2.Digest:
    return blobs_pb2.Digest(hash=xxhash.xxh3_128_hexdigest(data), size_bytes=len(data))


class FakeBlobs(blobs_pb2_grpc.BlobsServicer):
    """An in-memory Blobs service whose next stream can be made to fail, stall or lie."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.uploads: dict[str, bytearray] = {}
        self.read_offsets: list[int] = []
        self.bytes_served = 0
        self.fail_read_after: int | None = None
        self.stall_read_after: int | None = None
        self.corrupt = False
        self.fail_write_at: int | None = None

    def FindMissingBlobs(  # noqa: N802 (rpc name)
        self, request: blobs_pb2.FindMissingBlobsRequest, context: grpc.ServicerContext
    ) -> blobs_pb2.FindMissingBlobsResponse:
        missing = [d for d in request.digests if d.hash not in self.blobs]
        return blobs_pb2.FindMissingBlobsResponse(missing=missing)

    def add(self, data: bytes) -> blobs_pb2.Digest:
        digest = digest_of(data)
        self.blobs[digest.hash] = data
        return digest

    def Read(  # noqa: N802 (rpc name)
        self, request: blobs_pb2.ReadRequest, context: grpc.ServicerContext
    ) -> Iterator[blobs_pb2.ReadResponse]:
        data = self.blobs.get(request.digest.hash)
        if data is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such blob")
        assert data is not None
        if self.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 1])
        self.read_offsets.append(request.offset)
        position, sent = request.offset, 0
        while position < len(data):
            if self.fail_read_after is not None and sent >= self.fail_read_after:
                self.fail_read_after = None
                context.abort(grpc.StatusCode.UNAVAILABLE, "injected: server going away")
            if self.stall_read_after is not None and sent >= self.stall_read_after:
                self.stall_read_after = None
                time.sleep(3)
                return
            chunk = data[position : position + SMALL_CHUNK]
            position += len(chunk)
            sent += len(chunk)
            self.bytes_served += len(chunk)
            yield blobs_pb2.ReadResponse(data=chunk)

    def QueryWriteStatus(  # noqa: N802 (rpc name)
        self, request: blobs_pb2.QueryWriteStatusRequest, context: grpc.ServicerContext
    ) -> blobs_pb2.QueryWriteStatusResponse:
        if request.digest.hash in self.blobs:
            return blobs_pb2.QueryWriteStatusResponse(committed_size=request.digest.size_bytes, complete=True)
        committed = len(self.uploads.get(request.upload_id, b""))
        return blobs_pb2.QueryWriteStatusResponse(committed_size=committed)

    def Write(  # noqa: N802 (rpc name)
        self, request_iterator: Iterator[blobs_pb2.WriteRequest], context: grpc.ServicerContext
    ) -> blobs_pb2.WriteResponse:
        buffer: bytearray | None = None
        digest = None
        for request in request_iterator:
            if buffer is None:
                digest = request.digest
                buffer = self.uploads.setdefault(request.upload_id, bytearray())
                if request.offset != len(buffer):
                    context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, f"offset {request.offset} != {len(buffer)}"
                    )
            buffer += request.data
            if self.fail_write_at is not None and len(buffer) >= self.fail_write_at:
                self.fail_write_at = None
                context.abort(grpc.StatusCode.UNAVAILABLE, "injected: server going away")
            if request.finish_write:
                assert digest is not None
                if xxhash.xxh3_128_hexdigest(bytes(buffer)) != digest.hash:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "digest mismatch")
                self.blobs[digest.hash] = bytes(buffer)
                return blobs_pb2.WriteResponse(committed_size=len(buffer), complete=True)
        return blobs_pb2.WriteResponse(committed_size=len(buffer or b""))


class FakeJobs(jobs_pb2_grpc.JobsServicer):
    """A Jobs service whose first watch stream breaks after two events."""

    def __init__(self) -> None:
        self.watches = 0

    def GetJob(self, request: jobs_pb2.GetJobRequest, context: grpc.ServicerContext) -> jobs_pb2.Job:  # noqa: N802
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not faked")
        raise AssertionError

    def ListJobs(  # noqa: N802 (rpc name)
        self, request: jobs_pb2.ListJobsRequest, context: grpc.ServicerContext
    ) -> jobs_pb2.ListJobsResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not faked")
        raise AssertionError

    def CancelJob(  # noqa: N802 (rpc name)
        self, request: jobs_pb2.CancelJobRequest, context: grpc.ServicerContext
    ) -> jobs_pb2.Job:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not faked")
        raise AssertionError

    def WatchJob(  # noqa: N802 (rpc name)
        self, request: jobs_pb2.WatchJobRequest, context: grpc.ServicerContext
    ) -> Iterator[jobs_pb2.JobEvent]:
        self.watches += 1
        history = [
            jobs_pb2.JobEvent(
                sequence=1, job=jobs_pb2.Job(job_id=request.job_id, state=jobs_pb2.JOB_STATE_QUEUED)
            ),
            jobs_pb2.JobEvent(
                sequence=2,
                job=jobs_pb2.Job(job_id=request.job_id, state=jobs_pb2.JOB_STATE_LEASED, progress=0.5),
            ),
            jobs_pb2.JobEvent(
                sequence=3,
                job=jobs_pb2.Job(
                    job_id=request.job_id, state=jobs_pb2.JOB_STATE_SUCCEEDED, artifact_id="a" * 32
                ),
            ),
        ]
        if self.watches == 1:
            yield from history[:2]
            context.abort(grpc.StatusCode.UNAVAILABLE, "injected: server restarting")
        # A new stream starts with the current state, which the client has already seen.
        yield history[1]
        yield history[2]


@pytest.fixture
def fakes() -> Iterator[tuple[FakeBlobs, FakeJobs, str]]:
    blobs, jobs = FakeBlobs(), FakeJobs()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    blobs_pb2_grpc.add_BlobsServicer_to_server(blobs, server)
    jobs_pb2_grpc.add_JobsServicer_to_server(jobs, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield blobs, jobs, f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


@pytest.fixture
def fake_client(fakes: tuple[FakeBlobs, FakeJobs, str]) -> Iterator[Client]:
    with Client(fakes[2], timeout=5.0, retries=3, idle_timeout=0.5) as client:
        yield client


def make_artifact(
    blobs: FakeBlobs, files: dict[str, bytes], executable: tuple[str, ...] = ()
) -> registry_pb2.Artifact:
    entries = [
        registry_pb2.ArtifactFile(path=path, digest=blobs.add(data), executable=path in executable)
        for path, data in sorted(files.items())
    ]
    artifact_id = xxhash.xxh3_128_hexdigest(json.dumps(sorted(files)).encode())
    return registry_pb2.Artifact(
        artifact_id=artifact_id,
        files=entries,
        file_count=len(entries),
        total_size_bytes=sum(len(d) for d in files.values()),
        manifest_digest=artifact_id,
    )


FILES = {
    "bin/run.sh": b"#!/bin/sh\necho hi\n",
    "model/weights.bin": os.urandom(700_000),
    "model/copy.bin": b"",
    "config.json": b"{}",
}


def read_tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.name != MARKER
    }


def test_fetch_places_verified_files_atomically_with_a_marker(
    fakes, fake_client: Client, tmp_path: Path
) -> None:
    blobs, _, _ = fakes
    artifact = make_artifact(blobs, FILES, executable=("bin/run.sh",))
    dest = tmp_path / "deploy" / "model"
    result = fake_client.fetch(artifact, dest)
    assert read_tree(dest) == FILES
    assert os.access(dest / "bin/run.sh", os.X_OK) and not os.access(dest / "config.json", os.X_OK)
    marker = json.loads((dest / MARKER).read_text())
    assert marker["artifact_id"] == artifact.artifact_id and len(marker["files"]) == len(FILES)
    assert result.bytes_downloaded == result.total_bytes and not result.already_present
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model"]
    again = fake_client.fetch(artifact, dest)
    assert again.already_present and again.bytes_downloaded == 0


def test_fetch_resumes_after_unavailable_mid_stream(fakes, fake_client: Client, tmp_path: Path) -> None:
    blobs, _, _ = fakes
    artifact = make_artifact(blobs, {"big.bin": os.urandom(1_000_000)})
    blobs.fail_read_after = 5 * SMALL_CHUNK
    result = fake_client.fetch(artifact, tmp_path / "out")
    assert blobs.read_offsets == [0, 5 * SMALL_CHUNK]
    assert result.bytes_downloaded == 1_000_000 and blobs.bytes_served == 1_000_000


def test_fetch_resumes_a_stalled_stream(fakes, fake_client: Client, tmp_path: Path) -> None:
    blobs, _, _ = fakes
    data = os.urandom(600_000)
    artifact = make_artifact(blobs, {"big.bin": data})
    blobs.stall_read_after = 3 * SMALL_CHUNK
    started = time.monotonic()
    fake_client.fetch(artifact, tmp_path / "out")
    assert time.monotonic() - started < 2.5, "the idle watchdog, not the server, ended the stalled stream"
    assert blobs.read_offsets == [0, 3 * SMALL_CHUNK]
    assert (tmp_path / "out/big.bin").read_bytes() == data


def test_interrupted_fetch_keeps_partial_data_and_resumes(fakes, fake_client: Client, tmp_path: Path) -> None:
    blobs, _, _ = fakes
    artifact = make_artifact(blobs, FILES)
    dest = tmp_path / "out"

    def interrupt(done: int, total: int) -> None:
        if done >= 300_000:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fake_client.fetch(artifact, dest, progress=interrupt)
    assert not dest.exists()
    assert temp_dir_for(dest, artifact.artifact_id).is_dir()
    result = fake_client.fetch(artifact, dest)
    assert read_tree(dest) == FILES
    assert result.bytes_resumed >= 300_000 - len(FILES["config.json"]) - len(FILES["bin/run.sh"])
    assert result.bytes_resumed + result.bytes_downloaded == result.total_bytes
    assert not temp_dir_for(dest, artifact.artifact_id).exists()


def test_corrupt_download_is_deleted_and_never_placed(fakes, fake_client: Client, tmp_path: Path) -> None:
    blobs, _, _ = fakes
    artifact = make_artifact(blobs, {"a.bin": os.urandom(100_000)})
    blobs.corrupt = True
    with pytest.raises(errors.DigestMismatch):
        fake_client.fetch(artifact, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not (temp_dir_for(tmp_path / "out", artifact.artifact_id) / "a.bin").exists()


@pytest.mark.parametrize("bad", ["../escape", "/etc/passwd", "a/../../b", MARKER])
def test_unsafe_manifest_paths_are_refused_before_writing(
    fakes, fake_client: Client, tmp_path: Path, bad
) -> None:
    blobs, _, _ = fakes
    artifact = make_artifact(blobs, {"ok.txt": b"fine"})
    artifact.files.append(registry_pb2.ArtifactFile(path=bad, digest=blobs.add(b"evil")))
    with pytest.raises(errors.UnsafeManifest):
        fake_client.fetch(artifact, tmp_path / "box" / "out")
    assert not (tmp_path / "box").exists() and not (tmp_path / "escape").exists()


def test_fetch_does_not_replace_other_content_unless_asked(
    fakes, fake_client: Client, tmp_path: Path
) -> None:
    blobs, _, _ = fakes
    artifact = make_artifact(blobs, FILES)
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "mine.txt").write_text("keep")
    with pytest.raises(errors.DestinationExists):
        fake_client.fetch(artifact, dest)
    assert blobs.bytes_served == 0 and (dest / "mine.txt").read_text() == "keep"
    fake_client.fetch(artifact, dest, overwrite=True)
    assert read_tree(dest) == FILES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_fetch_into_an_empty_directory_needs_no_overwrite(fakes, fake_client: Client, tmp_path: Path) -> None:
    blobs, _, _ = fakes
    artifact = make_artifact(blobs, FILES)
    (tmp_path / "out").mkdir()
    fake_client.fetch(artifact, tmp_path / "out")
    assert read_tree(tmp_path / "out") == FILES


def test_concurrent_fetches_to_one_destination_download_once(fakes, tmp_path: Path) -> None:
    blobs, _, address = fakes
    artifact = make_artifact(blobs, FILES)
    results = []

    def fetch() -> None:
        with Client(address) as client:
            results.append(client.fetch(artifact, tmp_path / "out"))

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and read_tree(tmp_path / "out") == FILES
    assert sum(r.bytes_downloaded for r in results) == artifact.total_size_bytes
    assert sum(not r.already_present for r in results) == 1


def test_upload_resumes_after_unavailable_from_the_committed_size(fakes, fake_client: Client) -> None:
    blobs, _, _ = fakes
    data = os.urandom(3 * (1 << 20) + 11)
    digest = digest_of(data)
    blobs.fail_write_at = 2 << 20
    result = fake_client.upload_blob(data, digest)
    assert blobs.blobs[digest.hash] == data
    assert result.bytes_sent == len(data) and result.bytes_resumed == 0 and not result.already_present
    assert fake_client.upload_blob(data, digest).already_present


def test_interrupted_upload_is_resumed_by_a_later_call(fakes, fake_client: Client, tmp_path: Path) -> None:
    blobs, _, _ = fakes
    path = tmp_path / "blob.bin"
    path.write_bytes(os.urandom(3 * (1 << 20)))
    digest = digest_of(path.read_bytes())

    def interrupt(done: int, total: int) -> None:
        if done >= 1 << 20:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        fake_client.upload_blob(path, digest, progress=interrupt)
    assert digest.hash not in blobs.blobs
    committed = fake_client.query_write_status(digest).committed_size
    assert committed >= 1 << 20
    result = fake_client.upload_blob(path, digest)
    assert result.bytes_resumed == committed and result.bytes_sent == digest.size_bytes - committed
    assert blobs.blobs[digest.hash] == path.read_bytes()


def test_watch_job_reconnects_and_skips_events_already_seen(fakes, fake_client: Client) -> None:
    _, jobs, _ = fakes
    seen = [event.sequence for event in fake_client.watch_job("j-1")]
    assert seen == [1, 2, 3] and jobs.watches == 2
    job = fake_client.wait_for_job("j-2")
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED


def test_publish_refuses_symbolic_links(fake_client: Client, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "real.bin").write_bytes(b"x")
    (src / "link.bin").symlink_to(src / "real.bin")
    with pytest.raises(errors.InvalidArgument, match="symbolic link"):
        fake_client.publish(src, ArtifactKey(kind="neuron", model="m"))
