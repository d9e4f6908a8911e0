"""Prewarming: make sure every configuration of a matrix is compiled before it is needed.

`prewarm` looks every key up with on_miss=ENQUEUE, so each missing configuration gets a
compile job (or joins the one already in flight: the server runs one job per key),
optionally waits for all of those jobs, and optionally fetches every resulting artifact's
blobs into a host-local cache (`HostCache`) so that later fetches on the host are local.

Each key ends as one `PrewarmRow` whose `outcome` is one of:

    hit        the artifact already existed
    compiled   a job (created or joined by this run) succeeded
    enqueued   a job was created; not waited for (wait=False)
    joined     a job was already in flight; not waited for (wait=False)
    failed     the compile failed (now, or earlier and still negatively cached)
    cancelled  the job was cancelled
    invalid    the server refused the key (INVALID_ARGUMENT); `detail` is its message
    timeout    the job had not finished when the timeout ran out (it keeps running)
    error      anything else (e.g. caching on this host failed); `detail` says what

A dry run (`dry_run`) looks every key up report-only, so it creates nothing, and ends
each row as hit, failed, invalid or error as above, or as one of:

    would_compile  a miss a live worker could compile (prewarm would enqueue it)
    in_flight      a job for the key is already queued or running (`job_id`)
    no_worker      a miss (or a job in flight) no live worker can compile; `detail` names
                   the missing capability (the server's `unserved_reason`)

Invalid combinations are not filtered beforehand: the server is the authority on what
fits (tensor-parallel degree vs. cores, precision vs. kind), and its per-key message
tells the matrix's owner which cells make no sense.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar, cast

from prebake.client.artifact_key import ArtifactKey
from prebake.client.client import Client
from prebake.client.errors import DeadlineExceeded, InvalidArgument, PrebakeError, Unavailable
from prebake.client.hostcache import HostCache
from prebake.client.matrix import PrewarmEntry
from prebake.core.names import TERMINAL_JOB_STATES, job_state_name
from prebake.v1 import jobs_pb2, registry_pb2

OUTCOMES = (
    "hit",
    "compiled",
    "enqueued",
    "joined",
    "would_compile",
    "in_flight",
    "no_worker",
    "failed",
    "cancelled",
    "invalid",
    "timeout",
    "error",
)
# Outcomes that mean "nothing is wrong with this configuration".
OK_OUTCOMES = frozenset({"hit", "compiled", "enqueued", "joined", "would_compile", "in_flight"})
# Poll period of the collecting thread: bounds how long Ctrl-C waits to be noticed.
_POLL_SECONDS = 0.25
R = TypeVar("R")


@dataclass(frozen=True)
class PrewarmRow:
    """What became of one configuration (see the module doc for `outcome`)."""

    key: ArtifactKey
    outcome: str
    # The server's message (invalid), the compile error (failed), the reason (cancelled,
    # timeout, error), or how a hit matched when it was not an exact match.
    detail: str = ""
    model_source: str = ""
    # What the lookup answered: "HIT", "MISS", "COMPILING", "FAILED"; "" if refused.
    lookup_status: str = ""
    key_digest: str = ""
    compile_target: str = ""
    # The key as the server normalised it (None when the lookup was refused).
    resolved: ArtifactKey | None = None
    artifact_id: str = ""
    job_id: str = ""
    # This run created the job (rather than joining one in flight).
    job_created: bool = False
    # Host mode: every blob of the artifact is in the host cache.
    cached: bool = False
    # Host mode: bytes this run downloaded into the host cache.
    bytes_cached: int = 0

    @property
    def ok(self) -> bool:
        return self.outcome in OK_OUTCOMES


@dataclass(frozen=True)
class PrewarmProgress:
    """A snapshot for progress displays, passed to `prewarm`'s `progress` callback."""

    total: int
    looked_up: int
    # Jobs being waited for, and how many of those a worker is running.
    waiting: int
    compiling: int
    # Rows whose artifact is being fetched into the host cache.
    caching: int
    # Finished rows by outcome.
    counts: Mapping[str, int] = field(default_factory=dict)
    # The row whose end this snapshot reports (None for other changes).
    finished: PrewarmRow | None = None

    @property
    def done(self) -> int:
        return sum(self.counts.values())


ProgressCallback = Callable[[PrewarmProgress], object]


