"""Evaluation files for `prebake evaluations import`: an `Evaluation` in protobuf JSON form, or
a SageMaker-style results table, read into an `evaluations_pb2.Evaluation`.

Which one a file is: an object with `levels` is protobuf JSON (`json_format`: field names in
snake_case or lowerCamelCase, int64 counts as numbers or strings); an object with `metrics`
is SageMaker-style. The SageMaker-style shape (what Studio's performance evaluation shows,
one row per concurrency; SageMaker documents no file format, so this is prebake's):

    {"instance_type": "ml.g5.2xlarge", "hourly_usd": 1.515, "discount_rate": 0,
     "input_output_ratio": 3, "prompt_tokens": 128, "output_tokens": 32, "requests": 8,
     "source": "sagemaker job my-eval",
     "metrics": [{"Concurrency": 1, "Time to first token (ms)": {"p50": 41, "p90": 55, "p99": 70},
                  "Inter-token latency (ms)": 9.8, "Client latency (ms)": 350,
                  "Input tokens per second": 410, "Output tokens per second": 102,
                  "Input tokens per second per request": 400,
                  "Output tokens per second per request": 100, "Client invocations": 8,
                  "Client invocation errors": 0, "Tokenizer failures": 0,
                  "Empty inference responses": 0, "Price per million input tokens": 0.9,
                  "Price per million output tokens": 3.6}, ...]}

Metric names are matched without case, units in parentheses and punctuation ("Time to first
token (ms)", "time_to_first_token_ms" and "ttft_ms" are one metric). A distribution is an
object of p50/p90/p99, or one number (what Studio's table shows), recorded as all three. Every
top-level field but `metrics` is optional.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from prebake.v1 import evaluations_pb2

# SageMaker-style metric names (normalised by `_name`) -> LevelMetrics fields.
_METRICS: dict[str, str] = {
    "concurrency": "concurrency",
    "time_to_first_token": "ttft_ms",
    "ttft": "ttft_ms",
    "inter_token_latency": "itl_ms",
    "itl": "itl_ms",
    "client_latency": "client_latency_ms",
    "client_side_latency": "client_latency_ms",
    "input_tokens_per_second": "input_tokens_per_second",
    "output_tokens_per_second": "output_tokens_per_second",
    "input_tokens_per_second_per_request": "input_tokens_per_second_per_request",
    "output_tokens_per_second_per_request": "output_tokens_per_second_per_request",
    "client_invocations": "client_invocations",
    "client_invocation_errors": "invocation_errors",
    "invocation_errors": "invocation_errors",
    "tokenizer_failures": "tokenizer_failures",
    "tokenizer_failed": "tokenizer_failures",
    "empty_inference_responses": "empty_responses",
    "empty_responses": "empty_responses",
    "price_per_million_input_tokens": "price_per_million_input_tokens",
    "price_per_million_output_tokens": "price_per_million_output_tokens",
    "blended_price_per_million_tokens": "blended_price_per_million_tokens",
    "requests": "requests",
    "duration_seconds": "duration_seconds",
    "duration": "duration_seconds",
    "input_tokens": "input_tokens",
    "output_tokens": "output_tokens",
}
_UNITS = re.compile(r"\([^)]*\)|_(ms|seconds|s)$")


class EvaluationFileError(ValueError):
    """The file is not an evaluation in either accepted form; the message says where."""


def _name(text: str) -> str:
    words = re.sub(r"[^a-z0-9]+", "_", re.sub(r"\([^)]*\)", "", text.lower())).strip("_")
    return _UNITS.sub("", words)


def _distribution(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: value[k] for k in ("p50", "p90", "p99") if k in value}
    if isinstance(value, int | float) and not isinstance(value, bool):
        return {"p50": value, "p90": value, "p99": value}
    raise EvaluationFileError(f"{where}: a distribution is {{p50, p90, p99}} or a number, not {value!r}")


def _level(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise EvaluationFileError(f"{where}: a metrics row is an object, not {type(row).__name__}")
    fields = evaluations_pb2.LevelMetrics.DESCRIPTOR.fields_by_name
    level: dict[str, Any] = {}
    for key, value in row.items():
        field = _METRICS.get(_name(key))
        if field is None:
            raise EvaluationFileError(
                f"{where}: unknown metric {key!r}; known: {', '.join(sorted(_METRICS))}"
            )
        is_distribution = fields[field].message_type is not None
        level[field] = _distribution(value, f"{where}.{key}") if is_distribution else value
    return level


def from_sagemaker(data: dict[str, Any]) -> dict[str, Any]:
    """The protobuf JSON of an `Evaluation` from a SageMaker-style results object."""
    rows = data["metrics"]
    if not isinstance(rows, list):
        raise EvaluationFileError("metrics: a list of rows, one per concurrency")
    instance_type = data.get("instance_type", "")
    return {
        "workload": {
            "prompt_tokens": data.get("prompt_tokens", 0),
            "output_tokens": data.get("output_tokens", 0),
            "requests": data.get("requests", 0),
        },
        "host": {"instance_type": instance_type},
        "price": {
            "instance_type": instance_type,
            "hourly_usd": data.get("hourly_usd", 0),
            "discount_rate": data.get("discount_rate", 0),
            "price_source": data.get("price_source", "import:sagemaker"),
            "input_output_ratio": data.get("input_output_ratio", 0),
        },
        "levels": [_level(row, f"metrics[{i}]") for i, row in enumerate(rows)],
        "source": data.get("source", "sagemaker"),
    }


def load(path: Path) -> evaluations_pb2.Evaluation:
    """The evaluation in `path`. Raises `EvaluationFileError` naming the file and the problem."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise EvaluationFileError(f"{path}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise EvaluationFileError(f"{path}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise EvaluationFileError(f"{path}: an evaluation is a JSON object")
    try:
        if "metrics" in data and "levels" not in data:
            data = from_sagemaker(data)
        return json_format.ParseDict(data, evaluations_pb2.Evaluation())
    except EvaluationFileError as exc:
        raise EvaluationFileError(f"{path}: {exc}") from None
    except json_format.ParseError as exc:
        raise EvaluationFileError(f"{path}: not an Evaluation ({exc})") from None
