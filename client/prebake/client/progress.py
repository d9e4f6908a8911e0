"""Dependency-free progress displays for the CLI: transfers and compile jobs.

On a terminal they redraw one line in place; otherwise (logs, CI, init containers) they
print a sparse line now and then, so a log is neither empty nor flooded. Both are safe
to call from several threads (upload progress arrives on a gRPC thread).
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
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


def is_interactive(stream: TextIO) -> bool:
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


def _width(stream: TextIO) -> int:
    return shutil.get_terminal_size((80, 24)).columns if is_interactive(stream) else 100


class TransferProgress:
    """A `progress(done_bytes, total_bytes)` callback that draws a bar with rate and ETA.

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

    def _draw(self, now: float) -> None:
        assert self._start is not None
        done, total = self._done, self._total
        elapsed = now - self._start[0]
        rate = (done - self._start[1]) / elapsed if elapsed > 0 else 0.0
        fraction = done / total if total else 1.0
        text = f"{fraction * 100:5.1f}%  {human_bytes(done)} / {human_bytes(total)}"
        if rate > 0:
            text += f"  {human_bytes(rate)}/s"
            if done < total:
                text += f"  ETA {human_seconds((total - done) / rate)}"
        if self.interactive:
            bar_width = max(10, min(30, _width(self.stream) - len(self.label) - len(text) - 6))
            filled = int(bar_width * fraction)
            line = f"{self.label} [{'#' * filled}{'.' * (bar_width - filled)}] {text}"
            self.stream.write("\r" + line[: _width(self.stream) - 1] + "\x1b[K")
        else:
            self.stream.write(f"{self.label}: {text}\n")
        self.stream.flush()


class VerifyProgress:
    """Draws a `prebake verify` run's progress (blobs checked, bytes hashed, damage found) on
    `stream` (stderr): redrawn in place on a terminal, a line every `log_seconds` otherwise."""

    def __init__(
        self, stream: TextIO | None = None, *, interactive: bool | None = None, log_seconds: float = 15.0
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = is_interactive(self.stream) if interactive is None else interactive
        self._interval = 0.1 if self.interactive else log_seconds
        self._last_draw = 0.0
        self._text = ""

    def __call__(self, checked: int, total: int, hashed: int, damaged: int) -> None:
        self._text = f"verify: {checked}/{total} blobs, {human_bytes(hashed)} hashed, {damaged} damaged"
        now = time.monotonic()
        if now - self._last_draw >= self._interval:
            self._last_draw = now
            self._draw()

    def _draw(self) -> None:
        if self.interactive:
            self.stream.write("\r" + self._text[: _width(self.stream) - 1] + "\x1b[K")
        else:
            self.stream.write(self._text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._text and self.interactive:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()


class JobProgress:
    """An `on_event(JobEvent)` callback showing a compile job's state, progress and message."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        interactive: bool | None = None,
        log_seconds: float = 10.0,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = is_interactive(self.stream) if interactive is None else interactive
        self._log_seconds = log_seconds
        self._lock = threading.Lock()
        self._last: tuple[int, str] | None = None
        self._last_log = 0.0
        self._open_line = False

    def __call__(self, event: jobs_pb2.JobEvent) -> None:
        job = event.job
        line = self.describe(job)
        with self._lock:
            now = time.monotonic()
            if self.interactive:
                self.stream.write("\r" + line[: _width(self.stream) - 1] + "\x1b[K")
                self._open_line = True
                if job.state in TERMINAL_JOB_STATES:
                    # Keep the final state visible above whatever is drawn next (a download bar).
                    self.stream.write("\n")
                    self._open_line = False
            else:
                changed = self._last is None or self._last[0] != job.state
                if changed or (
                    self._last != (job.state, job.message) and now - self._last_log >= self._log_seconds
                ):
                    self.stream.write(line + "\n")
                    self._last_log = now
            self._last = (job.state, job.message)
            self.stream.flush()

    def close(self) -> None:
        with self._lock:
            if self._open_line:
                self.stream.write("\n")
                self.stream.flush()
                self._open_line = False

    @staticmethod
    def describe(job: jobs_pb2.Job) -> str:
        """ "job j-1a2b  leased  42%  compiling layer 3/8" (progress only while it runs)."""
        parts = [f"job {job.job_id}", job_state_name(job.state)]
        if job.state == jobs_pb2.JOB_STATE_LEASED or job.progress > 0:
            parts.append(f"{job.progress * 100:3.0f}%")
        text = (
            job.error
            if job.state in (jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED)
            else job.message
        )
        first_line = next((line for line in text.splitlines() if line.strip()), "")
        if first_line:
            parts.append(first_line)
        return "  ".join(parts)


class PrewarmDisplay:
    """A `prewarm` progress callback: one line of counts, redrawn (terminal) or logged now and then.

    "prewarm: 5/12 done (3 hit, 2 compiled); 7 waiting, 2 compiling; 1m02s"
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        interactive: bool | None = None,
        redraw_seconds: float = 0.2,
        log_seconds: float = 30.0,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = is_interactive(self.stream) if interactive is None else interactive
        self._interval = redraw_seconds if self.interactive else log_seconds
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._last_draw = 0.0
        self._last: PrewarmProgress | None = None
        self._open_line = False

    def __call__(self, snapshot: PrewarmProgress) -> None:
        with self._lock:
            previous, self._last = self._last, snapshot
            now = time.monotonic()
            if self.interactive:
                changed = previous is None or previous.done != snapshot.done
                due = changed or now - self._last_draw >= self._interval
            else:
                # A log gets a line once every key is looked up (what is left to wait
                # for), then one per interval; the final table follows on stdout.
                looked_up = snapshot.looked_up == snapshot.total and (
                    previous is None or previous.looked_up < snapshot.total
                )
                due = looked_up or (self._last_draw > 0 and now - self._last_draw >= self._interval)
            if due:
                self._last_draw = now
                self._draw(snapshot, now)

    def close(self) -> None:
        with self._lock:
            if self._last is not None and self.interactive:
                self._draw(self._last, time.monotonic())
            if self._open_line:
                self.stream.write("\n")
                self.stream.flush()
                self._open_line = False

    def describe(self, snapshot: PrewarmProgress, elapsed: float) -> str:
        counts = ", ".join(f"{n} {outcome}" for outcome, n in snapshot.counts.items() if n)
        text = f"prewarm: {snapshot.done}/{snapshot.total} done"
        if counts:
            text += f" ({counts})"
        if snapshot.looked_up < snapshot.total:
            text += f"; looking up {snapshot.looked_up}/{snapshot.total}"
        elif snapshot.total > snapshot.done:
            activity = []
            if snapshot.waiting:
                plural = "s" if snapshot.waiting != 1 else ""
                activity.append(f"{snapshot.waiting} job{plural}, {snapshot.compiling} compiling")
            if snapshot.caching:
                activity.append(f"{snapshot.caching} caching")
            text += f"; {snapshot.total - snapshot.done} pending"
            if activity:
                text += f" ({'; '.join(activity)})"
        return f"{text}; {human_seconds(elapsed)}"

    def _draw(self, snapshot: PrewarmProgress, now: float) -> None:
        line = self.describe(snapshot, now - self._started)
        if self.interactive:
            self.stream.write("\r" + line[: _width(self.stream) - 1] + "\x1b[K")
            self._open_line = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
