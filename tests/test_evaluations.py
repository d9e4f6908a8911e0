"""Evaluations over the wire: ImportEvaluation, ListEvaluations and GetArtifact against real
servers on loopback, their validation, their lifetime (deleted with the artifact, kept across a
restart), and the CLI (`prebake show`, `prebake evaluations list|import`). What is stored, paged,
deleted and kept runs on every registry backend (SQLite, and DynamoDB + S3 on moto in server
mode, the replica hit cache included); the rest on SQLite."""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from prebake.client import Client, errors, exitcodes
from prebake.core.evaluation_records import LevelMetrics
from prebake.server import evaluation_messages
from prebake.server.app import BackgroundServer, background_server
from prebake.server.records import Evaluation
from prebake.v1 import evaluations_pb2
from tests.conftest import LLAMA3_8B_INF2, REGISTRY_BACKENDS, make_artifact_dir, registry_settings
from tests.plugin_cli import PrebakeCli

# An evaluation in protobuf JSON form, as `prebake evaluations import` reads it.
SAMPLE: dict[str, Any] = {
    "workload": {"promptTokens": 128, "outputTokens": 32, "requests": 8, "concurrencyLevels": [1, 4]},
    "host": {
        "hostname": "bench-1",
        "cpuModel": "Intel Xeon Platinum 8488C",
        "cpuCount": 8,
        "instanceType": "c7i.2xlarge",
        "runtimeVersions": {"torch": "2.13.0", "python": "3.12"},
    },
    "price": {
        "instanceType": "c7i.2xlarge",
        "hourlyUsd": 0.357,
        "discountRate": 0.1,
        "priceSource": "table:2026-11-01",
        "inputOutputRatio": 3.0,
    },
    "levels": [
        {
            "concurrency": c,
            "requests": 8,
            "clientInvocations": 8,
            "durationSeconds": 4.0 / c,
            "inputTokens": "1024",
            "outputTokens": "256",
            "ttftMs": {"p50": 40.0 * c, "p90": 50.0 * c, "p99": 61.5 * c},
            "itlMs": {"p50": 9.5 + c, "p90": 11.0 + c, "p99": 14.0 + c},
            "clientLatencyMs": {"p50": 350.0, "p90": 400.0, "p99": 480.0},
            "inputTokensPerSecond": 256.0 * c,
            "outputTokensPerSecond": 64.0 * c,
            "inputTokensPerSecondPerRequest": {"p50": 300.0, "p90": 320.0, "p99": 330.0},
            "outputTokensPerSecondPerRequest": {"p50": 80.0, "p90": 90.0, "p99": 95.0},
            "pricePerMillionInputTokens": 0.1 / c,
            "pricePerMillionOutputTokens": 0.4 / c,
            "blendedPricePerMillionTokens": 0.175 / c,
        }
        for c in (1, 4)
    ],
    "source": "sagemaker benchmark 2026-11-30",
}


def sample(**changes: Any) -> evaluations_pb2.Evaluation:
    data = copy.deepcopy(SAMPLE)
    data.update(changes)
    return json_format.ParseDict(data, evaluations_pb2.Evaluation())


ON_EVERY_BACKEND = pytest.mark.parametrize("server", REGISTRY_BACKENDS, indirect=True)


def publish(client: Client, root: Path, batch_size: int = 4) -> str:
    directory = make_artifact_dir(root / f"artifact-{batch_size}", {"model.bin": 2048}, seed=batch_size)
    return client.publish(directory, replace(LLAMA3_8B_INF2, batch_size=batch_size)).artifact.artifact_id


def test_messages_and_records_convert_both_ways_field_by_field() -> None:
    msg = sample()
    evaluation_messages.check(msg, "a" * 32)
    record = Evaluation(
        evaluation_id="ev-1",
        artifact_id="a" * 32,
        model="m",
        created_at=1_700_000_000.25,
        source="import:x",
        request_id="r",
        **evaluation_messages.parts(msg),
    )
    back = evaluation_messages.evaluation(record)
    for name in ("workload", "host", "price", "levels"):
        assert getattr(back, name) == getattr(msg, name), name
    assert (back.evaluation_id, back.artifact_id, back.source, back.request_id) == (
        "ev-1",
        "a" * 32,
        "import:x",
        "r",
    )
    assert abs(back.created_at.ToNanoseconds() - 1_700_000_000_250_000_000) < 1000  # a float has ~240 ns here
    # Every LevelMetrics field of the proto is a record field, and the other way round.
    proto_fields = {f.name for f in evaluations_pb2.LevelMetrics.DESCRIPTOR.fields}
    assert proto_fields == {f.name for f in dataclasses.fields(LevelMetrics)}


@pytest.fixture
def artifact_id(client: Client, tmp_path: Path) -> str:
    return publish(client, tmp_path)


