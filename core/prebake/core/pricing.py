"""Price per million tokens from an hourly instance price and measured throughput, written once.

Used by the worker when it evaluates an artifact (each concurrency level's prices) and by
whoever recomputes a recorded evaluation's prices later (a new price table, another
discount): everything a price depends on is in `PriceInputs` (`prebake.core.evaluation_records`),
recorded with the evaluation.

Source: the blended price follows the definition of SageMaker's inference optimization
toolkit, "Achieve up to ~2x higher throughput while reducing costs by ~50% for generative
AI inference on Amazon SageMaker with the new inference optimization toolkit - Part 1"
(AWS Machine Learning Blog, July 2024,
https://aws.amazon.com/blogs/machine-learning/achieve-up-to-2x-higher-throughput-while-reducing-costs-by-50-for-generative-ai-inference-on-amazon-sagemaker-with-the-new-inference-optimization-toolkit-part-1),
with the metric names of "Evaluate the performance of optimized models"
(https://docs.aws.amazon.com/sagemaker/latest/dg/model-optimize-evaluate.html):

    total token throughput (tokens/s)   T = concurrency / p50 inter-token latency (s)
    effective hourly price (USD/h)      H = hourly_usd * (1 - discount_rate)
    blended price (USD / 1M tokens)     B = H / (T * 3600) * 1_000_000

quoted for a 3:1 input:output token mix (`PriceInputs.input_output_ratio`). The per-input
and per-output prices charge the whole instance-hour to one kind of token, from the level's
measured overall rates (tokens of that kind / the level's wall time):

    price per 1M input tokens           H / (input tokens/s * 3600) * 1_000_000
    price per 1M output tokens          H / (output tokens/s * 3600) * 1_000_000

and `blend` combines two such per-kind prices at the recorded ratio, (r * in + out) / (r + 1),
the usual "3:1 blended" price, for results that carry only the split prices (imported ones).

Worked example (ml.g5.2xlarge at 1.515 USD/h with a 20 % discount, concurrency 4, p50
inter-token latency 25 ms, measured 360 input and 120 output tokens/s):

    H = 1.515 * (1 - 0.2)                    = 1.212 USD/h
    T = 4 / 0.025                            = 160 tokens/s = 576,000 tokens/h
    B = 1.212 / 576,000 * 1e6                = 2.1042 USD per 1M tokens
    input  = 1.212 / (360 * 3600) * 1e6      = 0.9352 USD per 1M input tokens
    output = 1.212 / (120 * 3600) * 1e6      = 2.8056 USD per 1M output tokens

Note: the formula paragraph of the post was not readable from this sandbox (only the post's
opening); the formula above is the one the post is cited for in issue 12 (concurrency / p50
ITL, hourly price, optional discount, 3:1 blend), implemented literally.

Standard library only. Every function raises ValueError for inputs that cannot give a price
(a negative or non-finite price, a discount outside [0, 1), a non-positive rate or latency).
"""

from __future__ import annotations

import math

from prebake.core.evaluation_records import DEFAULT_INPUT_OUTPUT_RATIO, PriceInputs

SECONDS_PER_HOUR = 3600.0
TOKENS_PER_PRICE_UNIT = 1_000_000.0


def _finite(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, not {value!r}")
    return float(value)


def _positive(name: str, value: float) -> float:
    if _finite(name, value) <= 0:
        raise ValueError(f"{name} must be positive, not {value!r}")
    return float(value)


def effective_hourly_usd(hourly_usd: float, discount_rate: float = 0.0) -> float:
    """The hourly price after the discount: hourly_usd * (1 - discount_rate).

    ValueError for a negative price or a discount outside [0, 1) (a discount of 1 would make
    every price 0, which reads as "no price known").
    """
    if _finite("hourly_usd", hourly_usd) < 0:
        raise ValueError(f"hourly_usd must not be negative, not {hourly_usd!r}")
    rate = _finite("discount_rate", discount_rate)
    if not 0 <= rate < 1:
        raise ValueError(f"discount_rate must be in [0, 1) (0.2 for 20 % off), not {discount_rate!r}")
    return float(hourly_usd) * (1.0 - rate)


def check_price_inputs(price: PriceInputs) -> None:
    """ValueError unless `price` can price anything: as `effective_hourly_usd`, and a positive
    `input_output_ratio`. (The record itself does not check: a stored or imported evaluation
    may carry inputs no price is computed from.)"""
    effective_hourly_usd(price.hourly_usd, price.discount_rate)
    _positive("input_output_ratio", price.input_output_ratio)


def total_token_throughput(concurrency: int, p50_itl_ms: float) -> float:
    """Tokens per second of the whole instance: concurrency / p50 inter-token latency.

    ValueError for a non-positive concurrency or latency (a level that streamed no second
    token has no inter-token latency, hence no blended price).
    """
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency <= 0:
        raise ValueError(f"concurrency must be a positive integer, not {concurrency!r}")
    return concurrency / (_positive("p50 inter-token latency (ms)", p50_itl_ms) / 1000.0)


def price_per_million_tokens(price: PriceInputs, tokens_per_second: float) -> float:
    """USD per 1M tokens for an instance producing `tokens_per_second` at `price`.

    effective hourly price / (tokens_per_second * 3600) * 1e6; ValueError unless the rate
    is positive.
    """
    rate = _positive("tokens_per_second", tokens_per_second)
    hourly = effective_hourly_usd(price.hourly_usd, price.discount_rate)
    return hourly / (rate * SECONDS_PER_HOUR) * TOKENS_PER_PRICE_UNIT


def blended_price_per_million_tokens(price: PriceInputs, concurrency: int, p50_itl_ms: float) -> float:
    """The toolkit's blended USD per 1M tokens: the price at concurrency / p50 ITL tokens/s."""
    return price_per_million_tokens(price, total_token_throughput(concurrency, p50_itl_ms))


def blend(
    input_price: float, output_price: float, input_output_ratio: float = DEFAULT_INPUT_OUTPUT_RATIO
) -> float:
    """Per-input and per-output prices blended at `input_output_ratio`: (r * in + out) / (r + 1)."""
    ratio = _positive("input_output_ratio", input_output_ratio)
    for name, value in (("input_price", input_price), ("output_price", output_price)):
        if _finite(name, value) < 0:
            raise ValueError(f"{name} must not be negative, not {value!r}")
    return (ratio * input_price + output_price) / (ratio + 1.0)
