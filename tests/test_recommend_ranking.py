"""The ranking rules of `prebake.server.recommend`, as pure functions over records."""

from __future__ import annotations

import dataclasses

import pytest

from prebake.core import pricing
from prebake.core.evaluation_records import (
    Distribution,
    EvaluationHost,
    EvaluationWorkload,
    LevelMetrics,
    PriceInputs,
)
from prebake.server import compat, recommend
from prebake.server.instance_catalog import InstanceCatalog
from prebake.server.key_normalization import DEFAULT_TOOLCHAINS, KeyRequest, normalize_key
from prebake.server.model_catalog import ModelCatalog
from prebake.server.recommend import Candidate, Excluded, Limits, Objective, Ranked
from prebake.server.records import Artifact, Evaluation, NormalizedKey, Producer

CATALOG = InstanceCatalog.load_default()
MODELS = ModelCatalog.load_default()


def normalize(request: KeyRequest) -> NormalizedKey:
    return normalize_key(request, CATALOG, DEFAULT_TOOLCHAINS, MODELS)


def key(
    instance_type: str = "ml.inf2.48xlarge", sequence_length: int = 8192, batch_size: int = 1
) -> NormalizedKey:
    return normalize(
        KeyRequest(
            kind="neuron",
            model="meta-llama/Meta-Llama-3-8B",
            instance_type=instance_type,
            sequence_length=sequence_length,
            batch_size=batch_size,
            tensor_parallel_degree=24,
            precision="bf16",
        )
    )


def artifact(k: NormalizedKey) -> Artifact:
    return Artifact(k.digest, k, (), 0, 0, Producer(), 1.0, 1.0, False, "m")


def lv(  # noqa: PLR0917 (one row of a table)
    concurrency: int, client: float, ttft: float, itl: float, rate: float, price: float = 0.0
) -> LevelMetrics:
    return LevelMetrics(
        concurrency=concurrency,
        requests=8,
        ttft_ms=Distribution(ttft, ttft, ttft),
        itl_ms=Distribution(itl, itl, itl),
        client_latency_ms=Distribution(client, client, client),
        output_tokens_per_second=rate,
        blended_price_per_million_tokens=price,
    )


def candidate(
    k: NormalizedKey, *levels: LevelMetrics, created: float = 10.0, hourly: float = 0.0, eid: str = "ev-1"
) -> Candidate:
    evaluation = Evaluation(
        evaluation_id=eid,
        artifact_id=k.digest,
        model=k.model,
        created_at=created,
        workload=EvaluationWorkload(128, 32, 8),
        host=EvaluationHost(instance_type="ml.inf2.48xlarge"),
        price=PriceInputs("ml.inf2.48xlarge", hourly, 0.25, "flag", 3.0),
        levels=levels,
    )
    return Candidate(artifact(k), evaluation, recommend.Serving(recommend.request_of(k)))


def test_level_choice_per_objective() -> None:
    c = candidate(
        key(), lv(1, 100, 10, 5, 50, 4.0), lv(4, 150, 30, 8, 180, 1.5), lv(8, 300, 90, 20, 300, 1.0)
    )
    assert (
        isinstance(r := recommend.judge(c, Objective.LATENCY, Limits()), Ranked) and r.level.concurrency == 1
    )
    assert (
        isinstance(r := recommend.judge(c, Objective.THROUGHPUT, Limits()), Ranked)
        and r.level.concurrency == 8
    )
    assert isinstance(r := recommend.judge(c, Objective.COST, Limits()), Ranked) and r.level.concurrency == 8
    # Limits on p50 drop level 8; the best remaining level for the objective is used.
    r = recommend.judge(c, Objective.THROUGHPUT, Limits(max_itl_ms=10))
    assert isinstance(r, Ranked) and (r.level.concurrency, r.value) == (4, 180)
    assert "1 level(s) exceed the limits" in r.reasons[0] and "meets max_itl_ms 10" in r.reasons[1]
    # The requested concurrency only.
    r = recommend.judge(c, Objective.COST, Limits(concurrency=4))
    assert (
        isinstance(r, Ranked) and r.level.concurrency == 4 and r.reasons[0] == "concurrency 4, as requested"
    )


def test_a_limit_is_met_only_by_a_measured_value() -> None:
    c = candidate(key(), lv(1, 100, 0, 5, 50, 4.0))  # TTFT not measured
    verdict = recommend.judge(c, Objective.LATENCY, Limits(max_ttft_ms=1000))
    assert isinstance(verdict, Excluded) and verdict.stage == 3


def test_levels_with_errors_or_without_the_metric_do_not_qualify() -> None:
    failing = dataclasses.replace(lv(1, 100, 10, 5, 50, 4.0), invocation_errors=2)
    c = candidate(key(), failing, lv(4, 0, 10, 5, 50, 4.0))
    verdict = recommend.judge(c, Objective.LATENCY, Limits())
    assert isinstance(verdict, Excluded) and verdict.stage == 2
    assert verdict.reason == (
        "concurrency 1 had 2 invocation errors; concurrency 4 measured no p50 client latency"
    )


