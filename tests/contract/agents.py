"""Child processes with their own `Storage` on a backend under test.

An `Agent` is a spawned process that opens a backend when told and runs the
`JobLifecycle` calls it is sent over a pipe, on one event loop. Agents are spawned once
per test session (`AgentPool`: spawning imports the server, which costs seconds) and
open each test's backend afresh. `together` releases several agents at once: each
arms its calls and waits; once all have armed they are sent "go" back to back, so that
several processes decide on the same stored state at the same moment (the races of the
contract). `crash_loop` is the body of a child that writes without pause until it is
SIGKILLed.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from multiprocessing.connection import Connection
from typing import Any

from prebake.core.errors import FailedPrecondition
from prebake.server.job_lifecycle import JobLifecycle
from prebake.server.records import ErrorClass
from prebake.server.storage.bundle import Storage
from tests.contract.samples import FILES, NEURON, PRODUCER, START, Clock, entry, make_key
from tests.contract.storage_backends import Backend

CONTEXT = multiprocessing.get_context("spawn")
TIMEOUT = 60.0

# (JobLifecycle method name, positional arguments, keyword arguments)
Call = tuple[str, tuple[Any, ...], dict[str, Any]]


async def _run(lifecycle: JobLifecycle, calls: list[Call]) -> list[Any]:
    return await asyncio.gather(
        *[getattr(lifecycle, name)(*args, **kwargs) for name, args, kwargs in calls], return_exceptions=True
    )


def _serve(conn: Connection) -> None:
    loop = asyncio.new_event_loop()
    storage: Storage | None = None
    lifecycle: JobLifecycle | None = None
    conn.send(("ready", None))
    while (message := conn.recv()) is not None:
        match message:
            case ("open", backend, backoff_base):
                storage = backend.open()
                lifecycle = JobLifecycle(
                    storage.artifacts, storage.jobs, clock=Clock(START), backoff_base=backoff_base
                )
                conn.send(("opened", None))
            case ("close",):
                if storage is not None:
                    storage.close()
                storage = lifecycle = None
                conn.send(("closed", None))
            case ("run", calls, together):
                assert lifecycle is not None
                if together:
                    conn.send(("armed", None))
                    assert conn.recv() == "go"
                conn.send(("done", loop.run_until_complete(_run(lifecycle, calls))))
    loop.close()


class Agent:
    """One child process. `start` sends calls, `results` waits for their outcomes."""

    def __init__(self) -> None:
        self._conn, child = CONTEXT.Pipe()
        self.process = CONTEXT.Process(target=_serve, args=(child,), daemon=True)
        self.process.start()
        child.close()
        self.pending = "ready"

    def expect(self, what: str) -> Any:
        if not self._conn.poll(TIMEOUT):
            raise TimeoutError(f"agent {self.process.pid} did not answer {what!r} within {TIMEOUT} s")
        tag, value = self._conn.recv()
        assert tag == what, (tag, value)
        self.pending = ""
        return value

    def send(self, message: Any, answer: str) -> None:
        assert not self.pending, f"agent still owes {self.pending!r}"
        self._conn.send(message)
        self.pending = answer

    def start_many(self, calls: list[Call], together: bool = False) -> None:
        """Run `calls` concurrently on the agent's loop (after `go` if `together`)."""
        self.send(("run", calls, together), "armed" if together else "done")

    def start(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.start_many([(name, args, kwargs)])

    def results(self) -> list[Any]:
        """The outcomes of the last `start_many`: values, or the exceptions raised."""
        outcome: list[Any] = self.expect("done")
        return outcome

    def result(self) -> Any:
        [outcome] = self.results()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        self.start(name, *args, **kwargs)
        return self.result()

    def go(self) -> None:
        self.expect("armed")
        self.pending = "done"

    def release(self) -> None:
        self._conn.send("go")

    def stop(self) -> None:
        if self.process.is_alive() and not self.pending:
            self._conn.send(None)
            self.process.join(TIMEOUT)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(TIMEOUT)
        self._conn.close()


def together(agents: Sequence[Agent], calls: Sequence[list[Call]]) -> list[list[Any]]:
    """Run `calls[i]` on `agents[i]`, all released at once; the outcomes per agent."""
    for agent, mine in zip(agents, calls, strict=True):
        agent.start_many(mine, together=True)
    for agent in agents:
        agent.go()
    for agent in agents:
        agent.release()
    return [agent.results() for agent in agents]


class AgentPool:
    """Agents spawned once, lent to one test at a time on that test's backend."""

    def __init__(self, size: int) -> None:
        self._agents = [Agent() for _ in range(size)]  # spawned in parallel
        for agent in self._agents:
            agent.expect("ready")

    @contextmanager
    def use(self, backend: Backend, count: int, backoff_base: float = 5.0) -> Iterator[list[Agent]]:
        lent = self._agents[:count]
        try:
            for agent in lent:
                agent.send(("open", backend, backoff_base), "opened")
            for agent in lent:
                agent.expect("opened")
            yield lent
        finally:
            for n, agent in enumerate(lent):
                if agent.pending:  # a failed test left it mid-call: replace it
                    agent.stop()
                    self._agents[n] = replacement = Agent()
                    replacement.expect("ready")
                else:
                    agent.send(("close",), "closed")
                    agent.expect("closed")

    def close(self) -> None:
        for agent in self._agents:
            agent.stop()


async def _crash_steps(lifecycle: JobLifecycle, clock: Clock, conn: Connection) -> None:
    """Publishes, replaces and the whole job cycle, reporting after every step."""
    replaced = make_key(model="replaced")
    lists = [FILES, tuple(entry(f"part-{n}.bin", size=n + 1) for n in range(7))]
    await lifecycle.publish(replaced, lists[0], PRODUCER, replace_existing=True)
    for i in range(1_000_000):
        clock.advance(1)
        key = make_key(batch_size=i)
        files = tuple(entry(f"f{i}-{n}.bin", size=n + 1) for n in range(1 + i % 6))
        await lifecycle.publish(key, files, PRODUCER)
        await lifecycle.publish(replaced, lists[1 - i % 2], PRODUCER, replace_existing=True)
        await lifecycle.create_or_join(make_key(batch_size=i, model="jobs"))
        leased = await lifecycle.lease("crasher", [NEURON], lease_seconds=30)
        if leased is not None:
            if i % 3 == 0:
                await lifecycle.fail_leased(
                    leased.job_id, leased.fencing_token, "flaky", ErrorClass.TRANSIENT
                )
            elif i % 3 == 1:
                await lifecycle.release(leased.job_id, leased.fencing_token)
            else:
                with suppress(FailedPrecondition):  # another step's publish got there first
                    await lifecycle.complete(leased.job_id, leased.fencing_token, files, PRODUCER)
        conn.send(i)


def crash_loop(backend: Backend, conn: Connection) -> None:
    storage = backend.open()
    clock = Clock(START)
    lifecycle = JobLifecycle(storage.artifacts, storage.jobs, clock=clock, backoff_base=0.0)
    asyncio.run(_crash_steps(lifecycle, clock, conn))
