"""The model and instance catalogs: listing, and the key checks they drive."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest

from prebake.client import ArtifactKey, Client, errors
from prebake.server.app import BackgroundServer
from prebake.v1 import catalog_pb2, registry_pb2
from tests.conftest import LLAMA3_8B_INF2, make_artifact_dir
from tests.plugin_cli import PrebakeCli

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


# --- One model, one name (issue 11, item 5) ---

JUMPSTART_LLAMA3_8B = dataclasses.replace(LLAMA3_8B_INF2, model="meta-textgeneration-llama-3-8b")


@pytest.mark.parametrize(
    ("published", "looked_up"),
    [(JUMPSTART_LLAMA3_8B, LLAMA3_8B_INF2), (LLAMA3_8B_INF2, JUMPSTART_LLAMA3_8B)],
    ids=["jumpstart-then-hf", "hf-then-jumpstart"],
)
def test_a_publish_under_one_name_of_a_model_is_a_hit_for_the_other(
    client: Client, tmp_path: Path, published: ArtifactKey, looked_up: ArtifactKey
) -> None:
    stored = client.publish(make_artifact_dir(tmp_path / "a", {"model.neff": 64}), published).artifact
    assert stored.key.key.model == "meta-llama/Meta-Llama-3-8B"  # the canonical name is what is stored
    hit = client.lookup(looked_up, on_miss="report")
    assert hit.status == registry_pb2.LOOKUP_STATUS_HIT
    assert hit.artifact.artifact_id == stored.artifact_id
    # Another spelling of the Hugging Face id (the hub resolves ids case-insensitively).
    lower = dataclasses.replace(looked_up, model="meta-llama/meta-llama-3-8b")
    assert client.lookup(lower, on_miss="report").artifact.artifact_id == stored.artifact_id


def test_names_of_one_model_are_near_misses_of_each_other(client: Client, tmp_path: Path) -> None:
    stored = client.publish(make_artifact_dir(tmp_path / "a", {"w": 8}), JUMPSTART_LLAMA3_8B).artifact
    other_batch = dataclasses.replace(LLAMA3_8B_INF2, batch_size=4)
    miss = client.lookup(other_batch, on_miss="report")
    assert miss.status == registry_pb2.LOOKUP_STATUS_MISS
    [near] = miss.nearest
    assert near.artifact_id == stored.artifact_id
    assert [(d.field, d.artifact_value, d.requested_value) for d in near.differences] == [
        ("batch_size", "8", "4")
    ]


def test_artifacts_stored_under_a_non_canonical_name_are_still_found(
    server: BackgroundServer, client: Client, tmp_path: Path
) -> None:
    """Keys stored before names were canonical carry the name as stated then: found on read."""
    from prebake.server.key_normalization import with_model
    from prebake.server.records import NormalizedKey

    # An artifact as the previous version stored it: keyed by the JumpStart id as stated.
    published = client.publish(make_artifact_dir(tmp_path / "a", {"w": 8}), LLAMA3_8B_INF2).artifact
    state = cast(Any, server.running).state
    index = state.storage.artifacts
    canonical = cast(Any, server.call(index.get, published.artifact_id))
    old_key: NormalizedKey = with_model(canonical.key, "meta-textgeneration-llama-3-8b")
    old = dataclasses.replace(canonical, artifact_id=old_key.digest, key=old_key)
    server.call(lambda: index.put(old, expect_manifest=None))
    server.call(
        lambda: index.delete(
            canonical.artifact_id, expect_manifest=canonical.manifest_digest, expect_pinned=False
        )
    )
    for key in (JUMPSTART_LLAMA3_8B, LLAMA3_8B_INF2):
        hit = client.lookup(key, on_miss="report")
        assert hit.status == registry_pb2.LOOKUP_STATUS_HIT, key.model
        assert hit.artifact.artifact_id == old_key.digest
    near = client.lookup(dataclasses.replace(LLAMA3_8B_INF2, batch_size=2), on_miss="report").nearest
    assert [n.artifact_id for n in near] == [old_key.digest]


def test_catalog_models_shows_both_ids(prebake: PrebakeCli, server: BackgroundServer) -> None:
    ran = prebake("--server", server.address, "catalog", "models", "--family", "llama")
    assert ran.code == 0, ran.err
    [row] = [line for line in ran.out.splitlines() if " meta-textgeneration-llama-3-8b " in line + " "]
    assert "meta-llama/Meta-Llama-3-8B" in row.split()
    data = json.loads(prebake("--server", server.address, "catalog", "models", "--json").out)
    by_id = {m["jumpstart_model_id"]: m for m in data["models"]}
    assert by_id["meta-textgeneration-llama-3-8b"]["hf_model_id"] == "meta-llama/Meta-Llama-3-8B"
    assert by_id["huggingface-textgeneration-gpt2"]["aliases"] == ["gpt2"]


def test_the_name_table_names_only_models_of_the_model_table_once() -> None:
    from prebake.server.model_catalog import ModelCatalog

    catalog = ModelCatalog.load_packaged()  # raises for a name of two models or an unknown id
    assert catalog.canonical_name("META-TEXTGENERATION-LLAMA-3-8B") == "meta-llama/Meta-Llama-3-8B"
    assert catalog.canonical_name("my-org/my-finetune") == "my-org/my-finetune"
    assert catalog.other_names("meta-llama/Meta-Llama-3-8B") == ("meta-textgeneration-llama-3-8b",)


def test_the_checks_of_a_model_apply_under_each_of_its_names(client: Client) -> None:
    with pytest.raises(errors.InvalidArgument, match="does not support quantization") as refused:
        client.lookup(awq("tiiuae/falcon-180B-chat"))
    assert "JumpStart huggingface-llm-falcon-180b-chat-bf16" in str(refused.value)
    assert client.list_jobs().jobs == []


def test_a_model_source_mapped_under_any_name_serves_the_canonical_one(tmp_path: Path) -> None:
    from prebake.server.model_sources import ModelSources

    sources = ModelSources.from_config("", "meta-textgeneration-llama-3-8b=/srv/llama3", tmp_path)
    assert sources.resolve("meta-llama/Meta-Llama-3-8B", "") == ("/srv/llama3", False)
