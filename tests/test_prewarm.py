"""Prewarming: matrix files, `prewarm` against a real server, the CLI, and the host cache.

No compile backend is needed: publishing an artifact for a key completes the jobs in
flight for it, so the tests play the compile workers (publish, cancel, or lease and
fail) from another thread while `prewarm` waits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from prebake.client import ArtifactKey, Client
from prebake.client.cli import main
from prebake.client.fetch import new_temp_dir
from prebake.client.hostcache import HostCache
from prebake.client.matrix import MatrixError, PrewarmEntry, load_matrix, parse_matrix
from prebake.client.prewarm import PrewarmProgress, PrewarmRow, prewarm, summarize
from prebake.v1 import blobs_pb2, jobs_pb2, key_pb2, registry_pb2, workers_pb2
from tests.conftest import LLAMA3_8B_INF2, make_artifact_dir, tree

LLAMA = "meta-llama/Meta-Llama-3-8B"
NEURON = workers_pb2.Capability(kind=key_pb2.ARTIFACT_KIND_NEURON, toolchain="neuronx-cc-2")

MATRIX_YAML = """\
kind: neuron
options: {optlevel: 2}
models:
  - model: meta-llama/Meta-Llama-3-8B
    revision: abc123
    model_source: s3://bucket/llama3-8b
  - model: mistralai/Mistral-7B-v0.3
    options: {fast: "yes"}
instance_types: [ml.inf2.48xlarge, ml.trn1.32xlarge]
shapes:
  - {sequence_length: 8192, batch_size: 8}
  - {sequence_length: 4096, batch_size: 4}
tensor_parallel_degrees: [24, 32]
precisions: [bf16]
keys:
  - {kind: awq, model: my/model, precision: int4-awq, instance_type: ml.g5.12xlarge}
