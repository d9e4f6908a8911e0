"""An awq evaluation job end to end: a real tiny AWQ checkpoint, a real server, a real worker and
`prebake evaluate` by key.

Reuses test_awq's module fixtures (one quantization for this module, through the compile
child), publishes the checkpoint under an awq key, and lets a worker that evaluates awq lease
the job, fetch the artifact, run the workload in the evaluation child and store the result.
Checks what the stored evaluation must satisfy whatever the machine's speed; no timing
assertions. A workload beyond the model's positions fails the job (deterministic) instead of
storing an evaluation whose every request failed.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from prebake.client import ArtifactKey, Client, exitcodes
from prebake.client.model_revision import revision_of
from prebake.compiler.awq import AwqBackend
from prebake.compiler.probe import BackendStatus
from prebake.compiler.worker import Worker, WorkerConfig
from prebake.core import pricing
from prebake.core.evaluation_records import EvaluationWorkload
from prebake.server.app import background_server
from prebake.server.price_table import load_price_table
from prebake.v1 import jobs_pb2
from tests.plugin_cli import PrebakeCli, Ran
from tests.test_awq import ChildRun, awq_key, awq_run, tiny_model
from tests.test_evaluation_jobs import as_measured
from tests.test_evaluation_workload import assert_consistent

__all__ = ["awq_run", "tiny_model"]  # fixtures, used by name

BACKEND = AwqBackend()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not BACKEND.available()[0], reason=BACKEND.available()[1])]
INSTANCE = "ml.g5.xlarge"
PROMPT, OUTPUT, REQUESTS, LEVELS = 8, 4, 3, (1, 2)
POSITIONS = 2048  # the tiny Llama's max_position_embeddings (tiny_llama.build_tiny_llama's default)


def awq_evaluator() -> BackendStatus:
    """What the probe reports for awq here: any target, evaluates."""
    return BackendStatus("awq", True, toolchain=BACKEND.toolchain(), compile_targets=(), evaluates=True)


@dataclass(frozen=True)
class Served:
    """A server holding the checkpoint under `key`, and a client of it."""

    client: Client
    artifact_id: str
    key: ArtifactKey


@pytest.fixture
def served(awq_run: ChildRun, tiny_model: Path, tmp_path: Path) -> Iterator[Served]:
    assert awq_run.proc.returncode == 0, awq_run.proc.stderr[-3000:]
    fields = awq_key(model_revision=revision_of(tiny_model))
    key = ArtifactKey(
        kind="awq",
        model=fields["model"],
        model_revision=fields["model_revision"],
        instance_type=INSTANCE,
        precision=fields["precision"],
        toolchain=BACKEND.toolchain(),
        options=fields["options"],
    )
    with (
        background_server(tmp_path / "data", worker_grace_seconds=0.0, lease_seconds=30.0) as srv,
        Client(srv.address, timeout=60.0) as c,
    ):
        artifact_id = c.publish(awq_run.out_dir, key).artifact.artifact_id
        # Live before the enqueue, whatever the worker thread's pace: a lease poll that finds nothing.
        assert not c.lease_job("w-probe", [awq_evaluator().capability()]).HasField("job")
        yield Served(c, artifact_id, key)


def evaluate(served: Served, tmp_path: Path, prebake: PrebakeCli, *workload: str) -> Ran:
    """`prebake evaluate` of the key (by its flags) with `workload`, one real worker serving it."""
    key = served.key
    worker = Worker(
        WorkerConfig(server=served.client.target, work_dir=tmp_path / "work", max_jobs=1, worker_id="w-awq"),
        backends={"awq": awq_evaluator()},
    )
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        return prebake(
            "--server", served.client.target, "evaluate", "--kind", "awq", "--model", key.model,
            "--revision", key.model_revision, "--instance-type", INSTANCE,
            "--precision", key.precision, "--toolchain", key.toolchain,
            *[a for name, value in key.options.items() for a in ("--option", f"{name}={value}")],
            *workload, "--wait-timeout", "600", "--json",
        )  # fmt: skip
    finally:
        worker.stop()
        thread.join(timeout=120)


def test_a_real_awq_evaluation_through_a_worker_and_prebake_evaluate(
    served: Served, tmp_path: Path, prebake: PrebakeCli
) -> None:
    c = served.client
    ran = evaluate(
        served, tmp_path, prebake, "--concurrency", ",".join(map(str, LEVELS)), "--requests", str(REQUESTS),
        "--prompt-tokens", str(PROMPT), "--output-tokens", str(OUTPUT), "--discount-rate", "0.2",
    )  # fmt: skip
    assert ran.code == 0, ran.err
    out = json.loads(ran.out)
    assert out["job"]["purpose"] == "evaluate" and out["job"]["state"] == "succeeded"
    job = c.get_job(out["job"]["job_id"])
    assert job.artifact_id == served.artifact_id and job.attempts == 1
    evaluation = c.evaluation_of(job)
    assert out["evaluation"]["evaluation_id"] == evaluation.evaluation_id
    assert evaluation.source == "worker:w-awq" and evaluation.artifact_id == served.artifact_id
    # Stored with its artifact: GetArtifact carries it.
    stored = c.get_artifact(served.artifact_id).evaluations
    assert [e.evaluation_id for e in stored] == [evaluation.evaluation_id]

    workload = evaluation.workload
    assert (workload.prompt_tokens, workload.output_tokens, workload.requests) == (PROMPT, OUTPUT, REQUESTS)
    assert [level.concurrency for level in evaluation.levels] == list(LEVELS)
    price = load_price_table().price_inputs(INSTANCE, 0.2)
    assert evaluation.price.instance_type == price.instance_type
    assert (evaluation.price.hourly_usd, evaluation.price.discount_rate) == (price.hourly_usd, 0.2)
    assert evaluation.price.price_source == price.price_source
    assert "transformers" in evaluation.host.runtime_versions
    for level in evaluation.levels:
        assert_consistent(as_measured(level), EvaluationWorkload(PROMPT, OUTPUT, REQUESTS, LEVELS))
        # Every request answered, none empty, none the checkpoint's tokenizer could not decode.
        assert (level.invocation_errors, level.empty_responses, level.tokenizer_failures) == (0, 0, 0)
        assert level.output_tokens == REQUESTS * OUTPUT
        assert level.output_tokens_per_second * level.duration_seconds == pytest.approx(level.output_tokens)
        assert level.itl_ms.p50 <= level.client_latency_ms.p50
        assert level.ttft_ms.p50 <= level.client_latency_ms.p50
        assert level.ttft_ms.p99 <= level.client_latency_ms.p99
        blended = pricing.blended_price_per_million_tokens(price, level.concurrency, level.itl_ms.p50)
        assert level.blended_price_per_million_tokens == pytest.approx(blended)
        assert level.blended_price_per_million_tokens > 0


def test_a_workload_beyond_the_models_positions_fails_the_job_and_stores_nothing(
    served: Served, tmp_path: Path, prebake: PrebakeCli
) -> None:
    # The key has no window (awq is weight-only), so only the loaded checkpoint's config can say.
    ran = evaluate(
        served, tmp_path, prebake, "--concurrency", "1", "--requests", "1",
        "--prompt-tokens", str(POSITIONS - 2), "--output-tokens", "4",
    )  # fmt: skip
    assert ran.code == exitcodes.FAILED, ran.err
    job = served.client.get_job(json.loads(ran.out)["job_id"])
    assert job.state == jobs_pb2.JOB_STATE_FAILED and job.purpose == jobs_pb2.JOB_PURPOSE_EVALUATE
    assert job.error_class == jobs_pb2.ERROR_CLASS_DETERMINISTIC and job.attempts == 1
    assert f"2046 prompt + 4 output tokens exceed the model's max_position_embeddings {POSITIONS}" in (
        job.error
    )
    assert not job.evaluation_id
    assert list(served.client.iter_evaluations(artifact_id=served.artifact_id)) == []
