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

Concurrency: one loaded package runs one forward at a time, over batch_size rows. The
runtime is an engine (one thread per loaded copy, `runners`, 1 by default) serving every
request in flight like one endpoint serves its users: each forward takes up to batch_size
waiting requests in arrival order (one per row; the other rows are padding) and gives each
its next token, then the unfinished ones go to the back of the line. So at concurrency C a
batch-1 package makes each request's inter-token latency about C forwards long while the
total tokens/s stays what back-to-back forwards allow (minus thread hand-offs under the
GIL): more concurrency buys throughput only from a batch_size > 1 package, whose forward
serves up to batch_size requests for about the price of one. (More runners on a 2-core
host mostly compete for the same cores.)

Tokenizer: a model source with a tokenizer (`tokenizer_dir`, loaded offline by
transformers' AutoTokenizer) gives the vocabulary synthetic prompts are drawn from (its
non-special ids) and decodes every response (a failure counts as a tokenizer failure).
Without one (the tiny test Llama has none) prompts are drawn from every id below the
vocabulary size and responses are token ids, never decoded: tokenizer_failures is 0.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from prebake.compiler.evaluation_metrics import EvaluationResult, current_host
from prebake.compiler.evaluation_tokenizer import load_tokenizer
from prebake.compiler.evaluation_workload import OnToken, Progress, run_workload, synthetic_prompts
from prebake.compiler.inductor import InductorPackage, load_package
from prebake.core.evaluation_records import EvaluationWorkload, PriceInputs

if TYPE_CHECKING:
    import torch

PAD_TOKEN = 0


