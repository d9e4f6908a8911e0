"""Storage seams for the registry's metadata: the artifact index, the job queue and the
worker directory.

Each is a `Protocol` of storage *primitives* (get, conditional create, conditional
replace, compare-and-set, list with opaque page tokens), never business rules: the job
lifecycle (lease, heartbeat, expiry, backoff, bounded attempts, complete-and-publish) is
written once above them in `prebake.server.job_lifecycle`, and lookups, nearest
artifacts and compatibility choices in storage-free modules. A backend is one module
(or package) implementing all three over one engine, because complete-and-publish must
be one atomic write across the index and the queue: SQLite (`storage.sqlite`, the
embedded default) and DynamoDB (`storage.dynamodb`: conditional writes and transactions).

Contract shared by every method of every backend:

* **Async, and off the event loop.** Methods are coroutines. A backend either does
  only non-blocking work on the loop (SQLite WAL point reads, which never wait for a
  writer) or hands the work to its own threads (SQLite writes go to one writer thread).
* **Atomic.** A method that raises has changed nothing. A conditional write whose
  condition does not hold raises `ConditionFailed` and changes nothing; the caller
  re-reads and decides again.
* **Errors.** Domain errors from `prebake.core.errors`; an engine that is busy or
  unreachable raises `Unavailable` (retryable), never an engine-specific exception.
* **Consistency.** A write is visible to every later read of any process or replica on
  the same engine (read-your-writes across replicas; DynamoDB reads are strongly
  consistent where it matters).
"""

from prebake.server.storage.artifact_index import ArtifactIndex, ArtifactQuery, JobWrite
from prebake.server.storage.conditions import ConditionFailed
from prebake.server.storage.job_queue import JobQuery, JobQueue
from prebake.server.storage.page_tokens import Page
from prebake.server.storage.worker_directory import WorkerDirectory

__all__ = [
    "ArtifactIndex",
    "ArtifactQuery",
    "ConditionFailed",
    "JobQuery",
    "JobQueue",
    "JobWrite",
    "Page",
    "WorkerDirectory",
]
