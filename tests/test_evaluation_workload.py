"""The evaluation load driver and its metrics, against a real (sleeping, deterministic) generator.

The generator sleeps a known few milliseconds before its first token and between tokens, so
the metrics must be internally consistent (throughput = tokens / time, inter-token latency
below client latency, time to first token within it, counts that add up) and concurrency
must raise total throughput: sleeping threads overlap. Nothing asserts a duration.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from prebake.compiler.evaluation_metrics import EvaluationResult, check_workload, current_host, distribution
from prebake.compiler.evaluation_workload import (
    OnToken,
    run_workload,
    synthetic_prompts,
)
from prebake.core import pricing
from prebake.core.evaluation_records import Distribution, EvaluationWorkload, LevelMetrics, PriceInputs

PREFILL_S = 0.004
PER_TOKEN_S = 0.003
WORKLOAD = EvaluationWorkload(prompt_tokens=16, output_tokens=5, requests=8, concurrency_levels=(1, 4))
PRICE = PriceInputs("ml.c7i.xlarge", 0.214, 0.1, "test")
PROMPTS = synthetic_prompts(range(100), WORKLOAD.prompt_tokens, seed=7)


class SleepingModel:
    """Echoes prompt ids back, one per `PER_TOKEN_S` after a `PREFILL_S` prefill; thread-safe.

    `script` maps call numbers (1-based, in call order) to "error" or "empty".
    """

    def __init__(self, script: dict[int, str] | None = None) -> None:
        self.script = script or {}
        self._calls = itertools.count(1)
        self._lock = threading.Lock()
        self.prompts: list[list[int]] = []

    def __call__(self, prompt_ids: list[int], max_new_tokens: int, on_token: OnToken) -> list[int]:
        with self._lock:
            call = next(self._calls)
            self.prompts.append(list(prompt_ids))
        time.sleep(PREFILL_S)
        if self.script.get(call) == "error":
            raise RuntimeError("the model fell over")
        if self.script.get(call) == "empty":
            return []
        out = []
        for i in range(max_new_tokens):
            if i:
                time.sleep(PER_TOKEN_S)
            out.append(prompt_ids[i % len(prompt_ids)])
            on_token(out[-1])
        return out


def assert_consistent(level: LevelMetrics, workload: EvaluationWorkload) -> None:
    """The properties every level must have, whatever the runtime."""
    assert level.requests == workload.requests
    assert level.client_invocations <= level.requests
    answered = level.client_invocations - level.invocation_errors - level.empty_responses
    assert answered >= 0
    assert level.output_tokens == answered * workload.output_tokens
    assert level.input_tokens == (level.client_invocations - level.invocation_errors) * workload.prompt_tokens
    assert level.duration_seconds > 0
    assert level.output_tokens_per_second == pytest.approx(level.output_tokens / level.duration_seconds)
    assert level.input_tokens_per_second == pytest.approx(level.input_tokens / level.duration_seconds)
    for dist in (level.ttft_ms, level.itl_ms, level.client_latency_ms):
        assert 0 < dist.p50 <= dist.p90 <= dist.p99
    assert level.itl_ms.p50 < level.client_latency_ms.p50
    # Each request's first token comes within its latency, so every percentile does too.
    for q in ("p50", "p90", "p99"):
        assert getattr(level.ttft_ms, q) <= getattr(level.client_latency_ms, q)
    # Per-request rates: that request's tokens over its own latency, so the slowest request
    # bounds them from below, and input and output rates differ by the token ratio alone.
    out_rate, in_rate = level.output_tokens_per_second_per_request, level.input_tokens_per_second_per_request
    slowest = workload.output_tokens / (level.client_latency_ms.p99 / 1000)
    assert slowest * (1 - 1e-9) <= out_rate.p50 <= out_rate.p99
    ratio = workload.prompt_tokens / workload.output_tokens
    for q in ("p50", "p90", "p99"):
        assert getattr(in_rate, q) == pytest.approx(getattr(out_rate, q) * ratio)


def assert_a_clean_priced_run(levels: Sequence[LevelMetrics], workload: EvaluationWorkload) -> None:
    """What a real runtime's evaluation with a known price must show (test_evaluation_inductor,
    test_evaluation_awq): one consistent level per concurrency, in order, none failed or cut
    short, and every price of every level known."""
    assert [level.concurrency for level in levels] == list(workload.concurrency_levels)
    for level in levels:
        assert_consistent(level, workload)
        assert (level.invocation_errors, level.empty_responses, level.tokenizer_failures) == (0, 0, 0)
        assert level.output_tokens == workload.requests * workload.output_tokens
        assert level.blended_price_per_million_tokens > 0
        assert level.price_per_million_input_tokens > 0 and level.price_per_million_output_tokens > 0


def test_levels_are_consistent_and_concurrency_raises_total_throughput() -> None:
    model = SleepingModel()
    one, four = run_workload(model, PROMPTS, WORKLOAD, PRICE)
    for level, concurrency in ((one, 1), (four, 4)):
        assert level.concurrency == concurrency
        assert_consistent(level, WORKLOAD)
        assert (level.invocation_errors, level.empty_responses, level.tokenizer_failures) == (0, 0, 0)
        assert level.client_invocations == WORKLOAD.requests
        assert level.output_tokens == WORKLOAD.requests * WORKLOAD.output_tokens
    # Four sleeping requests overlap: more tokens per second of wall time.
    assert four.output_tokens_per_second > one.output_tokens_per_second
    # Every level sent its own prompts (indexes 0..7, then 8..15), each exactly prompt_tokens long.
    assert sorted(map(tuple, model.prompts)) == sorted(tuple(PROMPTS(i)) for i in range(16))


def test_prices_come_from_the_pricing_module_and_the_levels_own_numbers() -> None:
    (level,) = run_workload(SleepingModel(), PROMPTS, EvaluationWorkload(16, 5, 4, (2,)), PRICE)
    assert level.blended_price_per_million_tokens == pytest.approx(
        pricing.blended_price_per_million_tokens(PRICE, 2, level.itl_ms.p50)
    )
    assert level.price_per_million_output_tokens == pytest.approx(
        pricing.price_per_million_tokens(PRICE, level.output_tokens_per_second)
    )
    assert level.price_per_million_input_tokens == pytest.approx(
        pricing.price_per_million_tokens(PRICE, level.input_tokens_per_second)
    )
    # More input than output tokens per second: input tokens are the cheaper ones.
    assert 0 < level.price_per_million_input_tokens < level.price_per_million_output_tokens


def test_without_a_price_every_price_is_zero() -> None:
    (level,) = run_workload(SleepingModel(), PROMPTS, EvaluationWorkload(16, 3, 2, (1,)))
    assert level.output_tokens == 6
    prices = (
        level.price_per_million_input_tokens,
        level.price_per_million_output_tokens,
        level.blended_price_per_million_tokens,
    )
    assert prices == (0.0, 0.0, 0.0)


def test_errors_empty_responses_and_tokenizer_failures_are_counted() -> None:
    model = SleepingModel({2: "error", 5: "error", 3: "empty"})

    def prompts(index: int) -> list[int]:
        if index == 6:
            raise UnicodeError("cannot encode")
        return PROMPTS(index)

    decoded: list[list[int]] = []

    def decode(ids: list[int]) -> str:
        decoded.append(ids)
        if len(decoded) == 1:
            raise ValueError("cannot decode")
        return " ".join(map(str, ids))

    (level,) = run_workload(model, prompts, EvaluationWorkload(16, 4, 8, (1,)), PRICE, decode=decode)
    assert level.client_invocations == 7  # index 6 never reached the model
    assert level.invocation_errors == 2
    assert level.empty_responses == 1
    assert level.tokenizer_failures == 2  # one prompt, one response
    assert len(decoded) == 4  # the four non-empty responses
    assert_consistent(level, EvaluationWorkload(16, 4, 8, (1,)))


def test_a_level_where_everything_fails_measures_nothing() -> None:
    model = SleepingModel(dict.fromkeys(range(1, 4), "error"))
    (level,) = run_workload(model, PROMPTS, EvaluationWorkload(16, 4, 3, (3,)), PRICE)
    assert (level.invocation_errors, level.output_tokens, level.input_tokens) == (3, 0, 0)
    assert level.ttft_ms == level.itl_ms == level.client_latency_ms == Distribution(0.0, 0.0, 0.0)
    assert level.blended_price_per_million_tokens == level.price_per_million_output_tokens == 0.0


def test_a_non_streaming_generate_has_ttft_equal_to_latency_and_no_gaps() -> None:
    def generate(prompt_ids: list[int], max_new_tokens: int, on_token: OnToken) -> list[int]:
        time.sleep(PREFILL_S)
        return prompt_ids[:max_new_tokens]

    (level,) = run_workload(generate, PROMPTS, EvaluationWorkload(16, 4, 2, (1,)), PRICE)
    assert level.ttft_ms == level.client_latency_ms
    assert level.itl_ms == Distribution(0.0, 0.0, 0.0)
    assert level.blended_price_per_million_tokens == 0.0  # no inter-token latency, no blended price
    assert level.price_per_million_output_tokens > 0


def test_progress_reports_every_request_of_every_level() -> None:
    seen: list[tuple[int, int, int]] = []
    run_workload(
        SleepingModel(), PROMPTS, EvaluationWorkload(16, 2, 3, (1, 2)), progress=lambda *a: seen.append(a)
    )
    assert seen == [(1, 1, 3), (1, 2, 3), (1, 3, 3), (2, 1, 3), (2, 2, 3), (2, 3, 3)]


# -- synthetic prompts, distributions, workloads, hosts ----------------------------------------


def test_synthetic_prompts_are_deterministic_and_exactly_as_long_as_asked() -> None:
    build = synthetic_prompts([5, 6, 7], 40, seed=1)
    assert build(0) == synthetic_prompts([5, 6, 7], 40, seed=1)(0)
    assert build(0) != build(1)
    assert build(0) != synthetic_prompts([5, 6, 7], 40, seed=2)(0)
    assert len(build(3)) == 40 and set(build(3)) <= {5, 6, 7}
    with pytest.raises(ValueError, match="non-empty vocabulary"):
        synthetic_prompts([], 4)
    with pytest.raises(ValueError, match="must be positive"):
        synthetic_prompts([1], 0)


def test_distribution_is_nearest_rank() -> None:
    assert distribution([7.5]) == Distribution(7.5, 7.5, 7.5)
    assert distribution([]) == Distribution(0.0, 0.0, 0.0)
    assert distribution(list(range(100, 0, -1))) == Distribution(50, 90, 99)
    assert distribution(range(1, 11)) == Distribution(5, 9, 10)  # type: ignore[arg-type]
    assert distribution([1.0, 2.0]) == Distribution(1.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="finite"):
        distribution([1.0, float("nan")])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt_tokens": 0}, "prompt_tokens must be a positive integer"),
        ({"output_tokens": -1}, "output_tokens must be a positive integer"),
        ({"requests": 1.5}, "requests must be a positive integer"),
        ({"concurrency_levels": ()}, "non-empty tuple"),
        ({"concurrency_levels": [1, 2]}, "non-empty tuple"),
        ({"concurrency_levels": (1, 0)}, "positive integers"),
        ({"concurrency_levels": (1, 4, 4)}, "unique"),
        ({"concurrency_levels": (4, 1)}, "ascending"),
    ],
)
def test_workload_validation(kwargs: dict[str, object], message: str) -> None:
    values: dict[str, object] = {
        "prompt_tokens": 8,
        "output_tokens": 4,
        "requests": 2,
        "concurrency_levels": (1,),
    }
    values.update(kwargs)
    workload = EvaluationWorkload(**values)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        check_workload(workload)
    model = SleepingModel()
    with pytest.raises(ValueError, match=message):
        run_workload(model, PROMPTS, workload)  # refused before any request
    assert model.prompts == []


def test_host_info_reads_this_machine(tmp_path: Path) -> None:
    import os

    host = current_host("ml.c7i.xlarge")
    assert host.cpu_count == os.cpu_count()
    assert host.cpu_model and host.hostname
    assert host.instance_type == "ml.c7i.xlarge"
    assert "torch" in dict(host.runtime_versions)
    assert list(host.runtime_versions) == sorted(host.runtime_versions)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Example CPU @ 3.0GHz\n")
    assert current_host(cpuinfo=cpuinfo).cpu_model == "Example CPU @ 3.0GHz"
    assert current_host().instance_type == ""


def test_a_result_is_the_evaluation_the_server_stores() -> None:
    # The worker's result, through the child's JSON and the Evaluation message, reads back as
    # the same records on the server's side: one set of records for both.
    import json

    from prebake.compiler.evaluation_job import evaluation_message
    from prebake.compiler.evaluation_run import result_to_dict
    from prebake.server import evaluation_messages

    levels = run_workload(SleepingModel(), PROMPTS, WORKLOAD, PRICE)
    result = EvaluationResult(WORKLOAD, current_host("ml.c7i.xlarge"), PRICE, levels)
    message = evaluation_message(json.loads(json.dumps(result_to_dict(result))))
    evaluation_messages.check(message, artifact_id="")
    assert evaluation_messages.parts(message) == {
        "workload": WORKLOAD,
        "host": result.host,
        "price": PRICE,
        "levels": levels,
    }
