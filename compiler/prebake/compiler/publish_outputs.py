"""Publishing a successful compile: upload the log and the output files, then `CompleteJob`.

Contract:
* Runs on the job thread and blocks it; every call goes through `call_under_lease`, so
  it is retried while the server is unreachable and the lease may still be ours.
* `publish` returns the published artifact, or raises:
  `NothingToPublish` (the compiler claimed success but wrote no files: the caller
  reports a transient failure); `LeaseGone` (the job is no longer ours, or the server
  refused the completion: nothing more may be sent); any other PrebakeError as is.
* A blob the server lost between upload and `CompleteJob` (FAILED_PRECONDITION or
  DATA_LOSS with blobs missing) is uploaded again and the completion retried once.
* `upload_log` never raises for a failed upload: it returns None and logs a warning (a
  job's outcome does not depend on its log).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prebake.client.client import Client, sign_manifest
from prebake.client.errors import DataLoss, FailedPrecondition, NotFound, PrebakeError
from prebake.compiler.job_run import JobRun, LeaseGone
from prebake.compiler.outage import Outage, call_under_lease
from prebake.compiler.supervise import read_result
from prebake.core.signing import SigningKey
from prebake.v1 import blobs_pb2, registry_pb2, workers_pb2

log = logging.getLogger("prebake.worker")


class NothingToPublish(Exception):
    """The compiler reported success but its output directory holds no files."""


def toolchain_versions(result: Mapping[str, Any]) -> dict[str, str]:
    """result.json's `toolchain_versions` as strings; {} if absent or malformed."""
    versions = result.get("toolchain_versions")
    return {str(k): str(v) for k, v in versions.items()} if isinstance(versions, dict) else {}


def upload_log(client: Client, outage: Outage, run: JobRun, log_path: Path) -> blobs_pb2.Digest | None:
    """Upload the compile log as a blob; None (and a warning) if that fails."""
    try:
        # Hashed while uploading: the log is read once.
        result = call_under_lease(run, outage, "uploading the log", lambda: client.upload_file(log_path))
    except (OSError, PrebakeError) as exc:
        log.warning("job %s: compile log not uploaded: %s", run.job_id, exc)
        return None
    return result.digest


def publish(
    client: Client,
    outage: Outage,
    run: JobRun,
    job_dir: Path,
    *,
    worker_id: str,
    log_digest: blobs_pb2.Digest | None,
    compile_seconds: float,
    signing_key: SigningKey | None = None,
) -> registry_pb2.Artifact:
    """Upload `job_dir/out` and complete the job with it; the published artifact.

    Each output file is read once: hashed while it is uploaded (`Client.upload_directory`).

    With `signing_key` the completion carries its signature of the job's key and files.
    """
    job_id, token = run.job_id, run.lease.token
    out_dir = job_dir / "out"
    run.set_message("uploading the artifact")
    files = call_under_lease(run, outage, "uploading", lambda: client.upload_directory(out_dir))
    if not files:
        raise NothingToPublish("the compiler reported success but wrote no files")
    producer = registry_pb2.Producer(
        worker=worker_id,
        toolchain_versions=toolchain_versions(read_result(job_dir / "result.json")),
        compile_seconds=compile_seconds,
        log=log_digest,
    )
    run.set_message("publishing")
    signature = None if signing_key is None else sign_manifest(signing_key, run.lease.job.key, files)

    def complete() -> workers_pb2.CompleteJobResponse:
        return client.complete_job(job_id, token, files, producer, signature=signature)

    try:
        try:
            response = call_under_lease(run, outage, "publishing", complete)
        except (FailedPrecondition, DataLoss) as exc:
            # Either a blob vanished since we uploaded it (re-upload and retry once) or
            # the lease is gone (then nothing is missing and we must not retry).
            reuploaded = _reupload_missing(
                client, outage, run, job_dir=job_dir, files=files, log_digest=log_digest
            )
            if not reuploaded:
                raise LeaseGone(f"publishing refused: {exc}") from exc
            response = call_under_lease(run, outage, "publishing", complete)
    except (FailedPrecondition, NotFound) as exc:
        raise LeaseGone(f"publishing refused: {exc}") from exc
    artifact = response.artifact
    log.info(
        "job %s: published artifact %s (%d files, %d bytes)",
        job_id,
        artifact.artifact_id,
        artifact.file_count,
        artifact.total_size_bytes,
    )
    return artifact


def _reupload_missing(
    client: Client,
    outage: Outage,
    run: JobRun,
    *,
    job_dir: Path,
    files: Sequence[registry_pb2.ArtifactFile],
    log_digest: blobs_pb2.Digest | None,
) -> bool:
    """Upload again whatever the server lacks; False if it lacked nothing."""
    wanted = [f.digest for f in files] + ([log_digest] if log_digest is not None else [])
    missing = call_under_lease(run, outage, "checking blobs", lambda: client.find_missing_blobs(wanted))
    if not missing:
        return False
    log.warning("job %s: %d blob(s) vanished before publishing; uploading again", run.job_id, len(missing))
    lost = {(m.hash, m.size_bytes) for m in missing}
    out_dir = job_dir / "out"
    for f in {(f.digest.hash, f.digest.size_bytes): f for f in files}.values():
        if (f.digest.hash, f.digest.size_bytes) in lost:
            # By the digest the manifest names: the bytes must still be those (the server checks).
            upload = functools.partial(client.upload_blob, out_dir / f.path, f.digest)
            call_under_lease(run, outage, "uploading", upload)
    if log_digest is not None and any(m.hash == log_digest.hash for m in missing):
        log_file = job_dir / "compile.log"
        call_under_lease(run, outage, "uploading the log", lambda: client.upload_blob(log_file, log_digest))
    return True
