"""Exit codes of the `prebake` command, stable for scripts and init containers.

The one table: the constants, their `--help` descriptions (`describe`) and which error
class ends a command with which code (`for_error`). A retry-on-failure wrapper can tell
from the code alone whether trying again may help: only UNAVAILABLE (and COMPILING,
MISS after a wait) may; INVALID, DENIED and USAGE never do without a change.
"""

from __future__ import annotations

from prebake.client.errors import (
    CompileFailed,
    InvalidArgument,
    NoCapableWorker,
    NoRecommendation,
    NotFound,
    OutOfRange,
    PermissionDenied,
    PrebakeError,
    Unauthenticated,
    Unavailable,
    UntrustedArtifact,
)

OK = 0  # success; for lookup: HIT
ERROR = 1  # any other failure (the message on stderr says what)
USAGE = 2  # bad command line (unknown option or command, missing argument, conflicting options),
# or a setting or file the command cannot use (an unreadable key file, a malformed prewarm file)
MISS = 3  # lookup/fetch: nothing usable (with enqueue, a compile job was created)
COMPILING = 4  # lookup/fetch: a compile job for the key was already in flight
FAILED = 5  # the key's compile failed (lookup/fetch: its last compile; ensure: the job)
NOT_FOUND = 6  # show/rm/pin/jobs show/fetch --artifact: no such artifact or job
UNAVAILABLE = 7  # the server could not be reached
NO_WORKER = 8  # ensure: no live worker can compile the key (the job stays queued)
UNTRUSTED = 9  # fetch/ensure --trust: the artifact is not signed by a trusted key (nothing placed)
INVALID = 10  # invalid input: a value the CLI or the server refused (a key field, a flag's value)
DENIED = 11  # unauthenticated (missing or wrong token/certificate) or permission denied (role)
NO_RECOMMENDATION = 12  # recommend: no evaluated artifact qualifies (the message names the closest)
INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it

DESCRIPTIONS: dict[int, str] = {
    OK: "success (lookup: HIT)",
    ERROR: "error",
    USAGE: "usage error (unknown option, missing argument; a file or setting it cannot use)",
    MISS: "MISS: nothing usable (a compile job may have been enqueued)",
    COMPILING: "COMPILING: a compile job for the key was already in flight",
    FAILED: "FAILED: the key's compile failed",
    NOT_FOUND: "NOT_FOUND: no such artifact or job",
    UNAVAILABLE: "UNAVAILABLE: the server could not be reached",
    NO_WORKER: "NO_WORKER: ensure: no live worker can compile the key",
    UNTRUSTED: "UNTRUSTED: fetch/ensure --trust: not signed by a trusted key; nothing placed",
    INVALID: "INVALID: invalid input (a key field or option value); do not retry unchanged",
    DENIED: "DENIED: unauthenticated or permission denied (token, certificate, role)",
    NO_RECOMMENDATION: "NO_RECOMMENDATION: recommend: no evaluated artifact meets the constraints",
    INTERRUPTED: "interrupted (Ctrl-C)",
}

# Most specific first: UntrustedArtifact is a PermissionDenied, NoCapableWorker,
# NoRecommendation and CompileFailed are FailedPreconditions (which, like every other PrebakeError, is ERROR).
_BY_ERROR: tuple[tuple[type[PrebakeError], int], ...] = (
    (UntrustedArtifact, UNTRUSTED),
    (NoCapableWorker, NO_WORKER),
    (NoRecommendation, NO_RECOMMENDATION),
    (CompileFailed, FAILED),
    (Unavailable, UNAVAILABLE),
    (NotFound, NOT_FOUND),
    (InvalidArgument, INVALID),
    (OutOfRange, INVALID),
    (Unauthenticated, DENIED),
    (PermissionDenied, DENIED),
)


def for_error(exc: PrebakeError) -> int:
    """The exit code a command ends with when `exc` stops it."""
    return next((code for cls, code in _BY_ERROR if isinstance(exc, cls)), ERROR)


def describe() -> str:
    """The exit-code table for `--help` epilogs."""
    return "exit codes:\n" + "\n".join(f"  {code:<3} {text}" for code, text in DESCRIPTIONS.items())
