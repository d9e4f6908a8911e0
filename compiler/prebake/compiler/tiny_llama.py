"""Build small, seeded, random-weight Llama checkpoints for tests, demos and benchmarks.

`build_tiny_llama(out_dir)` writes a Hugging Face checkpoint (config.json, model.safetensors,
generation_config.json) that `AutoModelForCausalLM.from_pretrained(out_dir)` loads offline.
The bytes depend only on the arguments and the installed torch/transformers versions, so
one seed always gives the same `revision_of(out_dir)`.

Command line:

    python -m prebake.compiler.tiny_llama OUT_DIR [--hidden-size 768 --num-layers 8 ...]

torch and transformers are imported inside the function so that importing this module
stays cheap (the worker may import the package without the inductor extra installed).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

# Llama sizes its MLP at about 8/3 of the hidden size, rounded up to a hardware-friendly
# multiple (the original code used 256; 64 keeps the tiny models tiny).
_FFN_MULTIPLE = 64


def default_intermediate_size(hidden_size: int) -> int:
    """Llama's MLP width for `hidden_size`: 8/3 * hidden, rounded up to a multiple of 64."""
    return _FFN_MULTIPLE * math.ceil(8 * hidden_size / 3 / _FFN_MULTIPLE)


def build_tiny_llama(
    out_dir: Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    vocab_size: int = 512,
    max_position_embeddings: int = 2048,
    seed: int = 0,
) -> Path:
    """Write a random-init `LlamaForCausalLM` checkpoint into `out_dir` and return `out_dir`.

    Weights are drawn after `torch.manual_seed(seed)`, in float32, so the same arguments give
    byte-identical files. `out_dir` is created if missing; files already in it are
    overwritten (others are left alone, which would change its revision: use an empty or
    new directory). Raises ValueError for inconsistent sizes (hidden size not divisible by
    the head count, or head count not divisible by the key/value head count).
    """
    if min(hidden_size, num_layers, num_heads, num_kv_heads, vocab_size, max_position_embeddings) <= 0:
        raise ValueError("every size must be positive")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not divisible by num_kv_heads {num_kv_heads}")

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or default_intermediate_size(hidden_size),
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        dtype="float32",
    )
    # Seed immediately before construction: weight initialisation is the only RNG consumer.
    torch.manual_seed(seed)
    # transformers leaves the constructor unannotated.
    model = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]
    # Through nn.Module: transformers overrides to() without annotations. float32 whatever
    # torch's default dtype happens to be in the calling process.
    torch.nn.Module.to(model, torch.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m prebake.compiler.tiny_llama",
        description="Write a seeded random-weight Llama checkpoint (Hugging Face format).",
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-kv-heads", type=int, default=2)
    parser.add_argument("--intermediate-size", type=int, default=None)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--max-position-embeddings", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        path = build_tiny_llama(
            args.out_dir,
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            num_heads=args.num_heads,
            num_kv_heads=args.num_kv_heads,
            intermediate_size=args.intermediate_size,
            vocab_size=args.vocab_size,
            max_position_embeddings=args.max_position_embeddings,
            seed=args.seed,
        )
    except ValueError as exc:
        parser.error(str(exc))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
