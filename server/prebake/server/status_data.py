"""What the status page shows, read from the server's state (`prebake.server.status_page` renders it).

`parse_overview_query` / `parse_job_id` validate what a browser sent (`InvalidArgument`
with a message saying what is accepted); `overview` and `job_detail` read the registry,
the blob store and the counters. Both coroutines run on the server's event loop, like the
services' rpcs, and reuse the queries those use (`ArtifactQuery`, `JobQuery`, keyset page
tokens, `check_job_id`). They return frozen snapshots that the renderer reads off the loop.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from prebake.core import names
from prebake.core.errors import InvalidArgument, NotFound, PrebakeError
from prebake.server.blobs import StoreUsage
from prebake.server.hit_history import HitHistory, Interval, Sample
from prebake.server.records import (
    Artifact,
    Digest,
    Evaluation,
    Job,
    JobEvent,
    JobState,
    RegistryCounts,
    WorkerRecord,
)
from prebake.server.services.admin_service import MAX_MODEL_FILTER
from prebake.server.services.jobs_service import check_job_id
from prebake.server.state import ServerState
from prebake.server.storage import ArtifactQuery, JobQuery
from prebake.server.storage.evaluation_store import EvaluationQuery
from prebake.server.storage.page_tokens import MAX_TOKEN_CHARS, Page

ARTIFACT_PAGE = 50
JOB_PAGE = 20
EVALUATION_ROWS = 10
MAX_INSTANCE_FILTER = 128
# The instance-type filter is applied to the registry's pages here (no index has it): at
# most this many artifacts are read for one page of the status page.
MAX_FILTER_SCAN = 5000
# The tail of a job's compile log the job page shows.
LOG_TAIL_BYTES = 64 << 10
# The most recent events of a job the job page shows (heartbeats add one each).
MAX_EVENTS = 500
# Query parameters of the overview ("" = no filter / first page).
OVERVIEW_PARAMETERS = ("kind", "model", "instance_type", "artifacts_page", "job_state", "jobs_page")


@dataclass(frozen=True)
class OverviewQuery:
    """The overview's filters and page positions, validated."""

    kind: str = ""
    model: str = ""
    instance_type: str = ""
    artifacts_page: str = ""
    job_state: str = ""
    jobs_page: str = ""

    def params(self, **changes: str) -> dict[str, str]:
        """The non-empty parameters of this query with `changes` applied (for links)."""
        values = {name: getattr(self, name) for name in OVERVIEW_PARAMETERS} | changes
        return {k: v for k, v in values.items() if v}


def parse_overview_query(params: Mapping[str, Sequence[str]]) -> OverviewQuery:
    """The query of `GET /?...` (as `urllib.parse.parse_qs` gives it, blanks kept);
    `InvalidArgument` for unknown or repeated parameters and bad values."""
    unknown = sorted(set(params) - set(OVERVIEW_PARAMETERS))
    if unknown:
        raise InvalidArgument(
            f"unknown query parameter {unknown[0]!r}; the status page takes {', '.join(OVERVIEW_PARAMETERS)}"
        )
    values: dict[str, str] = {}
    for name, given in params.items():
        if len(given) > 1:
            raise InvalidArgument(f"query parameter {name!r} is given {len(given)} times; give it once")
        values[name] = given[0].strip()
    query = OverviewQuery(**values)
    if query.kind and query.kind not in names.kind_names():
        raise InvalidArgument(f"kind {query.kind!r} is unknown; one of {', '.join(names.kind_names())}")
    if len(query.model) > MAX_MODEL_FILTER:
        raise InvalidArgument(f"model filter is {len(query.model)} characters; at most {MAX_MODEL_FILTER}")
    if len(query.instance_type) > MAX_INSTANCE_FILTER:
        raise InvalidArgument(
            f"instance_type filter is {len(query.instance_type)} characters; at most {MAX_INSTANCE_FILTER}"
        )
    if query.job_state and query.job_state not in {s.value for s in JobState}:
        raise InvalidArgument(
            f"job_state {query.job_state!r} is unknown; one of {', '.join(s.value for s in JobState)}"
        )
    for name in ("artifacts_page", "jobs_page"):
        if len(getattr(query, name)) > MAX_TOKEN_CHARS:
            raise InvalidArgument(f"{name} is not a page token this server issued; start again without one")
    return query


def parse_job_id(text: str) -> str:
    """The job id of `/jobs/JOB_ID`; `InvalidArgument` if malformed."""
    return check_job_id(text)


