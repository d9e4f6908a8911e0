"""Presets: the shipped catalog loads and validates; a bad row is refused with its line;
`Catalog.ListPresets`/`GetPreset` on a real server (with the registry's artifact and newest
evaluation); `prebake catalog presets`, and `--preset` on `ensure`, `lookup` and `fetch` (a
published artifact's hit)."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from prebake.client import Client, errors, exitcodes
from prebake.client.artifact_key import ArtifactKey
from prebake.server.app import BackgroundServer
from prebake.server.instance_catalog import InstanceCatalog
from prebake.server.model_catalog import ModelCatalog
from prebake.server.presets import Presets
from prebake.server.recommend import Objective
from prebake.v1 import catalog_pb2, evaluations_pb2
from tests.conftest import make_artifact_dir, tree
from tests.plugin_cli import PrebakeCli

CATALOG = InstanceCatalog.load_default()
MODELS = ModelCatalog.load_default()
HEADER = (
    "name,objective,kind,model,instance_type,sequence_length,batch_size,tensor_parallel_degree,precision,"
    "description\n"
)
LOW_LATENCY = ArtifactKey(
    kind="neuron",
    model="meta-llama/Meta-Llama-3-8B",
    instance_type="ml.inf2.48xlarge",
    sequence_length=8192,
    batch_size=1,
    tensor_parallel_degree=24,
    precision="bf16",
)


def test_the_shipped_presets_load_and_validate() -> None:
    presets = Presets.load_default(CATALOG, MODELS)
    names = [p.name for p in presets]
    assert {"llama-3-8b/low-latency", "llama-3-8b/low-cost", "llama-3-70b/high-throughput"} <= set(names)
    assert len(names) == len(set(names)) >= 5
    assert {p.objective for p in presets} == set(Objective)
    for preset in presets:
        assert MODELS.named(preset.key.model) is not None and preset.key.toolchain == ""
        assert preset.description
    low = presets.get("LLaMA-3-8B/low-latency")  # case-insensitive
    assert (low.key.kind, low.key.batch_size, low.key.tensor_parallel_degree) == ("neuron", 1, 24)
    assert [p.name for p in presets.of_model("meta-llama/Meta-Llama-3-70B")] == [
        "llama-3-70b/high-throughput",
        "llama-3-70b/low-latency",
    ]


@pytest.mark.parametrize(
    ("row", "words"),
    [
        ("x/y,latency,neuron,meta-llama/Meta-Llama-3-8B,ml.inf2.48xlarg,8192,1,24,bf16,d", "did you mean"),
        ("x/y,latency,neuron,meta-llama/Meta-Llama-3-8B,ml.inf2.xlarge,8192,1,24,bf16,d", "NeuronCores"),
        (
            "x/y,fastest,neuron,meta-llama/Meta-Llama-3-8B,ml.inf2.48xlarge,8192,1,24,bf16,d",
            "objective 'fastest'",
        ),
        ("x/y,latency,neuron,my/unknown,ml.inf2.48xlarge,8192,1,24,bf16,d", "not in the model catalog"),
        (
            "Bad Name,latency,neuron,meta-llama/Meta-Llama-3-8B,ml.inf2.48xlarge,8192,1,24,bf16,d",
            "<model>/<goal>",
        ),
        (
            "x/y,latency,neuron,meta-llama/Meta-Llama-3-8B,ml.inf2.48xlarge,8192,one,24,bf16,d",
            "batch_size 'one'",
        ),
        ("x/y,latency,neuron,meta-llama/Meta-Llama-3-8B,ml.inf2.48xlarge,8192,1,24,bf16,", "no description"),
    ],
)
def test_a_bad_row_is_refused_with_its_line(row: str, words: str) -> None:
    text = f"# comment\n{HEADER}# another\n{row}\n"
    with pytest.raises(ValueError, match=r"presets\.csv, line 4: ") as info:
        Presets.parse(text, "presets.csv", CATALOG, MODELS)
    assert words in str(info.value)


def test_a_name_twice_is_refused() -> None:
    row = "x/y,latency,neuron,meta-llama/Meta-Llama-3-8B,ml.inf2.48xlarge,8192,1,24,bf16,d\n"
    with pytest.raises(ValueError, match="line 3: preset 'x/y' is listed twice"):
        Presets.parse(HEADER + row + row, "presets.csv", CATALOG, MODELS)


def evaluation() -> evaluations_pb2.Evaluation:
    dist = evaluations_pb2.Distribution(p50=10.0, p90=12.0, p99=15.0)
    return evaluations_pb2.Evaluation(
        workload=evaluations_pb2.EvaluationWorkload(prompt_tokens=128, output_tokens=32, requests=4),
        levels=[
            evaluations_pb2.LevelMetrics(
                concurrency=1,
                requests=4,
                ttft_ms=dist,
                itl_ms=dist,
                client_latency_ms=evaluations_pb2.Distribution(p50=300.0, p90=310.0, p99=320.0),
                output_tokens_per_second=100.0,
            )
        ],
        source="test",
    )


@pytest.fixture
def published(client: Client, tmp_path: Path) -> tuple[str, Path]:
    """An artifact for llama-3-8b/low-latency's key, evaluated; its id and source directory."""
    src = make_artifact_dir(tmp_path / "compiled", {"model.neff": 4096, "config.json": 10})
    artifact_id = client.publish(src, LOW_LATENCY).artifact.artifact_id
    client.import_evaluation(artifact_id, evaluation())
    return artifact_id, src


