"""A real evaluation of a compiled tiny-Llama inductor artifact, at concurrency 1 and 4.

Reuses test_inductor's module fixtures (the fp32 package: batch 2, sequence length 32), so
this module compiles once. Checks the greedy generation against eager transformers and the
metrics' internal consistency; nothing asserts a duration.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from prebake.compiler.evaluation_inductor import (
    InductorRuntime,
    evaluate_inductor,
    evaluate_runtime,
)
from prebake.compiler.evaluation_tokenizer import load_tokenizer
from prebake.compiler.evaluation_workload import synthetic_prompts
from prebake.core.evaluation_records import EvaluationWorkload
from prebake.server.price_table import load_price_table
from tests.test_evaluation_workload import assert_a_clean_priced_run
from tests.test_inductor import SEQ, ChildRun, fp32_child, tiny_model

__all__ = ["fp32_child", "tiny_model"]  # fixtures, used by name

WORKLOAD = EvaluationWorkload(prompt_tokens=8, output_tokens=6, requests=4, concurrency_levels=(1, 4))


@pytest.fixture(scope="module")
def package_dir(fp32_child: ChildRun) -> Path:
    assert fp32_child.proc.returncode == 0, fp32_child.proc.stderr
    return fp32_child.out_dir


@pytest.fixture(scope="module")
def runtime(package_dir: Path) -> Iterator[InductorRuntime]:
    with InductorRuntime(package_dir) as loaded:
        yield loaded


def eager_greedy(model_dir: Path, prompt: list[int], new_tokens: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_greedy_generation_matches_eager(runtime: InductorRuntime, tiny_model: Path) -> None:
    assert (runtime.batch_size, runtime.sequence_length) == (2, SEQ)
    prompt = synthetic_prompts(range(runtime.vocab_size), 8, seed=3)(0)
    streamed: list[int] = []
    output = runtime.generate(prompt, 6, streamed.append)
    assert output == streamed
    assert output == eager_greedy(tiny_model, prompt, 6)


def test_a_workload_beyond_the_window_is_refused_before_running(runtime: InductorRuntime) -> None:
    with pytest.raises(ValueError, match=rf"do not fit this package's sequence length {SEQ}"):
        runtime.generate(list(range(30)), 3, lambda _t: None)
    with pytest.raises(ValueError, match="ask for at most 2 output tokens"):
        evaluate_runtime(runtime, EvaluationWorkload(30, 3, 1, (1,)))


def test_a_real_evaluation_at_concurrency_1_and_4(package_dir: Path) -> None:
    price = load_price_table().price_inputs("ml.c6a.4xlarge")
    seen: list[tuple[int, int, int]] = []
    result = evaluate_inductor(
        package_dir, WORKLOAD, price, instance_type="", progress=lambda *a: seen.append(a)
    )
    assert result.workload == WORKLOAD and result.price == price
    assert result.host.cpu_count > 0 and "torch" in dict(result.host.runtime_versions)
    # No tokenizer in the tiny checkpoint: token ids in, token ids out, nothing to fail.
    assert_a_clean_priced_run(result.levels, WORKLOAD)
    assert len(seen) == 2 * WORKLOAD.requests and seen[-1] == (4, 4, 4)


def test_concurrent_requests_share_batch_rows_and_get_the_same_tokens(runtime: InductorRuntime) -> None:
    # Batch 2 package: two requests per forward; each must still see only its own row.
    prompts = [synthetic_prompts(range(runtime.vocab_size), 5 + i, seed=9)(i) for i in range(4)]
    alone = [runtime.generate(p, 4, lambda _t: None) for p in prompts]
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(lambda p: runtime.generate(p, 4, lambda _t: None), prompts))
    assert together == alone


def test_a_closed_runtime_refuses_requests(package_dir: Path) -> None:
    runtime = InductorRuntime(package_dir)
    runtime.close()
    with pytest.raises(RuntimeError, match="closed"):
        runtime.generate([1, 2], 1, lambda _t: None)


def test_the_model_sources_tokenizer_gives_the_prompt_vocabulary_and_decodes(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[EOS]": 1, **{f"w{i}": i for i in range(2, 20)}}
    raw = RawTokenizer(WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = Whitespace()
    # transformers leaves the constructor unannotated.
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="[EOS]")  # type: ignore[no-untyped-call]
    fast.save_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path, vocab_size=10)
    assert list(tokenizer.vocabulary) == list(range(2, 10))  # no specials, nothing beyond the model
    assert tokenizer.decode is not None and tokenizer.decode([2, 3]) == "w2 w3"
    ids = load_tokenizer(None, vocab_size=10)
    assert list(ids.vocabulary) == list(range(10)) and ids.decode is None
