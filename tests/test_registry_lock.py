"""The event loop never waits for SQLite: hits are answered while another connection
holds the registry's write lock, even with a write of this server stuck behind it."""

from __future__ import annotations

import dataclasses
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from prebake.client import Client
from prebake.server.app import BackgroundServer
from prebake.v1 import registry_pb2
from tests.conftest import LLAMA3_8B_INF2, make_artifact_dir


def test_hits_are_answered_while_a_writer_holds_the_database_lock(
    client: Client, server: BackgroundServer, tmp_path: Path
) -> None:
    client.publish(make_artifact_dir(tmp_path / "a", {"w": 10}), LLAMA3_8B_INF2)
    other_key = dataclasses.replace(LLAMA3_8B_INF2, batch_size=2)
    blocker = sqlite3.connect(server.config.data_dir / "registry.sqlite3", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process's writer, holding the lock
    with ThreadPoolExecutor(1) as pool:
        try:
            # A miss enqueues a job: a write, which now waits behind the lock on the
            # server's writer thread.
            miss = pool.submit(client.lookup, other_key)
            for _ in range(20):
                hit = client.lookup(LLAMA3_8B_INF2)
                assert hit.status == registry_pb2.LOOKUP_STATUS_HIT
            assert client.get_artifact(hit.artifact.artifact_id).artifact_id == hit.artifact.artifact_id
            assert not miss.done(), "the write did not wait for the lock: the test proves nothing"
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert miss.result(timeout=30).status == registry_pb2.LOOKUP_STATUS_MISS