@ON_EVERY_BACKEND
def test_import_stores_what_get_artifact_and_list_return(client: Client, artifact_id: str) -> None:
    stored = client.import_evaluation(artifact_id, sample())
    assert stored.evaluation_id.startswith("ev-") and len(stored.evaluation_id) == 27
    assert stored.artifact_id == artifact_id and stored.created_at.seconds > 0
    assert stored.source == "import:sagemaker benchmark 2026-11-30" and stored.request_id
    assert list(stored.workload.concurrency_levels) == [1, 4]
    assert stored.levels[1].ttft_ms.p99 == 246.0 and stored.host.runtime_versions["torch"] == "2.13.0"
    assert list(client.get_artifact(artifact_id).evaluations) == [stored]
    assert list(client.iter_evaluations(artifact_id=artifact_id)) == [stored]
    model = client.get_artifact(artifact_id).key.key.model
    assert list(client.iter_evaluations(model=model)) == [stored]
    assert list(client.iter_evaluations()) == [stored]
    # Lookup hits stay small.
    hit = client.lookup(replace(LLAMA3_8B_INF2, batch_size=4), on_miss="report")
    assert hit.artifact.artifact_id == artifact_id and not hit.artifact.evaluations


@ON_EVERY_BACKEND
def test_listing_pages_newest_first(client: Client, artifact_id: str) -> None:
    stored = [client.import_evaluation(artifact_id, sample()) for _ in range(3)]
    first = client.list_evaluations(artifact_id=artifact_id, page_size=2)
    assert [e.evaluation_id for e in first.evaluations] == [stored[2].evaluation_id, stored[1].evaluation_id]
    rest = client.list_evaluations(artifact_id=artifact_id, page_size=2, page_token=first.next_page_token)
    assert [e.evaluation_id for e in rest.evaluations] == [
        stored[0].evaluation_id
    ] and not rest.next_page_token
    assert client.list_evaluations(artifact_id="0" * 32).evaluations == []


def _levels(**change: Any) -> list[dict[str, Any]]:
    levels: list[dict[str, Any]] = copy.deepcopy(SAMPLE["levels"])
    path, value = next(iter(change.items()))
    *parents, last = path.split("__")
    target = levels[1]
    for name in parents:
        target = target[name]
    target[last] = value
    return levels


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"levels": []}, "evaluation.levels"),
        ({"levels": [SAMPLE["levels"][0], SAMPLE["levels"][0]]}, "evaluation.levels[1].concurrency"),
        ({"levels": _levels(concurrency=0)}, "evaluation.levels[1].concurrency"),
        ({"levels": _levels(invocationErrors=-1)}, "evaluation.levels[1].invocation_errors"),
        ({"levels": _levels(ttftMs__p90=1000.0)}, "evaluation.levels[1].ttft_ms"),
        ({"levels": _levels(durationSeconds="NaN")}, "evaluation.levels[1].duration_seconds"),
        ({"levels": _levels(itlMs__p99="Infinity")}, "evaluation.levels[1].itl_ms.p99"),
        (
            {"workload": {**SAMPLE["workload"], "concurrencyLevels": [1, 8]}},
            "evaluation.workload.concurrency_levels",
        ),
        ({"price": {**SAMPLE["price"], "discountRate": 1.0}}, "evaluation.price.discount_rate"),
        ({"artifactId": "f" * 32}, "evaluation.artifact_id"),
        ({"source": "x" * 1025}, "evaluation.source"),
    ],
)
def test_invalid_evaluations_are_refused_naming_the_field(
    client: Client, artifact_id: str, changes: dict[str, Any], field: str
) -> None:
    with pytest.raises(errors.InvalidArgument) as refused:
        client.import_evaluation(artifact_id, sample(**changes))
    assert refused.value.field == field and field in str(refused.value)
    assert client.list_evaluations().evaluations == []


def test_unknown_or_malformed_artifacts_are_refused(client: Client) -> None:
    with pytest.raises(errors.NotFound):
        client.import_evaluation("0" * 32, sample())
    with pytest.raises(errors.InvalidArgument) as refused:
        client.import_evaluation("nope", sample())
    assert refused.value.field == "artifact_id"
    with pytest.raises(errors.InvalidArgument, match="not both"):
        client.list_evaluations(artifact_id="0" * 32, model="m")
    with pytest.raises(errors.InvalidArgument, match="page_token"):
        client.list_evaluations(page_token="junk")


@ON_EVERY_BACKEND
def test_deleting_the_artifact_deletes_its_evaluations(client: Client, tmp_path: Path) -> None:
    gone, kept = publish(client, tmp_path, 4), publish(client, tmp_path, 8)
    client.import_evaluation(gone, sample())
    survivor = client.import_evaluation(kept, sample())
    client.delete_artifact(gone)
    assert list(client.iter_evaluations()) == [survivor]
    assert client.list_evaluations(artifact_id=gone).evaluations == []


