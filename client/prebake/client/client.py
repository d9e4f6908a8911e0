"""`Client`: every rpc of the prebake contract, plus the deployer's operations.

Low-level wrappers (one per rpc, named after it in snake_case) return the contract's
protobuf messages. High-level operations (`ensure`, `fetch`, `publish`, `upload_blob`,
`download_blob`) compose them with verification, resumption and atomic placement.

Failures are raised as `prebake.client.errors.PrebakeError` subclasses, never as
`grpc.RpcError`. UNAVAILABLE is retried (bounded, with backoff) wherever the contract
says the call is safe to repeat; nothing else is retried implicitly.
"""

from __future__ import annotations

import dataclasses
import functools
import getpass
import os
import socket
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, ParamSpec, TypeVar

import grpc

from prebake.client.artifact_key import ArtifactKey
from prebake.client.channel import (
    Connection,
    IdleWatchdog,
    RetryPolicy,
    call_with_retry,
    cancel_call,
    stalled,
    status_of,
)
from prebake.client.credentials import Credentials
from prebake.client.digest_memo import DigestMemo
from prebake.client.digest_memo import default_path as default_memo_path
from prebake.client.errors import (
    AlreadyExists,
    CompileFailed,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    JobCancelled,
    NoCapableWorker,
    NoRecommendation,
    NotFound,
    PrebakeError,
    Unavailable,
    from_rpc_error,
)
from prebake.client.fetch import MARKER, FetchResult, fetch_artifact
from prebake.client.hostcache import HostCache
from prebake.client.model_revision import revision_of
from prebake.client.publish import LocalFile, scan_directory
from prebake.client.s3_model_revision import s3_revision_of
from prebake.client.transfer import (
    DownloadResult,
    Progress,
    TransferSettings,
    UploadResult,
    download_blob,
    upload_blob,
    upload_hashing,
    upload_id_for,
)
from prebake.core.names import (
    TERMINAL_JOB_STATES,
    job_state_name,
    job_state_to_proto,
    kind_to_proto,
    lookup_status_name,
)
from prebake.core.request_ids import request_scope
from prebake.core.s3_urls import is_s3_url
from prebake.core.signing import Signature, SigningKey, TrustSet, check_signed_key, files_digest
from prebake.v1 import (
    admin_pb2,
    blobs_pb2,
    catalog_pb2,
    evaluations_pb2,
    jobs_pb2,
    key_pb2,
    registry_pb2,
    workers_pb2,
)

T = TypeVar("T")
DEFAULT_TARGET = "127.0.0.1:50051"
KeyLike = ArtifactKey | key_pb2.ArtifactKey
DigestLike = blobs_pb2.Digest | tuple[str, int]
# The contract's limit on digests per FindMissingBlobs request.
_FIND_MISSING_BATCH = 10_000
# A presigned URL that expires within this many seconds is not worth trying.
URL_MARGIN_SECONDS = 5.0
# Compatibility policies by the names the client and CLI use.
POLICIES = {
    "longer_sequence": registry_pb2.COMPATIBILITY_POLICY_LONGER_SEQUENCE,
    "neuroncore_v2_family": registry_pb2.COMPATIBILITY_POLICY_NEURONCORE_V2_FAMILY,
}
# The contract's largest page for list rpcs.
_MAX_PAGE = 1000


@dataclass(frozen=True)
class EnsureResult:
    """Outcome of `Client.ensure`."""

    # What the initial lookup answered: "HIT", "MISS" or "COMPILING".
    status: str
    artifact_id: str
    # The compile job waited for (None on a HIT).
    job_id: str | None
    fetch: FetchResult
    seconds: float


def as_digest(digest: DigestLike) -> blobs_pb2.Digest:
    if isinstance(digest, blobs_pb2.Digest):
        return digest
    hash_hex, size = digest
    return blobs_pb2.Digest(hash=hash_hex, size_bytes=size)


def _paginate(page: Callable[[int, str], tuple[Sequence[T], str]], limit: int | None) -> Iterator[T]:
    """Follow a list rpc's page tokens, yielding at most `limit` items (None: all)."""
    token, count = "", 0
    while True:
        items, token = page(min(limit or _MAX_PAGE, _MAX_PAGE), token)
        for item in items:
            if limit is not None and count >= limit:
                return
            count += 1
            yield item
        if not token:
            return


def _with_source_revision(key: key_pb2.ArtifactKey, model_source: str) -> key_pb2.ArtifactKey:
    """The key, with the revision its model source implies if it has none.

    New weights must never hit an artifact compiled from old ones, so a key looked up
    with a model source and no revision gets the source's revision: for a local checkpoint
    directory the digest of its files (`revision_of`; hashing runs at disk speed), for an
    `s3://` prefix the digest of its listing (`s3_revision_of`: sizes and ETags, nothing
    downloaded; needs boto3, else the error says to install prebake[aws] or pass
    `--revision`). Other schemes imply nothing (the worker refuses them).
    Raises InvalidArgument if a local directory cannot be read, and what `s3_revision_of`
    raises for an S3 source.
    """
    if key.model_revision or not model_source:
        return key
    if is_s3_url(model_source):
        revision = s3_revision_of(model_source)
    elif "://" in model_source:
        return key
    else:
        try:
            revision = revision_of(Path(model_source))
        except (OSError, ValueError) as exc:
            raise InvalidArgument(f"model_source {model_source}: {exc}") from None
    resolved = key_pb2.ArtifactKey()
    resolved.CopyFrom(key)
    resolved.model_revision = revision
    return resolved


def _absolute_source(model_source: str) -> str:
    """A local model source as an absolute path (the server refuses relative ones: they
    would be relative to its working directory, not the caller's); URLs unchanged."""
    if not model_source.strip() or "://" in model_source:
        return model_source
    # Joined, not normalised: the server judges the path as written (a `..` is refused there).
    return os.path.join(os.getcwd(), os.path.expanduser(model_source))


def _key_proto(key: KeyLike) -> key_pb2.ArtifactKey:
    return key.to_proto() if isinstance(key, ArtifactKey) else key


def sign_manifest(
    signing_key: SigningKey, key: key_pb2.ResolvedKey, files: Sequence[registry_pb2.ArtifactFile]
) -> Signature:
    """`signing_key`'s signature of the artifact `files` make for the resolved `key`."""
    return signing_key.sign(key.digest, key.canonical, files_digest(files))


def _signature_message(signature: Signature | None) -> registry_pb2.Signature | None:
    if signature is None:
        return None
    return registry_pb2.Signature(
        key_id=signature.key_id, signature=signature.signature, public_key=signature.public_key
    )


def _producer_identity() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name in a bare container
        user = "unknown"
    return f"publish:{user}@{socket.gethostname()}"


P = ParamSpec("P")
R = TypeVar("R")


