"""Recommendations over the wire: `Registry.Recommend` on a real server with imported evaluations of
several configurations (table-driven: objective, limits, concurrency, filters, policies), its
refusals and validation, and `prebake recommend` (table, ready `ensure` line, --json, exit codes).
The table-driven cases and the refusal run on every registry backend (SQLite, DynamoDB + S3).

The registry: three artifacts of Llama 3 8B with one evaluation each (the newest counts):

- FAST   inf2, 8192 x 1:  concurrency 1 only; the lowest latency (200 ms), dear ($5/M).
- WIDE   inf2, 8192 x 8:  concurrency 1 and 8; the most tokens/s at 8 (600/s, ITL 27 ms), $1.2/M there.
- CHEAP  trn1, 4096 x 4 (tp 24, so it fits inf2.48xlarge too): concurrency 1 and 4; no stored
         blended price, recomputed from $0.76/h: 4 / 18 ms = 222 tok/s -> $0.95/M at 4.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from prebake.client import Client, errors, exitcodes
from prebake.client.artifact_key import ArtifactKey
from prebake.core import pricing
from prebake.core.evaluation_records import PriceInputs
from prebake.server.app import BackgroundServer, background_server
from prebake.v1 import evaluations_pb2, registry_pb2
from tests.conftest import LLAMA3_8B_INF2, REGISTRY_BACKENDS, make_artifact_dir, registry_settings
from tests.plugin_cli import PrebakeCli, Ran

MODEL = "meta-llama/Meta-Llama-3-8B"
FAST_KEY = replace(LLAMA3_8B_INF2, batch_size=1)
WIDE_KEY = LLAMA3_8B_INF2
CHEAP_KEY = replace(LLAMA3_8B_INF2, instance_type="ml.trn1.32xlarge", sequence_length=4096, batch_size=4)


def level(  # noqa: PLR0917 (a row of the table: concurrency, latencies, rate, price)
    concurrency: int,
    client_ms: float,
    ttft_ms: float,
    itl_ms: float,
    tokens_per_second: float,
    blended: float = 0.0,
    errors_: int = 0,
) -> evaluations_pb2.LevelMetrics:
    def dist(p50: float) -> evaluations_pb2.Distribution:
        return evaluations_pb2.Distribution(p50=p50, p90=p50 * 1.2, p99=p50 * 1.5)

    return evaluations_pb2.LevelMetrics(
        concurrency=concurrency,
        requests=16,
        client_invocations=16,
        invocation_errors=errors_,
        duration_seconds=10.0,
        input_tokens=16 * 128,
        output_tokens=16 * 32,
        ttft_ms=dist(ttft_ms),
        itl_ms=dist(itl_ms),
        client_latency_ms=dist(client_ms),
        output_tokens_per_second=tokens_per_second,
        input_tokens_per_second=tokens_per_second * 4,
        blended_price_per_million_tokens=blended,
    )


def evaluation(
    instance_type: str, hourly: float, *levels: evaluations_pb2.LevelMetrics
) -> evaluations_pb2.Evaluation:
    return evaluations_pb2.Evaluation(
        workload=evaluations_pb2.EvaluationWorkload(prompt_tokens=128, output_tokens=32, requests=16),
        host=evaluations_pb2.EvaluationHost(hostname="bench", instance_type=instance_type),
        price=evaluations_pb2.PriceInputs(
            instance_type=instance_type, hourly_usd=hourly, price_source="flag", input_output_ratio=3.0
        ),
        levels=list(levels),
        source="test",
    )


def publish(client: Client, root: Path, key: ArtifactKey, seed: int) -> str:
    directory = make_artifact_dir(root / f"artifact-{seed}", {"model.bin": 1024}, seed=seed)
    return client.publish(directory, key).artifact.artifact_id


@pytest.fixture
def registry(client: Client, tmp_path: Path) -> dict[str, str]:
    """The three artifacts above, evaluated; name -> artifact id."""
    return build_registry(client, tmp_path)


def build_registry(client: Client, tmp_path: Path) -> dict[str, str]:
    ids = {
        "FAST": publish(client, tmp_path, FAST_KEY, 1),
        "WIDE": publish(client, tmp_path, WIDE_KEY, 2),
        "CHEAP": publish(client, tmp_path, CHEAP_KEY, 3),
    }
    # An older evaluation of FAST that would win every objective: only the newest counts.
    client.import_evaluation(
        ids["FAST"], evaluation("ml.inf2.48xlarge", 12.98, level(1, 1.0, 1.0, 1.0, 1e6, 0.01))
    )
    client.import_evaluation(
        ids["FAST"], evaluation("ml.inf2.48xlarge", 12.98, level(1, 200, 20, 5, 40, 5.0))
    )
    client.import_evaluation(
        ids["WIDE"],
        evaluation(
            "ml.inf2.48xlarge", 12.98, level(1, 400, 50, 12, 80, 3.0), level(8, 900, 150, 27, 600, 1.2)
        ),
    )
    client.import_evaluation(
        ids["CHEAP"],
        evaluation("ml.trn1.32xlarge", 0.76, level(1, 500, 60, 14, 70), level(4, 600, 80, 18, 300)),
    )
    return ids


CHEAP_PRICE = pricing.blended_price_per_million_tokens(
    PriceInputs("ml.trn1.32xlarge", 0.76, 0.0, "flag"), 4, 18.0
)

# (request fields, expected artifacts in rank order, the chosen concurrency of the first)
CASES: list[tuple[str, dict[str, Any], list[str], int]] = [
    ("latency", {"objective": "latency"}, ["FAST", "WIDE", "CHEAP"], 1),
    ("throughput", {"objective": "throughput"}, ["WIDE", "CHEAP", "FAST"], 8),
    ("cost", {"objective": "cost"}, ["CHEAP", "WIDE", "FAST"], 4),
    # WIDE's level 8 has ITL 27 ms: excluded, so its level 1 (80 tok/s) ranks below CHEAP's 4.
    (
        "throughput under max_itl_ms",
        {"objective": "throughput", "max_itl_ms": 20},
        ["CHEAP", "WIDE", "FAST"],
        4,
    ),
    ("latency under max_ttft_ms", {"objective": "latency", "max_ttft_ms": 55}, ["FAST", "WIDE"], 1),
    ("concurrency 8", {"objective": "latency", "concurrency": 8}, ["WIDE"], 8),
    ("concurrency 1 cost", {"objective": "cost", "concurrency": 1}, ["CHEAP", "WIDE", "FAST"], 1),
    # CHEAP is compiled for trn1: not served on inf2 unless the NeuronCore-v2 policy allows it.
    ("inf2 only", {"objective": "cost", "instance_types": ["ml.inf2.48xlarge"]}, ["WIDE", "FAST"], 8),
    (
        "inf2 with neuroncore_v2_family",
        {"objective": "cost", "instance_types": ["inf2.48xlarge"], "allow": ["neuroncore_v2_family"]},
        ["CHEAP", "WIDE", "FAST"],
        4,
    ),
    ("sequence 8192", {"objective": "cost", "sequence_length": 8192}, ["WIDE", "FAST"], 8),
    (
        "sequence 2048 with longer_sequence",
        {"objective": "latency", "sequence_length": 2048, "allow": ["longer_sequence"]},
        ["FAST", "WIDE", "CHEAP"],
        1,
    ),
    ("kind awq", {"objective": "cost", "kind": "awq"}, [], 0),
    ("limit 1", {"objective": "cost", "limit": 1}, ["CHEAP"], 4),
    (
        "model by JumpStart id",
        {"objective": "latency", "model": "meta-textgeneration-llama-3-8b"},
        ["FAST", "WIDE", "CHEAP"],
        1,
    ),
]


@pytest.fixture(scope="module", params=REGISTRY_BACKENDS)
def ranked(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Client, dict[str, str]]]:
    """A client of a server on each registry backend holding the registry above, built once per
    backend (the cases below only read it). The rpc reads only the storage seams, so DynamoDB + S3
    must rank every case exactly as SQLite does."""
    tmp = tmp_path_factory.mktemp("ranked")
    with (
        registry_settings(request, request.param, "recommend") as settings,
        background_server(tmp / "data", **settings) as srv,
        Client(srv.address, timeout=30.0) as client,
    ):
        yield client, build_registry(client, tmp)


@pytest.mark.parametrize(("name", "fields", "expected", "concurrency"), CASES, ids=[c[0] for c in CASES])
def test_recommend_picks_the_right_artifact(
    ranked: tuple[Client, dict[str, str]],
    name: str,
    fields: dict[str, Any],
    expected: list[str],
    concurrency: int,
) -> None:
    client, registry = ranked
    fields = dict(fields)
    model = fields.pop("model", MODEL)
    if not expected:
        with pytest.raises(errors.NoRecommendation):
            client.recommend(model, **fields)
        return
    response = client.recommend(model, **fields)
    by_id = {v: k for k, v in registry.items()}
    assert [by_id[c.artifact_id] for c in response.candidates] == expected
    assert response.model == MODEL and response.considered == 3
    top = response.candidates[0]
    assert top.rank == 1 and top.level.concurrency == concurrency
    assert top.reasons and top.evaluation_id.startswith("ev-")
    # The key to ensure gets exactly this artifact, with the policies it names.
    allow = [p for p, v in (("longer_sequence", 1), ("neuroncore_v2_family", 2)) if v in top.ensure_allow]
    hit = client.lookup(top.ensure_key, on_miss="report", allow=allow)
    assert hit.status == registry_pb2.LOOKUP_STATUS_HIT and hit.artifact.artifact_id == top.artifact_id


def test_values_reasons_and_recomputed_price(client: Client, registry: dict[str, str]) -> None:
    response = client.recommend(
        MODEL, "cost", instance_types=["ml.inf2.48xlarge"], allow=["neuroncore_v2_family"]
    )
    top = response.candidates[0]
    assert top.artifact_id == registry["CHEAP"]
    assert (
        top.objective_value == pytest.approx(CHEAP_PRICE)
        and top.blended_price_per_million_tokens == top.objective_value
    )
    assert list(top.ensure_allow) == [registry_pb2.COMPATIBILITY_POLICY_NEURONCORE_V2_FAMILY]
    assert top.ensure_key.instance_type == "ml.inf2.48xlarge" and top.ensure_key.toolchain
    assert top.key.compile_target == "trn1" and top.measured_on == "ml.trn1.32xlarge"
    text = "\n".join(top.reasons)
    assert "best; the next has $1.2000" in text
    assert "recomputed from $0.76/h" in text and "neuroncore_v2_family" in text
    assert "concurrency 4: the best blended price" in text
    # The constraint met is said.
    response = client.recommend(MODEL, "throughput", max_itl_ms=20)
    wide = next(c for c in response.candidates if c.artifact_id == registry["WIDE"])
    assert any("meets max_itl_ms 20" in r for r in wide.reasons)
    assert any("1 level(s) exceed the limits" in r for r in wide.reasons)


def test_exclusions_say_why(client: Client, registry: dict[str, str]) -> None:
    response = client.recommend(MODEL, "cost", instance_types=["ml.inf2.48xlarge"])
    (excluded,) = response.excluded
    assert excluded.artifact_id == registry["CHEAP"]
    assert "compiled for trn1" in excluded.reason and "`allow` neuroncore_v2_family" in excluded.reason


def test_an_unavailable_artifact_is_not_recommended(
    server: BackgroundServer, client: Client, registry: dict[str, str]
) -> None:
    index = cast(Any, server.running).state.storage.artifacts
    fast = cast(Any, server.call(index.get, registry["FAST"]))
    server.call(
        lambda: index.mark_unavailable(fast.artifact_id, "blob lost", expect_manifest=fast.manifest_digest)
    )
    response = client.recommend(MODEL, "latency")
    assert [c.artifact_id for c in response.candidates] == [registry["WIDE"], registry["CHEAP"]]
    assert [(e.artifact_id, e.reason) for e in response.excluded] == [
        (registry["FAST"], "unavailable: blob lost")
    ]


def rpc_error(client: Client, **fields: Any) -> grpc.RpcError:
    stub = client._conn.stubs.registry  # the raw rpc: its status code and details
    with pytest.raises(grpc.RpcError) as info:
        stub.Recommend(registry_pb2.RecommendRequest(**fields), timeout=10)
    return info.value


def test_refusal_names_the_closest(ranked: tuple[Client, dict[str, str]]) -> None:
    client, registry = ranked
    err = rpc_error(client, model=MODEL, objective=evaluations_pb2.OBJECTIVE_LATENCY, max_itl_ms=4)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details() == (
        f"no evaluated artifact of {MODEL} meets max_itl_ms 4: the closest is {registry['FAST']} at "
        "concurrency 1 with TTFT p50 20 ms, ITL p50 5 ms"
    )
    with pytest.raises(errors.NoRecommendation, match="has a level at concurrency 2"):
        client.recommend(MODEL, "latency", concurrency=2)
    with pytest.raises(errors.NoRecommendation, match="serves the filters"):
        client.recommend(MODEL, "latency", sequence_length=2048)


def test_refusal_without_evaluations(client: Client) -> None:
    with pytest.raises(
        errors.NoRecommendation, match="no artifact of meta-llama/Meta-Llama-3-70B has an evaluation"
    ):
        client.recommend("meta-llama/Meta-Llama-3-70B", "cost")


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"model": MODEL}, "objective", "`objective` is required"),
        ({"model": MODEL, "objective": 9}, "objective", "unknown Objective value 9"),
        ({"objective": 1}, "model", "model is required"),
        ({"model": "meta-textgeneration-llama-3-8bb", "objective": 1}, "model", "did you mean"),
        (
            {"model": MODEL, "objective": 1, "instance_types": ["ml.inf2.48xlarg"]},
            "instance_types[0]",
            "did you mean 'ml.inf2.48xlarge'",
        ),
        ({"model": MODEL, "objective": 1, "max_itl_ms": -1}, "max_itl_ms", "0 (no limit) or more"),
        ({"model": MODEL, "objective": 1, "max_ttft_ms": float("nan")}, "max_ttft_ms", "finite"),
        ({"model": MODEL, "objective": 1, "concurrency": -2}, "concurrency", "negative"),
        ({"model": MODEL, "objective": 1, "limit": 101}, "limit", "outside 1-100"),
        ({"model": MODEL, "objective": 1, "kind": 7}, "kind", "unknown ArtifactKind value 7"),
        ({"model": MODEL, "objective": 1, "allow": [5]}, "allow[0]", "unknown CompatibilityPolicy value 5"),
    ],
)
def test_validation_names_the_field(client: Client, fields: dict[str, Any], field: str, words: str) -> None:
    err = rpc_error(client, **fields)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in str(err.details())
    assert errors.from_rpc_error(err).field == field


# --- the CLI ---------------------------------------------------------------------------------


def recommend_cli(prebake: PrebakeCli, server: BackgroundServer, *args: str) -> Ran:
    """`prebake recommend --server ... --model MODEL` with `args` after them."""
    return prebake("recommend", "--server", server.address, "--model", MODEL, *args)


def test_cli_recommend_table_and_ensure_line(
    prebake: PrebakeCli, server: BackgroundServer, registry: dict[str, str]
) -> None:
    ran = recommend_cli(
        prebake,
        server,
        "--objective",
        "cost",
        "--instance-type",
        "ml.inf2.48xlarge",
        "--allow",
        "neuroncore_v2_family",
    )
    assert ran.code == exitcodes.OK, ran.err
    lines = ran.out.splitlines()
    assert lines[0].split()[:3] == ["RANK", "ARTIFACT", "KIND"]
    assert registry["CHEAP"][:12] in lines[1] and "4" in lines[1].split()
    assert "recomputed from $0.76/h" in ran.out
    ensure = next(line.strip() for line in lines if line.strip().startswith("prebake ensure"))
    assert "--kind neuron --model meta-llama/Meta-Llama-3-8B --instance-type ml.inf2.48xlarge" in ensure
    assert "--sequence-length 4096 --batch-size 4 --tp 24 --precision bf16 --toolchain " in ensure
    assert ensure.endswith("--allow neuroncore_v2_family --dest DIR")


def test_cli_recommend_json(prebake: PrebakeCli, server: BackgroundServer, registry: dict[str, str]) -> None:
    ran = recommend_cli(prebake, server, "--objective", "latency", "--json")
    assert ran.code == exitcodes.OK, ran.err
    data = json.loads(ran.out)
    assert [c["artifact_id"] for c in data["candidates"]] == [registry[n] for n in ("FAST", "WIDE", "CHEAP")]
    top = data["candidates"][0]
    assert top["objective_value"] == 200.0 and top["level"]["concurrency"] == 1
    assert top["ensure_args"][:4] == ["--kind", "neuron", "--model", MODEL]
    assert data["ensure_command"].startswith("prebake ensure --kind neuron")


def test_cli_recommend_refusal_and_bad_input(
    prebake: PrebakeCli, server: BackgroundServer, registry: dict[str, str]
) -> None:
    ran = recommend_cli(prebake, server, "--objective", "latency", "--max-itl-ms", "4", "--json")
    assert ran.code == exitcodes.NO_RECOMMENDATION
    error = json.loads(ran.out)["error"]
    assert error["code"] == "FAILED_PRECONDITION" and error["exit_code"] == exitcodes.NO_RECOMMENDATION
    assert "the closest is" in error["message"] and "ITL p50 5 ms" in ran.err
    ran = recommend_cli(prebake, server, "--objective", "cots")
    assert ran.code == exitcodes.INVALID and "did you mean" in ran.err
    ran = recommend_cli(
        prebake, server, "--objective", "cost", "--instance-type", "ml.inf2.48xlarg", "--json"
    )
    error = json.loads(ran.out)["error"]
    assert ran.code == exitcodes.INVALID and error["field"] == "instance_types[0]"
    assert error["message"].startswith("--instance-type: ")
    ran = recommend_cli(prebake, server)
    assert ran.code == exitcodes.USAGE and "--objective" in ran.err
