"""Compatibility policies in lookup, table-driven, through a real server.

Each case publishes some artifacts, looks one key up with some policies allowed, and
states which artifact (if any) must answer and under which policy. The rules: exact
first; a Neuron artifact for a longer sequence length serves a shorter request only
with `longer_sequence`; inf2 <-> trn1 (both NeuronCore-v2) only with
`neuroncore_v2_family`; trn2 never shares; everything else must be equal; among several,
the smallest sufficient sequence length, then the requested compile target.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from prebake.client import ArtifactKey, Client
from prebake.v1 import registry_pb2
from tests.conftest import make_artifact_dir

BASE = ArtifactKey(
    kind="neuron",
    model="meta-llama/Meta-Llama-3-8B",
    instance_type="ml.inf2.48xlarge",
    sequence_length=4096,
    batch_size=8,
    tensor_parallel_degree=24,
    precision="bf16",
)
INF2 = {"instance_type": "ml.inf2.48xlarge"}
TRN1 = {"instance_type": "ml.trn1.32xlarge"}
TRN2 = {"instance_type": "ml.trn2.48xlarge"}
LONGER = "longer_sequence"
V2 = "neuroncore_v2_family"


def key(**changes: object) -> ArtifactKey:
    return dataclasses.replace(BASE, **changes)  # type: ignore[arg-type]


# (id, published keys, requested key, allowed policies, index of the expected artifact or None, policy)
CASES = [
    ("exact-only-ignores-longer", [key(sequence_length=8192)], key(), [], None, ""),
    ("longer-serves-shorter", [key(sequence_length=8192)], key(), [LONGER], 0, LONGER),
    ("shorter-never-serves-longer", [key(sequence_length=2048)], key(), [LONGER], None, ""),
    (
        "smallest-sufficient-superset",
        [key(sequence_length=16384), key(sequence_length=8192)],
        key(),
        [LONGER],
        1,
        LONGER,
    ),
    (
        "exact-beats-every-policy",
        [key(sequence_length=8192), key(**TRN1, tensor_parallel_degree=24), key()],
        key(),
        [LONGER, V2],
        2,
        "exact",
    ),
    ("inf2-serves-trn1-when-allowed", [key(**INF2)], key(**TRN1), [V2], 0, V2),
    ("trn1-serves-inf2-when-allowed", [key(**TRN1)], key(**INF2), [V2], 0, V2),
    ("cross-family-needs-the-policy", [key(**TRN1)], key(**INF2), [LONGER], None, ""),
    (
        "trn2-never-matches-trn1",
        [key(**TRN1, tensor_parallel_degree=32)],
        key(**TRN2, tensor_parallel_degree=32),
        [LONGER, V2],
        None,
        "",
    ),
    ("trn1-never-matches-trn2", [key(**TRN2)], key(**TRN1), [V2], None, ""),
    (
        "small-inf2-takes-trn1-artifact-whose-tp-fits",
        [key(**TRN1, tensor_parallel_degree=2)],
        key(instance_type="ml.inf2.xlarge", tensor_parallel_degree=2),
        [V2],
        0,
        V2,
    ),
    (
        "both-policies-at-once",
        [key(**TRN1, sequence_length=8192)],
        key(**INF2),
        [LONGER, V2],
        0,
        f"{LONGER}+{V2}",
    ),
    (
        "shorter-sequence-wins-over-same-target",
        [key(**INF2, sequence_length=16384), key(**TRN1, sequence_length=8192)],
        key(**INF2),
        [LONGER, V2],
        1,
        f"{LONGER}+{V2}",
    ),
    (
        "same-target-wins-a-tie",
        [key(**TRN1, sequence_length=8192), key(**INF2, sequence_length=8192)],
        key(**INF2),
        [LONGER, V2],
        1,
        LONGER,
    ),
    ("batch-size-must-match", [key(sequence_length=8192, batch_size=4)], key(), [LONGER, V2], None, ""),
    ("tp-must-match", [key(**TRN1, tensor_parallel_degree=32)], key(**INF2), [V2], None, ""),
    ("precision-must-match", [key(sequence_length=8192, precision="fp16")], key(), [LONGER], None, ""),
    ("options-must-match", [key(sequence_length=8192, options={"optlevel": "3"})], key(), [LONGER], None, ""),
    (
        "toolchain-must-match",
        [key(sequence_length=8192, toolchain="neuronx-cc-2.15")],
        key(),
        [LONGER],
        None,
        "",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_compatibility_rules(client: Client, tmp_path: Path, case: tuple) -> None:  # type: ignore[type-arg]
    _, published, requested, allow, expected, policy = case
    ids = []
    for i, k in enumerate(published):
        src = make_artifact_dir(tmp_path / f"a{i}", {"model.neff": 100 + i}, seed=i)
        ids.append(client.publish(src, k).artifact.artifact_id)
    answer = client.lookup(requested, on_miss="report", allow=allow)
    if expected is None:
        assert answer.status == registry_pb2.LOOKUP_STATUS_MISS
        return
    assert answer.status == registry_pb2.LOOKUP_STATUS_HIT
    assert answer.artifact.artifact_id == ids[expected]
    assert answer.matched_policy == policy
    assert answer.artifact.files and answer.artifact.key.digest == ids[expected]
    if policy != "exact":
        assert answer.key.digest != ids[expected], "the response keeps the requested key"
        assert "serves your" in answer.match_reason or "shares NeuronCore-v2" in answer.match_reason


def test_a_policy_hit_creates_no_job_and_a_miss_enqueues_the_exact_key(
    client: Client, tmp_path: Path
) -> None:
    client.publish(make_artifact_dir(tmp_path / "a", {"w": 1}), key(sequence_length=8192))
    hit = client.lookup(key(), allow=[LONGER])
    assert hit.status == registry_pb2.LOOKUP_STATUS_HIT and not hit.job.job_id
    assert client.list_jobs().jobs == []
    miss = client.lookup(key(sequence_length=16384), allow=[LONGER])
    assert miss.status == registry_pb2.LOOKUP_STATUS_MISS and miss.job.key.digest == miss.key.digest


@pytest.mark.parametrize(("ask_batch", "ask_seq"), [(1, 0), (8, 0), (64, 4096), (0, 131072)])
def test_awq_artifacts_serve_any_batch_and_sequence_length(
    client: Client, tmp_path: Path, ask_batch: int, ask_seq: int
) -> None:
    awq = ArtifactKey(kind="awq", model="meta-llama/Meta-Llama-3-8B", instance_type="ml.g5.12xlarge")
    published = client.publish(make_artifact_dir(tmp_path / "a", {"w": 1}), awq).artifact.artifact_id
    asked = dataclasses.replace(
        awq, batch_size=ask_batch, sequence_length=ask_seq, instance_type="ml.g6.12xlarge"
    )
    answer = client.lookup(asked, on_miss="report")
    assert answer.status == registry_pb2.LOOKUP_STATUS_HIT and answer.artifact.artifact_id == published
    assert answer.matched_policy == "exact" and "awq keys ignore" in answer.match_reason


def test_unknown_policy_names_are_refused_by_the_client(client: Client) -> None:
    with pytest.raises(ValueError, match="unknown compatibility policies"):
        client.lookup(key(), allow=["close_enough"])
