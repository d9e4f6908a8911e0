"""The revision of an `s3://BUCKET/PREFIX` model source, computed from its object listing alone.

A Hugging Face checkpoint in S3 (config.json, *.safetensors, tokenizer files, ...) gets a
revision without being downloaded: the xxh3-128 digest (`prebake.core.digests`) of the JSON
document `{"scheme": S3_REVISION_SCHEME, "files": [[path, size, etag], ...]}`, one row per
object sorted by its path relative to the prefix, the ETag without its quotes.

Why ETags are enough: S3 gives an object a new ETag whenever its bytes change (the MD5 of
the content for plain and SSE-S3 single-part uploads, an MD5 of the parts' MD5s with a
part count for multipart ones, an opaque value that changes on every write for SSE-KMS
and SSE-C). So changing, adding, removing or renaming a file of the checkpoint changes the
revision, like `revision_of` for a local directory. The converse does not hold, and that
is the safe direction: identical bytes uploaded differently (another part size, KMS) may
give another revision, a spurious miss but never a hit on an artifact of other weights.
Identical objects uploaded the same way under two prefixes or buckets get one revision
(the location is not hashed, as a local directory's place is not). The scheme string
differs from the local one, so an S3 revision never equals a local one by accident.

Which objects count is `prebake.client.model_revision.is_checkpoint_path` (the rule for
local directories); "folder" marker keys ending in "/" are not files and are skipped.

Two layers, so that the thin client imports nothing beyond its three dependencies:
`SourceObject`, `revision_of_objects` and `S3Checkpoint.revision` are pure; the listing
(`list_checkpoint`, `s3_revision_of`) imports boto3 lazily, inside `s3_client`. Worker and
client share both, so they always agree on a revision. Stateless and thread-safe.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

from prebake.client.model_revision import CONFIG_FILE, is_checkpoint_path
from prebake.core.digests import hash_bytes
from prebake.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    PrebakeError,
    Unavailable,
)
from prebake.core.s3_urls import S3Location, parse_s3_url

if TYPE_CHECKING:
    from botocore.exceptions import BotoCoreError, ClientError
    from mypy_boto3_s3 import S3Client

# Part of the hashed document: a change of the recipe must change every revision.
S3_REVISION_SCHEME = "prebake-s3-model-revision-v1"
# A checkpoint has tens of files; a prefix with more objects than this is not one (a bucket
# root, a data set) and is refused before anything is downloaded.
MAX_CHECKPOINT_OBJECTS = 10_000

_DENIED = {"AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"}
_RETRY_LATER = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestTimeout"}
_WRONG_REGION = {"PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"}


@dataclass(frozen=True)
class SourceObject:
    """One file of an S3 checkpoint: its posix path under the prefix, size and ETag (unquoted)."""

    path: str
    size: int
    etag: str


def revision_of_objects(objects: Iterable[SourceObject]) -> str:
    """The revision (32 hex digits) of a checkpoint made of `objects`; see the module docstring.

    Pure and order-independent. Raises ValueError if `objects` is empty.
    """
    rows = sorted([o.path, o.size, o.etag] for o in objects)
    if not rows:
        raise ValueError("a checkpoint without files has no revision")
    # JSON keeps the encoding unambiguous whatever characters the names contain.
    document = json.dumps({"scheme": S3_REVISION_SCHEME, "files": rows}, separators=(",", ":"))
    return hash_bytes(document.encode())


@dataclass(frozen=True)
class S3Checkpoint:
    """The files of a checkpoint under `location`, as one listing saw them (sorted by path)."""

    location: S3Location
    objects: tuple[SourceObject, ...]

    @property
    def revision(self) -> str:
        return revision_of_objects(self.objects)

    @property
    def total_size(self) -> int:
        return sum(o.size for o in self.objects)

    def key(self, obj: SourceObject) -> str:
        """The object key of one of this checkpoint's files."""
        return self.location.key(obj.path)


