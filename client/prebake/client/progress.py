"""Dependency-free progress displays for the CLI: transfers, compile jobs, prewarm runs.

On a terminal they redraw one line in place, fitted to its width with the important part
first (stage, percent or bytes, elapsed time; ids and bars are what a narrow terminal
loses); otherwise (logs, CI, init containers) they print a plain line per change and a
heartbeat line now and then, so a log is neither empty nor flooded. All are safe to call
from several threads (upload progress arrives on a gRPC thread).

Hand-written rather than rich or tqdm: the thin client depends on grpcio, protobuf and
xxhash only, and the one-line displays here need neither tables nor multi-bar layouts.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from prebake.core.names import TERMINAL_JOB_STATES, job_state_name
from prebake.core.units import human_bytes
from prebake.v1 import jobs_pb2

if TYPE_CHECKING:
    from prebake.client.prewarm import PrewarmProgress


def human_seconds(seconds: float) -> str:
    """75 -> "1m15s"; 0.25 -> "0.25s"."""
    if seconds < 10:
        return f"{seconds:.2f}s"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _elapsed(seconds: float) -> str:
    """Elapsed time in a progress line: whole seconds ("0s", "42s"), then as human_seconds
    ("1m15s"); hundredths would flicker on every redraw."""
    return f"{int(seconds)}s" if seconds < 60 else human_seconds(seconds)


def is_interactive(stream: TextIO) -> bool:
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


def _width(stream: TextIO) -> int:
    """Columns a redrawn line may use (one less than the terminal's: writing the last
    column makes some terminals wrap)."""
    return shutil.get_terminal_size((80, 24)).columns - 1


# Lines written to a log are never cut: nothing redraws them, and a log has no width.
_LOG_WIDTH = 10_000


@dataclass(frozen=True)
class Field:
    """One part of a progress line, for `fit`."""

    text: str
    # 0: always kept; otherwise dropped, highest first, while the line is too long.
    drop: int = 0
    # May be shortened (ending in "…") once nothing more can be dropped.
    shrink: bool = False


def fit(fields: Sequence[Field], width: int, sep: str = "  ") -> str:
    """The fields' texts joined by `sep`, made to fit `width` columns by dropping the
    least important fields and then shortening the shrinkable ones, so that what matters
    (stage, percent, elapsed) survives a narrow terminal instead of being cut off the end.
    """
    kept = [f for f in fields if f.text]

    def length(parts: Sequence[Field]) -> int:
        return sum(len(f.text) for f in parts) + len(sep) * max(0, len(parts) - 1)

    while length(kept) > width and any(f.drop for f in kept):
        worst = max(f.drop for f in kept)
        # Of equally droppable fields, the last goes first.
        index = max(i for i, f in enumerate(kept) if f.drop == worst)
        del kept[index]
    excess = length(kept) - width
    if excess > 0:
        for i, f in enumerate(kept):
            if f.shrink and excess > 0:
                keep = max(1, len(f.text) - excess - 1)
                excess -= len(f.text) - keep - 1
                kept[i] = Field(f.text[:keep] + "…")
    return sep.join(f.text for f in kept)[:width]


class _Ticker:
    """Calls `tick()` every `period` seconds on a daemon thread between `start()` and
    `stop()`: what keeps the elapsed time moving (and the heartbeat lines coming) while
    nothing else happens. Restartable (`ensure` may wait for a second job)."""

    def __init__(self, period: float, tick: Callable[[], object]) -> None:
        self._period = period
        self._tick = tick
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._period <= 0 or (self._thread is not None and not self._stopped.is_set()):
            return
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(self._stopped,), name="prebake-progress", daemon=True
        )
        self._thread.start()

    def _run(self, stopped: threading.Event) -> None:
        while not stopped.wait(self._period):
            self._tick()

    def stop(self) -> None:
        self._stopped.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=1.0)


class Activity:
    """What a command is doing right now, for the message Ctrl-C prints: an interrupted
    job wait leaves the job running on the server, an interrupted transfer leaves a
    partial transfer to resume; each deserves its own advice."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: set[str] = set()
        self._job_count = 0
        self._transfer = ""

    def job_event(self, event: jobs_pb2.JobEvent) -> None:
        """An `on_event` callback: waiting for `event.job` until it is terminal."""
        job = event.job
        with self._lock:
            if job.state in TERMINAL_JOB_STATES:
                self._jobs.discard(job.job_id)
            else:
                self._jobs.add(job.job_id)

    def waiting_for(self, jobs: int) -> None:
        """`jobs` jobs are being waited for (prewarm's count)."""
        with self._lock:
            self._job_count = jobs

    def transferring(self, label: str) -> None:
        """A transfer ("upload", "download") is under way; "" when none is."""
        with self._lock:
            self._transfer = label

    def interrupted(self) -> str:
        """The message for Ctrl-C now."""
        with self._lock:
            if self._transfer:
                return (
                    f"interrupted during the {self._transfer} (a partial transfer is kept; "
                    "run the command again to resume)"
                )
            again = "run the command again to wait again"
            if len(self._jobs) == 1:
                (job_id,) = self._jobs
                keeps = "the job keeps running on the server"
                return f"interrupted while waiting for job {job_id}: {keeps}; {again}"
            count = max(len(self._jobs), self._job_count)
            if count:
                return f"interrupted while waiting for {count} jobs: they keep running on the server; {again}"
            return "interrupted"


