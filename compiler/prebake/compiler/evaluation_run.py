"""The evaluation child process: one evaluation job's workload, in one fresh interpreter.

    python -m prebake.compiler.evaluation_run --kind inductor --request REQUEST.json --result RESULT.json

Why a child, as for compiles (`prebake.compiler.run`): the worker process never imports torch
(embedded workers live in the server), a cancelled or lost job is stopped by killing the
child, and a crash inside a runtime takes down only the child. The protocol is the compile
child's (see run.py): JSON progress lines on stdout, the human log on stderr, RESULT written
atomically when the child ends by itself, exit 0 / 3 (deterministic: the workload cannot run
against this artifact, e.g. it does not fit the compiled sequence length) / 1 (anything else).

REQUEST: {"artifact_dir", "workload": {prompt_tokens, output_tokens, requests,
concurrency_levels}, "price": {instance_type, hourly_usd, discount_rate, price_source,
input_output_ratio}, "tokenizer_dir": path or null}. RESULT on success: {"ok": true,
"evaluation": `result_to_dict(EvaluationResult)`}.

Kinds: inductor (`evaluate_inductor`) and awq (`evaluate_awq`) run on CPU here. Neuron artifacts
need the Neuron runtime, which this package does not drive: `EVALUATORS` has no neuron entry,
so a neuron worker advertises no evaluate purpose and evaluation jobs of neuron keys wait for
one that does (`EnqueueEvaluation` says so at once).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from prebake.compiler.backend import EXIT_DETERMINISTIC, EXIT_OK
from prebake.compiler.evaluation_metrics import EvaluationResult, check_workload
from prebake.compiler.evaluation_workload import Progress, WorkloadDoesNotFit
from prebake.compiler.run import (
    EXIT_TRANSIENT,
    JsonLinesProgress,
    _private_stdout,
    _write_json_atomically,
    exit_when_orphaned,
)
from prebake.core.evaluation_records import EvaluationWorkload, PriceInputs
from prebake.core.pricing import check_price_inputs

# Files whose presence says a directory holds a tokenizer transformers can load.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def has_tokenizer(directory: Path | None) -> bool:
    return directory is not None and any((directory / name).is_file() for name in TOKENIZER_FILES)


def _inductor(
    artifact: Path,
    workload: EvaluationWorkload,
    price: PriceInputs,
    tokenizer: Path | None,
    progress: Progress,
) -> EvaluationResult:
    from prebake.compiler.evaluation_inductor import InductorRuntime, evaluate_runtime

    with InductorRuntime(artifact) as runtime:
        try:
            runtime.check_fits(workload.prompt_tokens, workload.output_tokens)
        except ValueError as exc:
            raise WorkloadDoesNotFit(str(exc)) from None
        return evaluate_runtime(
            runtime,
            workload,
            price,
            tokenizer_dir=tokenizer if has_tokenizer(tokenizer) else None,
            progress=progress,
        )


def _awq(
    artifact: Path,
    workload: EvaluationWorkload,
    price: PriceInputs,
    tokenizer: Path | None,
    progress: Progress,
) -> EvaluationResult:
    from prebake.compiler.evaluation_awq import evaluate_awq

    # The checkpoint carries the tokenizer when its source had one. A workload beyond the
    # model's positions raises WorkloadDoesNotFit once the checkpoint is loaded (its config says).
    return evaluate_awq(artifact, workload, price, use_tokenizer=has_tokenizer(artifact), progress=progress)


Evaluator = Callable[[Path, EvaluationWorkload, PriceInputs, "Path | None", Progress], EvaluationResult]
EVALUATORS: Mapping[str, Evaluator] = {"inductor": _inductor, "awq": _awq}


def result_to_dict(result: EvaluationResult) -> dict[str, Any]:
    """The result as the protobuf JSON of an `Evaluation` (nested records as objects, tuples as
    lists, the host's runtime versions as the proto's map)."""
    data = dataclasses.asdict(result)
    data["host"]["runtime_versions"] = dict(result.host.runtime_versions)
    return data


def _log(message: str) -> None:
    print(f"prebake.compiler.evaluation_run: {message}", file=sys.stderr, flush=True)


def run_evaluation(kind: str, request_path: Path, result_path: Path) -> int:
    """Run one evaluation; returns the exit status (see the module docstring)."""
    exit_when_orphaned(os.getppid())
    request = json.loads(request_path.read_text())
    lines = JsonLinesProgress(_private_stdout())
    workload = EvaluationWorkload(
        **{**request["workload"], "concurrency_levels": tuple(request["workload"]["concurrency_levels"])}
    )
    price = PriceInputs(**request["price"])
    check_workload(workload)
    check_price_inputs(price)
    total = workload.requests * len(workload.concurrency_levels)
    finished: dict[int, int] = {}

    def progress(level: int, done: int, of: int) -> None:
        finished[level] = done
        lines(sum(finished.values()) / total, f"concurrency {level}: {done}/{of} requests")

    tokenizer = Path(request["tokenizer_dir"]) if request.get("tokenizer_dir") else None
    _log(f"{kind} evaluation of {request['artifact_dir']}: {workload}")
    try:
        lines(0.0, "loading the artifact")
        result = EVALUATORS[kind](Path(request["artifact_dir"]), workload, price, tokenizer, progress)
    except WorkloadDoesNotFit as exc:
        _write_json_atomically(result_path, {"ok": False, "deterministic": True, "error": str(exc)})
        _log(f"deterministic failure: {exc}")
        return EXIT_DETERMINISTIC
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        error = f"{type(exc).__name__}: {exc}"
        _write_json_atomically(result_path, {"ok": False, "deterministic": False, "error": error})
        _log(f"transient failure: {error}")
        return EXIT_TRANSIENT
    _write_json_atomically(result_path, {"ok": True, "evaluation": result_to_dict(result)})
    _log("done")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m prebake.compiler.evaluation_run", description="Run one evaluation job's workload."
    )
    parser.add_argument("--kind", choices=sorted(EVALUATORS), required=True)
    parser.add_argument("--request", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args(argv)
    return run_evaluation(args.kind, args.request, args.result)


if __name__ == "__main__":
    sys.exit(main())
