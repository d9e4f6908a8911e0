"""The worker's side of an evaluation job, besides running its child: checks, request, result.

An evaluation job (`Job.purpose` EVALUATE) names the artifact to evaluate (`Job.artifact_id`),
the workload and the price inputs the server resolved (`Job.evaluation`). The worker (see
`Worker._evaluate` in worker.py) checks that the workload can run at all (`workload_problem`,
before anything is fetched: a deterministic failure), fetches the artifact through the host
cache, runs `python -m prebake.compiler.evaluation_run` on `evaluation_request(...)` under its
lease, and completes the job with `evaluation_message(result)`.

Pure functions; thread-safe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf import json_format

from prebake.core.names import kind_name
from prebake.v1 import evaluations_pb2, jobs_pb2

EVALUATION_MODULE = "prebake.compiler.evaluation_run"


def workload_problem(job: jobs_pb2.Job) -> str:
    """Why the job's workload cannot run against its artifact ("" if it can, as far as the key
    tells): an inductor package's window is its key's sequence length, static."""
    workload = job.evaluation.workload
    window = job.key.key.sequence_length
    needed = workload.prompt_tokens + workload.output_tokens
    if kind_name(job.key.key.kind) == "inductor" and window and needed > window:
        return (
            f"{workload.prompt_tokens} prompt + {workload.output_tokens} output tokens do not fit the "
            f"artifact's compiled sequence length {window}; ask for at most {window} tokens in all "
            f"(e.g. --output-tokens {max(window - workload.prompt_tokens, 1)})"
        )
    return ""


def evaluation_request(job: jobs_pb2.Job, artifact_dir: Path, tokenizer_dir: Path | None) -> dict[str, Any]:
    """The evaluation child's request (see evaluation_run.py)."""
    workload = job.evaluation.workload
    price = job.evaluation.price
    return {
        "artifact_dir": str(artifact_dir),
        "workload": {
            "prompt_tokens": workload.prompt_tokens,
            "output_tokens": workload.output_tokens,
            "requests": workload.requests,
            "concurrency_levels": sorted(workload.concurrency_levels),
        },
        "price": {
            "instance_type": price.instance_type,
            "hourly_usd": price.hourly_usd,
            "discount_rate": price.discount_rate,
            "price_source": price.price_source,
            "input_output_ratio": price.input_output_ratio,
        },
        "tokenizer_dir": None if tokenizer_dir is None else str(tokenizer_dir),
    }


def evaluation_message(evaluation: dict[str, Any]) -> evaluations_pb2.Evaluation:
    """The `Evaluation` of the child's result (`result_to_dict`: field names as in the proto).

    ValueError (json_format.ParseError) for a result that does not read as one."""
    data = {name: value for name, value in evaluation.items() if value is not None}
    return json_format.ParseDict(data, evaluations_pb2.Evaluation())
