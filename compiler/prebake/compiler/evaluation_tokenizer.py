"""The model source's tokenizer, as far as an evaluation needs one: prompt vocabulary and decoding.

Shared by the evaluation runtimes (inductor, awq). Synthetic prompts are drawn from the
tokenizer's ordinary ids (no special tokens, nothing at or beyond the model's vocabulary
size); every response is decoded, and a failure to decode counts as a tokenizer failure.
Without a tokenizer, prompts are drawn from every id below the vocabulary size and
responses are never decoded (tokenizer_failures stays 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prebake.compiler.evaluation_workload import Decode


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
