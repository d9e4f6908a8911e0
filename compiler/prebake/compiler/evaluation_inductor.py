"""Evaluating an inductor artifact: greedy generation with its `.pt2` package on this CPU.

The package (see `prebake.compiler.inductor`) has static shapes: it takes one int64
`input_ids` tensor of exactly (batch_size, sequence_length) and returns the logits of every
position, with no KV cache (exported with use_cache=False) and no attention-mask input. So
generation recomputes the whole static window for every token:

    prefill   the prompt, right-padded with token 0 to sequence_length, in row 0; the next
              token is the argmax of the logits at the prompt's last position;
    decode    the window with the tokens so far (prompt + generated), one forward per token.

Right padding is exact for a causal decoder: position i attends only to positions <= i, so
the padding after the last real token changes no logit that is read. Prompt plus output
tokens must fit the window (ValueError before anything runs otherwise).

Concurrency: one loaded package runs one forward at a time. `InductorRuntime` holds a pool
of `runners` loaded packages (1 by default) and a request takes a runner for each forward,
not for the whole request, so concurrent requests interleave token by token like users of
one endpoint: with one runner, concurrency C makes each request's inter-token latency about
C forwards long and the total tokens/s stays about what one forward a time allows (on two
CPU cores more runners mostly compete for the same cores). Rows 1.. of a batch_size > 1
package are padding: requests are not batched together (a step batcher is not built).

Tokenizer: a model source with a tokenizer (`tokenizer_dir`, loaded offline by
transformers' AutoTokenizer) gives the vocabulary synthetic prompts are drawn from (its
non-special ids) and decodes every response (a failure counts as a tokenizer failure).
Without one (the tiny test Llama has none) prompts are drawn from every id below the
vocabulary size and responses are token ids, never decoded: tokenizer_failures is 0.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prebake.compiler.evaluation_metrics import EvaluationResult, HostInfo, PriceInputs, Workload
from prebake.compiler.evaluation_workload import Decode, OnToken, Progress, run_workload, synthetic_prompts
from prebake.compiler.inductor import InductorPackage, load_package

if TYPE_CHECKING:
    import torch

PAD_TOKEN = 0


@dataclass(frozen=True)
class Tokenizer:
    """The parts of a tokenizer an evaluation uses: prompt vocabulary and response decoding."""

    vocabulary: Sequence[int]
    decode: Decode | None


def load_tokenizer(tokenizer_dir: Path | None, vocab_size: int) -> Tokenizer:
    """The model source's tokenizer (offline), or token ids 0..vocab_size-1 without one.

    Ids at or beyond the package's vocabulary (added tokens) and special tokens are never
    put in a prompt.
    """
    if tokenizer_dir is None:
        return Tokenizer(range(vocab_size), None)
    from transformers import AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    special = set(tokenizer.all_special_ids)
    ids = [i for i in sorted(set(tokenizer.get_vocab().values())) if i < vocab_size and i not in special]
    if not ids:
        raise ValueError(f"the tokenizer in {tokenizer_dir} has no ordinary token below {vocab_size}")

    def decode(token_ids: list[int]) -> str:
        text: str = tokenizer.decode(token_ids, skip_special_tokens=True)
        return text

    return Tokenizer(ids, decode)


class InductorRuntime:
    """A pool of loaded copies of one inductor package, generating greedily (module docstring).

    `generate` is thread-safe. Construction loads `runners` copies and runs one warm-up
    forward on each (the first call of a package is slower: it maps its weights), so the
    measured levels see a warm runtime.
    """

    def __init__(self, package_dir: Path, runners: int = 1) -> None:
        if runners <= 0:
            raise ValueError(f"runners must be positive, not {runners}")
        packages = [load_package(package_dir) for _ in range(runners)]
        first = packages[0]
        self.batch_size, self.sequence_length = (int(n) for n in first.input_shape)
        self.vocab_size = int(first.manifest["outputs"][0]["shape"][-1])
        self._pool: queue.Queue[InductorPackage] = queue.Queue()
        for package in packages:
            package(self._window([PAD_TOKEN]))
            self._pool.put(package)

    def _window(self, ids: Sequence[int]) -> torch.Tensor:
        import torch

        window = torch.full((self.batch_size, self.sequence_length), PAD_TOKEN, dtype=torch.int64)
        window[0, : len(ids)] = torch.tensor(list(ids), dtype=torch.int64)
        return window

    def _next_token(self, ids: Sequence[int]) -> int:
        window = self._window(ids)
        package = self._pool.get()
        try:
            logits = package(window)
        finally:
            self._pool.put(package)
        return int(logits[0, len(ids) - 1].argmax())

    def check_fits(self, prompt_tokens: int, output_tokens: int) -> None:
        """ValueError unless a prompt of `prompt_tokens` plus `output_tokens` new ones fit the window."""
        if prompt_tokens + output_tokens > self.sequence_length:
            raise ValueError(
                f"{prompt_tokens} prompt + {output_tokens} output tokens do not fit this package's "
                f"sequence length {self.sequence_length}; ask for at most "
                f"{max(self.sequence_length - prompt_tokens, 0)} output tokens"
            )

    def generate(self, prompt_ids: list[int], max_new_tokens: int, on_token: OnToken) -> list[int]:
        """Greedy: `max_new_tokens` new ids after `prompt_ids`, each passed to `on_token` as it comes."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        self.check_fits(len(prompt_ids), max_new_tokens)
        ids = list(prompt_ids)
        new: list[int] = []
        for _ in range(max_new_tokens):
            token = self._next_token(ids)
            ids.append(token)
            new.append(token)
            on_token(token)
        return new


def evaluate_inductor(
    package_dir: Path,
    workload: Workload,
    price: PriceInputs | None = None,
    *,
    tokenizer_dir: Path | None = None,
    runners: int = 1,
    seed: int = 0,
    instance_type: str = "",
    progress: Progress | None = None,
    runtime_factory: Callable[[Path, int], InductorRuntime] = InductorRuntime,
) -> EvaluationResult:
    """Load the inductor artifact in `package_dir` and run `workload` against it on this CPU.

    ValueError if the workload does not fit the package's window; RuntimeError (from
    `load_package`) if this CPU cannot run the package. `instance_type` is what HostInfo
    records for this host ("" when unknown); `price` prices the levels (None: prices 0).
    """
    runtime = runtime_factory(package_dir, runners)
    runtime.check_fits(workload.prompt_tokens, workload.output_tokens)
    tokenizer = load_tokenizer(tokenizer_dir, runtime.vocab_size)
    prompts = synthetic_prompts(tokenizer.vocabulary, workload.prompt_tokens, seed)
    levels = run_workload(
        runtime.generate, prompts, workload, price, decode=tokenizer.decode, progress=progress
    )
    return EvaluationResult(workload, HostInfo.current(instance_type), price, levels)