def s3_client() -> S3Client:
    """A boto3 S3 client configured from boto3's standard sources only (environment,
    AWS_PROFILE, instance role; `AWS_ENDPOINT_URL_S3` for other endpoints).

    Raises ImportError if boto3 is not installed (the `prebake[aws]` extra), `Unavailable`
    if boto3's configuration is unusable (a missing AWS_PROFILE, say).
    """
    import boto3
    from botocore.exceptions import BotoCoreError

    try:
        return boto3.client("s3")
    except BotoCoreError as exc:
        raise Unavailable(
            f"cannot set up an S3 client ({type(exc).__name__}); check AWS_PROFILE and the AWS "
            "configuration files of this host"
        ) from None


def list_checkpoint(location: S3Location, s3: S3Client | None = None) -> S3Checkpoint:
    """The checkpoint under `location`: one paginated listing, no object is read.

    Raises, with a message that names the location and what to change (never a credential):
    `InvalidArgument` if the bucket does not exist, the prefix holds no checkpoint files or
    no config.json, more than MAX_CHECKPOINT_OBJECTS objects, or a key that cannot be a
    file (an empty, '.' or '..' path segment, a NUL, a name both a file and a folder);
    `PermissionDenied` if the credentials may not list it; `Unavailable` if S3 cannot be
    reached, throttles, fails (5xx) or no credentials are configured here. ImportError if
    boto3 is missing and no client is given.
    """
    client = s3 if s3 is not None else s3_client()
    from botocore.exceptions import BotoCoreError, ClientError

    objects: list[SourceObject] = []
    try:
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=location.bucket, Prefix=location.prefix
        )
        for page in pages:
            for item in page.get("Contents", []):
                obj = _source_object(location, item["Key"], item["Size"], item["ETag"])
                if obj is not None:
                    objects.append(obj)
                if len(objects) > MAX_CHECKPOINT_OBJECTS:
                    raise InvalidArgument(
                        f"model source {location} holds more than {MAX_CHECKPOINT_OBJECTS} objects; "
                        "it is not a checkpoint prefix (name the folder that holds config.json)"
                    )
    except (ClientError, BotoCoreError) as exc:
        raise s3_error(exc, location, client.meta.endpoint_url, "list") from None
    objects.sort(key=lambda o: o.path)
    _check_layout(location, objects)
    return S3Checkpoint(location, tuple(objects))


def s3_revision_of(url: str) -> str:
    """The revision of the checkpoint at `url` (`s3://BUCKET/PREFIX`), for keys made by a client.

    Raises what `parse_s3_url` and `list_checkpoint` raise; every message ends by saying
    that `--revision` names the revision without reading S3. Without boto3 installed,
    `InvalidArgument` saying to install `prebake[aws]` or pass `--revision`.
    """
    location = parse_s3_url(url, "model source")
    try:
        return list_checkpoint(location, s3_client()).revision
    except ImportError:
        raise InvalidArgument(
            f"model source {location}: computing the revision of an s3:// model source needs boto3; "
            "install prebake[aws], or pass --revision"
        ) from None
    except PrebakeError as exc:
        raise type(exc)(f"{exc} (or pass --revision to name the model revision yourself)") from None


def _source_object(location: S3Location, key: str, size: int, etag: str) -> SourceObject | None:
    """The checkpoint file that `key` is, None if it is not one (hidden, a folder marker)."""
    path = key[len(location.prefix) :]
    if not path or path.endswith("/"):
        return None
    # Before the hidden rule: PurePosixPath drops "" and "." segments, and a local file
    # name has none of these.
    if any(segment in ("", ".", "..") for segment in path.split("/")) or "\0" in path:
        raise InvalidArgument(
            f"model source {location}: object key {key!r} cannot be a checkpoint file "
            "(an empty, '.' or '..' path segment, or a NUL character); rename it"
        )
    if not is_checkpoint_path(PurePosixPath(path)):
        return None
    return SourceObject(path, size, etag.strip('"'))


