"""The checks every publish path (operator publish, worker completion) makes on a manifest."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prebake.core.errors import FailedPrecondition
from prebake.core.signing import Signature
from prebake.server import convert
from prebake.server.job_lifecycle import manifest_digest
from prebake.server.records import Artifact, Digest, FileEntry, NormalizedKey, Producer
from prebake.server.state import ServerState
from prebake.v1 import registry_pb2, workers_pb2


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
    """Every blob present and verified (off the event loop) as far as its backend needs.

    A local blob whose file changed since it was last found good is re-hashed: publishing is
    the last moment to refuse it before deployers depend on it (DataLoss quarantines it). A
    backend that checks its own bytes (S3) is trusted, as on every read. Callers must call
    `require_present` again with no await between it and their registry write: a
    concurrent DeleteArtifact, which also runs on the loop, may remove a blob while
    this coroutine waits.
    """
    require_present(state, digests)

    def verify_all() -> None:  # one hop off the loop, not one per blob
        for digest in digests:
            state.blobs.verify(digest)

    await state.run_blocking(verify_all)


async def verified_manifest(
    state: ServerState, files: Sequence[registry_pb2.ArtifactFile], producer: registry_pb2.Producer
) -> tuple[list[FileEntry], Producer, list[Digest]]:
    """Validate a manifest (paths, digests, producer) and verify every blob it names.

    Returns (files sorted by path, producer, every digest named including the log). The
    caller must `require_present(state, digests)` again right before its registry write,
    with no await in between (see verify_blobs).
    """
    # A manifest may name tens of thousands of files: converted beside the event loop.
    entries = await state.run_blocking(convert.file_entries, files)
    checked = convert.producer_from_proto(producer)
    digests = convert.unique_digests(entries)
    if checked.log is not None:
        digests.append(checked.log)
    await verify_blobs(state, digests)
    return entries, checked, digests


def checked_signature(
    state: ServerState,
    key: NormalizedKey,
    files: Sequence[FileEntry],
    request: registry_pb2.PublishArtifactRequest | workers_pb2.CompleteJobRequest,
) -> Signature | None:
    """The request's signature of `key` and `files`, checked against the server's policy
    (`prebake.server.signatures`); None for an unsigned request the policy allows."""
    signature = convert.signature_from_proto(request.signature) if request.HasField("signature") else None
    state.signatures.check(key, manifest_digest(files), signature)
    return signature


def superseded(state: ServerState) -> Callable[[Artifact], bool]:
    """Whether a stored artifact gives way to any new publish of its key (a revoked signer's)."""
    policy = state.signatures
    return lambda artifact: policy.revoked_signer(artifact) is not None
