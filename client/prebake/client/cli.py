"""The `prebake` command line: argument parsing, dispatch and exit codes.

The handlers live in `prebake.client.commands`; this module defines the command-line
shape (kept stable for scripts) and turns failures into `error: ...` on stderr and the
exit codes of `prebake.client.exitcodes`.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Callable
from typing import Any

from prebake.client import commands, exitcodes
from prebake.client.client import DEFAULT_TARGET
from prebake.core.names import job_state_names, kind_names

DEFAULT_TIMEOUT = 30.0


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _epilog(examples: str, extra: str = "") -> str:
    text = "examples:\n" + textwrap.indent(textwrap.dedent(examples).strip("\n"), "  ")
    return f"{text}\n\n{extra}" if extra else text


def _option(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return name.strip(), value


def _size(text: str) -> int:
    """Bytes, with an optional binary suffix: 1048576, 512M, 64G, 2TiB."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    raw = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (raw[:-1], raw[-1]) if raw and raw[-1] in units else (raw, "")
    try:
        value = int(float(number) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a size such as 1048576, 512M or 64G, got {text!r}"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a size cannot be negative: {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more seconds, got {text!r}")
    return value


def _client_options(suppress: bool) -> argparse.ArgumentParser:
    """--server and --timeout, accepted before or after the command name.

    On subcommands the defaults are suppressed so that a value given before the command
    is not overwritten by the subcommand's default.
    """
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("server connection")
    default_server = argparse.SUPPRESS if suppress else os.environ.get("PREBAKE_SERVER") or DEFAULT_TARGET
    group.add_argument(
        "--server",
        metavar="HOST:PORT",
        default=default_server,
        help=f"prebake server address (env PREBAKE_SERVER; default {DEFAULT_TARGET})",
    )
    group.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_positive_float,
        default=argparse.SUPPRESS if suppress else DEFAULT_TIMEOUT,
        help=f"deadline of each request (default {DEFAULT_TIMEOUT:g})",
    )
    return parent


def _add_key_options(parser: argparse.ArgumentParser, required: bool, lookup: bool = True) -> None:
    """The key's options; with `lookup`, also --allow (compatibility policies for a lookup)."""
    group = parser.add_argument_group(
        "artifact key",
        "the configuration; the server validates and normalises it (aliases, defaults, "
        "fields the kind ignores)",
    )
    group.add_argument("--kind", required=required, help=f"compiler family: {', '.join(kind_names())}")
    group.add_argument("--model", required=required, help="model id, e.g. meta-llama/Meta-Llama-3-8B")
    group.add_argument("--revision", default="", help="model revision (commit hash or weights digest)")
    group.add_argument("--instance-type", default="", metavar="TYPE", help="e.g. ml.inf2.48xlarge")
    group.add_argument("--sequence-length", type=int, default=0, metavar="N", help="compiled sequence length")
    group.add_argument("--batch-size", type=int, default=0, metavar="N", help="compiled batch size")
    group.add_argument("--tp", type=int, default=0, metavar="N", help="tensor-parallel degree (default 1)")
    group.add_argument(
        "--precision", default="", help="bf16, fp16, fp32, int8, fp8, int4-awq (default: kind's)"
    )
    group.add_argument("--toolchain", default="", help="compiler version (default: the server's)")
    group.add_argument(
        "--option",
        dest="options",
        action="append",
        type=_option,
        default=[],
        metavar="KEY=VALUE",
        help="extra compiler option; repeatable",
    )
    if not lookup:
        return
    group.add_argument(
        "--allow",
        action="append",
        default=[],
        choices=["longer_sequence", "neuroncore_v2_family"],
        help="also accept an artifact this policy admits (neuron: compiled for a longer "
        "sequence length; compiled for the other NeuronCore-v2 family, inf2/trn1); repeatable",
    )


def _add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object to stdout")


def _add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress display on stderr")


