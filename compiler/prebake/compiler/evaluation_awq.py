"""Evaluating an awq artifact: its compressed-tensors checkpoint through transformers on CPU.

The checkpoint (see `prebake.compiler.awq`) is a Hugging Face model whose quantization config
is compressed-tensors `pack-quantized`; transformers loads it (offline) and runs it with
dynamic shapes, so generation is greedy with a KV cache: one prefill forward over the
prompt, then one forward per new token over that token alone, reusing the request's cache.
Small models only here: the CPU path dequantizes, it is a correctness and relative
measurement, not what a GPU serving stack would reach.

Concurrency: one model object runs one forward at a time (a lock held per forward, not per
request), so concurrent requests interleave token by token; each request keeps its own
cache. As for a batch-1 inductor package, total tokens/s does not grow with concurrency
(requests are not batched) while each request's inter-token latency grows with it.

Tokenizer: the checkpoint's own (the awq backend always writes one: the source's, or a
synthetic WordLevel tokenizer over the vocabulary when the source has none), loaded with
`prebake.compiler.evaluation_tokenizer`; pass `use_tokenizer=False` to send token ids only.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from prebake.compiler.awq import read_manifest
from prebake.compiler.evaluation_metrics import EvaluationResult, current_host
from prebake.compiler.evaluation_tokenizer import load_tokenizer
from prebake.compiler.evaluation_workload import (
    OnToken,
    Progress,
    WorkloadDoesNotFit,
    run_workload,
    synthetic_prompts,
)
from prebake.core.evaluation_records import EvaluationWorkload, PriceInputs


class AwqRuntime:
    """A loaded awq checkpoint generating greedily with a KV cache; `generate` is thread-safe.

    ValueError (from `read_manifest`) if `checkpoint_dir` is not an awq artifact.
    """

    def __init__(self, checkpoint_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.manifest = read_manifest(checkpoint_dir)
        model: Any = AutoModelForCausalLM.from_pretrained(str(checkpoint_dir), local_files_only=True)
        torch.nn.Module.eval(model).requires_grad_(False)
        self._model = model
        embeddings = model.get_input_embeddings()
        self.vocab_size = int(getattr(embeddings, "num_embeddings", model.config.vocab_size))
        limit = getattr(model.config, "max_position_embeddings", None)
        self.max_positions = int(limit) if isinstance(limit, int) else 0
        self._lock = threading.Lock()
        # Warm-up: the first forward initialises the kernels and the quantized weights' views.
        self.generate([0], 1, lambda _t: None)

    def _forward(self, input_ids: Any, cache: Any) -> tuple[int, Any]:
        import torch

        with self._lock, torch.no_grad():
            out = self._model(input_ids=input_ids, past_key_values=cache, use_cache=True)
        return int(out.logits[0, -1].argmax()), out.past_key_values

    def check_fits(self, prompt_tokens: int, output_tokens: int) -> None:
        """WorkloadDoesNotFit (a ValueError) unless a prompt of `prompt_tokens` plus
        `output_tokens` new ones fit the model's max_position_embeddings (no limit if unset)."""
        if self.max_positions and prompt_tokens + output_tokens > self.max_positions:
            raise WorkloadDoesNotFit(
                f"{prompt_tokens} prompt + {output_tokens} output tokens exceed the model's "
                f"max_position_embeddings {self.max_positions}; ask for at most "
                f"{self.max_positions} tokens in all"
            )

    def generate(self, prompt_ids: list[int], max_new_tokens: int, on_token: OnToken) -> list[int]:
        """Greedy: `max_new_tokens` new ids after `prompt_ids`, each passed to `on_token` as it comes.

        ValueError for an empty prompt or one that with the new tokens exceeds the model's
        max_position_embeddings (`check_fits`).
        """
        import torch

        if not prompt_ids:
            raise ValueError("the prompt is empty")
        self.check_fits(len(prompt_ids), max_new_tokens)
        new: list[int] = []
        cache: Any = None
        step = torch.tensor([prompt_ids], dtype=torch.int64)
        for _ in range(max_new_tokens):
            token, cache = self._forward(step, cache)
            new.append(token)
            on_token(token)
            step = torch.tensor([[token]], dtype=torch.int64)
        return new


def evaluate_awq(
    checkpoint_dir: Path,
    workload: EvaluationWorkload,
    price: PriceInputs | None = None,
    *,
    use_tokenizer: bool = True,
    seed: int = 0,
    instance_type: str = "",
    progress: Progress | None = None,
) -> EvaluationResult:
    """Load the awq artifact in `checkpoint_dir` and run `workload` against it on this CPU.

    `instance_type` is recorded as this host's (`current_host`; "" when unknown); `price` prices
    the levels (None: every price 0). WorkloadDoesNotFit, before any request, for a workload
    beyond the model's positions.
    """
    runtime = AwqRuntime(checkpoint_dir)
    runtime.check_fits(workload.prompt_tokens, workload.output_tokens)
    tokenizer = load_tokenizer(checkpoint_dir if use_tokenizer else None, runtime.vocab_size)
    prompts = synthetic_prompts(tokenizer.vocabulary, workload.prompt_tokens, seed)
    levels = run_workload(
        runtime.generate, prompts, workload, price, decode=tokenizer.decode, progress=progress
    )
    return EvaluationResult(workload, current_host(instance_type), price, levels)
