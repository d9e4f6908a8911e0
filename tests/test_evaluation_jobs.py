"""Evaluation jobs end to end: `EnqueueEvaluation`, workers leasing them, `CompleteEvaluationJob`.

Real servers on loopback. Most tests publish a stand-in artifact (files that are no package)
and play the worker by hand, which is enough for everything the server decides: validation,
"no worker evaluates this", single flight, fencing, restarts. One test compiles the tiny Llama
once (test_inductor's module fixture) and runs a real evaluation through a real worker and
`prebake evaluate`. No timing assertions.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from prebake.client import ArtifactKey, Client, render
from prebake.client.errors import FailedPrecondition, InvalidArgument, NotFound, QuotaExceeded
from prebake.client.model_revision import revision_of
from prebake.compiler.evaluation_run import EVALUATORS
from prebake.compiler.probe import BackendStatus
from prebake.compiler.worker import Worker, WorkerConfig
from prebake.core import pricing
from prebake.core.evaluation_records import Distribution, EvaluationWorkload, LevelMetrics
from prebake.server import evaluation_messages
from prebake.server.app import BackgroundServer, background_server
from prebake.server.config import ServerConfig
from prebake.server.price_table import load_price_table
from prebake.server.records import JobPurpose
from prebake.server.storage.record_json import capabilities_from_json, capabilities_json
from prebake.v1 import evaluations_pb2, jobs_pb2, key_pb2, registry_pb2, workers_pb2
from tests.conftest import make_artifact_dir
from tests.contract.samples import make_artifact, make_evaluation
from tests.plugin_cli import PrebakeCli
from tests.test_evaluation_workload import assert_consistent
from tests.test_inductor import SEQ, ChildRun, fp32_child, tiny_model

__all__ = ["fp32_child", "tiny_model"]  # fixtures, used by name

INSTANCE = "ml.c6a.4xlarge"
KEY = ArtifactKey(
    kind="inductor",
    model="test/tiny-llama",
    model_revision="r1",
    instance_type=INSTANCE,
    sequence_length=SEQ,
    batch_size=2,
    precision="fp32",
    toolchain="torch-2.13.0",
)
COMPILE, EVALUATE = jobs_pb2.JOB_PURPOSE_COMPILE, jobs_pb2.JOB_PURPOSE_EVALUATE
EVALUATOR = workers_pb2.Capability(
    kind=key_pb2.ARTIFACT_KIND_INDUCTOR,
    toolchain="torch-2.13.0",
    compile_targets=["cpu-avx2"],
    purposes=[COMPILE, EVALUATE],
)
COMPILER_ONLY = workers_pb2.Capability(
    kind=key_pb2.ARTIFACT_KIND_INDUCTOR, toolchain="torch-2.13.0", compile_targets=["cpu-avx2"]
)


def start_server(data_dir: Path) -> BackgroundServer:
    config = ServerConfig(
        listen="127.0.0.1:0", data_dir=data_dir, worker_grace_seconds=0.0, lease_seconds=30.0
    )
    return BackgroundServer(config).start()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[BackgroundServer]:
    with background_server(tmp_path / "data", worker_grace_seconds=0.0, lease_seconds=30.0) as srv:
        yield srv


@pytest.fixture
def client(server: BackgroundServer) -> Iterator[Client]:
    with Client(server.address, timeout=30.0) as c:
        yield c


def publish_stand_in(client: Client, tmp_path: Path, key: ArtifactKey = KEY) -> str:
    """An artifact for `key` whose files are no package (enough for what the server decides)."""
    directory = make_artifact_dir(tmp_path / f"artifact-{key.batch_size}", {"model.pt2": 64})
    return client.publish(directory, key).artifact.artifact_id


def register(client: Client, capability: workers_pb2.Capability, worker_id: str = "w-eval") -> None:
    """Make `worker_id` live with `capability` (a lease poll that finds nothing)."""
    reply = client.lease_job(worker_id, [capability])
    assert not reply.HasField("job")


def enqueue(
    client: Client, key: ArtifactKey | None = KEY, **workload: Any
) -> jobs_pb2.EnqueueEvaluationResponse:
    fields: dict[str, Any] = {"concurrency_levels": [1, 4], "requests": 4, **workload}
    return client.enqueue_evaluation(key, **fields)


def measured(artifact_id: str) -> evaluations_pb2.Evaluation:
    """A plausible measured evaluation at levels 1 and 4 (what a worker sends)."""
    record = make_evaluation(make_artifact())
    msg = evaluation_messages.evaluation(dataclasses.replace(record, artifact_id=artifact_id))
    for name in ("evaluation_id", "created_at", "source", "request_id"):
        msg.ClearField(name)
    return msg


# --- enqueueing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("workload", "field"),
    [
        ({"requests": 0}, "workload.requests"),
        ({"concurrency_levels": []}, "workload.concurrency_levels"),
        ({"concurrency_levels": [1, 0]}, "workload.concurrency_levels[1]"),
        ({"concurrency_levels": [4, 4]}, "workload.concurrency_levels[1]"),
        ({"concurrency_levels": [1, 257]}, "workload.concurrency_levels[1]"),
        ({"prompt_tokens": 2_000_000}, "workload.prompt_tokens"),
        ({"output_tokens": -1}, "workload.output_tokens"),
        ({"discount_rate": 1.0}, "discount_rate"),
        ({"discount_rate": float("nan")}, "discount_rate"),
    ],
)
def test_a_bad_workload_is_refused_naming_the_field_and_enqueues_nothing(
    client: Client, tmp_path: Path, workload: dict[str, Any], field: str
) -> None:
    publish_stand_in(client, tmp_path)
    register(client, EVALUATOR)
    with pytest.raises(InvalidArgument) as refused:
        enqueue(client, **workload)
    assert refused.value.field == field and field in str(refused.value)
    assert list(client.iter_jobs()) == []


def test_key_and_artifact_are_one_or_the_other_and_must_exist(client: Client, tmp_path: Path) -> None:
    register(client, EVALUATOR)
    with pytest.raises(NotFound, match="no artifact for this key"):
        enqueue(client)
    with pytest.raises(NotFound, match="no artifact"):
        enqueue(client, None, artifact_id="0" * 32)
    with pytest.raises(InvalidArgument, match="artifact_id"):
        enqueue(client, None, artifact_id="not-an-id")
    artifact_id = publish_stand_in(client, tmp_path)
    with pytest.raises(InvalidArgument, match="one of them"):
        enqueue(client, KEY, artifact_id=artifact_id)
    with pytest.raises(InvalidArgument, match="one of them"):
        enqueue(client, None)
    assert list(client.iter_jobs()) == []
    # By id it works as by key: the same job.
    by_id = enqueue(client, None, artifact_id=artifact_id)
    assert by_id.created and by_id.job.artifact_id == artifact_id
    assert not enqueue(client).created


def test_no_live_worker_that_evaluates_is_refused_at_once(client: Client, tmp_path: Path) -> None:
    publish_stand_in(client, tmp_path)
    with pytest.raises(
        FailedPrecondition, match=r"no live worker evaluates inductor torch-2\.13\.0 for cpu-avx2"
    ):
        enqueue(client)
    # A compile-only worker (one from before evaluation jobs) does not count, and is named.
    register(client, COMPILER_ONLY, "w-compile")
    with pytest.raises(FailedPrecondition, match=r"torch-2\.13\.0 for cpu-avx2 \(compile only\)"):
        enqueue(client)
    assert list(client.iter_jobs()) == []
    register(client, EVALUATOR)
    assert enqueue(client).created


def test_the_spec_carries_the_price_from_the_shipped_table(client: Client, tmp_path: Path) -> None:
    artifact_id = publish_stand_in(client, tmp_path)
    register(client, EVALUATOR)
    job = enqueue(client, concurrency_levels=[4, 1], discount_rate=0.25, prompt_tokens=8).job
    assert job.purpose == EVALUATE and job.artifact_id == artifact_id and job.request_id
    spec = job.evaluation
    assert list(spec.workload.concurrency_levels) == [1, 4]  # run in ascending order
    assert (spec.workload.prompt_tokens, spec.workload.output_tokens, spec.workload.requests) == (8, 16, 4)
    table = load_price_table().price_inputs(INSTANCE, 0.25)
    assert (spec.price.instance_type, spec.price.hourly_usd, spec.price.discount_rate) == (
        table.instance_type,
        table.hourly_usd,
        0.25,
    )
    assert spec.price.price_source == table.price_source and spec.price.input_output_ratio == 3.0
    shown = render.job_text(job)
    assert "4 requests of 8 prompt + 16 output tokens at concurrency 1,4; ml.c6a.4xlarge at $" in shown
    assert "less 25%" in shown and render.job_json(job)["purpose"] == "evaluate"


def test_a_price_table_file_overrides_the_shipped_one(tmp_path: Path) -> None:
    table = tmp_path / "prices.csv"
    table.write_text(
        "# source: our contract\n# recorded: 2026-12-01\ninstance_type,hourly_usd\nml.c6a.4xlarge,1.5\n"
    )
    with (
        background_server(tmp_path / "data", worker_grace_seconds=0.0, price_table_file=str(table)) as srv,
        Client(srv.address) as c,
    ):
        publish_stand_in(c, tmp_path)
        register(c, EVALUATOR)
        price = enqueue(c).job.evaluation.price
    assert (price.hourly_usd, price.price_source) == (1.5, "our contract, recorded 2026-12-01")


def test_identical_evaluations_share_a_job_and_a_compile_of_the_key_coexists(
    client: Client, tmp_path: Path
) -> None:
    artifact_id = publish_stand_in(client, tmp_path)
    register(client, EVALUATOR)
    first = enqueue(client)
    joined = enqueue(client, concurrency_levels=[4, 1])
    assert first.created and not joined.created and joined.job.job_id == first.job.job_id
    other = enqueue(client, requests=8)
    assert other.created and other.job.job_id != first.job.job_id
    # The artifact goes; a lookup of its key enqueues a compile beside the evaluations.
    client.delete_artifact(artifact_id)
    miss = client.lookup(KEY)
    assert miss.status == registry_pb2.LOOKUP_STATUS_MISS and miss.job_created
    active = {j.job_id: j.purpose for j in client.iter_jobs(states=["queued"])}
    assert active == {first.job.job_id: EVALUATE, other.job.job_id: EVALUATE, miss.job.job_id: COMPILE}
    # A compile-only worker leases the compile, never an evaluation.
    leased = client.lease_job("w-compile", [COMPILER_ONLY])
    assert leased.job.job_id == miss.job.job_id


# --- completing ------------------------------------------------------------------------------


def test_only_the_current_lease_stores_the_evaluation_and_it_survives_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = start_server(data)
    try:
        with Client(srv.address, timeout=30.0) as c:
            artifact_id = publish_stand_in(c, tmp_path)
            register(c, EVALUATOR, "w-a")
            job = enqueue(c).job
            stale = c.lease_job("w-a", [EVALUATOR])
            assert stale.job.job_id == job.job_id and stale.job.purpose == EVALUATE
            assert stale.job.evaluation == job.evaluation
            c.release_job(job.job_id, stale.fencing_token, "handing over")
            current = c.lease_job("w-b", [EVALUATOR])
            assert current.job.job_id == job.job_id
            # The worker that lost its lease stores nothing.
            with pytest.raises(FailedPrecondition, match="not leased under fencing token"):
                c.complete_evaluation_job(job.job_id, stale.fencing_token, measured(artifact_id))
            assert list(c.iter_evaluations(artifact_id=artifact_id)) == []
            # Refused before anything changes: other levels than the job's, a compile's completion.
            wrong = measured(artifact_id)
            del wrong.levels[1]
            wrong.workload.ClearField("concurrency_levels")
            with pytest.raises(InvalidArgument, match="not the job's levels"):
                c.complete_evaluation_job(job.job_id, current.fencing_token, wrong)
            assert c.get_job(job.job_id).state == jobs_pb2.JOB_STATE_LEASED

            done = c.complete_evaluation_job(job.job_id, current.fencing_token, measured(artifact_id))
            assert done.job.state == jobs_pb2.JOB_STATE_SUCCEEDED
            stored = done.evaluation
            assert stored.evaluation_id == done.job.evaluation_id and stored.artifact_id == artifact_id
            assert stored.source == "worker:w-b" and stored.request_id == job.request_id
            # A retry (a lost answer) stores nothing new; a stale token still cannot.
            again = c.complete_evaluation_job(job.job_id, current.fencing_token, measured(artifact_id))
            assert again.evaluation == stored
            with pytest.raises(FailedPrecondition):
                c.complete_evaluation_job(job.job_id, stale.fencing_token, measured(artifact_id))
            assert [e.evaluation_id for e in c.iter_evaluations(artifact_id=artifact_id)] == [
                stored.evaluation_id
            ]
    finally:
        srv.stop()

    srv = start_server(data)
    try:
        with Client(srv.address) as c:
            after = c.get_job(job.job_id)
            assert (after.purpose, after.evaluation_id) == (EVALUATE, stored.evaluation_id)
            assert c.evaluation_of(after) == stored
            assert list(c.get_artifact(artifact_id).evaluations) == [stored]
    finally:
        srv.stop()


def test_a_workload_longer_than_the_window_fails_the_job_before_running(
    client: Client, tmp_path: Path
) -> None:
    publish_stand_in(client, tmp_path)
    register(client, EVALUATOR)
    job = enqueue(client, prompt_tokens=30, output_tokens=8).job
    worker = Worker(
        WorkerConfig(server=client.target, work_dir=tmp_path / "work", max_jobs=1, worker_id="w-real"),
        backends={"inductor": inductor_evaluator()},
    )
    assert worker.run() == 1
    failed = client.get_job(job.job_id)
    assert failed.state == jobs_pb2.JOB_STATE_FAILED
    assert failed.error_class == jobs_pb2.ERROR_CLASS_DETERMINISTIC and failed.attempts == 1
    assert "30 prompt + 8 output tokens do not fit the artifact's compiled sequence length 32" in failed.error


def as_measured(level: evaluations_pb2.LevelMetrics) -> LevelMetrics:
    """A stored level as the load driver's record, for its consistency checks."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(LevelMetrics):
        value = getattr(level, f.name)
        values[f.name] = Distribution(value.p50, value.p90, value.p99) if f.type == "Distribution" else value
    return LevelMetrics(**values)