def _add_host_cache(parser: argparse.ArgumentParser, purpose: str, env_default: bool) -> None:
    """--host-cache [DIR] (and, if the env var enables it, --no-host-cache).

    Given without DIR, the value is "" (the default root: `commands.host_cache_from_args`).
    """
    default_dir = "default DIR: $PREBAKE_HOST_CACHE or ~/.cache/prebake/blobs"
    enabled = "; on by default when PREBAKE_HOST_CACHE is set" if env_default else ""
    parser.add_argument(
        "--host-cache",
        nargs="?",
        const="",
        default=None,
        metavar="DIR",
        help=f"{purpose} ({default_dir}{enabled})",
    )
    if env_default:
        parser.add_argument(
            "--no-host-cache",
            action="store_true",
            help="do not use the host cache even if PREBAKE_HOST_CACHE is set",
        )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {text!r}")
    return value


def _add_job_filters(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--state",
        dest="states",
        action="extend",
        nargs="+",
        choices=job_state_names(),
        default=default,
        metavar="STATE",
        help=f"only jobs in these states ({', '.join(job_state_names())}); repeatable",
    )
    parser.add_argument("--kind", choices=kind_names(), default=default, help="only jobs of this kind")
    parser.add_argument(
        "--limit", type=int, default=argparse.SUPPRESS if suppress else 50, help="at most N jobs (default 50)"
    )
    if not suppress:
        _add_json(parser)
    else:
        parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")