@dataclass(frozen=True)
class Overview:
    """Everything `/` shows, read at `now`."""

    query: OverviewQuery
    now: float
    started_at: float
    lookups: int
    hits: int
    misses: int
    intervals: list[Interval]
    usage: StoreUsage
    blob_count: int
    counts: RegistryCounts
    workers: list[WorkerRecord]
    artifacts: Page[Artifact]
    # True when the instance-type filter stopped after MAX_FILTER_SCAN artifacts.
    artifacts_scan_capped: bool
    jobs: Page[Job]
    # The newest evaluations of any artifact (at most EVALUATION_ROWS).
    evaluations: list[Evaluation]


@dataclass(frozen=True)
class JobDetail:
    """Everything `/jobs/JOB_ID` shows, read at `now`."""

    now: float
    job: Job
    events: list[JobEvent]
    earlier_events: int
    # The tail of the compile log ("" without one); what went wrong reading it, if anything.
    log_tail: str
    log_truncated: bool
    log_problem: str


async def overview(state: ServerState, history: HitHistory, query: OverviewQuery) -> Overview:
    """Read the overview (on the server's loop). `InvalidArgument` for a page token that is
    not one of this list's."""
    # As GetStats does: hits recorded in memory reach the artifact rows first.
    await state.tracker.flush()
    counts = await state.storage.artifacts.counts()
    blob_count, _ = state.blobs.stats()
    now = time.time()
    artifacts, capped = await _artifact_page(state, query)
    states = (JobState(query.job_state),) if query.job_state else ()
    jobs = await state.storage.jobs.list_page(JobQuery(states=states), query.jobs_page, JOB_PAGE)
    c = state.counters
    return Overview(
        query=query,
        now=now,
        started_at=c.started_at,
        lookups=c.lookups,
        hits=c.hits,
        misses=c.misses,
        # With the open interval up to now: a lookup shows before the next periodic sample.
        intervals=history.intervals(Sample(now, c.lookups, c.hits)),
        usage=state.blobs.usage(),
        blob_count=blob_count,
        counts=counts,
        workers=await state.storage.workers.workers(now, include_expired=True),
        artifacts=artifacts,
        artifacts_scan_capped=capped,
        jobs=jobs,
        evaluations=(await state.storage.evaluations.list_page(EvaluationQuery(), "", EVALUATION_ROWS)).items,
    )


def _matches_instance(artifact: Artifact, wanted: str) -> bool:
    wanted = wanted.lower()
    return wanted in (artifact.key.instance_type.lower(), artifact.key.compile_target.lower())


async def _artifact_page(state: ServerState, query: OverviewQuery) -> tuple[Page[Artifact], bool]:
    """One page of artifacts; with an instance-type filter, registry pages are read until a
    page's worth matches (or MAX_FILTER_SCAN were read), and the token is the registry's
    position after the last one read, so paging stays keyset."""
    index = state.storage.artifacts
    registry_query = ArtifactQuery(query.kind, query.model)
    if not query.instance_type:
        return await index.list_page(registry_query, query.artifacts_page, ARTIFACT_PAGE), False
    kept: list[Artifact] = []
    token, scanned = query.artifacts_page, 0
    while True:
        page = await index.list_page(registry_query, token, ARTIFACT_PAGE)
        scanned += len(page.items)
        kept += [a for a in page.items if _matches_instance(a, query.instance_type)]
        token = page.next_token
        if len(kept) >= ARTIFACT_PAGE or not token or scanned >= MAX_FILTER_SCAN:
            return Page(kept, token), bool(token) and len(kept) < ARTIFACT_PAGE


async def job_detail(state: ServerState, job_id: str) -> JobDetail:
    """Read one job, its events and the tail of its log (on the server's loop);
    `NotFound` for an unknown job."""
    job = await state.storage.jobs.get(job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    events = await state.storage.jobs.events(job_id)
    shown = events[-MAX_EVENTS:]
    tail, truncated, problem = "", False, ""
    if job.log is not None:
        try:
            tail, truncated = await state.run_blocking(_log_tail, state, job.log)
        except PrebakeError as exc:
            problem = f"the log blob cannot be read: {exc}"
    return JobDetail(time.time(), job, shown, len(events) - len(shown), tail, truncated, problem)


def _log_tail(state: ServerState, log: Digest) -> tuple[str, bool]:
    """The last LOG_TAIL_BYTES of the log blob as text, and whether earlier bytes were cut."""
    offset = max(0, log.size - LOG_TAIL_BYTES)
    reader = state.blobs.read(log, offset=offset)
    try:
        data = b"".join(reader)
    finally:
        reader.close()
    return data.decode("utf-8", "replace"), offset > 0
