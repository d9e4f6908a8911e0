"""Models too large for the accelerator memory they would get are refused at the key."""

from __future__ import annotations

import pytest

from prebake.core.errors import InvalidKey
from prebake.server.instance_catalog import InstanceCatalog
from prebake.server.key_normalization import KeyRequest, normalize_key
from prebake.server.sizing import parameter_count

CATALOG = InstanceCatalog.load_default()


@pytest.mark.parametrize(
    ("model", "params"),
    [
        ("meta-llama/Meta-Llama-3-8B", 8e9),
        ("meta-textgeneration-llama-3-70b-instruct", 70e9),
        ("mistralai/Mixtral-8x7B-Instruct-v0.1", 56e9),
        ("huggingface-llm-mistralai-mixtral-8x22b-instruct-v0-1", 176e9),
        ("huggingface-textgeneration-bloom-560m", 560e6),
        ("huggingface-textgeneration1-bloomz-7b1-fp16", 7.1e9),
        ("Qwen/Qwen2-1.5B", 1.5e9),
        ("tiny/llama", None),
        ("gpt2", None),
        ("org/model-v2b-base", None),
    ],
)
def test_parameter_count_from_the_name(model: str, params: float | None) -> None:
    found = parameter_count(model)
    if params is None:
        assert found is None
    else:
        assert found == pytest.approx(params)


def neuron(model: str, instance: str, tp: int, precision: str = "bf16") -> KeyRequest:
    return KeyRequest(
        kind="neuron",
        model=model,
        instance_type=instance,
        sequence_length=4096,
        batch_size=1,
        tensor_parallel_degree=tp,
        precision=precision,
    )


FITS = [
    neuron("meta-llama/Meta-Llama-3-8B", "ml.inf2.48xlarge", 24),
    neuron("meta-llama/Meta-Llama-3-8B", "ml.inf2.xlarge", 2),  # 16 GB in 32 GiB
    neuron("meta-llama/Meta-Llama-3-70B", "ml.trn1.32xlarge", 32),  # SageMaker's example
    neuron("meta-llama/Meta-Llama-3-70B", "ml.inf2.48xlarge", 24),
    neuron("meta-llama/Meta-Llama-3-70B", "ml.inf2.48xlarge", 24, "fp32"),  # 280 GB in 384 GiB
    KeyRequest(kind="awq", model="meta-llama/Meta-Llama-3-70B", instance_type="ml.g5.12xlarge"),  # 35 GB
    KeyRequest(kind="awq", model="meta-llama/Meta-Llama-3-70B"),  # no instance: nothing to check
]
TOO_LARGE = [
    (neuron("meta-llama/Meta-Llama-3-70B", "ml.inf2.xlarge", 2), "140 GB of weights in bf16"),
    (neuron("meta-llama/Meta-Llama-3-70B", "ml.inf2.48xlarge", 4), "the 4 NeuronCores of ml.inf2.48xlarge"),
    (neuron("meta-llama/Meta-Llama-3-8B", "ml.inf2.xlarge", 1, "fp32"), "32 GB of weights in fp32"),
    (
        KeyRequest(kind="awq", model="tiiuae/falcon-180B", instance_type="ml.g5.2xlarge"),
        "ml.g5.2xlarge has 24 GiB",
    ),
]


@pytest.mark.parametrize("request_", FITS, ids=lambda r: f"{r.model}@{r.instance_type or '-'}")
def test_models_that_fit_are_accepted(request_: KeyRequest) -> None:
    normalize_key(request_, CATALOG)


@pytest.mark.parametrize(("request_", "message"), TOO_LARGE, ids=lambda v: getattr(v, "model", ""))
def test_models_too_large_are_refused_with_what_to_change(request_: KeyRequest, message: str) -> None:
    with pytest.raises(InvalidKey) as info:
        normalize_key(request_, CATALOG)
    assert info.value.field == "model"
    assert message in str(info.value) and "use " in str(info.value)
