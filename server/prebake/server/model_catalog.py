"""The JumpStart model table: which optimizations each SageMaker JumpStart model supports.

Shipped as package data (from the reference table). Key validation uses it for keys
whose model is a JumpStart id: an unknown id is refused with suggestions, and an AWQ key
for a model whose quantization support is "no" is refused. Hugging Face repo ids
(`org/name`) are not in the table and are not checked. Immutable after load, so safe to
share between threads.
"""

from __future__ import annotations

import csv
import difflib
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources

from prebake.core.errors import InvalidKey

# JumpStart ids look like `meta-textgeneration-llama-3-8b` or `huggingface-llm-falcon-7b-bf16`.
_JUMPSTART_RE = re.compile(r"^(?:meta|huggingface)-[a-z0-9][a-z0-9._-]*$")


@dataclass(frozen=True)
class ModelInfo:
    family: str
    jumpstart_model_id: str
    supports_quantization: bool | None
    supports_speculative_decoding: bool | None
    sagemaker_draft_model: bool | None


def _support(cell: str) -> bool | None:
    return {"yes": True, "no": False}.get(cell.strip().lower())


def looks_like_jumpstart_id(model: str) -> bool:
    return bool(_JUMPSTART_RE.match(model))


class ModelCatalog:
    def __init__(self, models: list[ModelInfo]) -> None:
        self._models = {m.jumpstart_model_id: m for m in models}

    @classmethod
    def load_default(cls) -> ModelCatalog:
        text = resources.files("prebake.server.data").joinpath("jumpstart_models.csv").read_text()
        rows = csv.DictReader(io.StringIO(text))
        return cls(
            [
                ModelInfo(
                    family=row["family"],
                    jumpstart_model_id=row["jumpstart_model_id"],
                    supports_quantization=_support(row["supports_quantization"]),
                    supports_speculative_decoding=_support(row["supports_speculative_decoding"]),
                    sagemaker_draft_model=_support(row["sagemaker_draft_model"]),
                )
                for row in rows
            ]
        )

    def __iter__(self) -> Iterator[ModelInfo]:
        return iter(self._models.values())

    def get(self, model_id: str) -> ModelInfo | None:
        return self._models.get(model_id)

    def check(self, model: str, kind: str) -> None:
        """Refuse an unknown JumpStart id, and AWQ for a model that does not support quantization."""
        if not looks_like_jumpstart_id(model):
            return
        info = self._models.get(model)
        if info is None:
            close = difflib.get_close_matches(model, list(self._models), n=3, cutoff=0.75)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise InvalidKey(
                "model",
                # An rpc message names rpcs and fields; the CLI translates for its users.
                f"model: unknown JumpStart model id {model!r}{hint} (Catalog.ListModels lists the "
                "known ids; a Hugging Face repo id looks like org/name)",
            )
        if kind == "awq" and info.supports_quantization is False:
            raise InvalidKey(
                "model",
                f"{model} does not support quantization (SageMaker JumpStart table); "
                "AWQ checkpoints cannot be made for it",
            )
