"""One near-miss computation per key: the memo itself, and a stampede of misses on a server.

What must hold: concurrent callers of one key share one computation; a joiner of an
in-flight job reuses the list computed as the job began, however long ago; a plain miss
reuses only a recent one; a failure is not kept; one caller giving up does not cancel
the computation the others wait for.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest

from prebake.client import Client
from prebake.server.app import BackgroundServer
from prebake.server.nearest_memo import NearestMemo
from prebake.v1 import registry_pb2
from tests.conftest import LLAMA3_8B_INF2, make_artifact_dir


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_concurrent_callers_share_one_computation() -> None:
    asyncio.run(_concurrent_callers_share_one_computation())


async def _concurrent_callers_share_one_computation() -> None:
    memo: NearestMemo[int] = NearestMemo()
    release = asyncio.Event()
    calls = 0

    async def compute() -> int:
        nonlocal calls
        calls += 1
        await release.wait()
        return 42

    waiters = [asyncio.ensure_future(memo.get("k", compute, 0.0)) for _ in range(50)]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*waiters) == [42] * 50
    assert calls == memo.computations == 1


def test_freshness_is_the_callers_choice() -> None:
    asyncio.run(_freshness_is_the_callers_choice())


async def _freshness_is_the_callers_choice() -> None:
    clock = Clock()
    memo: NearestMemo[float] = NearestMemo(clock=clock)

    async def compute() -> float:
        return clock.now

    assert await memo.get("k", compute, clock.now - 1) == 1000.0
    clock.now += 30
    # A joiner of a job created before the answer was computed takes it, 30 s later.
    assert await memo.get("k", compute, 999.5) == 1000.0
    # A plain miss wants one from the last second: computed again.
    assert await memo.get("k", compute, clock.now - 1) == 1030.0
    assert memo.computations == 2
    # Other keys are separate.
    assert await memo.get("other", compute, 0.0) == 1030.0
    assert memo.computations == 3


def test_a_failure_is_not_kept() -> None:
    asyncio.run(_a_failure_is_not_kept())


async def _a_failure_is_not_kept() -> None:
    memo: NearestMemo[str] = NearestMemo()
    calls = 0

    async def compute() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("registry down")
        return "ok"

    with pytest.raises(RuntimeError, match="registry down"):
        await memo.get("k", compute, 0.0)
    assert await memo.get("k", compute, 0.0) == "ok"
    assert memo.computations == 2


def test_one_caller_giving_up_does_not_cancel_the_others() -> None:
    asyncio.run(_one_caller_giving_up_does_not_cancel_the_others())


async def _one_caller_giving_up_does_not_cancel_the_others() -> None:
    memo: NearestMemo[str] = NearestMemo()
    release = asyncio.Event()

    async def compute() -> str:
        await release.wait()
        return "near"

    impatient = asyncio.ensure_future(memo.get("k", compute, 0.0))
    patient = asyncio.ensure_future(memo.get("k", compute, 0.0))
    await asyncio.sleep(0)
    impatient.cancel()
    with pytest.raises(asyncio.CancelledError):
        await impatient
    release.set()
    assert await patient == "near"
    # Still remembered: the computation finished although its first caller left.
    assert await memo.get("k", compute, 0.0) == "near"
    assert memo.computations == 1


def test_the_oldest_key_is_forgotten_beyond_capacity() -> None:
    asyncio.run(_the_oldest_key_is_forgotten_beyond_capacity())


async def _the_oldest_key_is_forgotten_beyond_capacity() -> None:
    memo: NearestMemo[str] = NearestMemo(capacity=2)

    async def compute() -> str:
        return "x"

    for key in ("a", "b", "c"):
        await memo.get(key, compute, 0.0)
    await memo.get("c", compute, 0.0)
    assert memo.computations == 3
    await memo.get("a", compute, 0.0)
    assert memo.computations == 4


def test_a_stampede_of_misses_computes_the_near_misses_once(
    server: BackgroundServer, client: Client, tmp_path: Path
) -> None:
    # Artifacts of the model, none for the key: every lookup is a miss with near misses.
    for batch in (1, 2, 4):
        source = make_artifact_dir(tmp_path / f"src{batch}", {"model.neff": 100}, seed=batch)
        client.publish(source, replace(LLAMA3_8B_INF2, batch_size=batch))
    index = cast(Any, server.running).state.storage.artifacts
    scans = 0
    ranked = index.nearest

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal scans
        scans += 1
        return await ranked(*args, **kwargs)

    index.nearest = counted
    try:
        with ThreadPoolExecutor(32) as pool:
            looked = list(pool.map(lambda _: client.lookup(LLAMA3_8B_INF2), range(64)))
        # Later joiners of the one job: the list computed as it began still serves them.
        looked += [client.lookup(LLAMA3_8B_INF2) for _ in range(5)]
    finally:
        index.nearest = ranked
    [job_id] = {r.job.job_id for r in looked}
    assert sum(r.job_created for r in looked) == 1
    assert {r.status for r in looked} <= {
        registry_pb2.LOOKUP_STATUS_MISS,
        registry_pb2.LOOKUP_STATUS_COMPILING,
    }
    near = {tuple(n.artifact_id for n in r.nearest) for r in looked}
    assert len(near) == 1 and len(next(iter(near))) == 3
    # One computation: one ranking per name the model's artifacts may be stored under (its
    # canonical Hugging Face id and its JumpStart id, see RegistryService.stored_as).
    assert job_id and scans == 2