def summarize(rows: Sequence[PrewarmRow]) -> dict[str, int]:
    """Rows per outcome, in the order of OUTCOMES, without zeros."""
    counts = {outcome: sum(1 for r in rows if r.outcome == outcome) for outcome in OUTCOMES}
    return {outcome: n for outcome, n in counts.items() if n}


def prewarm(
    client: Client,
    keys: Sequence[PrewarmEntry | ArtifactKey],
    *,
    wait: bool = True,
    timeout: float | None = None,
    fetch_to_cache: HostCache | None = None,
    progress: ProgressCallback | None = None,
    concurrency: int = 8,
    force: bool = False,
) -> list[PrewarmRow]:
    """Look every key up (enqueueing the missing ones) and return one row per key, in order.

    First every key is looked up (up to `concurrency` at a time), so that every missing
    configuration is enqueued before anything is waited for. Then, with `wait`, every
    job is followed until it ends, up to `concurrency` watches at a time; `timeout`
    (seconds from the start of the call) bounds that waiting, and rows whose job is still
    running get "timeout" (the job is not cancelled). With `fetch_to_cache`, the blobs of
    every hit or compiled artifact are then downloaded into that host cache (only those
    it lacks). `force` retries keys whose last compile failed (negative cache).

    `model_source` of each PrewarmEntry goes with its lookup, for the job it may create.
    `progress` is called from worker threads, one call at a time, after every change.

    Raises Unavailable if the server cannot be reached while looking keys up (nothing
    useful can be reported then); any later failure of a row becomes its "error" outcome.
    If the caller is interrupted (KeyboardInterrupt), the jobs keep running on the
    server, and watch threads still running end with the client (close it).
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, not {concurrency}")
    entries = [k if isinstance(k, PrewarmEntry) else PrewarmEntry(k) for k in keys]
    deadline = None if timeout is None else time.monotonic() + timeout
    tracker = _Tracker(len(entries), progress)
    rows: list[PrewarmRow] = [PrewarmRow(e.key, "error", "not looked up") for e in entries]

    def look_up(index: int) -> PrewarmRow:
        row = _look_up(client, entries[index], force)
        tracker.looked_up(row, final=not _needs_more(row, wait, fetch_to_cache))
        return row

    for index, row in _parallel(look_up, range(len(entries)), concurrency):
        rows[index] = row

    def finish(index: int) -> PrewarmRow:
        row = rows[index]
        if wait and row.outcome in ("enqueued", "joined"):
            row = _await_job(client, row, deadline, timeout, tracker)
        if fetch_to_cache is not None and row.outcome in ("hit", "compiled"):
            row = _cache(client, fetch_to_cache, row, tracker)
        tracker.finished(row)
        return row

    pending = [i for i, row in enumerate(rows) if _needs_more(row, wait, fetch_to_cache)]
    for index, row in _parallel(finish, pending, concurrency):
        rows[index] = row
    return rows


def dry_run(
    client: Client,
    keys: Sequence[PrewarmEntry | ArtifactKey],
    *,
    progress: ProgressCallback | None = None,
    concurrency: int = 8,
    force: bool = False,
) -> list[PrewarmRow]:
    """What `prewarm` would do, creating nothing: one row per key, in order (see the module
    doc for the outcomes). Every key is looked up report-only (`ON_MISS_REPORT`); the
    server says whether a live worker could take the job (`unserved_reason`). `force`
    shows keys whose last compile failed as they would be retried.

    Raises Unavailable if the server cannot be reached.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, not {concurrency}")
    entries = [k if isinstance(k, PrewarmEntry) else PrewarmEntry(k) for k in keys]
    tracker = _Tracker(len(entries), progress)
    rows: list[PrewarmRow] = [PrewarmRow(e.key, "error", "not looked up") for e in entries]

    def look_up(index: int) -> PrewarmRow:
        row = _look_up(client, entries[index], force, report_only=True)
        tracker.looked_up(row, final=True)
        return row

    for index, row in _parallel(look_up, range(len(entries)), concurrency):
        rows[index] = row
    return rows


def _needs_more(row: PrewarmRow, wait: bool, cache: HostCache | None) -> bool:
    if wait and row.outcome in ("enqueued", "joined"):
        return True
    return cache is not None and row.outcome == "hit"


