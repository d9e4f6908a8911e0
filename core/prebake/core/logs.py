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
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Mapping
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


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid:
            entry["request_id"] = rid
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        # json.dumps escapes newlines: a traceback stays on its one line.
        return json.dumps(entry, default=str, ensure_ascii=False)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]  # generic only in the stubs
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
    handler: logging.Handler = _StderrHandler() if stream is None else logging.StreamHandler(stream)
    handler._prebake = True  # type: ignore[attr-defined]  # marks the handlers this function owns
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
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