def test_blended_price_stored_recomputed_or_blended() -> None:
    c = candidate(key(), lv(4, 100, 10, 25, 50), hourly=1.515)
    price, note = recommend.blended_price(c.evaluation, c.evaluation.levels[0])
    inputs = PriceInputs("ml.inf2.48xlarge", 1.515, 0.25, "flag")
    assert price == pytest.approx(pricing.blended_price_per_million_tokens(inputs, 4, 25.0))
    assert note == "recomputed from $1.515/h less 25% at concurrency / p50 ITL"
    stored = candidate(key(), lv(4, 100, 10, 25, 50, 2.5), hourly=1.515)
    assert recommend.blended_price(stored.evaluation, stored.evaluation.levels[0]) == (2.5, "")
    split = dataclasses.replace(
        lv(4, 100, 10, 0, 50), price_per_million_input_tokens=1.0, price_per_million_output_tokens=5.0
    )
    c = candidate(key(), split)
    blended, how = recommend.blended_price(c.evaluation, split)
    assert blended == pytest.approx(2.0) and how == "blended 3:1 from the input and output prices"
    unpriced = candidate(key(), lv(4, 100, 10, 25, 50))
    assert recommend.blended_price(unpriced.evaluation, unpriced.evaluation.levels[0]) == (0.0, "")
    verdict = recommend.judge(unpriced, Objective.COST, Limits())
    assert isinstance(verdict, Excluded) and "measured no blended price" in verdict.reason


def test_ties_are_broken_deterministically() -> None:
    a = candidate(key(batch_size=1), lv(1, 100, 10, 5, 50), created=5.0, eid="ev-a")
    b = candidate(key(batch_size=2), lv(1, 100, 10, 5, 60), created=5.0, eid="ev-b")  # more tok/s
    c = candidate(key(batch_size=4), lv(1, 100, 10, 5, 60), created=9.0, eid="ev-c")  # newer
    d = candidate(key(batch_size=8), lv(1, 100, 10, 5, 60), created=9.0, eid="ev-d")
    first_id, second_id = sorted([c.artifact.artifact_id, d.artifact.artifact_id])
    for order in ([a, b, c, d], [d, c, b, a], [b, d, a, c]):
        ranked = recommend.rank(order, Objective.LATENCY, Limits()).ranked
        assert [r.candidate.artifact.artifact_id for r in ranked] == [
            first_id,
            second_id,
            b.artifact.artifact_id,
            a.artifact.artifact_id,
        ]
    assert "tied with the next" in ranked[0].reasons[0] and "tied with rank 1" in ranked[1].reasons[0]


def test_refusal_names_the_closest_level() -> None:
    near = candidate(key(batch_size=1), lv(1, 100, 10, 27, 50), lv(4, 200, 40, 30, 150))
    far = candidate(key(batch_size=2), lv(1, 100, 10, 60, 50))
    outcome = recommend.rank([near, far], Objective.THROUGHPUT, Limits(max_itl_ms=20))
    assert not outcome.ranked
    message = recommend.refusal("M", Objective.THROUGHPUT, Limits(max_itl_ms=20), 2, outcome.excluded)
    assert message == (
        f"no evaluated artifact of M meets max_itl_ms 20: the closest is {near.artifact.artifact_id} at "
        "concurrency 1 with TTFT p50 10 ms, ITL p50 27 ms"
    )
    assert recommend.refusal("M", Objective.COST, Limits(), 0, []).startswith(
        "no artifact of M has an evaluation"
    )


def test_serving_exact_by_policy_or_not() -> None:
    trn1 = artifact(key("ml.trn1.32xlarge", sequence_length=4096))
    exact = recommend.serving(trn1, ["ml.trn1.2xlarge", "ml.trn1.32xlarge"], 0, [], normalize)
    # trn1.2xlarge has 2 cores: tp 24 does not fit it; trn1.32xlarge serves exactly.
    assert isinstance(exact, recommend.Serving) and exact.request.instance_type == "ml.trn1.32xlarge"
    assert not exact.policies
    refused = recommend.serving(trn1, ["ml.inf2.48xlarge"], 0, [], normalize)
    assert (
        refused == "compiled for trn1, ml.inf2.48xlarge is inf2 (`allow` neuroncore_v2_family would admit it)"
    )
    family = recommend.serving(trn1, ["ml.inf2.48xlarge"], 2048, list(compat.Policy), normalize)
    assert isinstance(family, recommend.Serving)
    assert family.policies == (compat.Policy.LONGER_SEQUENCE, compat.Policy.NEURONCORE_V2_FAMILY)
    assert family.request.sequence_length == 2048 and family.request.instance_type == "ml.inf2.48xlarge"
    shorter = recommend.serving(trn1, [], 8192, list(compat.Policy), normalize)
    assert shorter == "compiled for sequence_length 4096, not 8192"
