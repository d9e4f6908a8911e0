"""The check every publish path makes before a manifest may reference blobs."""

from __future__ import annotations

from prebake.server.errors import FailedPrecondition
from prebake.server.model import Digest
from prebake.server.state import ServerState


def require_present(state: ServerState, digests: list[Digest]) -> None:
    """Raise FailedPrecondition naming the blobs the store does not hold."""
    missing = state.blobs.find_missing(digests)
    if missing:
        shown = ", ".join(str(d) for d in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise FailedPrecondition(
            f"{len(missing)} blob(s) are not uploaded: {shown}{more}; upload them and try again"
        )


async def verify_blobs(state: ServerState, digests: list[Digest]) -> None:
    """Every blob present and its bytes re-hashed (off the event loop).

    A blob may have rotted since upload, and publishing is the last moment to refuse it
    before deployers depend on it (DataLoss quarantines it). Callers must call
    `require_present` again with no await between it and their registry write: a
    concurrent DeleteArtifact, which also runs on the loop, may remove a blob while
    this coroutine waits.
    """
    require_present(state, digests)
    for digest in digests:
        await state.run_blocking(state.blobs.verify, digest)