def test_list_presets_shows_artifact_and_newest_evaluation(
    client: Client, published: tuple[str, Path]
) -> None:
    presets = {p.name: p for p in client.list_presets()}
    low = presets["llama-3-8b/low-latency"]
    assert low.objective == evaluations_pb2.OBJECTIVE_LATENCY and low.artifact_id == published[0]
    assert low.resolved.digest == published[0] and low.evaluation.levels[0].client_latency_ms.p50 == 300.0
    assert low.key.toolchain == "" and low.resolved.key.toolchain  # resolved by the server
    other = presets["llama-3-8b/high-throughput"]
    assert other.artifact_id == "" and not other.HasField("evaluation") and other.resolved.digest
    # By any of the model's names.
    by_jumpstart = client.list_presets("meta-textgeneration-llama-3-8b")
    assert {p.name for p in by_jumpstart} == {n for n in presets if n.startswith("llama-3-8b/")}
    assert client.get_preset("llama-3-8b/low-latency") == low


def test_unknown_preset_is_not_found_with_suggestions(client: Client) -> None:
    with pytest.raises(
        errors.NotFound, match=r"no preset 'llama-3-8b/low-latncy'; did you mean 'llama-3-8b/low-latency'"
    ):
        client.get_preset("llama-3-8b/low-latncy")
    stub = client._conn.stubs.catalog
    with pytest.raises(grpc.RpcError) as info:
        stub.GetPreset(catalog_pb2.GetPresetRequest(name="nope"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_cli_catalog_presets(
    prebake: PrebakeCli, server: BackgroundServer, published: tuple[str, Path]
) -> None:
    ran = prebake("catalog", "presets", "--server", server.address, "--model", "meta-llama/Meta-Llama-3-8B")
    assert ran.code == exitcodes.OK, ran.err
    lines = ran.out.splitlines()
    assert lines[0].split()[:2] == ["PRESET", "OBJECTIVE"]
    low = next(line for line in lines if line.startswith("llama-3-8b/low-latency"))
    assert published[0][:12] in low and "c1: 300 ms" in low
    ran = prebake("catalog", "presets", "--server", server.address, "--json")
    data = json.loads(ran.out)["presets"]
    first = next(p for p in data if p["name"] == "llama-3-70b/high-throughput")
    assert first["objective"] == "throughput" and first["ensure_args"][:4] == [
        "--kind",
        "neuron",
        "--model",
        "meta-llama/Meta-Llama-3-70B",
    ]


def test_cli_ensure_preset(
    prebake: PrebakeCli, server: BackgroundServer, published: tuple[str, Path], tmp_path: Path
) -> None:
    dest = tmp_path / "deploy"
    ran = prebake(
        "ensure",
        "--server",
        server.address,
        "--preset",
        "llama-3-8b/low-latency",
        "--dest",
        str(dest),
        "--json",
        "-q",
    )
    assert ran.code == exitcodes.OK, ran.err
    assert json.loads(ran.out)["artifact_id"] == published[0]
    assert tree(dest) == tree(published[1])
    # Key flags beside --preset, or neither: usage errors; an unknown preset: not found.
    ran = prebake("ensure", "--server", server.address, "--preset", "llama-3-8b/low-latency", "--tp", "8",
                  "--dest", str(tmp_path / "x"), "--json")  # fmt: skip
    assert ran.code == exitcodes.USAGE and "do not also give --tp" in ran.err
    assert json.loads(ran.out)["error"]["code"] == "USAGE"
    ran = prebake("ensure", "--server", server.address, "--dest", str(tmp_path / "x"))
    assert ran.code == exitcodes.USAGE and "--kind, --model (or --preset NAME)" in ran.err
    ran = prebake(
        "ensure", "--server", server.address, "--preset", "llama-3-8b/fast", "--dest", str(tmp_path / "x")
    )
    assert ran.code == exitcodes.NOT_FOUND and "known presets: llama-3-8b/low-latency" in ran.err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("command", ["lookup", "fetch"])
def test_cli_lookup_and_fetch_take_a_preset_as_ensure_does(
    command: str, prebake: PrebakeCli, client: Client, published: tuple[str, Path], tmp_path: Path
) -> None:
    server = client.target
    dest = ["--dest", str(tmp_path / "deploy")] if command == "fetch" else ["--no-enqueue"]
    ran = prebake(command, "--server", server, "--preset", "llama-3-8b/low-latency", *dest, "--json")
    assert ran.code == exitcodes.OK, ran.err
    out = json.loads(ran.out)
    artifact = out["artifact_id"] if command == "fetch" else out["artifact"]["artifact_id"]
    assert out["status"] == "HIT" and artifact == published[0]
    if command == "fetch":
        assert tree(tmp_path / "deploy") == tree(published[1])
    # The preset's key: another preset of the model has no artifact, a miss (and nothing compiles).
    ran = prebake(command, "--server", server, "--preset", "llama-3-8b/high-throughput", *dest)
    assert ran.code == exitcodes.MISS
    assert list(client.iter_jobs()) == []
    # Key flags beside --preset: usage errors, as for ensure; an unknown preset: not found with the
    # closest names; nothing is placed.
    dest = ["--dest", str(tmp_path / "x")] if command == "fetch" else []
    ran = prebake(command, "--server", server, "--preset", "llama-3-8b/low-latency",
                  "--model", "m/x", *dest, "--json")  # fmt: skip
    assert ran.code == exitcodes.USAGE and "do not also give --model" in ran.err
    assert json.loads(ran.out)["error"]["code"] == "USAGE"
    ran = prebake(command, "--server", server, "--preset", "llama-3-8b/low-latency",
                  "--option", "a=b", "--instance-type", "ml.inf2.xlarge", *dest)  # fmt: skip
    # Named as they are typed, in the order of `--help`.
    assert ran.code == exitcodes.USAGE and "do not also give --instance-type, --option" in ran.err
    ran = prebake(command, "--server", server, "--preset", "llama-3-8b/low-latncy", *dest)
    assert ran.code == exitcodes.NOT_FOUND
    assert "did you mean 'llama-3-8b/low-latency'" in ran.err
    assert not (tmp_path / "x").exists()
    assert list(client.iter_jobs()) == []


def test_cli_a_preset_or_an_artifact_or_a_key_never_two_never_none(
    prebake: PrebakeCli, server: BackgroundServer, published: tuple[str, Path], tmp_path: Path
) -> None:
    ran = prebake("fetch", "--server", server.address, "--preset", "llama-3-8b/low-latency",
                  "--artifact", published[0], "--dest", str(tmp_path / "x"))  # fmt: skip
    assert ran.code == exitcodes.USAGE and "not both" in ran.err and "--preset NAME" in ran.err
    ran = prebake("lookup", "--server", server.address, "--no-enqueue")
    assert ran.code == exitcodes.USAGE and "--kind, --model (or --preset NAME)" in ran.err
    assert not (tmp_path / "x").exists()
