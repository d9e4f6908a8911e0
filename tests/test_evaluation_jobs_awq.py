"""An awq evaluation job end to end: a real tiny AWQ checkpoint, a real server, a real worker and
`prebake evaluate` by key.

Reuses test_awq's module fixtures (one quantization for this module, through the compile
child), publishes the checkpoint under an awq key, and lets a worker that evaluates awq lease
the job, fetch the artifact, run the workload in the evaluation child and store the result.
Checks what the stored evaluation must satisfy whatever the machine's speed; no timing
assertions.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from prebake.client import ArtifactKey, Client
from prebake.client.model_revision import revision_of
from prebake.compiler.awq import AwqBackend
from prebake.compiler.evaluation_metrics import Workload
from prebake.compiler.probe import BackendStatus
from prebake.compiler.worker import Worker, WorkerConfig
from prebake.core import pricing
from prebake.server.app import background_server
from prebake.server.price_table import load_price_table
from tests.plugin_cli import PrebakeCli
from tests.test_awq import ChildRun, awq_key, awq_run, tiny_model
from tests.test_evaluation_jobs import as_measured
from tests.test_evaluation_workload import assert_consistent

__all__ = ["awq_run", "tiny_model"]  # fixtures, used by name

BACKEND = AwqBackend()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not BACKEND.available()[0], reason=BACKEND.available()[1])]
INSTANCE = "ml.g5.xlarge"
PROMPT, OUTPUT, REQUESTS, LEVELS = 8, 4, 3, (1, 2)


def awq_evaluator() -> BackendStatus:
    """What the probe reports for awq here: any target, evaluates."""
    return BackendStatus("awq", True, toolchain=BACKEND.toolchain(), compile_targets=(), evaluates=True)


def test_a_real_awq_evaluation_through_a_worker_and_prebake_evaluate(
    awq_run: ChildRun, tiny_model: Path, tmp_path: Path, prebake: PrebakeCli
) -> None:
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
        worker = Worker(
            WorkerConfig(server=srv.address, work_dir=tmp_path / "work", max_jobs=1, worker_id="w-awq"),
            backends={"awq": awq_evaluator()},
        )
        # Live before the enqueue, whatever the thread's pace: a lease poll that finds nothing.
        assert not c.lease_job("w-probe", [awq_evaluator().capability()]).HasField("job")
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        try:
            ran = prebake(
                "--server", srv.address, "evaluate", "--kind", "awq", "--model", key.model,
                "--revision", key.model_revision, "--instance-type", INSTANCE,
                "--precision", key.precision, "--toolchain", key.toolchain,
                *[a for name, value in key.options.items() for a in ("--option", f"{name}={value}")],
                "--concurrency", ",".join(map(str, LEVELS)), "--requests", str(REQUESTS),
                "--prompt-tokens", str(PROMPT), "--output-tokens", str(OUTPUT),
                "--discount-rate", "0.2", "--wait-timeout", "600", "--json",
            )  # fmt: skip
        finally:
            worker.stop()
            thread.join(timeout=120)
        assert ran.code == 0, ran.err
        out = json.loads(ran.out)
        assert out["job"]["purpose"] == "evaluate" and out["job"]["state"] == "succeeded"
        job = c.get_job(out["job"]["job_id"])
        assert job.artifact_id == artifact_id and job.attempts == 1
        evaluation = c.evaluation_of(job)
        assert out["evaluation"]["evaluation_id"] == evaluation.evaluation_id
        assert evaluation.source == "worker:w-awq" and evaluation.artifact_id == artifact_id
        # Stored with its artifact: GetArtifact carries it.
        stored = c.get_artifact(artifact_id).evaluations
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
        assert_consistent(as_measured(level), Workload(PROMPT, OUTPUT, REQUESTS, LEVELS))
        # The checkpoint ships a tokenizer: every prompt and answer went through it.
        assert (level.invocation_errors, level.empty_responses, level.tokenizer_failures) == (0, 0, 0)
        assert level.output_tokens == REQUESTS * OUTPUT
        assert level.output_tokens_per_second * level.duration_seconds == pytest.approx(level.output_tokens)
        assert level.itl_ms.p50 <= level.client_latency_ms.p50
        assert level.ttft_ms.p50 <= level.client_latency_ms.p50
        assert level.ttft_ms.p99 <= level.client_latency_ms.p99
        blended = pricing.blended_price_per_million_tokens(price, level.concurrency, level.itl_ms.p50)
        assert level.blended_price_per_million_tokens == pytest.approx(blended)
        assert level.blended_price_per_million_tokens > 0