@dataclass
class _Job:
    """One request inside the engine: its tokens so far and what it still needs."""

    ids: list[int]
    remaining: int
    on_token: OnToken
    output: list[int] = field(default_factory=list)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class InductorRuntime:
    """Greedy generation with loaded copies of one inductor package (see the module docstring).

    `generate` is thread-safe: it hands the request to the engine threads (one per loaded
    copy, `runners`) and waits. Each engine thread takes up to batch_size waiting requests
    in arrival order, runs one forward for all of them (one request per row) and gives each
    its next token, then puts the unfinished ones back at the end of the line, so
    concurrent requests share the package token by token. `on_token` is called from an
    engine thread. Construction loads the copies and runs one warm-up forward on each (the
    first call of a package is slower), so measurements see a warm runtime; `close` stops
    the engine threads (also a context manager).
    """

    def __init__(self, package_dir: Path, runners: int = 1) -> None:
        if runners <= 0:
            raise ValueError(f"runners must be positive, not {runners}")
        packages = [load_package(package_dir) for _ in range(runners)]
        first = packages[0]
        self.batch_size, self.sequence_length = (int(n) for n in first.input_shape)
        self.vocab_size = int(first.manifest["outputs"][0]["shape"][-1])
        self._waiting: deque[_Job] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._threads = []
        for number, package in enumerate(packages):
            package(self._window([[PAD_TOKEN]]))
            thread = threading.Thread(
                target=self._engine, args=(package,), name=f"inductor-engine-{number}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def __enter__(self) -> InductorRuntime:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the engine threads; requests still waiting fail with RuntimeError."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        for thread in self._threads:
            thread.join()
        while self._waiting:
            job = self._waiting.popleft()
            job.error = RuntimeError("the inductor runtime was closed")
            job.done.set()

    def _window(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        import torch

        window = torch.full((self.batch_size, self.sequence_length), PAD_TOKEN, dtype=torch.int64)
        for row, ids in enumerate(rows):
            window[row, : len(ids)] = torch.tensor(list(ids), dtype=torch.int64)
        return window

    def _engine(self, package: InductorPackage) -> None:
        while True:
            with self._ready:
                while not self._waiting and not self._closed:
                    self._ready.wait()
                if self._closed:
                    return
                batch = [self._waiting.popleft() for _ in range(min(self.batch_size, len(self._waiting)))]
            self._step(package, batch)
            with self._ready:
                self._waiting.extend(job for job in batch if not job.done.is_set())
                self._ready.notify_all()

    def _step(self, package: InductorPackage, batch: list[_Job]) -> None:
        # Whatever fails fails the requests of this step, never the engine thread: a dead
        # engine would leave every later request waiting forever.
        try:
            logits = package(self._window([job.ids for job in batch]))
            tokens = [int(logits[row, len(job.ids) - 1].argmax()) for row, job in enumerate(batch)]
        except Exception as exc:
            for job in batch:
                job.error = exc
                job.done.set()
            return
        for job, token in zip(batch, tokens, strict=True):
            job.ids.append(token)
            job.output.append(token)
            job.remaining -= 1
            try:
                job.on_token(token)
            except Exception as exc:
                job.error = exc
            if job.remaining == 0 or job.error is not None:
                job.done.set()

    def check_fits(self, prompt_tokens: int, output_tokens: int) -> None:
        """ValueError unless a prompt of `prompt_tokens` plus `output_tokens` new ones fit the window."""
        if prompt_tokens + output_tokens > self.sequence_length:
            raise ValueError(
                f"{prompt_tokens} prompt + {output_tokens} output tokens do not fit this package's "
                f"sequence length {self.sequence_length}; ask for at most "
                f"{max(self.sequence_length - prompt_tokens, 0)} output tokens"
            )

    def generate(self, prompt_ids: list[int], max_new_tokens: int, on_token: OnToken) -> list[int]:
        """Greedy: `max_new_tokens` new ids after `prompt_ids`, each passed to `on_token` as it comes.

        ValueError for an empty prompt or one that does not fit with the new tokens;
        RuntimeError after `close`; the package's or `on_token`'s exception if one raised.
        """
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        self.check_fits(len(prompt_ids), max_new_tokens)
        if max_new_tokens <= 0:
            return []
        job = _Job(list(prompt_ids), max_new_tokens, on_token)
        with self._ready:
            if self._closed:
                raise RuntimeError("the inductor runtime was closed")
            self._waiting.append(job)
            self._ready.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.output


def evaluate_runtime(
    runtime: InductorRuntime,
    workload: EvaluationWorkload,
    price: PriceInputs | None = None,
    *,
    tokenizer_dir: Path | None = None,
    seed: int = 0,
    instance_type: str = "",
    progress: Progress | None = None,
) -> EvaluationResult:
    """Run `workload` against a loaded runtime (which stays open; the caller closes it).

    ValueError, before any request, if the workload does not fit the package's window.
    `instance_type` is recorded as this host's (`current_host`; "" when unknown); `price`
    prices the levels (None: every price 0).
    """
    runtime.check_fits(workload.prompt_tokens, workload.output_tokens)
    tokenizer = load_tokenizer(tokenizer_dir, runtime.vocab_size)
    prompts = synthetic_prompts(tokenizer.vocabulary, workload.prompt_tokens, seed)
    levels = run_workload(
        runtime.generate, prompts, workload, price, decode=tokenizer.decode, progress=progress
    )
    return EvaluationResult(workload, current_host(instance_type), price, levels)


def evaluate_inductor(
    package_dir: Path,
    workload: EvaluationWorkload,
    price: PriceInputs | None = None,
    *,
    tokenizer_dir: Path | None = None,
    runners: int = 1,
    seed: int = 0,
    instance_type: str = "",
    progress: Progress | None = None,
) -> EvaluationResult:
    """Load the inductor artifact in `package_dir`, run `workload` against it on this CPU, close it.

    As `evaluate_runtime`; also RuntimeError (from `load_package`) if this CPU cannot run
    the package, ValueError if `package_dir` holds no inductor manifest.
    """
    with InductorRuntime(package_dir, runners) as runtime:
        return evaluate_runtime(
            runtime,
            workload,
            price,
            tokenizer_dir=tokenizer_dir,
            seed=seed,
            instance_type=instance_type,
            progress=progress,
        )
