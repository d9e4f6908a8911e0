"""A real evaluation of an awq artifact (the tiny Llama, quantized W4A16) through transformers on CPU.

Reuses test_awq's module fixtures (one quantization for this module). The checkpoint ships a
tokenizer (a synthetic one for the tiny model), so prompts come from its vocabulary and every
response is decoded. Nothing asserts a duration.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from prebake.compiler.evaluation_awq import AwqRuntime, evaluate_awq
from prebake.compiler.evaluation_workload import synthetic_prompts
from prebake.core.evaluation_records import EvaluationWorkload
from prebake.server.price_table import load_price_table
from tests.test_awq import ChildRun, awq_run, tiny_model
from tests.test_evaluation_workload import assert_a_clean_priced_run

__all__ = ["awq_run", "tiny_model"]  # fixtures, used by name

WORKLOAD = EvaluationWorkload(prompt_tokens=8, output_tokens=5, requests=4, concurrency_levels=(1, 4))


@pytest.fixture(scope="module")
def checkpoint(awq_run: ChildRun) -> Path:
    assert awq_run.proc.returncode == 0, awq_run.proc.stderr[-3000:]
    return awq_run.out_dir


def test_cached_greedy_generation_matches_recomputing_without_a_cache(checkpoint: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    runtime = AwqRuntime(checkpoint)
    prompt = synthetic_prompts(range(runtime.vocab_size), 8, seed=5)(0)
    streamed: list[int] = []
    output = runtime.generate(prompt, 5, streamed.append)
    assert output == streamed and len(output) == 5
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), local_files_only=True)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    assert output == ids[len(prompt) :]
    with pytest.raises(ValueError, match="max_position_embeddings"):
        runtime.generate(prompt, runtime.max_positions, lambda _t: None)


def test_a_real_evaluation_at_concurrency_1_and_4(checkpoint: Path) -> None:
    price = load_price_table().price_inputs("ml.g5.xlarge")
    result = evaluate_awq(checkpoint, WORKLOAD, price)
    assert_a_clean_priced_run(result.levels, WORKLOAD)