def _look_up(client: Client, entry: PrewarmEntry, force: bool, report_only: bool = False) -> PrewarmRow:
    row = PrewarmRow(entry.key, "error", model_source=entry.model_source)
    try:
        response = client.lookup(
            entry.key,
            on_miss="report" if report_only else "enqueue",
            force=force,
            model_source=entry.model_source,
        )
    except InvalidArgument as exc:
        return dataclasses.replace(row, outcome="invalid", detail=exc.details or str(exc))
    except Unavailable:
        raise
    except PrebakeError as exc:
        return dataclasses.replace(row, detail=f"lookup failed ({exc.code}): {exc}")
    resolved = response.key
    row = dataclasses.replace(
        row,
        key_digest=resolved.digest,
        compile_target=resolved.compile_target,
        resolved=ArtifactKey.from_proto(resolved.key),
    )
    job = response.job if response.HasField("job") and response.job.job_id else None
    status = response.status
    if status == registry_pb2.LOOKUP_STATUS_HIT:
        exact = response.matched_policy in ("", "exact")
        return dataclasses.replace(
            row,
            outcome="hit",
            lookup_status="HIT",
            artifact_id=response.artifact.artifact_id,
            detail="" if exact else response.match_reason or f"policy {response.matched_policy}",
        )
    if status == registry_pb2.LOOKUP_STATUS_FAILED:
        error = response.error or (job.error if job else "") or "no error message"
        return dataclasses.replace(
            row,
            outcome="failed",
            lookup_status="FAILED",
            job_id=job.job_id if job else "",
            detail=f"{error} (cached failure; --force retries)",
        )
    name = "MISS" if status == registry_pb2.LOOKUP_STATUS_MISS else "COMPILING"
    if report_only and status in (registry_pb2.LOOKUP_STATUS_MISS, registry_pb2.LOOKUP_STATUS_COMPILING):
        served = "would_compile" if job is None else "in_flight"
        outcome = "no_worker" if response.unserved_reason else served
        return dataclasses.replace(
            row,
            outcome=outcome,
            lookup_status=name,
            job_id=job.job_id if job else "",
            detail=response.unserved_reason,
        )
    if status not in (registry_pb2.LOOKUP_STATUS_MISS, registry_pb2.LOOKUP_STATUS_COMPILING) or job is None:
        reason = response.error or f"lookup answered status {status} without a job"
        return dataclasses.replace(row, lookup_status=name, detail=reason)
    return dataclasses.replace(
        row,
        outcome="enqueued" if response.job_created else "joined",
        lookup_status=name,
        job_id=job.job_id,
        job_created=response.job_created,
    )


def _await_job(
    client: Client,
    row: PrewarmRow,
    deadline: float | None,
    timeout: float | None,
    tracker: _Tracker,
) -> PrewarmRow:
    remaining = None if deadline is None else deadline - time.monotonic()
    tracker.waiting(row.job_id, +1)
    try:
        if remaining is not None and remaining <= 0:
            # The time ran out while other jobs were watched; this one may be done anyway.
            job = client.get_job(row.job_id)
            if job.state not in TERMINAL_JOB_STATES:
                detail = f"job {row.job_id} still {job_state_name(job.state)} after {timeout:g} s"
                return dataclasses.replace(row, outcome="timeout", detail=f"{detail}; it keeps running")
        else:
            job = client.wait_for_job(row.job_id, timeout=remaining, on_event=tracker.job_event)
    except DeadlineExceeded as exc:
        return dataclasses.replace(row, outcome="timeout", detail=f"{exc}; it keeps running")
    except PrebakeError as exc:
        return dataclasses.replace(row, detail=f"watching job {row.job_id} failed ({exc.code}): {exc}")
    finally:
        tracker.waiting(row.job_id, -1)
    if job.state == jobs_pb2.JOB_STATE_SUCCEEDED:
        return dataclasses.replace(
            row, outcome="compiled", artifact_id=job.artifact_id or row.key_digest, detail=""
        )
    if job.state == jobs_pb2.JOB_STATE_CANCELLED:
        return dataclasses.replace(row, outcome="cancelled", detail=job.error or "cancelled")
    return dataclasses.replace(row, outcome="failed", detail=job.error or "no error message")


