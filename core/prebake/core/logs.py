"""Log set-up of the long-running commands (`prebake serve`, `prebake worker`).

Two formats, chosen by `log_format`:

* ``text``: ``TIME LEVEL LOGGER [REQUEST_ID] MESSAGE``, for people (the bracket only
  inside a request);
* ``json``: one JSON object per line, for log shippers: ``ts`` (UNIX seconds), ``time``
  (ISO 8601, UTC), ``level``, ``logger``, ``message``, ``request_id`` (inside a request),
  ``exc`` (a traceback, when there is one) and every structured field a call passed in
  ``extra={"fields": {...}}`` (the server's per-rpc line: ``method``, ``code``,
  ``duration_ms``, ``peer``).

Every record gets a ``request_id`` attribute: the current one of
`prebake.core.request_ids` (None outside a request). Standard library only.

Lines written often (the server's one line per rpc) may skip the `logging` machinery:
`direct_handler` says when a record would reach only the handler set up here, and that
handler then formats them from their parts, as it formats records, and writes them in
one go (`DirectHandler.write_lines`). A LogRecord, its handler chain and a flushed write
per line cost about 25 µs; a hit's whole server time is about 30 times that.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from prebake.core import request_ids

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"


def check_log_settings(log_format: str, log_level: str) -> None:
    """ValueError naming the setting unless both are among `LOG_FORMATS` / `LOG_LEVELS`."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log_format {log_format!r}: expected one of {', '.join(LOG_FORMATS)}")
    if log_level.lower() not in LOG_LEVELS:
        raise ValueError(f"log_level {log_level!r}: expected one of {', '.join(LOG_LEVELS)}")


class RequestIdFilter(logging.Filter):
    """Stamps every record with the current request id (and its text-format tag)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_ids.current()
        rid = getattr(record, "request_id", None)
        record.request_tag = f" [{rid}]" if rid else ""
        return True


@dataclass(frozen=True)
class Line:
    """What a record of a line without a traceback carries, for `DirectHandler.write_lines`."""

    created: float  # UNIX seconds, as LogRecord.created
    level: int
    logger: str
    message: str  # formatted already
    request_id: str | None = None
    fields: Mapping[str, Any] | None = None


def _msecs(created: float) -> int:
    return int((created - int(created)) * 1000)  # as LogRecord computes msecs


class TextFormatter(logging.Formatter):
    """`TEXT_FORMAT`; the time of day is made once per second."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._second = (-1, "")

    def _asctime(self, created: float) -> str:
        second = int(created)
        if self._second[0] != second:
            self._second = (second, time.strftime(self.default_time_format, self.converter(created)))
        return f"{self._second[1]},{_msecs(created):03d}"  # logging's default_msec_format

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return super().formatTime(record, datefmt) if datefmt else self._asctime(record.created)

    def line(self, line: Line) -> str:
        tag = f" [{line.request_id}]" if line.request_id else ""
        return TEXT_FORMAT % {
            "asctime": self._asctime(line.created),
            "levelname": logging.getLevelName(line.level),
            "name": line.logger,
            "request_tag": tag,
            "message": line.message,
        }


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        exc = self.formatException(record.exc_info) if record.exc_info else record.exc_text
        parts = Line(
            record.created,
            record.levelno,
            record.name,
            record.getMessage(),
            getattr(record, "request_id", None),
            fields if isinstance(fields, dict) else None,
        )
        return self.line(parts, exc)

    def line(self, line: Line, exc: str | None = None) -> str:
        entry: dict[str, Any] = {
            "ts": round(line.created, 6),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(line.created))
            + f".{_msecs(line.created):03d}Z",
            "level": logging.getLevelName(line.level).lower(),
            "logger": line.logger,
            "message": line.message,
        }
        if line.request_id:
            entry["request_id"] = line.request_id
        if line.fields:
            entry.update(line.fields)
        if exc:
            entry["exc"] = exc
        # json.dumps escapes newlines: a traceback stays on its one line.
        return json.dumps(entry, default=str, ensure_ascii=False)