def build_parser() -> argparse.ArgumentParser:
    """The whole `prebake` command line."""
    parser = argparse.ArgumentParser(
        prog="prebake",
        formatter_class=_formatter,
        parents=[_client_options(suppress=False)],
        description=(
            "prebake: a cache and registry of ahead-of-time compiled model artifacts.\n"
            "Look a configuration up, download its verified artifact, or have it compiled."
        ),
        epilog=_epilog(
            """
            prebake serve                                  # a server on 127.0.0.1:50051
            prebake ensure --kind inductor --model my/llama --instance-type ml.c7i.4xlarge \\
                --sequence-length 512 --batch-size 1 --dest ./model-aot
            prebake lookup --kind neuron --model meta-llama/Meta-Llama-3-8B \\
                --instance-type ml.inf2.48xlarge --sequence-length 8192 --batch-size 8 --tp 24
            prebake ls --kind neuron
            """,
            exitcodes.describe(),
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    client_opts = _client_options(suppress=True)

    def add(
        name: str,
        handler: Callable[..., int],
        summary: str,
        description: str,
        examples: str,
        *,
        client: bool = True,
        parent: Any = sub,
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(
            name,
            help=summary,
            description=description,
            epilog=_epilog(examples, exitcodes.describe()),
            formatter_class=_formatter,
            parents=[client_opts] if client else [],
        )
        p.set_defaults(handler=handler, needs_client=client)
        return p

    p = add(
        "serve",
        commands.serve,
        "run a prebake server",
        "Run the server in this process until SIGINT/SIGTERM: registry and blobs under the\n"
        "data directory, and an in-process compile worker for every backend whose toolchain\n"
        "is installed here (see --workers). Settings: flags > PREBAKE_* environment\n"
        "variables > --config file.",
        """
        prebake serve
        prebake serve --listen 0.0.0.0:50051 --data-dir /var/lib/prebake --max-store-bytes 500G
        prebake serve --workers 0          # compile only on separate `prebake worker` hosts
        PREBAKE_DATA_DIR=/srv/prebake prebake serve --config prebake.toml
        """,
        client=False,
    )
    p.add_argument("--listen", metavar="HOST:PORT", help=f"address to listen on (default {DEFAULT_TARGET})")
    p.add_argument(
        "--data-dir", metavar="DIR", help="where the registry and blobs live (default ./prebake-data)"
    )
    p.add_argument("--config", metavar="FILE", help="TOML file with a [server] table (env PREBAKE_CONFIG)")
    p.add_argument("--max-blob-bytes", type=_size, metavar="N", help="largest blob accepted (default 64G)")
    p.add_argument(
        "--max-store-bytes", type=_size, metavar="N", help="total blob bytes allowed (default: no limit)"
    )
    p.add_argument(
        "--workers",
        type=_count,
        metavar="N",
        help="in-process compile workers per installed backend (default 1; 0 = none)",
    )

    p = add(
        "worker",
        commands.worker,
        "run a compile worker",
        "Lease compile jobs from the server and run them until SIGINT/SIGTERM: each compile\n"
        "runs in a child process, heartbeats carry its progress, outputs are uploaded\n"
        "(resumably) and published. A worker leases only the kinds whose toolchain is\n"
        "installed here, and waits out server restarts. On SIGINT/SIGTERM it takes no new\n"
        "job and gives a running compile --drain-seconds to finish, then kills it and hands\n"
        "the job back to the queue; a second signal skips the wait.",
        """
        prebake worker                                 # every kind whose toolchain is installed
        prebake worker --kind inductor --work-dir /scratch/prebake --server registry:50051
        prebake worker --kind neuron --max-jobs 1 --drain-seconds 600   # one job, then exit
        """,
    )
    p.add_argument(
        "--kind",
        dest="kinds",
        action="append",
        choices=kind_names(),
        default=[],
        help="serve only this kind; repeatable (default: every kind installed here)",
    )
    p.add_argument(
        "--work-dir",
        metavar="DIR",
        help="scratch space for compiles, cleaned after each job (default: $TMPDIR/prebake-worker)",
    )
    p.add_argument(
        "--max-jobs", type=_count, metavar="N", help="exit after N jobs (default: run until stopped)"
    )
    p.add_argument(
        "--drain-seconds",
        type=_seconds,
        default=60.0,
        metavar="S",
        help="on SIGINT/SIGTERM, let a running compile finish for up to S seconds (default 60)",
    )
    p.add_argument("--worker-id", metavar="ID", help="name recorded on leased jobs (default: HOST:PID)")

    p = add(
        "lookup",
        commands.lookup,
        "look a configuration up (HIT / MISS / COMPILING / FAILED)",
        "Look a key up. On a miss a compile job is enqueued (or the one in flight joined)\n"
        "unless --no-enqueue. A HIT shows the artifact and why it matched; a MISS shows the\n"
        "job and the nearest existing artifacts with the fields that differ.",
        """
        prebake lookup --kind neuron --model meta-llama/Meta-Llama-3-8B \\
            --instance-type ml.inf2.48xlarge --sequence-length 8192 --batch-size 8 --tp 24
        prebake lookup --kind awq --model my/model --no-enqueue --json | jq .status
        """,
    )
    _add_key_options(p, required=True)
    p.add_argument("--no-enqueue", action="store_true", help="only report a miss; create no compile job")
    p.add_argument(
        "--explain",
        action="store_true",
        help="on a miss, show the canonical key and every near artifact field by field",
    )
    p.add_argument("--force", action="store_true", help="ignore a cached compile failure and enqueue again")
    p.add_argument(
        "--model-source", default="", metavar="SRC", help="weights for a new job (dir or s3:// prefix)"
    )
    _add_json(p)

    p = add(
        "fetch",
        commands.fetch,
        "download an existing artifact into a directory",
        "Download the artifact for a key (or --artifact ID) into --dest, verified, resumable,\n"
        "placed atomically. Never compiles: a miss exits with the MISS code (see ensure).",
        """
        prebake fetch --kind inductor --model my/llama --instance-type ml.c7i.4xlarge \\
            --sequence-length 512 --batch-size 1 --dest /opt/models/llama-aot
        prebake fetch --artifact 3f2a9c0d1e2b3a4f5e6d7c8b9a0f1e2d --dest ./a --overwrite
        """,
    )
    _add_key_options(p, required=False)
    p.add_argument("--artifact", metavar="ID", help="fetch this artifact id instead of looking a key up")
    p.add_argument("--dest", required=True, metavar="DIR", help="directory to place the artifact in")
    p.add_argument("--overwrite", action="store_true", help="replace whatever --dest holds")
    _add_host_cache(p, "place files this host's blob cache holds from it", env_default=True)
    _add_quiet(p)
    _add_json(p)

    p = add(
        "ensure",
        commands.ensure,
        "make a directory hold the artifact for a key, compiling it if needed",
        "The deployer's command: look the key up; on a hit download it; on a miss wait for\n"
        "the compile job (showing its progress), then download. --dest is placed atomically\n"
        "and is left untouched on failure.",
        """
        prebake ensure --kind neuron --model meta-llama/Meta-Llama-3-8B \\
            --instance-type ml.inf2.48xlarge --sequence-length 8192 --batch-size 8 --tp 24 \\
            --model-source s3://models/llama-3-8b --dest /opt/ml/model/compiled --wait-timeout 3600
        """,
    )
    _add_key_options(p, required=True)
    p.add_argument("--dest", required=True, metavar="DIR", help="directory to place the artifact in")
    p.add_argument(
        "--model-source", default="", metavar="SRC", help="weights for a compile (dir or s3:// prefix)"
    )
    p.add_argument(
        "--wait-timeout",
        type=_positive_float,
        metavar="S",
        help="give up waiting for a compile after S seconds",
    )
    p.add_argument("--overwrite", action="store_true", help="replace whatever --dest holds")
    _add_host_cache(p, "place files this host's blob cache holds from it", env_default=True)
    _add_quiet(p)
    _add_json(p)

    p = add(
        "prewarm",
        commands.prewarm,
        "make sure every configuration of a matrix is compiled (and cached on this host)",
        "Look every configuration of a prewarm file up: the missing ones get a compile job,\n"
        "those in flight are joined. Then wait for every job (showing progress) and print a\n"
        "table of what became of each: hit, compiled, failed, cancelled, invalid (the server\n"
        "refused the combination; its message says why), timeout or error. With --host-cache\n"
        "the artifacts are also downloaded into this host's cache, which later fetch/ensure\n"
        "calls on the host use first.\n"
        "\n"
        "FILE is JSON, or YAML (needs PyYAML: pip install 'prebake[prewarm]'):\n"
        "  kind: neuron                   # default for every entry\n"
        "  toolchain: neuronx-cc-2        # optional default\n"
        '  options: {optlevel: "2"}       # optional default compiler options\n'
        "  models:                        # id strings, or {model, revision, model_source,\n"
        "    - model: meta-llama/Meta-Llama-3-8B    #  kind, toolchain, options}\n"
        "      model_source: s3://bucket/llama3-8b\n"
        "  instance_types: [ml.inf2.48xlarge, ml.trn1.32xlarge]\n"
        "  shapes: [{sequence_length: 8192, batch_size: 8}, {sequence_length: 4096, batch_size: 4}]\n"
        "  tensor_parallel_degrees: [24, 32]   # optional, default [1]\n"
        "  precisions: [bf16]\n"
        "  keys:                          # optional explicit keys, added to the product\n"
        "    - {kind: awq, model: my/model, precision: int4-awq, instance_type: ml.g5.12xlarge}\n"
        "The product is models x instance_types x shapes x tensor_parallel_degrees x\n"
        "precisions; identical entries are listed once. A file holding a list is a list of keys.\n"
        "\n"
        "Exit status: 0 if every row is hit or compiled (or, with --no-wait, enqueued/joined);\n"
        "5 if any compile failed; else 1 if any row is invalid, cancelled, timeout or error.\n"
        "Rows hidden by --skip-invalid do not count. 2: the file is unreadable or malformed.",
        """
        prebake prewarm launch-matrix.yaml
        prebake prewarm launch-matrix.yaml --no-wait --skip-invalid
        prebake prewarm launch-matrix.json --wait-timeout 7200 --host-cache=/var/cache/prebake --json
        """,
    )
    p.add_argument("matrix", metavar="FILE", help="prewarm matrix (YAML or JSON; see above)")
    p.add_argument("--no-wait", action="store_true", help="enqueue and report; do not wait for jobs")
    p.add_argument(
        "--wait-timeout",
        type=_positive_float,
        metavar="S",
        help="stop waiting for jobs after S seconds (they keep running; rows say timeout)",
    )
    # Not on by default from the env var: it downloads every artifact of the matrix.
    _add_host_cache(
        p, "also download every artifact into this host's cache; put FILE first", env_default=False
    )
    p.add_argument("--skip-invalid", action="store_true", help="hide (and do not fail on) invalid rows")
    p.add_argument("--force", action="store_true", help="retry keys whose last compile failed")
    p.add_argument(
        "--concurrency",
        type=_positive_int,
        default=8,
        metavar="N",
        help="parallel lookups/watches (default 8)",
    )
    _add_quiet(p)
    _add_json(p)

    p = add(
        "publish",
        commands.publish,
        "publish a local directory as the artifact for a key",
        "Hash every regular file under DIR, upload the blobs the server lacks (resumable),\n"
        "then publish the manifest atomically. Symbolic links are refused.",
        """
        prebake publish ./out --kind inductor --model my/llama --instance-type ml.c7i.4xlarge \\
            --sequence-length 512 --batch-size 1 --note "built on ci-42"
        """,
    )
    p.add_argument("directory", metavar="DIR", help="directory whose files form the artifact")
    _add_key_options(p, required=True, lookup=False)
    p.add_argument("--note", default="", help="free text recorded as the producer's note")
    p.add_argument("--replace", action="store_true", help="replace an existing artifact with other files")
    _add_quiet(p)
    _add_json(p)

    jobs_help = "list, show, watch and cancel compile jobs"
    p = add(
        "jobs",
        commands.jobs_list,
        jobs_help,
        "Compile jobs. Without a subcommand: list them (newest first).",
        """
        prebake jobs --state queued leased
        prebake jobs show j-3f2a
        prebake jobs watch j-3f2a
        prebake jobs cancel j-3f2a --reason "wrong model"
        """,
    )
    _add_job_filters(p, suppress=False)
    jobs = p.add_subparsers(dest="jobs_command", metavar="SUBCOMMAND")
    p = add(
        "list",
        commands.jobs_list,
        "list jobs (the default)",
        "List compile jobs, newest first.",
        "prebake jobs list --state failed --kind neuron --limit 10",
        parent=jobs,
    )
    _add_job_filters(p, suppress=True)
    p = add(
        "show", commands.jobs_show, "show one job", "Show one job.", "prebake jobs show j-3f2a", parent=jobs
    )
    p.add_argument("job_id", metavar="ID")
    _add_json(p)
    p = add(
        "watch",
        commands.jobs_watch,
        "follow a job until it finishes",
        "Follow a job's state and progress until it succeeds, fails or is cancelled.\n"
        "Exits 0 if it succeeded, 5 if it failed, 1 if it was cancelled.",
        "prebake jobs watch j-3f2a",
        parent=jobs,
    )
    p.add_argument("job_id", metavar="ID")
    _add_quiet(p)
    _add_json(p)
    p = add(
        "cancel",
        commands.jobs_cancel,
        "cancel a queued or running job",
        "Cancel a queued or leased job; its worker learns so at its next heartbeat.",
        'prebake jobs cancel j-3f2a --reason "superseded"',
        parent=jobs,
    )
    p.add_argument("job_id", metavar="ID")
    p.add_argument("--reason", default="", help="recorded as the job's error")
    _add_json(p)

    p = add(
        "ls",
        commands.ls,
        "list artifacts",
        "List artifacts, newest first (without their files; see show).",
        """
        prebake ls
        prebake ls --kind neuron --model meta-llama/Meta-Llama-3-8B --pinned
        """,
    )
    p.add_argument("--kind", choices=kind_names(), help="only artifacts of this kind")
    p.add_argument("--model", default="", help="only artifacts of this model (exact)")
    p.add_argument("--pinned", action="store_true", help="only pinned artifacts")
    p.add_argument("--limit", type=int, default=100, help="at most N artifacts (default 100; 0 = all)")
    _add_json(p)

    p = add(
        "show",
        commands.show,
        "show an artifact's manifest",
        "Show an artifact: key, producer, and every file with its size and digest.",
        "prebake show 3f2a9c0d1e2b3a4f5e6d7c8b9a0f1e2d",
    )
    p.add_argument("artifact_id", metavar="ARTIFACT_ID")
    _add_json(p)

    p = add(
        "rm",
        commands.rm,
        "delete an artifact",
        "Delete an artifact and every blob no other artifact uses; later lookups of its key\n"
        "miss. A pinned artifact needs --force.",
        "prebake rm 3f2a9c0d1e2b3a4f5e6d7c8b9a0f1e2d",
    )
    p.add_argument("artifact_id", metavar="ARTIFACT_ID")
    p.add_argument("--force", action="store_true", help="delete even if pinned")
    _add_json(p)

    p = add(
        "pin",
        commands.pin,
        "pin (or --unpin) an artifact",
        "Pinned artifacts are never evicted and are deleted only with rm --force.",
        """
        prebake pin 3f2a9c0d1e2b3a4f5e6d7c8b9a0f1e2d
        prebake pin --unpin 3f2a9c0d1e2b3a4f5e6d7c8b9a0f1e2d
        """,
    )
    p.add_argument("artifact_id", metavar="ARTIFACT_ID")
    p.add_argument("--unpin", action="store_true", help="unpin instead")
    _add_json(p)

    p = add(
        "import",
        commands.import_set,
        "publish a set of artifacts compiled elsewhere, listed in a file",
        "Publish every artifact a set file lists (e.g. a SageMaker-style precompiled set), each\n"
        "as `prebake publish` would. FILE is JSON, or YAML (needs PyYAML), holding a list of\n"
        "entries: the key's fields as in a prewarm file's `keys`, plus `path` (the directory\n"
        "with that artifact's files, relative to FILE) and an optional `note`. Entries are\n"
        "independent; the exit status is 1 if any failed.",
        """
        prebake import precompiled-set.yaml
        # precompiled-set.yaml:
        # - {path: llama3-8b, kind: neuron, model: meta-textgeneration-llama-3-8b,
        #    instance_type: ml.inf2.48xlarge, sequence_length: 8192, batch_size: 8,
        #    tensor_parallel_degree: 24, note: SageMaker precompiled set}
        """,
    )
    p.add_argument("file", metavar="FILE", help="the set file (JSON or YAML)")
    _add_json(p)

    p = add(
        "catalog",
        commands.catalog,
        "list JumpStart models or instance types the server knows",
        "models: the SageMaker JumpStart model table and which optimizations each model\n"
        "supports (quantization, speculative decoding, SageMaker draft model); AWQ keys for a\n"
        "model without quantization support are refused. instances: every instance type keys\n"
        "may name, with its cores (the bound of --tp), memory and compile target.",
        """
        prebake catalog                        # models
        prebake catalog models --family LLaMA --quantization
        prebake catalog instances --json
        """,
    )
    p.add_argument("what", nargs="?", choices=["models", "instances"], default="models")
    p.add_argument("--family", default="", help="only this model family (e.g. LLaMA, Mistral)")
    p.add_argument("--quantization", action="store_true", help="only models that support quantization")
    _add_json(p)

    p = add(
        "stats",
        commands.stats,
        "show server statistics",
        "Artifacts, blobs, lookups and hit rate, jobs per state, queue depth, bytes moved.",
        "prebake stats --json",
    )
    _add_json(p)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("prebake")
    except PackageNotFoundError:
        return "(not installed)"


def main(argv: list[str] | None = None) -> int:
    """Run the `prebake` command line; returns the exit code (see `exitcodes`).

    `--help`, `--version` and argparse's usage errors return their exit code (0 or 2)
    instead of raising SystemExit, so callers can always use the return value.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code is None:
            return exitcodes.OK
        return exc.code if isinstance(exc.code, int) else exitcodes.USAGE
    try:
        return commands.run(args)
    except commands.UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"prebake: error: {exc}", file=sys.stderr)
        return exitcodes.USAGE


if __name__ == "__main__":
    raise SystemExit(main())