def _exact_hit(response: registry_pb2.LookupResponse | None) -> registry_pb2.Artifact | None:
    """The artifact a report-only lookup found for exactly this key, if any."""
    if response is None or response.status != registry_pb2.LOOKUP_STATUS_HIT:
        return None
    exact = response.artifact.artifact_id == response.key.digest
    return response.artifact if exact else None


def _sizes(files: Iterable[registry_pb2.ArtifactFile]) -> dict[str, int]:
    return {f.path: f.digest.size_bytes for f in files}


def _same_files(files: Sequence[LocalFile], artifact: registry_pb2.Artifact) -> bool:
    return _identities(f.to_proto() for f in files) == _identities(artifact.files)


def _identities(files: Iterable[registry_pb2.ArtifactFile]) -> set[tuple[str, str, int, bool]]:
    return {(f.path, f.digest.hash, f.digest.size_bytes, f.executable) for f in files}


def _listing(directory: Path) -> dict[str, int] | None:
    """Path -> size of the files `scan_directory` would publish, from `stat` alone.

    None when the tree holds something the scan refuses (a link, a special file) or
    cannot be read: the scan then says what is wrong, this only compares.
    """
    found: dict[str, int] = {}
    try:
        for root, dirs, names in os.walk(directory, followlinks=False):
            if any((Path(root) / d).is_symlink() for d in dirs):
                return None
            for name in names:
                path = Path(root) / name
                st = path.lstat()
                if not stat.S_ISREG(st.st_mode):
                    return None
                rel = path.relative_to(directory).as_posix()
                if rel != MARKER:
                    found[rel] = st.st_size
    except OSError:
        return None
    return found


def _already_exists(existing: registry_pb2.Artifact) -> AlreadyExists:
    # Worded as the server's publish-time refusal (`replace` is the request field).
    return AlreadyExists(
        f"artifact {existing.artifact_id} for this key already exists with a different file list "
        f"(manifest {existing.manifest_digest}); set `replace` to replace it"
    )