class TransferProgress:
    """A `progress(done_bytes, total_bytes)` callback that draws percent, bytes, elapsed,
    rate, ETA and a bar, in that order of importance.

    The rate counts only bytes moved in this session (not bytes resumed from an earlier
    attempt). Call `close()` at the end to finish the line.
    """

    def __init__(
        self,
        label: str,
        stream: TextIO | None = None,
        *,
        interactive: bool | None = None,
        redraw_seconds: float = 0.1,
        log_seconds: float = 15.0,
    ) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = is_interactive(self.stream) if interactive is None else interactive
        self._interval = redraw_seconds if self.interactive else log_seconds
        self._lock = threading.Lock()
        self._start: tuple[float, int] | None = None
        self._last_draw = 0.0
        self._done = 0
        self._total = 0

    def __call__(self, done: int, total: int) -> None:
        with self._lock:
            now = time.monotonic()
            if self._start is None or done < self._start[1]:
                self._start = (now, done)
                self._last_draw = now
            self._done, self._total = done, total
            if now - self._last_draw >= self._interval or (self.interactive and done >= total):
                self._last_draw = now
                self._draw(now)

    def close(self) -> None:
        """Finish the display: a newline on a terminal, a summary line otherwise."""
        with self._lock:
            if self._start is None:
                return
            now = time.monotonic()
            if self.interactive:
                self._draw(now)
                self.stream.write("\n")
            else:
                elapsed = now - self._start[0]
                moved = self._done - self._start[1]
                rate = f" ({human_bytes(moved / elapsed)}/s)" if elapsed > 0 and moved else ""
                self.stream.write(
                    f"{self.label}: {human_bytes(self._done)} in {human_seconds(elapsed)}{rate}\n"
                )
            self.stream.flush()
            self._start = None

    def describe(
        self, done: int, total: int, elapsed: float, rate: float, *, width: int, bar: bool = True
    ) -> str:
        """ "download  42.0%  1.2 MiB / 3.0 MiB  5.00s  250 KiB/s  ETA 7.40s  [####......]",
        fitted to `width`: the bar goes first, then ETA and rate; label, percent, bytes and
        elapsed stay."""
        fraction = done / total if total else 1.0
        fields = [
            Field(self.label),
            Field(f"{fraction * 100:5.1f}%".strip()),
            Field(f"{human_bytes(done)} / {human_bytes(total)}"),
            Field(_elapsed(elapsed)),
            Field(f"{human_bytes(rate)}/s" if rate > 0 else "", drop=2),
            Field(f"ETA {human_seconds((total - done) / rate)}" if rate > 0 and done < total else "", drop=3),
        ]
        line = fit(fields, width)
        room = width - len(line) - 4
        if bar and room >= 10:
            bar_width = min(30, room)
            filled = int(bar_width * fraction)
            line += f"  [{'#' * filled}{'.' * (bar_width - filled)}]"
        return line

    def _draw(self, now: float) -> None:
        assert self._start is not None
        done, total = self._done, self._total
        elapsed = now - self._start[0]
        rate = (done - self._start[1]) / elapsed if elapsed > 0 else 0.0
        if self.interactive:
            line = self.describe(done, total, elapsed, rate, width=_width(self.stream))
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(self.describe(done, total, elapsed, rate, width=_LOG_WIDTH, bar=False) + "\n")
        self.stream.flush()


