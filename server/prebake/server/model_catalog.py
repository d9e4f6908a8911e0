"""The JumpStart model table: which optimizations each SageMaker JumpStart model supports,
and the names each model goes by.

Shipped as package data: `jumpstart_models.csv` (the reference table) and
`model_names.csv` (the Hugging Face repo id and aliases of those JumpStart models whose
Hugging Face repo is known). Key validation uses it: an unknown JumpStart id is refused
with suggestions, and an AWQ key for a model whose quantization support is "no" is
refused, whichever of its names the key uses. Other Hugging Face repo ids (`org/name`) are
not in the table and are not checked. Immutable after load, so safe to share between threads.

One model, one name in keys: `canonical_name` maps every known name of a model (JumpStart
id, Hugging Face id, alias; case-insensitively, as the Hugging Face hub resolves repo ids)
to its Hugging Face id, which key normalisation puts in the key. The Hugging Face id, not
the JumpStart id, because it is what deployers and workers use: it names the checkpoint a
worker downloads and compiles, it is what `model_source_map` entries and published
artifacts (SageMaker's precompiled sets included) have been keyed by so far, and it exists
for every model while a JumpStart id exists only for the models SageMaker lists. A model
without a known Hugging Face id keeps its JumpStart id.
"""

from __future__ import annotations

import csv
import difflib
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
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
    # The Hugging Face repo id of the same weights ("" if not known), the model's canonical
    # name in keys when set; and other names of it (renamed owners, older repo names).
    hf_model_id: str = ""
    aliases: tuple[str, ...] = ()

    @property
    def canonical_name(self) -> str:
        return self.hf_model_id or self.jumpstart_model_id

    @property
    def names(self) -> tuple[str, ...]:
        """Every name of the model, the canonical one first."""
        others = (self.jumpstart_model_id, self.hf_model_id, *self.aliases)
        return (self.canonical_name, *(n for n in others if n and n != self.canonical_name))


def _support(cell: str) -> bool | None:
    return {"yes": True, "no": False}.get(cell.strip().lower())


def looks_like_jumpstart_id(model: str) -> bool:
    return bool(_JUMPSTART_RE.match(model))


class ModelCatalog:
    def __init__(self, models: list[ModelInfo]) -> None:
        self._models = {m.jumpstart_model_id: m for m in models}
        self._by_name: dict[str, ModelInfo] = {}
        for model in models:
            for name in model.names:
                other = self._by_name.setdefault(name.lower(), model)
                if other is not model:
                    raise ValueError(
                        f"model name {name!r} names both {other.jumpstart_model_id} and "
                        f"{model.jumpstart_model_id}"
                    )

    @classmethod
    def load_default(cls) -> ModelCatalog:
        return _default_catalog()

    @classmethod
    def load_packaged(cls) -> ModelCatalog:
        """Parse the package's tables (`load_default` parses them once per process)."""
        data = resources.files("prebake.server.data")
        names: dict[str, tuple[str, tuple[str, ...]]] = {}
        text = data.joinpath("model_names.csv").read_text()
        for row in csv.DictReader(line for line in io.StringIO(text) if not line.startswith("#")):
            names[row["jumpstart_model_id"]] = (row["hf_model_id"], tuple((row["aliases"] or "").split()))
        rows = list(csv.DictReader(io.StringIO(data.joinpath("jumpstart_models.csv").read_text())))
        unknown = sorted(set(names) - {row["jumpstart_model_id"] for row in rows})
        if unknown:
            raise ValueError(f"model_names.csv names JumpStart ids the model table lacks: {unknown}")
        return cls(
            [
                ModelInfo(
                    family=row["family"],
                    jumpstart_model_id=row["jumpstart_model_id"],
                    supports_quantization=_support(row["supports_quantization"]),
                    supports_speculative_decoding=_support(row["supports_speculative_decoding"]),
                    sagemaker_draft_model=_support(row["sagemaker_draft_model"]),
                    hf_model_id=names.get(row["jumpstart_model_id"], ("", ()))[0],
                    aliases=names.get(row["jumpstart_model_id"], ("", ()))[1],
                )
                for row in rows
            ]
        )

    def __iter__(self) -> Iterator[ModelInfo]:
        return iter(self._models.values())

    def get(self, model_id: str) -> ModelInfo | None:
        return self._models.get(model_id)

    def named(self, name: str) -> ModelInfo | None:
        """The model one of whose names (any case) is `name`."""
        return self._by_name.get(name.lower())

    def canonical_name(self, name: str) -> str:
        """The name keys use for the model `name` names: its Hugging Face id when known,
        else `name` itself (an unknown model is left as stated)."""
        model = self._by_name.get(name.lower())
        return model.canonical_name if model is not None else name

    def other_names(self, name: str) -> tuple[str, ...]:
        """The names of `name`'s model other than its canonical one: what keys stored before
        names were made canonical may carry instead (see RegistryService._match)."""
        model = self._by_name.get(name.lower())
        return model.names[1:] if model is not None else ()

    def check(self, model: str, kind: str) -> None:
        """Refuse an unknown JumpStart id, and AWQ for a model that does not support quantization."""
        info = self.named(model)
        if info is None and not looks_like_jumpstart_id(model):
            return
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
            also = "" if model == info.jumpstart_model_id else f" (JumpStart {info.jumpstart_model_id})"
            raise InvalidKey(
                "model",
                f"{model}{also} does not support quantization (SageMaker JumpStart table); "
                "AWQ checkpoints cannot be made for it",
            )


@cache
def _default_catalog() -> ModelCatalog:
    return ModelCatalog.load_packaged()


def canonical_model_name(name: str) -> str:
    """`ModelCatalog.canonical_name` of the packaged catalog."""
    return _default_catalog().canonical_name(name)