"""


def write(tmp_path: Path, name: str, content: object) -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


# Matrix files ------------------------------------------------------------------------


def test_yaml_matrix_is_the_product_of_its_axes_plus_keys(tmp_path: Path) -> None:
    entries = load_matrix(write(tmp_path, "m.yaml", MATRIX_YAML))
    assert len(entries) == 2 * 2 * 2 * 2 * 1 + 1
    first = entries[0]
    assert first == PrewarmEntry(
        ArtifactKey(
            kind="neuron",
            model=LLAMA,
            model_revision="abc123",
            instance_type="ml.inf2.48xlarge",
            sequence_length=8192,
            batch_size=8,
            tensor_parallel_degree=24,
            precision="bf16",
            options={"optlevel": "2"},
        ),
        model_source="s3://bucket/llama3-8b",
    )
    # Nesting order: models, instance types, shapes, degrees, precisions.
    assert [
        (e.key.instance_type, e.key.sequence_length, e.key.tensor_parallel_degree) for e in entries[:4]
    ] == [
        ("ml.inf2.48xlarge", 8192, 24),
        ("ml.inf2.48xlarge", 8192, 32),
        ("ml.inf2.48xlarge", 4096, 24),
        ("ml.inf2.48xlarge", 4096, 32),
    ]
    mistral = entries[8]
    assert mistral.key.model == "mistralai/Mistral-7B-v0.3"
    assert dict(mistral.key.options) == {"optlevel": "2", "fast": "yes"}  # merged, model wins
    assert mistral.model_source == ""
    awq = entries[-1]
    assert (awq.key.kind, awq.key.precision, awq.key.tensor_parallel_degree) == ("awq", "int4-awq", 0)
    assert dict(awq.key.options) == {"optlevel": "2"}  # top-level defaults apply to keys too


def test_json_matrix_parses_like_the_same_yaml(tmp_path: Path) -> None:
    yaml = pytest.importorskip("yaml")
    document = yaml.safe_load(MATRIX_YAML)
    # Any extension: JSON is tried first.
    assert load_matrix(write(tmp_path, "m.json", document)) == load_matrix(
        write(tmp_path, "m.yaml", MATRIX_YAML)
    )
    assert load_matrix(write(tmp_path, "m.matrix", document)) == load_matrix(
        write(tmp_path, "m.json", document)
    )


def test_a_list_of_keys_with_aliases_and_duplicates(tmp_path: Path) -> None:
    key = {"kind": "neuron", "model": LLAMA, "instance_type": "ml.inf2.48xlarge", "tp": 24, "revision": "r1"}
    entries = load_matrix(write(tmp_path, "keys.json", [key, dict(key), {**key, "model_source": "/w"}]))
    assert entries == [
        PrewarmEntry(
            ArtifactKey(
                kind="neuron",
                model=LLAMA,
                model_revision="r1",
                instance_type="ml.inf2.48xlarge",
                tensor_parallel_degree=24,
            ),
            model_source="/w",  # a duplicate that names its weights is preferred
        )
    ]


def test_duplicates_across_product_and_keys_are_dropped() -> None:
    document = {
        "kind": "neuron",
        "models": [LLAMA, LLAMA],
        "instance_types": ["ml.inf2.48xlarge"],
        "shapes": [{"sequence_length": 8192, "batch_size": 8}],
        "tensor_parallel_degrees": [24],
        "precisions": ["bf16", "bf16"],
        "keys": [
            {
                "model": LLAMA,
                "instance_type": "ml.inf2.48xlarge",
                "sequence_length": 8192,
                "batch_size": 8,
                "tensor_parallel_degree": 24,
                "precision": "bf16",
            }
        ],
    }
    assert parse_matrix(document) == [PrewarmEntry(LLAMA3_8B_INF2)]


def test_omitted_axes_leave_fields_unset_but_tp_defaults_to_1() -> None:
    [entry] = parse_matrix({"kind": "awq", "models": ["my/model"]})
    assert entry.key == ArtifactKey(kind="awq", model="my/model", tensor_parallel_degree=1)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"kind": "neuron", "models": [LLAMA], "shape": []}, r"m\.json: shape: unknown field"),
        ({"models": [LLAMA]}, r"models\[0\]\.kind: no kind"),
        ({"kind": "neuron", "models": [{"revision": "x"}]}, r"models\[0\]\.model: `model` is required"),
        ({"kind": "neuron", "models": [{"model": LLAMA, "weights": "/w"}]}, r"models\[0\]\.weights: unknown"),
        (
            {"kind": "neuron", "models": [LLAMA], "shapes": [{"sequence_length": 1}, {"batch_size": "8"}]},
            r"shapes\[1\]\.batch_size: expected an integer, got str '8'",
        ),
        (
            {"kind": "neuron", "models": [LLAMA], "shapes": [{"batch_size": True}]},
            r"batch_size: expected an integer",
        ),
        ({"kind": "neuron", "models": [LLAMA], "precisions": []}, r"precisions: expected a non-empty list"),
        ({"kind": "neuron", "models": LLAMA}, r"models: expected a non-empty list, got str"),
        (
            {"kind": "neuron", "models": [{"model": LLAMA, "revision": 123}]},
            r"revision: .* got int 123 \(quote it\)",
        ),
        ({"kind": "neuron", "models": [LLAMA], "options": {"x": [1]}}, r"options\.x: expected a string"),
        ({"kind": "neuron", "instance_types": ["ml.inf2.48xlarge"]}, r"instance_types: .* needs `models`"),
        ({"kind": "neuron"}, r"lists no configuration"),
        (
            {"kind": "neuron", "keys": [{"model": LLAMA, "tp": 2, "tensor_parallel_degree": 2}]},
            r"given twice",
        ),
        ({"keys": [{"kind": "neuron", "model": LLAMA, "batch": 8}]}, r"keys\[0\]\.batch: unknown field"),
        ({"keys": []}, r"keys: the list of keys is empty"),
        (42, r"m\.json: expected a mapping .* or a list of keys, got int 42"),
        (
            [
                {"kind": "neuron", "model": LLAMA, "model_source": "/a"},
                {"kind": "neuron", "model": LLAMA, "model_source": "/b"},
            ],
            r"listed twice with different model sources",
        ),
        (
            {
                "kind": "neuron",
                "models": [f"m{i}" for i in range(101)],
                "precisions": [str(i) for i in range(100)],
            },
            r"101 x 1 x 1 x 1 x 100 = 10100 entries is above the limit",
        ),
    ],
)
def test_malformed_matrices_name_the_file_and_the_field(
    tmp_path: Path, document: object, message: str
) -> None:
    with pytest.raises(MatrixError, match=message):
        load_matrix(write(tmp_path, "m.json", document))


def test_unreadable_or_unparsable_files(tmp_path: Path) -> None:
    with pytest.raises(MatrixError, match=r"nope\.yaml: cannot read"):
        load_matrix(tmp_path / "nope.yaml")
    with pytest.raises(MatrixError, match=r"bad\.json: not valid JSON"):
        load_matrix(write(tmp_path, "bad.json", "{kind: neuron"))
    with pytest.raises(MatrixError, match=r"bad\.yaml: not valid YAML"):
        load_matrix(write(tmp_path, "bad.yaml", "kind: [neuron\n"))
    assert issubclass(MatrixError, ValueError)


def test_yaml_needs_pyyaml_but_json_does_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "yaml", None)  # makes `import yaml` fail
    with pytest.raises(MatrixError, match=r"pip install 'prebake\[prewarm\]'"):
        load_matrix(write(tmp_path, "m.yaml", MATRIX_YAML))
    assert len(load_matrix(write(tmp_path, "m.yaml", {"kind": "awq", "models": ["a", "b"]}))) == 2


# Prewarm against a server ------------------------------------------------------------


def publish_for(
    client: Client, tmp_path: Path, key: ArtifactKey | key_pb2.ArtifactKey, seed: int = 0
) -> None:
    if isinstance(key, key_pb2.ArtifactKey):
        key = ArtifactKey.from_proto(key)
    src = make_artifact_dir(
        tmp_path / f"art-{seed}", {"model.neff": 3000 + seed, "config.json": 50}, seed=seed
    )
    client.publish(src, key)


class Completer:
    """Plays the compile workers: once `expected` jobs are being waited for, acts on each."""

    def __init__(self, client: Client, expected: int, act: Callable[[jobs_pb2.Job], None]) -> None:
        self.client = client
        self.expected = expected
        self.act = act
        self.all_waiting = threading.Event()
        self.errors: list[BaseException] = []
        self.snapshots: list[PrewarmProgress] = []
        self.thread = threading.Thread(target=self.run, daemon=True)

    def progress(self, snapshot: PrewarmProgress) -> None:
        self.snapshots.append(snapshot)
        if snapshot.waiting >= self.expected:
            self.all_waiting.set()

    def run(self) -> None:
        try:
            assert self.all_waiting.wait(20), "prewarm never waited for every job"
            for job in self.client.iter_jobs(states=["queued"]):
                self.act(job)
        except BaseException as exc:
            self.errors.append(exc)

    def __enter__(self) -> Completer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(timeout=30)
        assert not self.errors, self.errors


def test_prewarm_reports_hit_compiled_cancelled_and_invalid(client: Client, tmp_path: Path) -> None:
    matrix = {
        "kind": "neuron",
        # With a revision given, the client need not list the S3 prefix (no AWS here).
        "models": [{"model": LLAMA, "model_source": "s3://bucket/llama", "revision": "r7"}],
        "instance_types": ["ml.inf2.48xlarge", "ml.trn1.32xlarge"],
        "shapes": [{"sequence_length": 8192, "batch_size": 8}],
        "tensor_parallel_degrees": [24, 32],
        "precisions": ["bf16"],
        "keys": [
            {
                "model": LLAMA,
                "instance_type": "ml.inf2.48xlarge",
                "sequence_length": 4096,
                "batch_size": 4,
                "tp": 24,
            }
        ],
    }
    entries = parse_matrix(matrix)
    assert len(entries) == 5
    # inf2 tp 24 at the matrix's revision: already there
    publish_for(client, tmp_path, dataclasses.replace(LLAMA3_8B_INF2, model_revision="r7"))

    def act(job: jobs_pb2.Job) -> None:
        if job.key.key.instance_type.endswith("trn1.32xlarge") and job.key.key.tensor_parallel_degree == 32:
            client.cancel_job(job.job_id, reason="not needed this quarter")
        else:
            publish_for(client, tmp_path, job.key.key, seed=job.key.key.sequence_length)

    with Completer(client, expected=3, act=act) as completer:
        rows = prewarm(client, entries, progress=completer.progress, concurrency=4)

    outcomes = [
        (r.key.instance_type, r.key.tensor_parallel_degree, r.key.sequence_length, r.outcome) for r in rows
    ]
    assert outcomes == [
        ("ml.inf2.48xlarge", 24, 8192, "hit"),
        ("ml.inf2.48xlarge", 32, 8192, "invalid"),
        ("ml.trn1.32xlarge", 24, 8192, "compiled"),
        ("ml.trn1.32xlarge", 32, 8192, "cancelled"),
        ("ml.inf2.48xlarge", 24, 4096, "compiled"),
    ]
    hit, invalid, compiled, cancelled, compiled_key = rows
    assert hit.artifact_id == hit.key_digest and hit.lookup_status == "HIT" and hit.compile_target == "inf2"
    assert "ml.inf2.48xlarge has 24 NeuronCores; tensor_parallel_degree=32 does not fit" in invalid.detail
    assert invalid.lookup_status == "" and invalid.resolved is None
    assert compiled.lookup_status == "MISS" and compiled.job_created and compiled.job_id
    assert compiled.artifact_id == compiled.key_digest and compiled.compile_target == "trn1"
    assert client.get_job(compiled.job_id).model_source == "s3://bucket/llama"  # passed along
    assert cancelled.detail == "not needed this quarter"
    assert compiled_key.model_source == ""
    assert summarize(rows) == {"hit": 1, "compiled": 2, "cancelled": 1, "invalid": 1}
    final = completer.snapshots[-1]
    assert (final.total, final.looked_up, final.done, final.waiting) == (5, 5, 5, 0)
    assert dict(final.counts) == summarize(rows)


def fail_compile(client: Client, key: ArtifactKey, error: str) -> jobs_pb2.Job:
    """Enqueue `key` and fail its job deterministically (no other job may be queued)."""
    job = client.lookup(key).job
    leased = client.lease_job("test-worker", [NEURON])
    assert leased.job.job_id == job.job_id
    return client.fail_job(job.job_id, leased.fencing_token, error, deterministic=True)


def test_prewarm_joins_in_flight_jobs_and_reports_cached_failures(client: Client, tmp_path: Path) -> None:
    failing = dataclasses.replace(LLAMA3_8B_INF2, batch_size=2)
    job = fail_compile(client, failing, "neuronx-cc: out of memory")
    in_flight = client.lookup(LLAMA3_8B_INF2).job

    rows = prewarm(client, [LLAMA3_8B_INF2, failing], wait=False)
    joined, failed = rows
    assert (joined.outcome, joined.job_id, joined.job_created) == ("joined", in_flight.job_id, False)
    assert joined.lookup_status == "COMPILING"
    assert failed.outcome == "failed" and "neuronx-cc: out of memory" in failed.detail
    assert failed.lookup_status == "FAILED"

    # force retries the failed key: a new job, which completes like any other.
    def act(job: jobs_pb2.Job) -> None:
        publish_for(client, tmp_path, job.key.key, seed=job.key.key.batch_size)

    with Completer(client, expected=2, act=act) as completer:
        rows = prewarm(client, [LLAMA3_8B_INF2, failing], force=True, progress=completer.progress)
    assert [r.outcome for r in rows] == ["compiled", "compiled"]
    assert rows[0].job_id == in_flight.job_id and not rows[0].job_created
    assert rows[1].job_created and rows[1].job_id != job.job_id


def test_prewarm_times_out_but_the_jobs_keep_running(client: Client) -> None:
    keys = [dataclasses.replace(LLAMA3_8B_INF2, batch_size=b) for b in (1, 2, 3)]
    started = time.monotonic()
    rows = prewarm(client, keys, timeout=0.5, concurrency=1)
    assert time.monotonic() - started < 10
    assert [r.outcome for r in rows] == ["timeout"] * 3
    assert all("keeps running" in r.detail for r in rows)
    assert all(client.get_job(r.job_id).state == jobs_pb2.JOB_STATE_QUEUED for r in rows)


def test_prewarm_raises_unavailable_when_there_is_no_server() -> None:
    from prebake.client.errors import Unavailable

    with Client("127.0.0.1:9", timeout=1.0, retries=0) as offline, pytest.raises(Unavailable):
        prewarm(offline, [LLAMA3_8B_INF2])


# The CLI -----------------------------------------------------------------------------


@pytest.fixture
def cli(
    client: Client, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., tuple[int, str, str]]:
    monkeypatch.setenv("PREBAKE_SERVER", client.target)
    monkeypatch.delenv("PREBAKE_HOST_CACHE", raising=False)

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_cli_exit_codes(cli: Callable[..., tuple[int, str, str]], client: Client, tmp_path: Path) -> None:
    publish_for(client, tmp_path, LLAMA3_8B_INF2)
    ok = write(
        tmp_path,
        "ok.yaml",
        f"kind: neuron\nmodels: [{LLAMA}]\ninstance_types: [ml.inf2.48xlarge]\n"
        "shapes: [{sequence_length: 8192, batch_size: 8}]\n"
        "tensor_parallel_degrees: [24]\nprecisions: [bf16]\n",
    )
    code, out, _ = cli("prewarm", str(ok), "-q")
    assert code == 0
    header, row, summary = out.strip().splitlines()
    assert header.split() == [
        "MODEL",
        "KIND",
        "INSTANCE/TARGET",
        "SEQ",
        "BATCH",
        "TP",
        "PRECISION",
        "OUTCOME",
        "DETAIL",
    ]
    assert row.split()[:8] == [LLAMA, "neuron", "ml.inf2.48xlarge/inf2", "8192", "8", "24", "bf16", "hit"]
    assert summary == "1 key: 1 hit"

    document = {
        "kind": "neuron",
        "models": [LLAMA],
        "instance_types": ["ml.inf2.48xlarge"],
        "shapes": [{"sequence_length": 8192, "batch_size": 8}],
        "tensor_parallel_degrees": [24, 32],
        "precisions": ["bf16"],
    }
    with_invalid = write(tmp_path, "inv.json", document)
    code, out, _ = cli("prewarm", str(with_invalid), "-q")
    assert code == 1
    assert "invalid" in out and "tensor_parallel_degree=32 does not fit" in out
    assert out.strip().endswith("2 keys: 1 hit, 1 invalid")
    code, out, _ = cli("prewarm", str(with_invalid), "-q", "--skip-invalid")
    assert code == 0
    assert "does not fit" not in out and out.strip().endswith("2 keys: 1 hit (1 invalid not shown)")

    code, out, _ = cli("prewarm", str(with_invalid), "--json", "-q")
    data = json.loads(out)
    assert code == 1 and data["exit_code"] == 1
    assert data["counts"] == {"hit": 1, "invalid": 1} and data["keys"] == 2
    assert [r["outcome"] for r in data["rows"]] == ["hit", "invalid"]
    assert data["rows"][0]["artifact_id"] == data["rows"][0]["key_digest"]

    # A cached compile failure: exit 5, even next to an invalid row.
    failing = dataclasses.replace(LLAMA3_8B_INF2, batch_size=2)
    fail_compile(client, failing, "compiler crashed")
    invalid = {**_key_json(LLAMA3_8B_INF2), "tensor_parallel_degree": 32}
    keys = write(tmp_path, "keys.json", [_key_json(failing), _key_json(LLAMA3_8B_INF2), invalid])
    code, out, _ = cli("prewarm", str(keys), "-q")
    assert code == 5
    assert "compiler crashed" in out and out.strip().endswith("3 keys: 1 hit, 1 failed, 1 invalid")

    # --no-wait: enqueued is fine.
    fresh = write(tmp_path, "fresh.json", [{**_key_json(LLAMA3_8B_INF2), "batch_size": 16}])
    code, out, err = cli("prewarm", str(fresh), "--no-wait")
    assert code == 0 and "enqueued" in out and "job j" in out
    assert "prewarm: " in err  # the progress line

    code, _, err = cli("prewarm", str(write(tmp_path, "bad.json", {"kind": "neuron", "modls": []})))
    assert code == 2 and "bad.json: modls: unknown field" in err


def _key_json(key: ArtifactKey) -> dict[str, object]:
    return {**dataclasses.asdict(key), "options": dict(key.options)}


def test_cli_timeout_exit_code(cli: Callable[..., tuple[int, str, str]], tmp_path: Path) -> None:
    fresh = write(tmp_path, "fresh.json", [_key_json(LLAMA3_8B_INF2)])
    code, out, _ = cli("prewarm", str(fresh), "--wait-timeout", "0.3", "-q")
    assert code == 1 and "timeout" in out and "keeps running" in out


# Host mode ---------------------------------------------------------------------------


def published_artifact(client: Client, tmp_path: Path) -> tuple[Path, registry_pb2.Artifact]:
    src = make_artifact_dir(
        tmp_path / "src", {"model.neff": 200_000, "sub/weights.bin": 50_000, "copy.bin": 0}
    )
    (src / "copy.bin").write_bytes((src / "sub/weights.bin").read_bytes())  # a duplicate blob
    (src / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (src / "run.sh").chmod(0o755)
    artifact = client.publish(src, LLAMA3_8B_INF2).artifact
    return src, client.get_artifact(artifact.artifact_id)


def file_digest(artifact: registry_pb2.Artifact, path: str) -> blobs_pb2.Digest:
    return next(f.digest for f in artifact.files if f.path == path)


def unique_bytes(artifact: registry_pb2.Artifact) -> int:
    return sum(size for _, size in {(f.digest.hash, f.digest.size_bytes) for f in artifact.files})


def test_host_mode_fills_the_cache_and_fetch_then_downloads_nothing(client: Client, tmp_path: Path) -> None:
    src, artifact = published_artifact(client, tmp_path)
    cache = HostCache(tmp_path / "cache")
    [row] = prewarm(client, [LLAMA3_8B_INF2], fetch_to_cache=cache)
    assert row.outcome == "hit" and row.cached and row.bytes_cached == unique_bytes(artifact)
    stats = cache.stats()
    assert (stats.blobs, stats.bytes, stats.partial_files) == (3, unique_bytes(artifact), 0)
    for f in artifact.files:
        path = cache.path_for(f.digest)
        assert path is not None and stat.S_IMODE(path.stat().st_mode) == 0o444

    [again] = prewarm(client, [LLAMA3_8B_INF2], fetch_to_cache=cache)
    assert again.cached and again.bytes_cached == 0

    served = client.get_stats().bytes_served
    dest = tmp_path / "dest"
    result = client.fetch(artifact, dest, host_cache=cache)
    assert client.get_stats().bytes_served == served
    # The duplicate file is copied from its twin, as without a cache.
    assert result.bytes_downloaded == 0 and result.bytes_from_cache == unique_bytes(artifact)
    assert tree(dest) == tree(src)
    # Non-executable files are hard links to the cache; the executable one is a copy.
    neff, script = (cache.path_for(file_digest(artifact, name)) for name in ("model.neff", "run.sh"))
    assert neff is not None and script is not None
    assert os.path.samefile(neff, dest / "model.neff")
    assert not os.path.samefile(script, dest / "run.sh")
    assert os.access(dest / "run.sh", os.X_OK) and not os.access(script, os.X_OK)
    assert stat.S_IMODE(neff.stat().st_mode) == 0o444  # fetch did not chmod the cache file

    # ensure uses it as well, and a cache that always copies gives private files.
    copying = HostCache(cache.root, hardlink=False)
    ensured = client.ensure(LLAMA3_8B_INF2, tmp_path / "dest2", host_cache=copying)
    assert ensured.fetch.bytes_from_cache == unique_bytes(artifact) and ensured.fetch.bytes_downloaded == 0
    assert not os.path.samefile(neff, tmp_path / "dest2" / "model.neff")
    assert tree(tmp_path / "dest2") == tree(src)
    assert client.get_stats().bytes_served == served


def test_a_corrupt_cache_entry_is_evicted_and_downloaded_instead(client: Client, tmp_path: Path) -> None:
    src, artifact = published_artifact(client, tmp_path)
    cache = HostCache(tmp_path / "cache")
    for f in artifact.files:
        cache.put_from_server(client, f.digest)
    neff = next(f for f in artifact.files if f.path == "model.neff")
    path = cache.path_for(neff.digest)
    assert path is not None
    path.chmod(0o644)  # cache files are read-only
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF
    path.write_bytes(bytes(data))
    assert cache.path_for(neff.digest) == path  # the size is right: only the hash tells

    served = client.get_stats().bytes_served
    result = client.fetch(artifact, tmp_path / "dest", host_cache=cache)
    assert tree(tmp_path / "dest") == tree(src)
    assert result.bytes_downloaded == neff.digest.size_bytes
    assert result.bytes_from_cache == unique_bytes(artifact) - neff.digest.size_bytes
    assert client.get_stats().bytes_served == served + neff.digest.size_bytes
    assert cache.path_for(neff.digest) is None  # evicted
    assert not cache.put_from_server(client, neff.digest).already_present  # and refilled by the next put
    assert cache.path_for(neff.digest) is not None


def test_cli_fetch_and_ensure_use_the_host_cache(
    cli: Callable[..., tuple[int, str, str]], client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, artifact = published_artifact(client, tmp_path)
    cache_dir = tmp_path / "cache"
    matrix = write(tmp_path, "m.json", [_key_json(LLAMA3_8B_INF2)])
    code, out, _ = cli("prewarm", str(matrix), f"--host-cache={cache_dir}", "-q", "--json")
    assert code == 0 and json.loads(out)["rows"][0]["cached"] is True
    assert json.loads(out)["host_cache"] == str(cache_dir)

    code, out, _ = cli(
        "fetch",
        "--artifact",
        artifact.artifact_id,
        "--dest",
        str(tmp_path / "a"),
        "--host-cache",
        str(cache_dir),
        "--json",
        "-q",
    )
    assert code == 0 and json.loads(out)["fetch"]["bytes_from_cache"] == unique_bytes(artifact)
    assert json.loads(out)["fetch"]["bytes_downloaded"] == 0

    # PREBAKE_HOST_CACHE turns it on for fetch/ensure; --no-host-cache turns it off.
    monkeypatch.setenv("PREBAKE_HOST_CACHE", str(cache_dir))
    code, out, _ = cli("ensure", *_key_args(LLAMA3_8B_INF2), "--dest", str(tmp_path / "b"), "-q")
    assert code == 0 and "from the host cache" in out and "downloaded 0 B" in out
    code, out, _ = cli(
        "fetch",
        "--artifact",
        artifact.artifact_id,
        "--dest",
        str(tmp_path / "c"),
        "--no-host-cache",
        "--json",
        "-q",
    )
    assert code == 0 and json.loads(out)["fetch"]["bytes_from_cache"] == 0
    assert tree(tmp_path / "b") == tree(tmp_path / "c") == tree(src)


def _key_args(key: ArtifactKey) -> list[str]:
    return [
        "--kind", key.kind, "--model", key.model, "--instance-type", key.instance_type,
        "--sequence-length", str(key.sequence_length), "--batch-size", str(key.batch_size),
        "--tp", str(key.tensor_parallel_degree), "--precision", key.precision,
    ]  # fmt: skip


# HostCache on its own ----------------------------------------------------------------


def test_concurrent_puts_of_one_blob_download_it_once(client: Client, tmp_path: Path) -> None:
    _, artifact = published_artifact(client, tmp_path)
    digest = next(f.digest for f in artifact.files if f.path == "model.neff")
    cache = HostCache(tmp_path / "cache")
    results = []

    def put() -> None:
        results.append(HostCache(cache.root).put_from_server(client, digest))

    threads = [threading.Thread(target=put) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 6
    assert sum(r.bytes_downloaded for r in results) == digest.size_bytes
    assert sum(not r.already_present for r in results) == 1
    assert sorted(p.name for p in (cache.root / "tmp").iterdir()) == []  # no partials or locks left


def test_path_for_checks_the_size_and_blob_path_the_digest(tmp_path: Path) -> None:
    cache = HostCache(tmp_path / "cache")
    digest = blobs_pb2.Digest(hash="0" * 32, size_bytes=10)
    assert cache.path_for(digest) is None and cache.stats().blobs == 0  # nothing created yet
    assert not (tmp_path / "cache").exists()
    path = cache.blob_path(digest)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"123")
    assert cache.path_for(digest) is None  # wrong size
    assert not cache.place(digest, tmp_path / "out")
    digest.hash = "../../etc/passwd00000000000000000"
    with pytest.raises(ValueError, match="not a blob digest"):
        cache.blob_path(digest)


def test_default_root_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PREBAKE_HOST_CACHE", str(tmp_path / "hc"))
    assert HostCache().root == tmp_path / "hc"
    monkeypatch.delenv("PREBAKE_HOST_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert HostCache().root == tmp_path / "xdg" / "prebake" / "blobs"


def test_a_resumed_fetch_never_appends_into_a_cache_file(client: Client, tmp_path: Path) -> None:
    src, artifact = published_artifact(client, tmp_path)
    cache = HostCache(tmp_path / "cache")
    neff = next(f for f in artifact.files if f.path == "model.neff")
    cache.put_from_server(client, neff.digest)
    cached = cache.path_for(neff.digest)
    assert cached is not None
    # An earlier fetch with the cache was interrupted after linking model.neff.
    dest = tmp_path / "dest"
    tmp = new_temp_dir(dest, artifact.artifact_id)
    os.link(cached, tmp / "model.neff")
    client.fetch(artifact, dest)  # now without the cache
    assert tree(dest) == tree(src)
    assert not os.path.samefile(cached, dest / "model.neff")
    assert cached.read_bytes() == (src / "model.neff").read_bytes()
    assert stat.S_IMODE(cached.stat().st_mode) == 0o444


def test_prewarm_rows_are_frozen_and_ok_reflects_the_outcome() -> None:
    row = PrewarmRow(LLAMA3_8B_INF2, "compiled")
    assert row.ok and not PrewarmRow(LLAMA3_8B_INF2, "timeout").ok
