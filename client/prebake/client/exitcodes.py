"""Exit codes of the `prebake` command, stable for scripts and init containers."""

from __future__ import annotations

OK = 0  # success; for lookup: HIT
ERROR = 1  # any other failure (the message on stderr says what)
USAGE = 2  # bad command line or configuration
MISS = 3  # lookup/fetch: nothing usable (with enqueue, a compile job was created)
COMPILING = 4  # lookup/fetch: a compile job for the key was already in flight
FAILED = 5  # the key's compile failed (lookup/fetch: its last compile; ensure: the job)
NOT_FOUND = 6  # show/rm/pin/jobs show/fetch --artifact: no such artifact or job
UNAVAILABLE = 7  # the server could not be reached
NO_WORKER = 8  # ensure: no live worker can compile the key (the job stays queued)
UNTRUSTED = 9  # fetch/ensure --trust: the artifact is not signed by a trusted key (nothing placed)
INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it

DESCRIPTIONS: dict[int, str] = {
    OK: "success (lookup: HIT)",
    ERROR: "error",
    USAGE: "usage error",
    MISS: "MISS: nothing usable (a compile job may have been enqueued)",
    COMPILING: "COMPILING: a compile job for the key was already in flight",
    FAILED: "FAILED: the key's compile failed",
    NOT_FOUND: "NOT_FOUND: no such artifact or job",
    UNAVAILABLE: "UNAVAILABLE: the server could not be reached",
    NO_WORKER: "NO_WORKER: ensure: no live worker can compile the key",
    UNTRUSTED: "UNTRUSTED: fetch/ensure --trust: not signed by a trusted key; nothing placed",
}


def describe() -> str:
    """The exit-code table for `--help` epilogs."""
    return "exit codes:\n" + "\n".join(f"  {code:<3} {text}" for code, text in DESCRIPTIONS.items())
