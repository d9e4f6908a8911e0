"""The model and instance catalogs: listing, and the key checks they drive."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prebake.client import ArtifactKey, Client, errors
from prebake.server.app import BackgroundServer
from prebake.v1 import catalog_pb2, registry_pb2
from tests.conftest import make_artifact_dir

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


def test_models_list_the_jumpstart_table_with_its_support_flags(client: Client) -> None:
    models = client.list_models()
    assert len(models) == 73
    by_id = {m.jumpstart_model_id: m for m in models}
    llama = by_id["meta-textgeneration-llama-3-70b"]
    assert llama.family == "LLaMA"
    assert (llama.quantization, llama.speculative_decoding, llama.sagemaker_draft_model) == (
        catalog_pb2.SUPPORT_YES,
        catalog_pb2.SUPPORT_YES,
        catalog_pb2.SUPPORT_YES,
    )
    assert by_id["huggingface-llm-falcon-180b-bf16"].quantization == catalog_pb2.SUPPORT_NO
    assert by_id["huggingface-llm-phi-2"].speculative_decoding == catalog_pb2.SUPPORT_UNKNOWN
    quantizable = client.list_models(quantization_only=True)
    assert len(quantizable) == 71 and all(m.quantization == catalog_pb2.SUPPORT_YES for m in quantizable)
    assert {m.family for m in client.list_models(family="mistral")} == {"Mistral"}


def test_instance_types_list_the_catalog(client: Client) -> None:
    types = {t.name: t for t in client.list_instance_types()}
    assert len(types) == 22
    inf2 = types["ml.inf2.48xlarge"]
    assert (inf2.total_cores, inf2.compile_target, inf2.accelerator_memory_gib) == (24, "inf2", 384)
    assert types["ml.c6a.4xlarge"].compile_target == "cpu-avx2"


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="shared/reference is not beside the checkout")
def test_packaged_tables_are_the_reference_tables() -> None:
    data = Path(__file__).resolve().parents[1] / "server" / "prebake" / "server" / "data"
    for name in ("jumpstart_models.csv", "instances.csv"):
        assert (data / name).read_text() == (REFERENCE / name).read_text(), name


def awq(model: str) -> ArtifactKey:
    return ArtifactKey(kind="awq", model=model, instance_type="ml.g5.12xlarge")


def test_awq_for_a_model_without_quantization_support_is_refused(client: Client) -> None:
    with pytest.raises(errors.InvalidArgument, match="does not support quantization"):
        client.lookup(awq("huggingface-llm-falcon-180b-chat-bf16"))
    assert client.list_jobs().jobs == []
    # The same model compiled for Neuron is fine: only quantization is unsupported.
    neuron = ArtifactKey(
        kind="neuron",
        model="huggingface-llm-falcon-180b-chat-bf16",
        instance_type="ml.trn2.48xlarge",
        sequence_length=4096,
        batch_size=1,
        tensor_parallel_degree=64,
    )
    assert client.lookup(neuron, on_miss="report").status == registry_pb2.LOOKUP_STATUS_MISS


def test_unknown_jumpstart_ids_are_refused_with_suggestions(client: Client) -> None:
    with pytest.raises(errors.InvalidArgument, match="did you mean meta-textgeneration-llama-3-8b"):
        client.lookup(awq("meta-textgeneration-llama-3-8bb"))
    # Hugging Face repo ids are not JumpStart ids and are not checked against the table.
    assert (
        client.lookup(awq("my-org/my-finetune"), on_miss="report").status == registry_pb2.LOOKUP_STATUS_MISS
    )


def test_importing_a_sagemaker_style_precompiled_set(client: Client, tmp_path: Path) -> None:
    # The published examples: Llama 3 8B on ml.inf2.48xlarge at 8192/8, 70B on ml.trn1.32xlarge at tp 32.
    keys = [
        ArtifactKey(
            kind="neuron",
            model="meta-textgeneration-llama-3-8b",
            instance_type="ml.inf2.48xlarge",
            sequence_length=8192,
            batch_size=8,
            tensor_parallel_degree=24,
        ),
        ArtifactKey(
            kind="neuron",
            model="meta-textgeneration-llama-3-70b",
            instance_type="ml.trn1.32xlarge",
            sequence_length=8192,
            batch_size=4,
            tensor_parallel_degree=32,
        ),
    ]
    for i, key in enumerate(keys):
        src = make_artifact_dir(
            tmp_path / f"set{i}", {"compiled/model.neff": 2000, "config.json": 100}, seed=i
        )
        assert client.publish(src, key, producer_note="imported from a SageMaker precompiled set").created
        assert client.lookup(key).status == registry_pb2.LOOKUP_STATUS_HIT


def test_catalog_command(server: BackgroundServer) -> None:
    env = {**os.environ, "PREBAKE_SERVER": server.address}
    cmd = [sys.executable, "-m", "prebake.client.cli", "catalog"]
    models = subprocess.run(
        [*cmd, "models", "--family", "Gemma"], env=env, capture_output=True, text=True, check=False
    )
    assert (
        models.returncode == 0
        and "huggingface-llm-gemma-7b" in models.stdout
        and "QUANTIZATION" in models.stdout
    )
    instances = subprocess.run(
        [*cmd, "instances", "--json"], env=env, capture_output=True, text=True, check=False
    )
    assert instances.returncode == 0
    names = [t["name"] for t in json.loads(instances.stdout)["instance_types"]]
    assert "ml.trn1.32xlarge" in names


def test_import_command_publishes_a_precompiled_set(
    server: BackgroundServer, client: Client, tmp_path: Path
) -> None:
    make_artifact_dir(
        tmp_path / "set" / "llama3-8b", {"compiled/model.neff": 3000, "config.json": 10}, seed=1
    )
    make_artifact_dir(
        tmp_path / "set" / "llama3-70b", {"compiled/model.neff": 5000, "config.json": 10}, seed=2
    )
    entries = [
        {
            "path": "llama3-8b",
            "kind": "neuron",
            "model": "meta-textgeneration-llama-3-8b",
            "instance_type": "ml.inf2.48xlarge",
            "sequence_length": 8192,
            "batch_size": 8,
            "tensor_parallel_degree": 24,
            "note": "SageMaker precompiled set",
        },
        {
            "path": "llama3-70b",
            "kind": "neuron",
            "model": "meta-textgeneration-llama-3-70b",
            "instance_type": "ml.trn1.32xlarge",
            "sequence_length": 8192,
            "batch_size": 4,
            "tensor_parallel_degree": 32,
        },
        {
            "path": "missing-dir",
            "kind": "neuron",
            "model": "meta-textgeneration-llama-3-8b",
            "instance_type": "ml.inf2.48xlarge",
            "sequence_length": 4096,
            "batch_size": 1,
            "tensor_parallel_degree": 2,
        },
    ]
    set_file = tmp_path / "set" / "precompiled-set.json"
    set_file.write_text(json.dumps(entries))
    env = {**os.environ, "PREBAKE_SERVER": server.address}
    cmd = [sys.executable, "-m", "prebake.client.cli", "import", str(set_file), "--json"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 1, "one entry failed"
    imported = json.loads(result.stdout)["imported"]
    assert [r["created"] for r in imported] == [True, True, False]
    assert imported[2]["error"] and "missing-dir" in imported[2]["error"]
    artifact = client.get_artifact(imported[0]["artifact_id"])
    assert artifact.producer.note == "SageMaker precompiled set"
    assert {f.path for f in artifact.files} == {"compiled/model.neff", "config.json"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"kind": "neuron"}]))
    usage = subprocess.run([*cmd[:-2], str(bad)], env=env, capture_output=True, text=True, check=False)
    assert usage.returncode == 2 and "path" in usage.stderr