@pytest.mark.parametrize("backend", REGISTRY_BACKENDS)
def test_evaluations_survive_a_restart(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    # On DynamoDB + S3 the second server has a data dir of its own: only the tables and the bucket
    # carry the evaluation over.
    again = data if backend == "sqlite" else tmp_path / "elsewhere"
    with registry_settings(request, backend, "evals") as settings:
        with background_server(data, **settings) as server, Client(server.address, timeout=30.0) as client:
            artifact_id = publish(client, tmp_path)
            stored = client.import_evaluation(artifact_id, sample())
            model = client.get_artifact(artifact_id).key.key.model
        with background_server(again, **settings) as server, Client(server.address, timeout=30.0) as client:
            assert list(client.get_artifact(artifact_id).evaluations) == [stored]
            assert list(client.iter_evaluations()) == [stored]
            assert list(client.iter_evaluations(model=model)) == [stored]


# --- CLI ------------------------------------------------------------------------------------


def test_cli_import_list_and_show(
    prebake: PrebakeCli, server: BackgroundServer, client: Client, artifact_id: str, tmp_path: Path
) -> None:
    path = tmp_path / "evaluation.json"
    path.write_text(json.dumps(SAMPLE))
    ran = prebake("--server", server.address, "evaluations", "import", str(path), "--artifact", artifact_id)
    assert ran.code == 0, ran.err
    (stored,) = client.iter_evaluations()
    assert stored.evaluation_id in ran.out

    ran = prebake("--server", server.address, "show", artifact_id)
    assert ran.code == 0, ran.err
    assert stored.evaluation_id in ran.out and "CONCURRENCY" in ran.out and "$/M BLENDED" in ran.out
    ran = prebake("--server", server.address, "show", artifact_id, "--json")
    shown = json.loads(ran.out)
    assert shown["evaluations"][0]["evaluation_id"] == stored.evaluation_id

    ran = prebake("--server", server.address, "evaluations", "list", "--artifact", artifact_id)
    assert ran.code == 0 and stored.evaluation_id in ran.out
    ran = prebake("--server", server.address, "evaluations", "list", "--json")
    assert [e["evaluation_id"] for e in json.loads(ran.out)["evaluations"]] == [stored.evaluation_id]


def test_cli_import_refuses_bad_files_with_exit_codes(
    prebake: PrebakeCli, server: BackgroundServer, artifact_id: str, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**SAMPLE, "levels": []}))
    ran = prebake(
        "--server", server.address, "evaluations", "import", str(bad), "--artifact", artifact_id, "--json"
    )
    error = json.loads(ran.out)["error"]
    assert ran.code == exitcodes.INVALID == error["exit_code"]
    assert error["code"] == "INVALID_ARGUMENT" and error["field"] == "evaluation.levels"
    junk = tmp_path / "junk.json"
    junk.write_text("{not json")
    ran = prebake("--server", server.address, "evaluations", "import", str(junk), "--artifact", artifact_id)
    assert ran.code == exitcodes.USAGE and "junk.json" in ran.err and "not JSON" in ran.err
    good = tmp_path / "good.json"
    good.write_text(json.dumps(SAMPLE))
    ran = prebake("--server", server.address, "evaluations", "import", str(good), "--artifact", "0" * 32)
    assert ran.code == exitcodes.NOT_FOUND
    ran = prebake("--server", server.address, "evaluations", "list", "--artifact", "0" * 32, "--model", "m")
    assert ran.code == exitcodes.USAGE


def test_cli_imports_a_sagemaker_style_results_file(
    prebake: PrebakeCli, server: BackgroundServer, client: Client, artifact_id: str, tmp_path: Path
) -> None:
    results = {
        "instance_type": "ml.inf2.48xlarge",
        "hourly_usd": 12.98,
        "input_output_ratio": 3,
        "prompt_tokens": 128,
        "output_tokens": 32,
        "requests": 8,
        "metrics": [
            {
                "Concurrency": c,
                "Time to first token (ms)": {"p50": 41 * c, "p90": 55 * c, "p99": 70 * c},
                "Inter-token latency (ms)": 9.8,
                "Client latency (ms)": 350,
                "Input tokens per second": 410 * c,
                "Output tokens per second": 102 * c,
                "Client invocations": 8,
                "Client invocation errors": 0,
                "Tokenizer failures": 0,
                "Empty inference responses": 0,
                "Price per million input tokens": 0.9 / c,
                "Price per million output tokens": 3.6 / c,
            }
            for c in (1, 8)
        ],
    }
    path = tmp_path / "sagemaker.json"
    path.write_text(json.dumps(results))
    ran = prebake(
        "--server",
        server.address,
        "evaluations",
        "import",
        str(path),
        "--artifact",
        artifact_id,
        "--source",
        "job 12",
    )
    assert ran.code == 0, ran.err
    (stored,) = client.iter_evaluations(artifact_id=artifact_id)
    assert stored.source == "import:job 12" and list(stored.workload.concurrency_levels) == [1, 8]
    assert stored.price.hourly_usd == 12.98 and stored.host.instance_type == "ml.inf2.48xlarge"
    assert stored.levels[1].ttft_ms.p90 == 440 and stored.levels[1].itl_ms.p99 == 9.8
    assert stored.levels[0].output_tokens_per_second == 102
    # An unknown metric is named.
    path.write_text(json.dumps({**results, "metrics": [{"Concurrency": 1, "Goodput": 3}]}))
    ran = prebake("--server", server.address, "evaluations", "import", str(path), "--artifact", artifact_id)
    assert ran.code == exitcodes.USAGE and "Goodput" in ran.err
