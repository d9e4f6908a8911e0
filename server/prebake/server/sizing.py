"""Does a model fit the accelerator memory it would get? A check made at key validation.

The parameter count is read from the model's name (`Meta-Llama-3-70B`, `mixtral-8x7b`,
`bloom-560m`, `bloomz-7b1`), which is how Hugging Face and JumpStart ids state it; a name
without a size is not checked. Only the weights are counted (a lower bound: the KV cache
and activations need more), so a refusal is certain, while a pass is not a guarantee.
"""

from __future__ import annotations

import re

from prebake.core.errors import InvalidKey
from prebake.server.instance_catalog import InstanceType

BYTES_PER_PARAMETER = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "fp8": 1.0, "int4-awq": 0.5}
# "8b", "70b", "1.5b", "8x7b", "7b1" (7.1B), "560m"; not glued to other letters or digits.
_SIZE_RE = re.compile(r"(?<![a-z0-9.])(?:(\d+)x)?(\d+(?:\.\d+)?)([bm])(\d)?(?![a-z0-9])")


def parameter_count(model: str) -> float | None:
    """Parameters the model's name states (the largest size in its last component), or None."""
    name = model.rsplit("/", 1)[-1].lower()
    sizes = []
    for experts, number, unit, decimal in _SIZE_RE.findall(name):
        value = float(number) + (float(f"0.{decimal}") if decimal else 0.0)
        value *= 1e9 if unit == "b" else 1e6
        sizes.append(value * (int(experts) if experts else 1))
    return max(sizes) if sizes else None


def check_fits(model: str, precision: str, kind: str, tp: int, instance: InstanceType | None) -> None:
    """Raise InvalidKey("model", ...) if the weights alone exceed the accelerator memory.

    Neuron: the memory of the `tp` NeuronCores used. AWQ: the whole GPU instance (its
    tensor-parallel degree is not part of the key). CPU instances are not checked.
    """
    params = parameter_count(model)
    if params is None or instance is None or instance.family == "cpu" or precision not in BYTES_PER_PARAMETER:
        return
    weights = params * BYTES_PER_PARAMETER[precision]
    if kind == "neuron":
        cores = min(tp, instance.total_cores)
        available = instance.accelerator_memory_gib * 2**30 * cores / instance.total_cores
        where = f"the {cores} NeuronCore{'s' if cores != 1 else ''} of {instance.name} it would use have"
        remedy = "a larger tensor_parallel_degree, a larger instance or a smaller precision"
    else:
        available = instance.accelerator_memory_gib * 2**30
        where = f"{instance.name} has"
        remedy = "a larger instance"
    if weights > available:
        raise InvalidKey(
            "model",
            f"{model} has about {params / 1e9:g}B parameters: {weights / 1e9:.0f} GB of weights in "
            f"{precision}, but {where} {available / 2**30:.0f} GiB of accelerator memory; use {remedy}",
        )
