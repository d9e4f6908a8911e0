"""The load driver of an evaluation: requests at each concurrency level, timed per token.

Independent of the model runtime: it drives a `Generate` callable,

    generate(prompt_ids, max_new_tokens, on_token) -> output_ids

which must be safe to call from several threads at once, call `on_token(token_id)` as each
new token is produced (streaming; the driver timestamps the calls; any thread may call it,
but one request's calls must not overlap) and return the new tokens. A generate that never
calls `on_token` is treated as non-streaming: its time to first token is its client
latency and it has no inter-token gaps.

For each level of the workload, `requests` requests go out through `concurrency` threads,
each sending its next request as soon as its previous one returned (so exactly
`concurrency` are in flight until the last ones). Per request the driver records the time
to first token, every gap between two streamed tokens, the client latency, and whether
building its prompt failed (a tokenizer failure: no invocation), the call raised (an
invocation error), the response was empty, or decoding it failed (a tokenizer failure).
The level's metrics and prices are then computed by `level_metrics`.

Prompts come from a `PromptBuilder` (request index -> token ids, exactly `prompt_tokens` of
them); `synthetic_prompts` draws them deterministically from a vocabulary with a seeded RNG,
so no data set is needed and a rerun sends the same prompts.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from prebake.compiler.evaluation_metrics import check_workload, distribution
from prebake.core import pricing
from prebake.core.evaluation_records import EvaluationWorkload, LevelMetrics, PriceInputs

OnToken = Callable[[int], None]
Generate = Callable[[list[int], int, OnToken], list[int]]
PromptBuilder = Callable[[int], list[int]]
Decode = Callable[[list[int]], str]
# (concurrency level, requests finished at that level, requests of the level)
Progress = Callable[[int, int, int], None]


class WorkloadDoesNotFit(ValueError):
    """The workload cannot run against this artifact at all, whatever the retry (deterministic):
    e.g. prompt plus output tokens beyond an inductor package's window or an awq model's
    positions. A runtime raises it before the first request, so that the job fails instead of
    storing an evaluation whose every request failed."""


def synthetic_prompts(vocabulary: Sequence[int], length: int, seed: int = 0) -> PromptBuilder:
    """Prompts of exactly `length` ids drawn from `vocabulary` (e.g. a tokenizer's non-special ids).

    Request `i` gets the same prompt on every run and every host (seeded by `seed` and `i`),
    and different requests get different prompts. ValueError for an empty vocabulary or a
    non-positive length.
    """
    ids = list(vocabulary)
    if not ids:
        raise ValueError("synthetic prompts need a non-empty vocabulary")
    if length <= 0:
        raise ValueError(f"prompt length must be positive, not {length}")

    def build(index: int) -> list[int]:
        rng = random.Random(f"prebake-prompt:{seed}:{index}")
        return rng.choices(ids, k=length)

    return build


@dataclass
class RequestRecord:
    """What one request measured (seconds, from time.perf_counter)."""

    started: float = 0.0
    finished: float = 0.0
    token_times: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    invoked: bool = False
    error: str = ""
    tokenizer_failed: bool = False

    @property
    def returned_tokens(self) -> bool:
        return self.invoked and not self.error and self.output_tokens > 0

    @property
    def latency(self) -> float:
        return self.finished - self.started

    @property
    def ttft(self) -> float:
        return (self.token_times[0] if self.token_times else self.finished) - self.started

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]


def _one_request(
    index: int,
    generate: Generate,
    prompts: PromptBuilder,
    workload: EvaluationWorkload,
    decode: Decode | None,
) -> RequestRecord:
    record = RequestRecord()
    try:
        prompt = prompts(index)
        if len(prompt) != workload.prompt_tokens:
            raise ValueError(f"prompt of {len(prompt)} tokens, not {workload.prompt_tokens}")
    except Exception:
        record.tokenizer_failed = True
        return record
    record.prompt_tokens = len(prompt)
    record.invoked = True

    def on_token(_token: int) -> None:
        record.token_times.append(time.perf_counter())

    record.started = time.perf_counter()
    try:
        output = generate(list(prompt), workload.output_tokens, on_token)
    except Exception as exc:
        record.finished = time.perf_counter()
        record.error = f"{type(exc).__name__}: {exc}"
        return record
    record.finished = time.perf_counter()
    record.output_tokens = len(output)
    if output and decode is not None:
        try:
            decode(list(output))
        except Exception:
            record.tokenizer_failed = True
    return record


def run_level(
    generate: Generate,
    prompts: PromptBuilder,
    workload: EvaluationWorkload,
    concurrency: int,
    *,
    decode: Decode | None = None,
    progress: Progress | None = None,
    first_index: int = 0,
) -> tuple[list[RequestRecord], float]:
    """Send the workload's requests with `concurrency` in flight; (records, wall seconds).

    Request indexes (for the prompt builder) are first_index .. first_index + requests - 1.
    `progress` is called after each request, from the driver's threads but never concurrently.
    """
    lock = threading.Lock()
    done = 0

    def task(index: int) -> RequestRecord:
        nonlocal done
        record = _one_request(index, generate, prompts, workload, decode)
        with lock:
            done += 1
            if progress is not None:
                progress(concurrency, done, workload.requests)
        return record

    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"evaluate-c{concurrency}") as pool:
        records = list(pool.map(task, range(first_index, first_index + workload.requests)))
    return records, time.perf_counter() - began


def level_metrics(
    records: Sequence[RequestRecord], duration: float, concurrency: int, price: PriceInputs | None
) -> LevelMetrics:
    """The LevelMetrics of one level's records (see LevelMetrics for each field's definition)."""
    ok = [r for r in records if r.returned_tokens]
    input_tokens = sum(r.prompt_tokens for r in records if r.invoked and not r.error)
    output_tokens = sum(r.output_tokens for r in ok)
    input_rate = input_tokens / duration if duration > 0 else 0.0
    output_rate = output_tokens / duration if duration > 0 else 0.0
    itl = distribution([g * 1000 for r in ok for g in r.gaps])
    per_request = [r for r in ok if r.latency > 0]
    input_price = output_price = blended = 0.0
    if price is not None:
        input_price = pricing.price_per_million_tokens(price, input_rate) if input_rate > 0 else 0.0
        output_price = pricing.price_per_million_tokens(price, output_rate) if output_rate > 0 else 0.0
        if itl.p50 > 0:
            blended = pricing.blended_price_per_million_tokens(price, concurrency, itl.p50)
    return LevelMetrics(
        concurrency=concurrency,
        requests=len(records),
        client_invocations=sum(r.invoked for r in records),
        invocation_errors=sum(bool(r.error) for r in records),
        tokenizer_failures=sum(r.tokenizer_failed for r in records),
        empty_responses=sum(r.invoked and not r.error and r.output_tokens == 0 for r in records),
        duration_seconds=duration,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        ttft_ms=distribution([r.ttft * 1000 for r in ok]),
        itl_ms=itl,
        client_latency_ms=distribution([r.latency * 1000 for r in ok]),
        input_tokens_per_second=input_rate,
        output_tokens_per_second=output_rate,
        input_tokens_per_second_per_request=distribution([r.prompt_tokens / r.latency for r in per_request]),
        output_tokens_per_second_per_request=distribution([r.output_tokens / r.latency for r in per_request]),
        price_per_million_input_tokens=input_price,
        price_per_million_output_tokens=output_price,
        blended_price_per_million_tokens=blended,
    )


def run_workload(
    generate: Generate,
    prompts: PromptBuilder,
    workload: EvaluationWorkload,
    price: PriceInputs | None = None,
    *,
    decode: Decode | None = None,
    progress: Progress | None = None,
) -> tuple[LevelMetrics, ...]:
    """One LevelMetrics per concurrency level of `workload`, in its order (see the module docstring).

    Levels run one after another; each level's requests get their own prompt indexes, so no
    level is measured on prompts another level already sent (a runtime with a prompt cache
    would otherwise look faster at later levels). Exceptions from `generate`, `prompts` and
    `decode` are counted, never raised; `progress` exceptions propagate. ValueError, before any
    request, for a workload that cannot run (`check_workload`).
    """
    check_workload(workload)
    levels = []
    for number, concurrency in enumerate(workload.concurrency_levels):
        records, duration = run_level(
            generate,
            prompts,
            workload,
            concurrency,
            decode=decode,
            progress=progress,
            first_index=number * workload.requests,
        )
        levels.append(level_metrics(records, duration, concurrency, price))
    return tuple(levels)