def inductor_evaluator() -> BackendStatus:
    return BackendStatus(
        "inductor", True, toolchain="torch-2.13.0", compile_targets=("cpu-avx2",), evaluates=True
    )


# --- a real evaluation -----------------------------------------------------------------------


@pytest.mark.slow
def test_a_real_evaluation_through_a_worker_and_prebake_evaluate(
    fp32_child: ChildRun, tiny_model: Path, tmp_path: Path, prebake: PrebakeCli
) -> None:
    assert fp32_child.proc.returncode == 0, fp32_child.proc.stderr[-3000:]
    key = dataclasses.replace(KEY, model_revision=revision_of(tiny_model))
    with (
        background_server(tmp_path / "data", worker_grace_seconds=0.0, lease_seconds=30.0) as srv,
        Client(srv.address, timeout=60.0) as c,
    ):
        artifact_id = c.publish(fp32_child.out_dir, key).artifact.artifact_id
        worker = Worker(
            WorkerConfig(server=srv.address, work_dir=tmp_path / "work", max_jobs=1, worker_id="w-eval"),
            backends={"inductor": inductor_evaluator()},
        )
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        try:
            register(c, EVALUATOR, "w-probe")  # live at once, whatever the thread's pace
            ran = prebake(
                "--server", srv.address, "evaluate", "--artifact", artifact_id,
                "--concurrency", "1,4", "--requests", "4", "--prompt-tokens", "8",
                "--output-tokens", "6", "--discount-rate", "0.1", "--wait-timeout", "600", "--json",
            )  # fmt: skip
        finally:
            worker.stop()
            thread.join(timeout=120)
        assert ran.code == 0, ran.err
        out = json.loads(ran.out)
        assert out["job"]["purpose"] == "evaluate" and out["job"]["state"] == "succeeded"
        evaluation = c.evaluation_of(c.get_job(out["job"]["job_id"]))
        assert out["evaluation"]["evaluation_id"] == evaluation.evaluation_id
        assert evaluation.source == "worker:w-eval"
    workload = evaluation.workload
    assert (workload.prompt_tokens, workload.output_tokens, workload.requests) == (8, 6, 4)
    assert [level.concurrency for level in evaluation.levels] == [1, 4]
    price = load_price_table().price_inputs(INSTANCE, 0.1)
    assert (evaluation.price.hourly_usd, evaluation.price.discount_rate) == (price.hourly_usd, 0.1)
    assert evaluation.host.runtime_versions["torch"].startswith("2.13")
    for level in evaluation.levels:
        assert_consistent(as_measured(level), EvaluationWorkload(8, 6, 4, (1, 4)))
        assert level.invocation_errors == 0 and level.output_tokens == 4 * 6
        assert level.output_tokens_per_second * level.duration_seconds == pytest.approx(level.output_tokens)
        assert level.itl_ms.p50 <= level.client_latency_ms.p50
        assert level.ttft_ms.p99 <= level.client_latency_ms.p99
        blended = pricing.blended_price_per_million_tokens(price, level.concurrency, level.itl_ms.p50)
        assert level.blended_price_per_million_tokens == pytest.approx(blended)
        assert level.blended_price_per_million_tokens > 0


