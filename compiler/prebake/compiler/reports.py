"""What a failed job's waiters are told: the backend's own message, the exit status, the end of the log.

Contract: pure text building; reading the log and result.json is best effort (an
unreadable file contributes nothing), nothing here raises for a missing or garbled file.
Every report fits the contract's 16 KiB limit on FailJob.error (workers.proto).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from prebake.compiler.backend import EXIT_DETERMINISTIC
from prebake.compiler.supervise import read_result

# The contract's limit on FailJob.error (workers.proto).
MAX_ERROR_CHARS = 16_384
# How much of the compile log a failure report quotes.
ERROR_TAIL_LINES = 60


def tail_text(text: str, lines: int) -> str:
    """The last `lines` lines of `text`, trailing whitespace dropped."""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def log_tail(path: Path, lines: int = ERROR_TAIL_LINES, limit: int = MAX_ERROR_CHARS) -> str:
    """The last `lines` lines of a log file, at most `limit` characters (reading only its end)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4 * limit))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return tail_text(text, lines)[-limit:]


def error_report(headline: str, log_path: Path) -> str:
    """`headline`, then the end of the compile log, within the contract's 16 KiB."""
    headline = headline[: MAX_ERROR_CHARS // 2]
    tail = log_tail(log_path)
    if not tail:
        return headline
    intro = f"{headline}\n\nend of the compile log:\n"
    return intro + tail[-(MAX_ERROR_CHARS - len(intro)) :]


def failure_report(kind: str, returncode: int, job_dir: Path) -> str:
    """What the job's waiters are told: the backend's own message first, then the log's end.

    The backend writes its error to result.json when it fails cleanly; a crash leaves
    only the log and the exit status.
    """
    error = str(read_result(job_dir / "result.json").get("error") or "")
    if returncode == EXIT_DETERMINISTIC:
        headline = error or f"the {kind} compiler rejected this configuration"
    else:
        status = f"the {kind} compile {exit_description(returncode)}"
        headline = f"{error} ({status})" if error else status
    return error_report(headline, job_dir / "compile.log")


def exit_description(code: int) -> str:
    """ "exited with status N" or "was killed by SIGNAME" (with a hint for SIGKILL)."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with status {code}"
