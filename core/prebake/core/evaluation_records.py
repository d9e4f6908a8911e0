"""What an evaluation of an artifact records: the workload, the host, the price inputs and the
metrics per concurrency level, defined once for the worker (which measures them) and the server
(which stores and ranks them).

Frozen dataclasses of plain data, independent of gRPC, SQL and the model runtime. Their names
and fields are those of `prebake/v1/evaluations.proto` (the server converts field by field, by
name: `prebake.server.evaluation_messages`) and the names the stores persist (`record_json`):
a field renamed here would no longer read stored evaluations. Defaults are the proto's zero
values (but for the usual 3:1 token mix of `PriceInputs.input_output_ratio`). Nothing here
validates: the server checks untrusted evaluations against the descriptor, the worker checks a
workload before running it (`prebake.compiler.evaluation_metrics.check_workload`) and
`prebake.core.pricing.check_price_inputs` checks what a price is computed from.

The metrics are those of SageMaker's inference optimization toolkit ("Evaluate the performance
of optimized models", https://docs.aws.amazon.com/sagemaker/latest/dg/model-optimize-evaluate.html).
"""

from __future__ import annotations

from dataclasses import dataclass

# The token mix a blended price is quoted for: 3 input tokens per output token (3:1).
DEFAULT_INPUT_OUTPUT_RATIO = 3.0


@dataclass(frozen=True)
class Distribution:
    """p50, p90 and p99 of one level's samples; `p50 <= p90 <= p99`; all 0 when nothing was measured."""

    p50: float = 0.0
    p90: float = 0.0
    p99: float = 0.0


@dataclass(frozen=True)
class EvaluationWorkload:
    """What is run: `requests` requests of `prompt_tokens` tokens each asking for `output_tokens`
    new tokens, at each of `concurrency_levels` (requests in flight at once), in run order."""

    prompt_tokens: int = 0
    output_tokens: int = 0
    requests: int = 0
    concurrency_levels: tuple[int, ...] = ()


@dataclass(frozen=True)
class EvaluationHost:
    """The machine an evaluation ran on. `instance_type` is "" off SageMaker/EC2 or when unknown;
    `runtime_versions` pairs package names (torch, transformers, ...) with their versions,
    sorted by name."""

    hostname: str = ""
    cpu_model: str = ""
    cpu_count: int = 0
    instance_type: str = ""
    runtime_versions: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class PriceInputs:
    """Everything a price depends on besides the measurements, recorded with an evaluation so
    that its prices can be recomputed (`prebake.core.pricing`).

    `hourly_usd` is 0 when no price was known (then every price is 0); `discount_rate` from 0 to
    below 1; `price_source` says where `hourly_usd` came from (the price table and its date, or a
    flag); `input_output_ratio` is the token mix the blended price is quoted for (3.0 = 3:1).
    """

    instance_type: str = ""
    hourly_usd: float = 0.0
    discount_rate: float = 0.0
    price_source: str = ""
    input_output_ratio: float = DEFAULT_INPUT_OUTPUT_RATIO


@dataclass(frozen=True)
class LevelMetrics:
    """The measurements of one concurrency level (units in the names, as in the proto).

    Counts: `requests` the level was asked to send; `client_invocations` the calls made to the
    model (requests whose prompt could be built); `invocation_errors` calls that raised;
    `tokenizer_failures` prompts that could not be built plus responses that could not be
    decoded; `empty_responses` calls that returned no token. Latencies in ms over the
    requests that returned tokens (`itl_ms` over every gap between two streamed tokens).
    Rates: overall = total tokens / `duration_seconds` (the level's wall time); per request
    = that request's tokens / its client latency. Prices in USD per 1M tokens from
    `prebake.core.pricing`; 0 when no price is known (no price inputs, or nothing measured).
    """

    concurrency: int = 0
    requests: int = 0
    client_invocations: int = 0
    invocation_errors: int = 0
    tokenizer_failures: int = 0
    empty_responses: int = 0
    duration_seconds: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    ttft_ms: Distribution = Distribution()
    itl_ms: Distribution = Distribution()
    client_latency_ms: Distribution = Distribution()
    input_tokens_per_second: float = 0.0
    output_tokens_per_second: float = 0.0
    input_tokens_per_second_per_request: Distribution = Distribution()
    output_tokens_per_second_per_request: Distribution = Distribution()
    price_per_million_input_tokens: float = 0.0
    price_per_million_output_tokens: float = 0.0
    blended_price_per_million_tokens: float = 0.0