def one_operation(fn: Callable[P, R]) -> Callable[P, R]:
    """Run a method as one client operation: its rpcs share one `x-request-id` (the caller's
    `request_scope` if one is open, else a fresh id; see `prebake.core.request_ids`)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with request_scope():
            return fn(*args, **kwargs)

    return wrapper


class Client:
    """A synchronous client for one prebake server.

    Thread safety: a Client may be shared by any number of threads; it holds a gRPC
    channel (thread-safe) and no other mutable state. Close it (or use it as a context
    manager) when done; calls on a closed client fail.

    `direct_download` asks for presigned URLs with manifests, where the server's store
    makes them (S3): files are then read straight from the store, verified as ever, and
    whatever the URL cannot deliver is read through the server.

    `timeout` is the deadline of each unary call, in seconds. `retries` bounds the
    retries after an UNAVAILABLE answer. Streams carry no deadline; a stream that
    delivers nothing for `idle_timeout` seconds is cancelled and resumed from where it
    was (downloads), or re-opened (job watches, which re-deliver the current state).

    `token` is sent with every rpc (`authorization: Bearer`); `ca_bundle` (PEM file: the
    CAs that sign the server's certificate) or `client_cert` with `client_key` (PEM files,
    for mutual TLS) make the channel TLS. `credentials` passes all of them already read
    (`Credentials.load`), instead. A file that cannot be read raises InvalidArgument.

    Every rpc carries an `x-request-id`: one per operation (a fetch, an ensure, a publish,
    one unary call with its retries), or the id of an enclosing
    `prebake.core.request_ids.request_scope(...)` the caller opened; the server logs it and
    records it on the job a lookup creates.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        timeout: float = 30.0,
        retries: int = 5,
        *,
        idle_timeout: float = 30.0,
        watch_idle_timeout: float = 60.0,
        direct_download: bool = True,
        token: str | None = None,
        ca_bundle: str | Path | None = None,
        client_cert: str | Path | None = None,
        client_key: str | Path | None = None,
        credentials: Credentials | None = None,
        trust: TrustSet | None = None,
        digest_memo: bool | Path | str = True,
    ) -> None:
        self.target = target
        # Where `publish` remembers the digests of files it read (`prebake.client.digest_memo`):
        # True for the default place ($PREBAKE_DIGEST_MEMO, else the user's cache), False for none.
        if digest_memo is True:
            self.digest_memo_path = default_memo_path()
        else:
            self.digest_memo_path = Path(digest_memo) if digest_memo else None
        # What the server is shown (see `prebake.client.credentials`): read once, here.
        self.credentials = credentials or Credentials.load(token, ca_bundle, client_cert, client_key)
        # Every fetch (and ensure) places only artifacts signed by one of these keys, checked
        # here from the manifest received (`prebake.core.signing`); None: no check.
        self.trust = trust
        # Ask for presigned URLs in manifests, so big files come straight from S3 (verified
        # as ever, with the server as the fallback). Off: every byte through the server.
        self.direct_download = direct_download
        self.timeout = timeout
        self.policy = RetryPolicy(retries=retries)
        self.idle_timeout = idle_timeout
        self.watch_idle_timeout = watch_idle_timeout
        self._conn = Connection(target, self.credentials)
        self._transfer = TransferSettings(
            policy=self.policy, unary_timeout=timeout, idle_seconds=idle_timeout, target=target
        )

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client(target={self.target!r}, timeout={self.timeout})"

    @one_operation
    def _call(self, fn: Callable[[float], T], timeout: float | None = None) -> T:
        """Run a unary rpc with a deadline, retrying UNAVAILABLE per the policy."""
        deadline = self.timeout if timeout is None else timeout
        return call_with_retry(lambda: fn(deadline), self.policy, self.target)

    # Registry ------------------------------------------------------------------------

    def lookup(
        self,
        key: KeyLike,
        on_miss: Literal["enqueue", "report"] = "enqueue",
        force: bool = False,
        model_source: str = "",
        *,
        timeout: float | None = None,
        allow: Sequence[str] = (),
    ) -> registry_pb2.LookupResponse:
        """Look a key up: HIT, MISS, COMPILING or FAILED (`LookupResponse.status`).

        `allow` names compatibility policies accepted besides an exact match
        (`longer_sequence`, `neuroncore_v2_family`); a HIT's `matched_policy` says which
        one matched.

        With on_miss="enqueue" a miss creates a compile job or joins the one in flight;
        "report" creates nothing. `force` ignores a cached deterministic failure.
        Raises InvalidArgument (with the server's message) for an invalid key.
        """
        modes = {"enqueue": registry_pb2.ON_MISS_ENQUEUE, "report": registry_pb2.ON_MISS_REPORT}
        if on_miss not in modes:
            raise ValueError(f"on_miss must be 'enqueue' or 'report', not {on_miss!r}")
        key = _with_source_revision(_key_proto(key), model_source)
        unknown = sorted(set(allow) - POLICIES.keys())
        if unknown:
            raise ValueError(f"unknown compatibility policies {unknown}; known: {sorted(POLICIES)}")
        request = registry_pb2.LookupRequest(
            key=key,
            on_miss=modes[on_miss],
            force=force,
            model_source=_absolute_source(model_source),
            allow=[POLICIES[name] for name in allow],
            direct_download=self.direct_download,
        )
        return self._call(lambda t: self._conn.stubs.registry.Lookup(request, timeout=t), timeout)

    def get_artifact(self, artifact_id: str = "", *, key: KeyLike | None = None) -> registry_pb2.Artifact:
        """One artifact's manifest, with its files: by id, or the artifact of exactly `key`
        (a read that counts as no lookup and enqueues nothing). Raises NotFound for an
        unknown id or a key without an artifact, InvalidArgument for an invalid key."""
        request = registry_pb2.GetArtifactRequest(
            artifact_id=artifact_id,
            key=_key_proto(key) if key is not None else None,
            direct_download=self.direct_download,
        )
        return self._call(lambda t: self._conn.stubs.registry.GetArtifact(request, timeout=t))

    def list_evaluations(
        self, artifact_id: str = "", model: str = "", page_size: int = 0, page_token: str = ""
    ) -> registry_pb2.ListEvaluationsResponse:
        """One page of evaluations, newest first: of one artifact, of one model's artifacts, or
        (both empty) every one. An unknown artifact id answers an empty page."""
        request = registry_pb2.ListEvaluationsRequest(
            artifact_id=artifact_id, model=model, page_size=page_size, page_token=page_token
        )
        return self._call(lambda t: self._conn.stubs.registry.ListEvaluations(request, timeout=t))

    def iter_evaluations(
        self, artifact_id: str = "", model: str = "", limit: int | None = None
    ) -> Iterator[evaluations_pb2.Evaluation]:
        """Every matching evaluation (following pages), newest first, at most `limit`."""

        def page(size: int, token: str) -> tuple[Sequence[evaluations_pb2.Evaluation], str]:
            reply = self.list_evaluations(artifact_id, model, page_size=size, page_token=token)
            return reply.evaluations, reply.next_page_token

        return _paginate(page, limit)

    def recommend(
        self,
        model: str,
        objective: Literal["latency", "throughput", "cost"],
        *,
        instance_types: Sequence[str] = (),
        kind: str = "",
        max_ttft_ms: float = 0.0,
        max_itl_ms: float = 0.0,
        concurrency: int = 0,
        sequence_length: int = 0,
        allow: Sequence[str] = (),
        limit: int = 0,
    ) -> registry_pb2.RecommendResponse:
        """The evaluated artifacts of `model` ranked for `objective` (best first), each with the
        key (`ensure_key`, `ensure_allow`) that gets it and why it ranks there. Raises
        `NoRecommendation` (a FailedPrecondition) when none qualifies, its message saying why
        (the closest level when the limits exclude everything); InvalidArgument naming the
        field (`.field`) for a refused request. A read, retried like every other."""
        objectives = {
            "latency": evaluations_pb2.OBJECTIVE_LATENCY,
            "throughput": evaluations_pb2.OBJECTIVE_THROUGHPUT,
            "cost": evaluations_pb2.OBJECTIVE_COST,
        }
        if objective not in objectives:
            raise ValueError(f"objective must be one of {sorted(objectives)}, not {objective!r}")
        unknown = sorted(set(allow) - POLICIES.keys())
        if unknown:
            raise ValueError(f"unknown compatibility policies {unknown}; known: {sorted(POLICIES)}")
        request = registry_pb2.RecommendRequest(
            model=model,
            instance_types=list(instance_types),
            kind=kind_to_proto(kind) if kind else key_pb2.ARTIFACT_KIND_UNSPECIFIED,
            objective=objectives[objective],
            max_ttft_ms=max_ttft_ms,
            max_itl_ms=max_itl_ms,
            concurrency=concurrency,
            sequence_length=sequence_length,
            allow=[POLICIES[name] for name in allow],
            limit=limit,
        )
        try:
            return self._call(lambda t: self._conn.stubs.registry.Recommend(request, timeout=t))
        except FailedPrecondition as exc:
            raise NoRecommendation(str(exc)) from None

    @one_operation
    def import_evaluation(
        self, artifact_id: str, evaluation: evaluations_pb2.Evaluation
    ) -> evaluations_pb2.Evaluation:
        """Store an evaluation of `artifact_id` measured elsewhere; returns it as stored (with
        its server-assigned id and time). Raises InvalidArgument naming the field (`.field`,
        e.g. `evaluation.levels[0].ttft_ms`) for an evaluation the server refuses, NotFound
        for an unknown artifact. Not retried: a lost answer's retry would store it twice."""
        request = registry_pb2.ImportEvaluationRequest(artifact_id=artifact_id, evaluation=evaluation)
        once = dataclasses.replace(self.policy, retries=0)
        return call_with_retry(
            lambda: self._conn.stubs.registry.ImportEvaluation(request, timeout=self.timeout),
            once,
            self.target,
        )

    def publish_artifact(
        self,
        key: KeyLike,
        files: Sequence[registry_pb2.ArtifactFile],
        producer: registry_pb2.Producer | None = None,
        replace: bool = False,
        force: bool = False,
        *,
        signature: Signature | None = None,
    ) -> registry_pb2.PublishArtifactResponse:
        """Publish a manifest whose blobs are all uploaded already (see `publish`).

        Raises FailedPrecondition when a blob is missing or, with `replace` but not
        `force`, when the existing artifact is pinned; AlreadyExists when another file
        list exists for the key and `replace` is not set; PermissionDenied for `replace`
        without the admin role (on a server with authentication). With `signature`:
        InvalidArgument when it does not verify, PermissionDenied when the server does not
        accept its signer.
        """
        request = registry_pb2.PublishArtifactRequest(
            key=_key_proto(key),
            files=files,
            producer=producer,
            replace=replace,
            force=force,
            signature=_signature_message(signature),
        )
        return self._call(lambda t: self._conn.stubs.registry.PublishArtifact(request, timeout=t))

    # Blobs ---------------------------------------------------------------------------

    def find_missing_blobs(self, digests: Iterable[DigestLike]) -> list[blobs_pb2.Digest]:
        """The subset of `digests` the server does not hold, in order, without duplicates.

        Any number of digests; they are sent in batches the contract allows.
        """
        wanted = [as_digest(d) for d in digests]
        missing: list[blobs_pb2.Digest] = []
        seen: set[tuple[str, int]] = set()
        for start in range(0, len(wanted), _FIND_MISSING_BATCH):
            batch = wanted[start : start + _FIND_MISSING_BATCH]
            for digest in self._find_missing_batch(batch):
                if (digest.hash, digest.size_bytes) not in seen:
                    seen.add((digest.hash, digest.size_bytes))
                    missing.append(digest)
        return missing

    def _find_missing_batch(self, batch: list[blobs_pb2.Digest]) -> list[blobs_pb2.Digest]:
        request = blobs_pb2.FindMissingBlobsRequest(digests=batch)
        return list(self._call(lambda t: self._conn.stubs.blobs.FindMissingBlobs(request, timeout=t)).missing)

    def read_blob(self, digest: DigestLike, offset: int = 0, limit: int = 0) -> Iterator[bytes]:
        """Stream a blob's bytes from `offset` (`limit` 0 = to the end), unverified.

        Resumes from the bytes already yielded after UNAVAILABLE or a stall (bounded).
        For a verified download to a file use `download_blob`.
        """
        proto = as_digest(digest)
        end = proto.size_bytes if limit == 0 else min(proto.size_bytes, offset + limit)
        failures = 0
        while offset < end:
            request = blobs_pb2.ReadRequest(digest=proto, offset=offset, limit=end - offset)
            stubs = self._conn.stubs
            call = stubs.blobs.Read(request)
            watchdog = IdleWatchdog(call, self.idle_timeout)
            try:
                with watchdog:
                    for message in call:
                        watchdog.kick()
                        failures = 0
                        offset += len(message.data)
                        yield message.data
                return
            except grpc.RpcError as err:
                if not stalled(err, watchdog) or failures >= self.policy.retries:
                    raise from_rpc_error(err, target=self.target) from None
                if watchdog.fired:
                    self._conn.replace(stubs)
            finally:
                cancel_call(call)
            time.sleep(self.policy.backoff(failures))
            failures += 1

    def write_blob(self, requests: Iterable[blobs_pb2.WriteRequest]) -> blobs_pb2.WriteResponse:
        """One raw Write stream (no retry: offsets make a blind repeat wrong).

        Most callers want `upload_blob`, which resumes and retries.
        """
        try:
            return self._conn.stubs.blobs.Write(iter(requests))
        except grpc.RpcError as err:
            raise from_rpc_error(err, target=self.target) from None

    def query_write_status(
        self, digest: DigestLike, upload_id: str | None = None
    ) -> blobs_pb2.QueryWriteStatusResponse:
        """Committed size of an upload (default id: the one `upload_blob` uses)."""
        proto = as_digest(digest)
        request = blobs_pb2.QueryWriteStatusRequest(upload_id=upload_id or upload_id_for(proto), digest=proto)
        return self._call(lambda t: self._conn.stubs.blobs.QueryWriteStatus(request, timeout=t))

    @one_operation
    def upload_blob(
        self, path_or_bytes: Path | str | bytes, digest: DigestLike, progress: Progress | None = None
    ) -> UploadResult:
        """Upload a file or bytes as blob `digest`; resumes an interrupted upload of it.

        The upload id is derived from host and digest, so a rerun in another process
        continues from what the server committed. Nothing is sent if the server holds
        the blob already. `progress(done, total)` is called from a gRPC thread.
        """
        source = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes)
        return upload_blob(self._conn, source, as_digest(digest), self._transfer, progress)

    @one_operation
    def upload_file(self, path: Path | str, progress: Progress | None = None) -> UploadResult:
        """Upload a file whose digest is not known yet, hashing it while sending (it is read once);
        `UploadResult.digest` is its digest. Resumes an interrupted upload of the unchanged file
        (the upload id is derived from host, path and the file's stat identity); the server drops
        the upload as a duplicate if it holds the blob already. `progress` as for `upload_blob`.
        """
        return upload_hashing(self._conn, Path(path), self._transfer, progress)

    @one_operation
    def download_blob(
        self, digest: DigestLike, path: Path | str, progress: Progress | None = None, url: str = ""
    ) -> DownloadResult:
        """Download a blob into `path`, verified, resuming from what `path` already holds.

        `url`, a presigned GET from a manifest (`ArtifactFile.download_url`), is read first;
        what it cannot deliver comes through the server. Raises DownloadDigestMismatch
        (after deleting `path`) if the bytes do not verify.
        """
        return download_blob(self._conn, as_digest(digest), Path(path), self._transfer, progress, url=url)

    # Jobs ----------------------------------------------------------------------------

    def get_job(self, job_id: str) -> jobs_pb2.Job:
        """One job. Raises NotFound for an unknown id."""
        request = jobs_pb2.GetJobRequest(job_id=job_id)
        return self._call(lambda t: self._conn.stubs.jobs.GetJob(request, timeout=t))

    def list_jobs(
        self,
        states: Sequence[str] = (),
        kind: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> jobs_pb2.ListJobsResponse:
        """One page of jobs, newest first. `states` are names ("queued", ...); `kind` "" = all."""
        request = jobs_pb2.ListJobsRequest(
            states=[job_state_to_proto(s) for s in states],
            kind=kind_to_proto(kind),
            page_size=page_size,
            page_token=page_token,
        )
        return self._call(lambda t: self._conn.stubs.jobs.ListJobs(request, timeout=t))

    def iter_jobs(
        self, states: Sequence[str] = (), kind: str = "", limit: int | None = None
    ) -> Iterator[jobs_pb2.Job]:
        """Every matching job (following pages), newest first, at most `limit`."""

        def page(size: int, token: str) -> tuple[Sequence[jobs_pb2.Job], str]:
            reply = self.list_jobs(states, kind, page_size=size, page_token=token)
            return reply.jobs, reply.next_page_token

        return _paginate(page, limit)

    def watch_job(self, job_id: str, timeout: float | None = None) -> Iterator[jobs_pb2.JobEvent]:
        """Follow a job: its current state, then every change, ending after a terminal one.

        Reconnects after UNAVAILABLE (bounded) and after `watch_idle_timeout` seconds
        without an event (a cheap liveness check; the new stream re-delivers the current
        state, which is skipped when already seen). `timeout` bounds the whole watch and
        raises DeadlineExceeded.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        request = jobs_pb2.WatchJobRequest(job_id=job_id)
        last_sequence = 0
        last_state = "unknown"
        failures = 0
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded(
                    f"job {job_id} did not finish in {timeout:g} s (last state: {last_state})"
                )
            stubs = self._conn.stubs
            call = stubs.jobs.WatchJob(request, timeout=remaining)
            watchdog = IdleWatchdog(call, self.watch_idle_timeout)
            heard = False
            try:
                with watchdog:
                    for event in call:
                        watchdog.kick()
                        heard = True
                        failures = 0
                        if event.sequence and event.sequence <= last_sequence:
                            continue
                        last_sequence = max(last_sequence, event.sequence)
                        last_state = job_state_name(event.job.state)
                        yield event
                        if event.job.state in TERMINAL_JOB_STATES:
                            return
                error: PrebakeError = Unavailable(f"the watch of job {job_id} ended early", self.target)
            except grpc.RpcError as err:
                if status_of(err) is grpc.StatusCode.DEADLINE_EXCEEDED and deadline is not None:
                    raise DeadlineExceeded(
                        f"job {job_id} did not finish in time (last state: {last_state})"
                    ) from None
                if not stalled(err, watchdog):
                    raise from_rpc_error(err, target=self.target) from None
                if watchdog.fired:
                    # Every watch opens with the job's current state: a stream that never
                    # delivered it sits on a dead connection; one that went quiet later
                    # merely had nothing to say. Either way, re-open at once.
                    if not heard:
                        self._conn.replace(stubs)
                    continue
                error = from_rpc_error(err, target=self.target)
            finally:
                cancel_call(call)
            if failures >= self.policy.retries:
                raise error
            time.sleep(self.policy.backoff(failures))
            failures += 1

    @one_operation
    def wait_for_job(
        self,
        job_id: str,
        timeout: float | None = None,
        on_event: Callable[[jobs_pb2.JobEvent], object] | None = None,
    ) -> jobs_pb2.Job:
        """Watch a job until it is terminal and return it (in whatever terminal state)."""
        job: jobs_pb2.Job | None = None
        for event in self.watch_job(job_id, timeout=timeout):
            if on_event is not None:
                on_event(event)
            job = event.job
        if job is None:  # pragma: no cover - watch_job returns only after a terminal event
            raise Unavailable(f"the watch of job {job_id} ended without a terminal state", self.target)
        return job

    def enqueue_evaluation(
        self,
        key: KeyLike | None = None,
        *,
        artifact_id: str = "",
        concurrency_levels: Sequence[int],
        requests: int,
        prompt_tokens: int = 0,
        output_tokens: int = 0,
        discount_rate: float = 0.0,
    ) -> jobs_pb2.EnqueueEvaluationResponse:
        """Enqueue (or join an identical) evaluation of the artifact of `key` (or `artifact_id`).

        A worker runs the workload against the artifact and stores the evaluation; follow the
        returned job with `wait_for_job` (`Job.evaluation_id` names the stored evaluation).
        0 token counts mean the server's default (16). Raises InvalidArgument naming the field,
        NotFound when the key has no artifact, FailedPrecondition when no live worker can
        evaluate it.
        """
        request = jobs_pb2.EnqueueEvaluationRequest(
            key=_key_proto(key) if key is not None else None,
            artifact_id=artifact_id,
            workload=evaluations_pb2.EvaluationWorkload(
                prompt_tokens=prompt_tokens,
                output_tokens=output_tokens,
                requests=requests,
                concurrency_levels=list(concurrency_levels),
            ),
            discount_rate=discount_rate,
        )
        return self._call(lambda t: self._conn.stubs.jobs.EnqueueEvaluation(request, timeout=t))

    def evaluation_of(self, job: jobs_pb2.Job) -> evaluations_pb2.Evaluation:
        """The evaluation a succeeded evaluation job stored. Raises NotFound if it is not
        (any more) among its artifact's evaluations."""
        for found in self.iter_evaluations(artifact_id=job.artifact_id):
            if found.evaluation_id == job.evaluation_id:
                return found
        raise NotFound(f"evaluation {job.evaluation_id or '(none)'} of job {job.job_id} is not stored")

    def cancel_job(self, job_id: str, reason: str = "") -> jobs_pb2.Job:
        """Cancel a queued or leased job. Raises FailedPrecondition if it already finished."""
        request = jobs_pb2.CancelJobRequest(job_id=job_id, reason=reason)
        return self._call(lambda t: self._conn.stubs.jobs.CancelJob(request, timeout=t))

    # Workers -------------------------------------------------------------------------

    def list_workers(self, include_expired: bool = False) -> list[workers_pb2.WorkerInfo]:
        """The workers heard of lately, with what they serve, sorted by id (live ones only
        unless `include_expired`)."""
        request = workers_pb2.ListWorkersRequest(include_expired=include_expired)
        response = self._call(lambda t: self._conn.stubs.workers.ListWorkers(request, timeout=t))
        return list(response.workers)

    def lease_job(
        self, worker_id: str, capabilities: Sequence[workers_pb2.Capability], wait_seconds: float = 0.0
    ) -> workers_pb2.LeaseJobResponse:
        """Lease a job matching one capability, waiting up to `wait_seconds` (long poll).

        `LeaseJobResponse.job` is unset when none came. Keep `fencing_token` for every
        later call about the job.
        """
        request = workers_pb2.LeaseJobRequest(
            worker_id=worker_id, capabilities=capabilities, wait_seconds=wait_seconds
        )
        return self._call(
            lambda t: self._conn.stubs.workers.LeaseJob(request, timeout=t), self.timeout + wait_seconds
        )

    def heartbeat(
        self, job_id: str, fencing_token: int, progress: float, message: str = ""
    ) -> workers_pb2.HeartbeatResponse:
        """Extend the lease and report progress. `cancelled` in the reply means stop.

        Raises FailedPrecondition when the lease is no longer this worker's.
        """
        request = workers_pb2.HeartbeatRequest(
            job_id=job_id, fencing_token=fencing_token, progress=progress, message=message
        )
        return self._call(lambda t: self._conn.stubs.workers.Heartbeat(request, timeout=t))

    def complete_job(
        self,
        job_id: str,
        fencing_token: int,
        files: Sequence[registry_pb2.ArtifactFile],
        producer: registry_pb2.Producer | None = None,
        *,
        signature: Signature | None = None,
    ) -> workers_pb2.CompleteJobResponse:
        """Publish a leased job's output (uploaded beforehand, e.g. by `upload_directory`).

        Raises FailedPrecondition when the lease was lost (nothing stored) or a blob is
        missing (upload and retry); idempotent, so safe to retry. `signature` (see
        `sign_manifest`) is recorded with the artifact.
        """
        request = workers_pb2.CompleteJobRequest(
            job_id=job_id,
            fencing_token=fencing_token,
            files=files,
            producer=producer,
            signature=_signature_message(signature),
        )
        return self._call(lambda t: self._conn.stubs.workers.CompleteJob(request, timeout=t))

    def complete_evaluation_job(
        self, job_id: str, fencing_token: int, evaluation: evaluations_pb2.Evaluation
    ) -> workers_pb2.CompleteEvaluationJobResponse:
        """Store a leased evaluation job's result. Raises FailedPrecondition when the lease was
        lost (nothing stored); idempotent under the same token, so safe to retry."""
        request = workers_pb2.CompleteEvaluationJobRequest(
            job_id=job_id, fencing_token=fencing_token, evaluation=evaluation
        )
        return self._call(lambda t: self._conn.stubs.workers.CompleteEvaluationJob(request, timeout=t))

    def fail_job(
        self,
        job_id: str,
        fencing_token: int,
        error: str,
        deterministic: bool,
        log: blobs_pb2.Digest | None = None,
    ) -> jobs_pb2.Job:
        """Report a failed attempt; deterministic failures end the job, others requeue it."""
        error_class = jobs_pb2.ERROR_CLASS_DETERMINISTIC if deterministic else jobs_pb2.ERROR_CLASS_TRANSIENT
        request = workers_pb2.FailJobRequest(
            job_id=job_id, fencing_token=fencing_token, error=error, error_class=error_class, log=log
        )
        return self._call(lambda t: self._conn.stubs.workers.FailJob(request, timeout=t))

    def release_job(self, job_id: str, fencing_token: int, reason: str = "") -> jobs_pb2.Job:
        """Give a leased job back to the queue without spending an attempt."""
        request = workers_pb2.ReleaseJobRequest(job_id=job_id, fencing_token=fencing_token, reason=reason)
        return self._call(lambda t: self._conn.stubs.workers.ReleaseJob(request, timeout=t))

    # Admin ---------------------------------------------------------------------------

    def list_artifacts(
        self,
        kind: str = "",
        model: str = "",
        pinned_only: bool = False,
        page_size: int = 0,
        page_token: str = "",
    ) -> admin_pb2.ListArtifactsResponse:
        """One page of artifacts (without file lists), newest first."""
        request = admin_pb2.ListArtifactsRequest(
            kind=kind_to_proto(kind),
            model=model,
            pinned_only=pinned_only,
            page_size=page_size,
            page_token=page_token,
        )
        return self._call(lambda t: self._conn.stubs.admin.ListArtifacts(request, timeout=t))

    def iter_artifacts(
        self, kind: str = "", model: str = "", pinned_only: bool = False, limit: int | None = None
    ) -> Iterator[registry_pb2.Artifact]:
        """Every matching artifact (following pages), newest first, at most `limit`."""

        def page(size: int, token: str) -> tuple[Sequence[registry_pb2.Artifact], str]:
            reply = self.list_artifacts(kind, model, pinned_only, page_size=size, page_token=token)
            return reply.artifacts, reply.next_page_token

        return _paginate(page, limit)

    def delete_artifact(self, artifact_id: str, force: bool = False) -> admin_pb2.DeleteArtifactResponse:
        """Delete an artifact and its unshared blobs. Pinned ones need `force`.

        A retried delete whose first attempt succeeded unseen answers NotFound.
        """
        request = admin_pb2.DeleteArtifactRequest(artifact_id=artifact_id, force=force)
        return self._call(lambda t: self._conn.stubs.admin.DeleteArtifact(request, timeout=t))

    def pin_artifact(self, artifact_id: str, pinned: bool = True) -> registry_pb2.Artifact:
        """Pin (or, with pinned=False, unpin) an artifact; returns it."""
        request = admin_pb2.PinArtifactRequest(artifact_id=artifact_id, pinned=pinned)
        return self._call(lambda t: self._conn.stubs.admin.PinArtifact(request, timeout=t))

    def get_stats(self) -> admin_pb2.Stats:
        """Counters and sizes: artifacts, blobs, hit rate, queue depth."""
        return self._call(lambda t: self._conn.stubs.admin.GetStats(admin_pb2.GetStatsRequest(), timeout=t))

    def collect_garbage(self, dry_run: bool = False) -> admin_pb2.CollectGarbageResponse:
        """Collect garbage on the server now (stale uploads, expired unreferenced and quarantined
        blobs, eviction above the high-water mark); with `dry_run`, only report what would go.

        Retried on UNAVAILABLE: a collection is idempotent (a retry removes what is left).
        """
        request = admin_pb2.CollectGarbageRequest(dry_run=dry_run)
        return self._call(lambda t: self._conn.stubs.admin.CollectGarbage(request, timeout=t))

    def verify_blobs(
        self, limit: int = 0, bytes_per_second: int = 0, repair: bool = True, timeout: float | None = None
    ) -> Iterator[admin_pb2.VerifyBlobsProgress]:
        """Have the server re-hash its blobs (least recently verified first, at most `limit`;
        0: all) and, with `repair`, quarantine what is corrupt and rebuild what is lost; yields
        its progress (cumulative counters, damaged blobs as found), the last with `done`.

        Not retried: a run that fails (Unavailable) may be started again, and continues with
        the blobs least recently verified. `timeout` bounds the whole run (None: no bound).
        """
        request = admin_pb2.VerifyBlobsRequest(limit=limit, bytes_per_second=bytes_per_second, repair=repair)
        call = self._conn.stubs.admin.VerifyBlobs(request, timeout=timeout)
        try:
            yield from call
        except grpc.RpcError as err:
            raise from_rpc_error(err, target=self.target) from None
        finally:
            cancel_call(call)

    # Catalog -------------------------------------------------------------------------

    def list_models(self, family: str = "", quantization_only: bool = False) -> list[catalog_pb2.ModelInfo]:
        """JumpStart models the server knows, with the optimizations each supports."""
        request = catalog_pb2.ListModelsRequest(family=family, quantization_only=quantization_only)
        return list(self._call(lambda t: self._conn.stubs.catalog.ListModels(request, timeout=t)).models)

    def list_presets(self, model: str = "") -> list[catalog_pb2.Preset]:
        """The server's presets (of `model`, any of its names, when given), each with its key as
        the server resolves it and, where the registry has them, its artifact and newest evaluation."""
        request = catalog_pb2.ListPresetsRequest(model=model)
        return list(self._call(lambda t: self._conn.stubs.catalog.ListPresets(request, timeout=t)).presets)

    def get_preset(self, name: str) -> catalog_pb2.Preset:
        """One preset by name; NotFound (naming the closest presets) for an unknown one."""
        request = catalog_pb2.GetPresetRequest(name=name)
        return self._call(lambda t: self._conn.stubs.catalog.GetPreset(request, timeout=t))

    def list_instance_types(self) -> list[catalog_pb2.InstanceTypeInfo]:
        """Instance types keys may name: cores, memory and the compile target each resolves to."""
        request = catalog_pb2.ListInstanceTypesRequest()
        reply = self._call(lambda t: self._conn.stubs.catalog.ListInstanceTypes(request, timeout=t))
        return list(reply.instance_types)

    # High-level operations -----------------------------------------------------------

    @one_operation
    def fetch(
        self,
        artifact: registry_pb2.Artifact | str,
        dest: Path | str,
        progress: Progress | None = None,
        overwrite: bool = False,
        *,
        host_cache: HostCache | None = None,
        trust: TrustSet | None = None,
    ) -> FetchResult:
        """Place an artifact (a manifest, or an id) in directory `dest`, verified and atomically.

        With `trust` (default: the client's), an artifact no trusted key signed raises
        `UntrustedArtifact` before anything is downloaded or placed.

        Never leaves a partial `dest`: files go to a temporary directory beside it
        (resumed by the next call after an interruption) and are renamed into place only
        once all are verified. Returns at once when `dest` already holds the artifact.
        Raises DestinationExists if `dest` holds something else and not `overwrite`,
        DownloadDigestMismatch if a file does not verify. With `host_cache`, files it holds are
        placed from it (verified) rather than downloaded (`FetchResult.bytes_from_cache`).
        """
        if isinstance(artifact, str):
            artifact = self.get_artifact(artifact)
        elif not artifact.files and artifact.file_count:
            artifact = self.get_artifact(artifact.artifact_id)  # a listing entry: no files
        return fetch_artifact(
            artifact,
            Path(dest),
            self._download_file,
            progress,
            overwrite,
            host_cache=host_cache,
            trust=self.trust if trust is None else trust,
        )

    def _download_file(
        self, entry: registry_pb2.ArtifactFile, path: Path, progress: Progress | None
    ) -> DownloadResult:
        """One file of a manifest: from its presigned URL while that is valid, else the server."""
        url = entry.download_url
        # A URL about to expire would only cost a refused request before the fallback.
        if url and entry.download_url_expires_at.ToNanoseconds() < (time.time() + URL_MARGIN_SECONDS) * 1e9:
            url = ""
        return self.download_blob(entry.digest, path, progress, url=url)

    @one_operation
    def publish(
        self,
        directory: Path | str,
        key: KeyLike,
        producer_note: str = "",
        replace: bool = False,
        progress: Progress | None = None,
        *,
        force: bool = False,
        signing_key: SigningKey | None = None,
    ) -> registry_pb2.PublishArtifactResponse:
        """Publish the regular files under `directory` as the artifact for `key`.

        `replace` and `force` as for `publish_artifact`.

        Reads every file once: a file whose digest the digest memo knows (unchanged since a
        publish read it) is uploaded only if the server lacks its blob; any other is hashed
        while it is uploaded (the server drops it if it turns out to hold the blob). Then
        publishes, with the digests computed while uploading; nothing is published before
        every blob is uploaded. If a blob vanishes between
        upload and publish (FAILED_PRECONDITION or DATA_LOSS), it is uploaded again and
        the publish retried once. Symbolic links and special files are refused. Without
        `replace`, a key that already has an artifact with other files is refused with
        AlreadyExists before anything is uploaded (the same files publish as a no-op). With
        `signing_key` the artifact is signed: the key is resolved first (a lookup that
        enqueues nothing; the publisher role may look up), since the signature covers
        the resolved key.
        """
        # Ask first: a key that has another artifact is refused before a byte is hashed or
        # uploaded, not after a multi-GB upload. The server checks again at publish time
        # (another publisher may win the race). Signing resolves the key with a lookup that
        # enqueues nothing anyway; otherwise a GetArtifact by key, which counts as no lookup.
        known = self.lookup(key, on_miss="report") if signing_key is not None else None
        existing = None
        if not replace:
            existing = _exact_hit(known) if known is not None else self._artifact_of(key)
        if existing is not None and _listing(Path(directory)) not in (None, _sizes(existing.files)):
            raise _already_exists(existing)
        with self._digest_memo() as memo:
            # An artifact exists for the key: hash first, so that other bytes under the same names
            # and sizes are refused before anything is uploaded (the same bytes upload nothing).
            files = scan_directory(Path(directory), hash_files=existing is not None, digest_memo=memo)
            if existing is not None and not _same_files(files, existing):
                raise _already_exists(existing)  # same names and sizes, other bytes: still before uploading
            files = self._upload_missing(files, progress, memo)
        producer = registry_pb2.Producer(worker=_producer_identity(), note=producer_note)
        manifest = [f.to_proto() for f in files]
        signature = None
        if signing_key is not None and known is not None:
            signature = sign_manifest(signing_key, known.key, manifest)
        try:
            return self.publish_artifact(key, manifest, producer, replace, force, signature=signature)
        except (FailedPrecondition, DataLoss):
            # A blob was deleted or quarantined since it was uploaded: upload it again.
            self._upload_missing(files, progress)
            return self.publish_artifact(key, manifest, producer, replace, force, signature=signature)

    def _artifact_of(self, key: KeyLike) -> registry_pb2.Artifact | None:
        try:
            return self.get_artifact(key=key)
        except NotFound:
            return None

    @one_operation
    def upload_directory(
        self, directory: Path | str, progress: Progress | None = None
    ) -> list[registry_pb2.ArtifactFile]:
        """Upload the regular files under `directory` (only the blobs the server lacks).

        Returns the manifest to pass to `publish_artifact` or `complete_job`, with the
        digests computed while uploading: each file is read once, as in `publish`.
        Symbolic links and special files are refused, as in `publish`.
        """
        with self._digest_memo() as memo:
            scanned = scan_directory(Path(directory), hash_files=False, digest_memo=memo)
            files = self._upload_missing(scanned, progress, memo)
        return [f.to_proto() for f in files]

    @contextmanager
    def _digest_memo(self) -> Iterator[DigestMemo]:
        """The digest memo, saved afterwards whatever happened (what was read stays known)."""
        memo = DigestMemo(self.digest_memo_path)
        try:
            yield memo
        finally:
            memo.save()

    def _upload_missing(
        self, files: Sequence[LocalFile], progress: Progress | None, memo: DigestMemo | None = None
    ) -> list[LocalFile]:
        """Upload what the server lacks of `files`: of those with a digest, the blobs it does not
        hold; the others hashed while uploading (recorded in `memo`). `files` with every digest."""
        by_digest: dict[tuple[str, int], LocalFile] = {}
        for f in files:
            if f.hash:
                by_digest.setdefault((f.hash, f.size), f)
        missing = self.find_missing_blobs(f.digest for f in by_digest.values()) if by_digest else []
        todo = [by_digest[(d.hash, d.size_bytes)] for d in missing if (d.hash, d.size_bytes) in by_digest]
        # Unhashed files, once per file (hard links share one upload).
        unhashed: dict[object, LocalFile] = {}
        for f in files:
            if not f.hash:
                unhashed.setdefault(f.file_identity, f)
        total = sum(f.size for f in todo) + sum(f.size for f in unhashed.values())
        done = 0

        def reporter(base: int) -> Progress:
            def report(file_done: int, _file_total: int) -> None:
                if progress is not None:
                    progress(base + file_done, total)

            return report

        for f in todo:
            self.upload_blob(f.source, f.digest, reporter(done))
            done += f.size
        computed: dict[object, blobs_pb2.Digest] = {}
        for identity, f in unhashed.items():
            started = time.time_ns()
            digest = self.upload_file(f.source, reporter(done)).digest
            computed[identity] = digest
            if memo is not None and f.stat is not None and digest.size_bytes == f.size:
                memo.record(f.source, f.stat, digest.hash, started)
            done += f.size
        return [f if f.hash else f.with_digest(computed[f.file_identity]) for f in files]

    def _await_capable_worker(
        self,
        response: registry_pb2.LookupResponse,
        *,
        key: KeyLike,
        model_source: str,
        allow: Sequence[str],
        started: float,
        grace: float,
    ) -> registry_pb2.LookupResponse:
        """`response`, or a later lookup's once a live worker can take the job."""
        while response.unserved_reason:
            if time.monotonic() - started >= grace:
                waited = f" (waited {grace:g} s for one)" if grace > 0 else ""
                raise NoCapableWorker(
                    f"{response.unserved_reason}{waited}; job {response.job.job_id} stays queued. "
                    "Start a worker that serves it (`prebake worker`), or name another toolchain "
                    "or instance type",
                    job=response.job,
                )
            time.sleep(min(1.0, max(0.0, grace - (time.monotonic() - started))))
            response = self.lookup(key, on_miss="enqueue", model_source=model_source, allow=allow)
            if response.status in (registry_pb2.LOOKUP_STATUS_HIT, registry_pb2.LOOKUP_STATUS_FAILED):
                break
        return response

    @one_operation
    def ensure(  # noqa: PLR0917 (the documented signature takes these positionally)
        self,
        key: KeyLike,
        dest: Path | str,
        model_source: str = "",
        timeout: float | None = None,
        progress: Progress | None = None,
        on_event: Callable[[jobs_pb2.JobEvent], object] | None = None,
        *,
        overwrite: bool = False,
        host_cache: HostCache | None = None,
        allow: Sequence[str] = (),
        worker_grace: float = 0.0,
        trust: TrustSet | None = None,
    ) -> EnsureResult:
        """Make `dest` hold the artifact for `key`, compiling it first if needed.

        When no live worker can compile the key (the lookup's `unserved_reason`),
        raises `NoCapableWorker` at once, or after waiting up to `worker_grace`
        seconds for one to appear (re-checking every second).

        Lookup (enqueueing on a miss); on HIT fetch; on MISS/COMPILING wait for the job
        (`on_event` sees every JobEvent), then fetch what it published. `timeout` bounds
        the lookup and the wait for a compile (DeadlineExceeded), not the transfer, which
        is bounded by stall detection instead. Raises CompileFailed when the compile
        failed (now or, cached, earlier) and JobCancelled when the job was cancelled.
        `dest` is placed as by `fetch` (with its `overwrite`, `host_cache` and `trust`, the
        client's by default: an artifact no trusted key signed raises `UntrustedArtifact` and
        nothing is placed). A hit whose blob turns out missing or corrupt on the server is
        looked up once more: the server marked it unavailable, so that lookup follows (or
        enqueues) its rebuild.
        """
        started = time.monotonic()
        ready = functools.partial(
            self._ensure_artifact,
            key,
            model_source,
            timeout,
            on_event,
            allow=allow,
            worker_grace=worker_grace,
            started=started,
        )

        def place(artifact: registry_pb2.Artifact) -> FetchResult:
            if (self.trust if trust is None else trust) is not None:
                # The signature (checked by fetch) binds the key; it must be the key asked for.
                requested = _key_proto(key)
                check_signed_key(artifact, requested.model, requested.model_revision)
            return self.fetch(
                artifact, dest, progress=progress, overwrite=overwrite, host_cache=host_cache, trust=trust
            )

        status, artifact, job_id = ready()
        try:
            fetched = place(artifact)
        except (NotFound, DataLoss) as lost:
            # A blob of the hit was missing or corrupt on the server. Its Read marked the
            # artifact unavailable and enqueued the rebuild where a job can do it, so a second
            # lookup follows that compile (or enqueues one) instead of failing; if it still hits,
            # nothing was repaired and the loss is the answer.
            if job_id is not None:
                raise
            status, artifact, job_id = ready()
            if job_id is None:
                raise lost from None
            fetched = place(artifact)
        return EnsureResult(
            status=status,
            artifact_id=artifact.artifact_id,
            job_id=job_id,
            fetch=fetched,
            seconds=time.monotonic() - started,
        )

    def _ensure_artifact(
        self,
        key: KeyLike,
        model_source: str,
        timeout: float | None,
        on_event: Callable[[jobs_pb2.JobEvent], object] | None,
        *,
        allow: Sequence[str],
        worker_grace: float,
        started: float,
    ) -> tuple[str, registry_pb2.Artifact, str | None]:
        """`ensure` up to the fetch: (lookup status, the artifact to fetch, the job followed)."""
        remaining = self._remaining(started, timeout)
        lookup_timeout = self.timeout if remaining is None else min(remaining, self.timeout)
        response = self.lookup(
            key, on_miss="enqueue", model_source=model_source, timeout=lookup_timeout, allow=allow
        )
        status = lookup_status_name(response.status)
        job_id: str | None = None
        if response.status == registry_pb2.LOOKUP_STATUS_HIT:
            artifact = response.artifact
        elif response.status == registry_pb2.LOOKUP_STATUS_FAILED:
            error = response.error or response.job.error or "no error message"
            raise CompileFailed(
                f"the last compile of key {response.key.digest} failed: {error} (lookup with force to retry)",
                job=response.job if response.HasField("job") else None,
            )
        else:
            if not response.job.job_id:
                reason = response.error or "the server gave no reason"
                raise FailedPrecondition(
                    f"no artifact for key {response.key.digest} and no compile job: {reason}"
                )
            job_id = response.job.job_id
            response = self._await_capable_worker(
                response, key=key, model_source=model_source, allow=allow, started=started, grace=worker_grace
            )
            remaining = self._remaining(started, timeout)
            try:
                job = self.wait_for_job(job_id, timeout=remaining, on_event=on_event)
            except DeadlineExceeded as exc:
                raise DeadlineExceeded(
                    f"gave up after {timeout:g} s: {exc.details}; the job keeps running, "
                    "and calling ensure again resumes the wait"
                ) from None
            self._raise_unless_succeeded(job)
            artifact = self.get_artifact(job.artifact_id or job.key.digest or response.key.digest)
        return status, artifact, job_id

    def _remaining(self, started: float, timeout: float | None) -> float | None:
        if timeout is None:
            return None
        remaining = started + timeout - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(f"gave up after {timeout:g} s")
        return remaining

    @staticmethod
    def _raise_unless_succeeded(job: jobs_pb2.Job) -> None:
        if job.state == jobs_pb2.JOB_STATE_SUCCEEDED:
            return
        if job.state == jobs_pb2.JOB_STATE_CANCELLED:
            raise JobCancelled(f"job {job.job_id} was cancelled: {job.error or 'no reason given'}", job=job)
        raise CompileFailed(f"job {job.job_id} failed: {job.error or 'no error message'}", job=job)
