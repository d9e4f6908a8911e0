"""Contract of `WorkerDirectory`, the same for every backend in `BACKENDS`."""

from __future__ import annotations

from prebake.server.records import WorkerCapability, WorkerRecord
from prebake.server.storage.bundle import Storage
from tests.contract.samples import NEURON, START
from tests.contract.storage_backends import Backend

TRN = WorkerCapability("neuron", "neuronx-cc 2.21", ("trn1", "trn2"))


async def test_put_then_list_live_workers_by_id(storage: Storage) -> None:
    assert await storage.workers.workers(START) == []
    b = WorkerRecord("worker-b", (NEURON, TRN), last_seen=START, expires_at=START + 30)
    a = WorkerRecord("worker-a", (WorkerCapability("awq", "llmcompressor 0.14"),), START, START + 10)
    c = WorkerRecord("worker-c", (), last_seen=START - 100, expires_at=START - 40)
    for record in (b, a, c):
        await storage.workers.put_worker(record)

    assert await storage.workers.workers(START) == [a, b]
    assert await storage.workers.workers(START, include_expired=True) == [a, b, c]
    # Live strictly before expires_at, exactly as WorkerRecord.live says.
    assert await storage.workers.workers(START + 10) == [b]
    assert a.live(START + 9.99) and not a.live(START + 10)
    assert await storage.workers.workers(START + 30) == []


async def test_put_overwrites_last_writer_wins(storage: Storage) -> None:
    first = WorkerRecord("worker-1", (NEURON,), last_seen=START, expires_at=START + 30)
    await storage.workers.put_worker(first)
    again = WorkerRecord("worker-1", (TRN,), last_seen=START + 20, expires_at=START + 50)
    await storage.workers.put_worker(again)
    assert await storage.workers.workers(START + 40) == [again]
    # An older record written later still wins: the directory does not order writes.
    await storage.workers.put_worker(first)
    assert await storage.workers.workers(START, include_expired=True) == [first]


async def test_records_are_seen_by_every_instance_on_the_engine(backend: Backend, storage: Storage) -> None:
    record = WorkerRecord("worker-x", (TRN,), last_seen=START, expires_at=START + 30)
    other = backend.open()
    try:
        await other.workers.put_worker(record)
    finally:
        other.close()
    assert await storage.workers.workers(START) == [record]
