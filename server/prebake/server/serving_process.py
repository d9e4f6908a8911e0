"""Entry point of one serving process of a primary (see `prebake.server.serving_processes`).

Run by the primary as `python -m prebake.server.serving_process PRIMARY_PID` with its
configuration in the environment; prints `ready` on stdout once it serves, and stops on
SIGTERM or SIGINT or as soon as the primary is gone.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from prebake.server.serving_processes import CONFIG_ENV, PARENT_CHECK_SECONDS, READY, config_from_text


async def _watch_parent(primary_pid: int, stop: asyncio.Event) -> None:
    while not stop.is_set():
        if os.getppid() != primary_pid:  # re-parented: the primary died without stopping us
            stop.set()
            return
        await asyncio.sleep(PARENT_CHECK_SECONDS)


async def _run(primary_pid: int) -> None:
    from prebake.server.app import start_serving_process

    config = config_from_text(os.environ[CONFIG_ENV])
    running = await start_serving_process(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    watcher = loop.create_task(_watch_parent(primary_pid, stop))
    print(READY, flush=True)
    await stop.wait()
    watcher.cancel()
    await running.stop()


def main() -> int:
    if len(sys.argv) != 2 or not sys.argv[1].isdigit() or CONFIG_ENV not in os.environ:
        print("prebake.server.serving_process is started by `prebake serve --processes N`", file=sys.stderr)
        return 2
    from prebake.server.app import setup_process

    setup_process(config_from_text(os.environ[CONFIG_ENV]))
    asyncio.run(_run(int(sys.argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
