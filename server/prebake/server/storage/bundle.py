"""`Storage`: the four seams of one backend, opened together, closed together."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prebake.server.storage.artifact_index import ArtifactIndex
from prebake.server.storage.evaluation_store import EvaluationStore
from prebake.server.storage.job_queue import JobQueue
from prebake.server.storage.worker_directory import WorkerDirectory


@dataclass(frozen=True)
class Storage:
    """An artifact index, a job queue, a worker directory and an evaluation store over one
    engine.

    They share the engine so that complete-and-publish (`ArtifactIndex.put` with a
    `JobWrite`) is one atomic write, and so that an artifact's delete or replace takes its
    evaluations with it (`EvaluationStore`). `close` releases the engine; awaited writes finish
    first.
    """

    artifacts: ArtifactIndex
    jobs: JobQueue
    workers: WorkerDirectory
    evaluations: EvaluationStore
    close: Callable[[], None]
    description: str