class DirectHandler(logging.StreamHandler):  # type: ignore[type-arg]  # generic only in the stubs
    """The handler `setup_logging` installs: a stream handler that can also write `Line`s."""

    def write_lines(self, lines: Sequence[Line]) -> None:
        """Write `lines` as this handler would write their records, in one write.

        Thread safe (the handler's lock). OSError and the like are left to the caller, who
        may log the lines through `logging` instead (which reports write errors its way).
        """
        formatter = self.formatter
        assert isinstance(formatter, TextFormatter | JsonFormatter)  # set by setup_logging only
        text = "".join(formatter.line(line) + self.terminator for line in lines)
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            self.stream.write(text)
            self.flush()


def direct_handler(logger: logging.Logger, level: int) -> DirectHandler | None:
    """The handler a record of `level` on `logger` would reach, when that is the one
    `setup_logging` installed, alone, with nothing on the way that filters or formats
    otherwise; else None (log through `logging`: a test's capture, someone else's handler)."""
    if not logger.isEnabledFor(level):
        return None
    found: logging.Handler | None = None
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        for handler in current.handlers:
            if found is not None:
                return None
            found = handler
        if not current.propagate:
            break
        current = current.parent
    if (
        not isinstance(found, DirectHandler)
        or not getattr(found, "_prebake", False)
        or level < found.level
        or len(found.filters) != 1  # its RequestIdFilter, which a Line's request_id stands for
        or not isinstance(found.formatter, TextFormatter | JsonFormatter)
    ):
        return None
    return found


class _StderrHandler(DirectHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted (not when it was set up),
    so that a replaced stderr (a test's capture, a daemon's redirection) is followed."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def setup_logging(log_format: str = "text", log_level: str = "info", stream: TextIO | None = None) -> None:
    """Route the root logger to `stream` (default: the current `sys.stderr`) in `log_format` at `log_level`.

    Replaces the handlers a previous call installed (not other ones); ValueError for an
    unknown format or level (`check_log_settings`).
    """
    check_log_settings(log_format, log_level)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_prebake", False):
            root.removeHandler(old)
    handler: DirectHandler = _StderrHandler() if stream is None else DirectHandler(stream)
    handler._prebake = True  # type: ignore[attr-defined]  # marks the handlers this function owns
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(log_level.upper())
    # Neither format shows the source line, thread or process: skip collecting them, which
    # is most of a record's cost (the logging HOWTO's "Optimization"; one line per rpc).
    logging._srcfile = None  # type: ignore[attr-defined]  # documented switch, no public API
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # Python's warnings too, so that a JSON log stays one object per line.
    logging.captureWarnings(True)


def add_log_flags(p: argparse.ArgumentParser) -> None:
    """--log-format and --log-level (None when not given), for `prebake serve` (ServerConfig's
    log_format and log_level) and `prebake worker` (`log_settings`)."""
    p.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help="log lines as text or as one JSON object per line (default text; env PREBAKE_LOG_FORMAT)",
    )
    p.add_argument(
        "--log-level",
        type=str.lower,
        choices=LOG_LEVELS,
        help="least severe level logged (default info; env PREBAKE_LOG_LEVEL)",
    )


def log_settings(
    log_format: str | None, log_level: str | None, environ: Mapping[str, str] | None = None
) -> tuple[str, str]:
    """(format, level): the flags if given, else PREBAKE_LOG_FORMAT / PREBAKE_LOG_LEVEL, else
    text / info, as `prebake serve` resolves them; ValueError for an unknown value."""
    env = os.environ if environ is None else environ
    chosen = (
        log_format or env.get("PREBAKE_LOG_FORMAT") or "text",
        (log_level or env.get("PREBAKE_LOG_LEVEL") or "info").lower(),
    )
    check_log_settings(*chosen)
    return chosen