def test_capabilities_stored_before_purposes_read_as_compile_only() -> None:
    old = '[["inductor","torch-2.13.0",["cpu-avx2"]]]'
    (capability,) = capabilities_from_json(old)
    assert capability.purposes == (JobPurpose.COMPILE,)
    assert capabilities_from_json(capabilities_json((capability,))) == (capability,)


def test_evaluations_spend_the_callers_job_budget_and_joins_are_free(tmp_path: Path) -> None:
    with (
        background_server(
            tmp_path / "data", worker_grace_seconds=0.0, job_create_burst=1, job_create_per_minute=0.001
        ) as srv,
        Client(srv.address) as c,
    ):
        publish_stand_in(c, tmp_path)
        register(c, EVALUATOR)
        first = enqueue(c)
        assert enqueue(c).job.job_id == first.job.job_id  # a join costs nothing
        with pytest.raises(QuotaExceeded, match="jobs created"):
            enqueue(c, requests=8)
        assert [j.job_id for j in c.iter_jobs()] == [first.job.job_id]


def test_neuron_artifacts_are_not_evaluated_here(client: Client, tmp_path: Path) -> None:
    # This package does not drive the Neuron runtime: no worker advertises evaluating neuron
    # artifacts (even where the SDK compiles them), so their evaluations are refused as unserved.
    assert "neuron" not in EVALUATORS
    neuron = BackendStatus("neuron", True, toolchain="neuronx-cc-2.15", compile_targets=("inf2",))
    assert list(neuron.capability().purposes) == [COMPILE]
    key = ArtifactKey(
        kind="neuron",
        model="test/tiny-llama",
        instance_type="ml.inf2.xlarge",
        sequence_length=SEQ,
        batch_size=1,
        toolchain="neuronx-cc-2.15",
    )
    publish_stand_in(client, tmp_path, key)
    register(client, neuron.capability(), "w-neuron")
    with pytest.raises(FailedPrecondition, match=r"no live worker evaluates neuron .*\(compile only\)"):
        enqueue(client, key)