def _cache(client: Client, cache: HostCache, row: PrewarmRow, tracker: _Tracker) -> PrewarmRow:
    tracker.caching(+1)
    try:
        artifact = client.get_artifact(row.artifact_id)
        downloaded = 0
        seen: set[tuple[str, int]] = set()
        for entry in artifact.files:
            identity = (entry.digest.hash, entry.digest.size_bytes)
            if identity not in seen:
                seen.add(identity)
                downloaded += cache.put_from_server(client, entry.digest).bytes_downloaded
    except (PrebakeError, OSError, ValueError) as exc:
        # ValueError: a malformed digest in the manifest (HostCache.blob_path).
        return dataclasses.replace(
            row, outcome="error", detail=f"{row.outcome}, but caching it on this host failed: {exc}"
        )
    finally:
        tracker.caching(-1)
    return dataclasses.replace(row, cached=True, bytes_cached=downloaded)


class _Tracker:
    """Counts for the progress callback, updated from worker threads under one lock."""

    def __init__(self, total: int, callback: ProgressCallback | None) -> None:
        self._callback = callback
        self._lock = threading.Lock()
        self._total = total
        self._looked_up = 0
        self._waiting: dict[str, int] = {}
        self._leased: set[str] = set()
        self._caching = 0
        self._counts: dict[str, int] = {}

    def looked_up(self, row: PrewarmRow, final: bool) -> None:
        with self._lock:
            self._looked_up += 1
            if final:
                self._counts[row.outcome] = self._counts.get(row.outcome, 0) + 1
            self._report(row if final else None)

    def finished(self, row: PrewarmRow) -> None:
        with self._lock:
            self._counts[row.outcome] = self._counts.get(row.outcome, 0) + 1
            self._report(row)

    def waiting(self, job_id: str, delta: int) -> None:
        with self._lock:
            # Several rows may wait for one job (keys that normalise alike).
            count = self._waiting.get(job_id, 0) + delta
            if count > 0:
                self._waiting[job_id] = count
            else:
                self._waiting.pop(job_id, None)
                self._leased.discard(job_id)
            self._report()

    def job_event(self, event: jobs_pb2.JobEvent) -> None:
        with self._lock:
            job = event.job
            if job.state == jobs_pb2.JOB_STATE_LEASED:
                self._leased.add(job.job_id)
            else:
                self._leased.discard(job.job_id)
            self._report()

    def caching(self, delta: int) -> None:
        with self._lock:
            self._caching += delta
            self._report()

    def _report(self, finished: PrewarmRow | None = None) -> None:
        if self._callback is not None:
            self._callback(
                PrewarmProgress(
                    total=self._total,
                    looked_up=self._looked_up,
                    waiting=len(self._waiting),
                    compiling=len(self._leased & self._waiting.keys()),
                    caching=self._caching,
                    counts={o: self._counts[o] for o in OUTCOMES if o in self._counts},
                    finished=finished,
                )
            )


@dataclass
class _Done(Generic[R]):
    index: int
    value: R | None = None
    error: BaseException | None = None


def _parallel(fn: Callable[[int], R], indices: Sequence[int], concurrency: int) -> Iterator[tuple[int, R]]:
    """Run `fn(i)` for every index on up to `concurrency` threads; yield (i, result) as each ends.

    An exception raised by `fn` is re-raised here, in the caller's thread, and the other
    threads take no new work. The threads are daemons (unlike ThreadPoolExecutor's,
    which the interpreter joins at exit): a watch can last hours, and Ctrl-C must not
    wait for it.
    """
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for index in indices:
        todo.put(index)
    done: queue.SimpleQueue[_Done[R]] = queue.SimpleQueue()
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            try:
                index = todo.get_nowait()
            except queue.Empty:
                return
            try:
                done.put(_Done(index, value=fn(index)))
            except BaseException as exc:
                done.put(_Done(index, error=exc))

    threads = [
        threading.Thread(target=work, name=f"prebake-prewarm-{n}", daemon=True)
        for n in range(min(concurrency, len(indices)))
    ]
    for thread in threads:
        thread.start()
    try:
        for _ in range(len(indices)):
            while True:
                try:
                    result = done.get(timeout=_POLL_SECONDS)
                    break
                except queue.Empty:
                    continue
            if result.error is not None:
                raise result.error
            yield result.index, cast(R, result.value)
    finally:
        stop.set()
