"""Fixtures of the contract suites: every test runs once per backend of `BACKENDS`.

No pytest-asyncio: an `async def` test is run here with `asyncio.run`, one event loop
per test.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator
from typing import Any

import pytest

from prebake.server.job_lifecycle import JobLifecycle
from prebake.server.storage.bundle import Storage
from tests.contract.agents import AgentPool
from tests.contract.samples import Clock
from tests.contract.storage_backends import BACKENDS, Backend


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    names = pyfuncitem._fixtureinfo.argnames
    kwargs: dict[str, Any] = {name: pyfuncitem.funcargs[name] for name in names}
    asyncio.run(pyfuncitem.obj(**kwargs))
    return True


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Backend:
    return BACKENDS[request.param](request)


@pytest.fixture
def storage(backend: Backend) -> Iterator[Storage]:
    opened = backend.open()
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def lifecycle(storage: Storage, clock: Clock) -> JobLifecycle:
    return JobLifecycle(storage.artifacts, storage.jobs, clock=clock)


@pytest.fixture(scope="session")
def agent_pool() -> Iterator[AgentPool]:
    """Four child processes for the cross-process races, spawned once per session."""
    pool = AgentPool(4)
    try:
        yield pool
    finally:
        pool.close()
