"""`prebake worker`: the compile worker's subcommand, added to the one `prebake` command.

Reached through the `prebake.commands` entry point `worker` (the protocol is in
`prebake.core.command_plugins`). Only the standard library and core are imported at load
time; the worker module (and, in its child processes, the toolchains) when the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from prebake.core.cli_values import count, seconds
from prebake.core.command_plugins import CommandFailed, CommandRegistrar
from prebake.core.logs import add_log_flags, log_settings, setup_logging
from prebake.core.names import kind_names

if TYPE_CHECKING:
    from prebake.client.client import Client


def register(commands: CommandRegistrar) -> None:
    """Add `worker`; it connects (--server, --timeout) like the client's commands."""
    p = commands.add_command(
        "worker",
        worker,
        summary="run a compile worker",
        description=(
            "Lease compile jobs from the server and run them until SIGINT/SIGTERM: each compile\n"
            "runs in a child process, heartbeats carry its progress, outputs are uploaded\n"
            "(resumably) and published. A worker leases only the kinds whose toolchain is\n"
            "installed here, and waits out server restarts. On SIGINT/SIGTERM it takes no new\n"
            "job and gives a running compile --drain-seconds to finish, then kills it and hands\n"
            "the job back to the queue; a second signal skips the wait."
        ),
        examples="""
        prebake worker                                 # every kind whose toolchain is installed
        prebake worker --kind inductor --work-dir /scratch/prebake --server registry:50051
        prebake worker --kind neuron --max-jobs 1 --drain-seconds 600   # one job, then exit
        """,
        connects=True,
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
        "--max-jobs", type=count, metavar="N", help="exit after N jobs (default: run until stopped)"
    )
    p.add_argument(
        "--drain-seconds",
        type=seconds,
        default=60.0,
        metavar="S",
        help="on SIGINT/SIGTERM, let a running compile finish for up to S seconds (default 60)",
    )
    p.add_argument("--worker-id", metavar="ID", help="name recorded on leased jobs (default: HOST:PID)")
    p.add_argument(
        "--model-source-root",
        dest="model_roots",
        action="append",
        metavar="DIR",
        help=(
            "read local model sources only under DIR (symbolic links resolved); repeatable "
            "(default: what the server's job names; the server checks its own roots)"
        ),
    )
    p.add_argument(
        "--signing-key",
        metavar="FILE",
        help="sign every artifact this worker completes with this Ed25519 private key "
        "(PEM; `prebake key generate`)",
    )
    add_log_flags(p)


def worker(args: argparse.Namespace, client: Client) -> int:
    """Run a worker until it has done --max-jobs or is signalled; CommandFailed if it cannot start."""
    from prebake.compiler.probe import WorkerSetupError
    from prebake.compiler.signals import run_until_signalled
    from prebake.compiler.work_dir import default_work_dir
    from prebake.compiler.worker import Worker, WorkerConfig, default_worker_id

    try:
        setup_logging(*log_settings(args.log_format, args.log_level))
    except ValueError as exc:  # a bad PREBAKE_LOG_FORMAT / PREBAKE_LOG_LEVEL
        raise CommandFailed(str(exc), bad_input=True) from exc
    config = WorkerConfig(
        server=args.server,
        work_dir=Path(args.work_dir) if args.work_dir else default_work_dir(),
        kinds=tuple(args.kinds),
        worker_id=args.worker_id or default_worker_id(),
        max_jobs=args.max_jobs,
        drain_seconds=args.drain_seconds,
        rpc_timeout=args.timeout,
        # The --token / --ca-bundle / --client-cert of the command line, as the client read them.
        credentials=client.credentials,
        model_roots=None if args.model_roots is None else tuple(Path(r).absolute() for r in args.model_roots),
        signing_key=Path(args.signing_key) if args.signing_key else None,
    )
    try:
        compile_worker = Worker(config, client=client)
    except WorkerSetupError as exc:
        raise CommandFailed(str(exc)) from exc
    run_until_signalled(compile_worker)
    return 0