def _check_layout(location: S3Location, objects: list[SourceObject]) -> None:
    if not objects:
        raise InvalidArgument(
            f"model source {location} holds no checkpoint files; check the bucket and the prefix "
            "(keys are case-sensitive)"
        )
    paths = {o.path for o in objects}
    if CONFIG_FILE not in paths:
        raise InvalidArgument(
            f"model source {location} has no {CONFIG_FILE}; it is not a Hugging Face checkpoint "
            "(name the folder that holds config.json)"
        )
    for path in sorted(paths):
        for parent in PurePosixPath(path).parents:
            if parent.as_posix() in paths:
                raise InvalidArgument(
                    f"model source {location}: {parent.as_posix()!r} is both a file and a folder "
                    f"(of {path!r}); a checkpoint directory cannot hold both"
                )


def changed_since_listed(location: S3Location, action: str, what: str) -> FailedPrecondition:
    """An object of the checkpoint at `location` changed or vanished between listing and
    reading (S3 said `what`): the listing's revision no longer names what S3 holds."""
    return FailedPrecondition(
        f"cannot {action} model source {location}: an object changed or was deleted after it was "
        f"listed ({what}); the checkpoint is being rewritten: look the key up again once it is complete"
    )


def s3_error(
    exc: ClientError | BotoCoreError, location: S3Location, endpoint: str, action: str
) -> PrebakeError:
    """The prebake error that botocore's `exc` stands for, raised while trying to `action`
    (a verb: "list", "download x") the model source at `location`.

    Deterministic answers (no such bucket, access denied, wrong region, the object changed
    or vanished since it was listed) are not `Unavailable`; what may pass by itself
    (unreachable endpoint, throttling, 5xx, no credentials on this host) is. Messages name
    the location, the endpoint and S3's error code, never a credential or S3's own text.
    """
    from botocore.exceptions import (
        ClientError,
        CredentialRetrievalError,
        NoCredentialsError,
        ParamValidationError,
        PartialCredentialsError,
    )

    where = f"model source {location}"
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        what = code or f"HTTP {status}"
        if code == "NoSuchBucket":
            return InvalidArgument(
                f"cannot {action} {where}: bucket {location.bucket!r} does not exist at {endpoint}; "
                "check the URL (and AWS_ENDPOINT_URL_S3 if it is set)"
            )
        if code in _DENIED or status == 403:
            return PermissionDenied(
                f"cannot {action} {where}: access denied ({what}); grant this host's AWS credentials "
                f"s3:ListBucket on arn:aws:s3:::{location.bucket} and s3:GetObject on "
                f"arn:aws:s3:::{location.bucket}/{location.prefix}*"
            )
        if code in ("PreconditionFailed", "NoSuchKey") or status in (404, 412):
            return changed_since_listed(location, action, what)
        if code in _WRONG_REGION or status == 301:
            return InvalidArgument(
                f"cannot {action} {where}: the bucket is in another region ({what}); "
                "set AWS_REGION (or AWS_DEFAULT_REGION) to the bucket's region"
            )
        if code in _RETRY_LATER or status == 429 or status >= 500:
            return Unavailable(
                f"cannot {action} {where}: S3 is unavailable or overloaded ({what}); retry later"
            )
        return InvalidArgument(f"cannot {action} {where}: S3 refused the request ({what}, HTTP {status})")
    if isinstance(exc, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
        return Unavailable(
            f"cannot {action} {where}: no usable AWS credentials on this host ({type(exc).__name__}); "
            "configure them through AWS_PROFILE, the environment or an instance role"
        )
    if isinstance(exc, ParamValidationError):
        return InvalidArgument(f"cannot {action} {where}: {exc}")
    return Unavailable(
        f"cannot {action} {where}: cannot reach S3 at {endpoint} ({type(exc).__name__}); "
        "check the network, and AWS_ENDPOINT_URL_S3 and AWS_REGION if they are set"
    )