class VerifyProgress:
    """Draws a `prebake verify` run's progress (blobs checked, bytes hashed, damage found,
    elapsed) on `stream` (stderr): redrawn in place on a terminal, a line every
    `log_seconds` otherwise."""

    def __init__(
        self, stream: TextIO | None = None, *, interactive: bool | None = None, log_seconds: float = 15.0
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = is_interactive(self.stream) if interactive is None else interactive
        self._interval = 0.1 if self.interactive else log_seconds
        self._started = time.monotonic()
        self._last_draw = 0.0
        self._fields: list[Field] = []

    def __call__(self, checked: int, total: int, hashed: int, damaged: int) -> None:
        self._fields = [
            Field("verify"),
            Field(f"{checked}/{total} blobs"),
            Field(f"{damaged} damaged"),
            Field(_elapsed(time.monotonic() - self._started)),
            Field(f"{human_bytes(hashed)} hashed", drop=1),
        ]
        now = time.monotonic()
        if now - self._last_draw >= self._interval:
            self._last_draw = now
            self._draw()

    def _draw(self) -> None:
        if self.interactive:
            self.stream.write("\r" + fit(self._fields, _width(self.stream)) + "\x1b[K")
        else:
            self.stream.write(fit(self._fields, _LOG_WIDTH) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._fields and self.interactive:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()


class JobProgress:
    """An `on_event(JobEvent)` callback showing a compile job's stage, progress and the time
    waited: redrawn in place (and every second) on a terminal; otherwise a line per state
    change, per new message at most every `log_seconds`, and a heartbeat line when nothing
    was written for `heartbeat_seconds`."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        interactive: bool | None = None,
        log_seconds: float = 10.0,
        heartbeat_seconds: float = 30.0,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = is_interactive(self.stream) if interactive is None else interactive
        self._log_seconds = log_seconds
        self._heartbeat_seconds = heartbeat_seconds
        self._lock = threading.Lock()
        self._job: jobs_pb2.Job | None = None
        self._started = 0.0
        self._last: tuple[int, str] | None = None
        self._last_log = 0.0
        self._open_line = False
        self._ticker = _Ticker(min(1.0, heartbeat_seconds), self._tick)

    def __call__(self, event: jobs_pb2.JobEvent) -> None:
        job = event.job
        with self._lock:
            now = time.monotonic()
            if self._job is None or self._job.job_id != job.job_id:
                self._started = now
            self._job = job
            if self.interactive:
                self._redraw(now)
                if job.state in TERMINAL_JOB_STATES:
                    # Keep the final state visible above whatever is drawn next (a download bar).
                    self.stream.write("\n")
                    self._open_line = False
            else:
                changed = self._last is None or self._last[0] != job.state
                if changed or (
                    self._last != (job.state, job.message) and now - self._last_log >= self._log_seconds
                ):
                    self._log(now)
            self._last = (job.state, job.message)
            self.stream.flush()
        if job.state in TERMINAL_JOB_STATES:
            self._ticker.stop()
        else:
            self._ticker.start()

    def close(self) -> None:
        self._ticker.stop()
        with self._lock:
            if self._open_line:
                self.stream.write("\n")
                self.stream.flush()
                self._open_line = False

    def _tick(self) -> None:
        with self._lock:
            job, now = self._job, time.monotonic()
            if job is None or job.state in TERMINAL_JOB_STATES:
                return
            if self.interactive:
                self._redraw(now)
            elif now - self._last_log >= self._heartbeat_seconds:
                self._log(now)
            self.stream.flush()

    def _redraw(self, now: float) -> None:
        assert self._job is not None
        line = fit(self.fields(self._job, now - self._started), _width(self.stream))
        self.stream.write("\r" + line + "\x1b[K")
        self._open_line = True

    def _log(self, now: float) -> None:
        assert self._job is not None
        self.stream.write(fit(self.fields(self._job, now - self._started), _LOG_WIDTH) + "\n")
        self._last_log = now

    @staticmethod
    def fields(job: jobs_pb2.Job, elapsed: float) -> list[Field]:
        """ "compiling layer 3/8  42%  1m02s  job j-1a2b": the stage (what the worker says
        while it runs, else the state and its message or error), the percent while it runs,
        the time waited so far, and the job id last, dropped first on a narrow terminal."""
        text = (
            job.error
            if job.state in (jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED)
            else job.message
        )
        message = next((line.strip() for line in text.splitlines() if line.strip()), "")
        state = job_state_name(job.state)
        if job.state == jobs_pb2.JOB_STATE_LEASED:
            stage = message or "compiling"
        else:
            stage = f"{state}: {message}" if message else state
        running = job.state == jobs_pb2.JOB_STATE_LEASED or job.progress > 0
        return [
            Field(stage, shrink=True),
            Field(f"{job.progress * 100:.0f}%" if running else ""),
            Field(_elapsed(elapsed)),
            Field(f"job {job.job_id}", drop=1),
        ]

    @staticmethod
    def describe(job: jobs_pb2.Job, elapsed: float, width: int = _LOG_WIDTH) -> str:
        """The line for `job` after `elapsed` seconds, fitted to `width` columns."""
        return fit(JobProgress.fields(job, elapsed), width)


class PrewarmDisplay:
    """A `prewarm` progress callback.

    On a terminal, one line of counts redrawn in place (and every second, for the elapsed
    time), the important part first:
        "prewarm:  5/12 done  1m02s  7 pending: 2 jobs, 2 compiling  3 hit, 2 compiled"
    Otherwise (a log) a plain line per finished row, one whenever what is pending changes,
    and a heartbeat line with the elapsed time when nothing was written for
    `heartbeat_seconds`.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        interactive: bool | None = None,
        redraw_seconds: float = 0.2,
        heartbeat_seconds: float = 30.0,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = is_interactive(self.stream) if interactive is None else interactive
        self._redraw_seconds = redraw_seconds
        self._heartbeat_seconds = heartbeat_seconds
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._last_draw = 0.0
        self._last: PrewarmProgress | None = None
        self._open_line = False
        self._ticker = _Ticker(min(1.0, heartbeat_seconds), self._tick)
        self._ticker.start()

    def __call__(self, snapshot: PrewarmProgress) -> None:
        with self._lock:
            previous, self._last = self._last, snapshot
            now = time.monotonic()
            if self.interactive:
                changed = previous is None or previous.done != snapshot.done
                if changed or now - self._last_draw >= self._redraw_seconds:
                    self._draw(snapshot, now)
                return
            if snapshot.finished is not None:
                self._write(self.describe_row(snapshot, now - self._started), now)
            elif previous is None or _pending(previous) != _pending(snapshot):
                self._write(self.describe(snapshot, now - self._started), now)

    def close(self) -> None:
        self._ticker.stop()
        with self._lock:
            if self._last is not None and self.interactive:
                self._draw(self._last, time.monotonic())
            if self._open_line:
                self.stream.write("\n")
                self.stream.flush()
                self._open_line = False

    def _tick(self) -> None:
        with self._lock:
            now = time.monotonic()
            if self._last is None:
                return
            if self.interactive:
                self._draw(self._last, now)
            elif now - self._last_draw >= self._heartbeat_seconds:
                self._write(self.describe(self._last, now - self._started), now)

    def fields(self, snapshot: PrewarmProgress, elapsed: float) -> list[Field]:
        counts = ", ".join(f"{n} {outcome}" for outcome, n in snapshot.counts.items() if n)
        pending = ""
        if snapshot.looked_up < snapshot.total:
            pending = f"looking up {snapshot.looked_up}/{snapshot.total}"
        elif snapshot.total > snapshot.done:
            activity = []
            if snapshot.waiting:
                plural = "s" if snapshot.waiting != 1 else ""
                activity.append(f"{snapshot.waiting} job{plural}, {snapshot.compiling} compiling")
            if snapshot.caching:
                activity.append(f"{snapshot.caching} caching")
            pending = f"{snapshot.total - snapshot.done} pending"
            if activity:
                pending += f": {'; '.join(activity)}"
        return [
            Field("prewarm:"),
            Field(f"{snapshot.done}/{snapshot.total} done"),
            Field(_elapsed(elapsed)),
            Field(pending, drop=1, shrink=True),
            Field(counts, drop=2, shrink=True),
        ]

    def describe(self, snapshot: PrewarmProgress, elapsed: float, width: int = _LOG_WIDTH) -> str:
        return fit(self.fields(snapshot, elapsed), width)

    @staticmethod
    def describe_row(snapshot: PrewarmProgress, elapsed: float) -> str:
        """ "prewarm:  3/12  compiled  neuron:meta-llama/... tp=24 precision=bf16  job j-1a2b  1m02s" """
        row = snapshot.finished
        assert row is not None
        detail = next((line.strip() for line in row.detail.splitlines() if line.strip()), "")
        parts = [
            "prewarm:",
            f"{snapshot.done}/{snapshot.total}",
            row.outcome,
            row.key.describe(),
            f"job {row.job_id}" if row.job_id and row.job_id not in detail else "",
            detail,
            _elapsed(elapsed),
        ]
        return "  ".join(part for part in parts if part)

    def _draw(self, snapshot: PrewarmProgress, now: float) -> None:
        line = self.describe(snapshot, now - self._started, _width(self.stream))
        self.stream.write("\r" + line + "\x1b[K")
        self.stream.flush()
        self._open_line = True
        self._last_draw = now

    def _write(self, line: str, now: float) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()
        self._last_draw = now


def _pending(snapshot: PrewarmProgress) -> tuple[bool, int, int]:
    """What a log line reports a change of: lookups all done, jobs compiling, rows being
    cached. (Fewer jobs waited for means a row finished, which has its own line; more, at
    the start, is the watches starting, not news.)"""
    return (snapshot.looked_up == snapshot.total, snapshot.compiling, snapshot.caching)
