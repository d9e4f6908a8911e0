"""Running a worker in the foreground of a process until SIGINT or SIGTERM (`prebake worker`).

Contract: `run_until_signalled` must be called from the main thread (it installs signal
handlers, and restores the previous ones before it returns). The first signal stops the
worker gracefully (drain, then release); a second one skips the drain. An exception
raised by the worker's `run` is re-raised in the caller.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prebake.compiler.worker import Worker

log = logging.getLogger("prebake.worker")


def run_until_signalled(worker: Worker) -> int:
    """Run `worker` on a thread until it ends or SIGINT/SIGTERM; returns its job count.

    The first signal stops gracefully (drain, then release); a second one skips the
    drain. Must be called from the main thread (signal handlers).
    """
    signals_seen = 0

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal signals_seen
        signals_seen += 1
        name = signal.Signals(signum).name
        if signals_seen == 1:
            log.info("%s: stopping (a running compile may finish; signal again to skip that)", name)
            worker.stop()
        else:
            log.info("%s again: stopping now", name)
            worker.stop(drain=False)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    taken: list[int] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            taken.append(worker.run())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name="prebake-worker")
    thread.start()
    try:
        # Joining in slices keeps the main thread responsive to signals.
        while thread.is_alive():
            thread.join(0.5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if error:
        raise error[0]
    return taken[0] if taken else 0
