"""`s3://BUCKET/PREFIX` locations: blob stores, model sources, the registry's bucket.

One parser for every place that takes an S3 URL (server flags, TOML, model sources), so
they all accept and refuse the same texts with the same messages. No boto3 here: the thin
client may parse a location without the AWS extra installed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from prebake.core.errors import InvalidArgument

SCHEME = "s3://"
# S3's bucket naming rules (general purpose buckets): 3-63 characters of lowercase letters,
# digits, dots and hyphens, starting and ending with a letter or digit.
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_MAX_PREFIX = 512


@dataclass(frozen=True)
class S3Location:
    """A bucket and a key prefix ("" or ending in "/")."""

    bucket: str
    prefix: str = ""

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}"

    def key(self, name: str) -> str:
        """The object key of `name` under this prefix."""
        return self.prefix + name


def is_s3_url(text: str) -> bool:
    return text.strip().startswith(SCHEME)


def parse_s3_url(text: str, what: str = "S3 location") -> S3Location:
    """`s3://bucket/some/prefix` -> S3Location("bucket", "some/prefix/").

    Raises `InvalidArgument` naming `what` for anything else: another scheme, a bad bucket
    name, empty or `.`/`..` path segments, or a prefix longer than 512 characters.
    """
    raw = text.strip()
    if not raw.startswith(SCHEME):
        raise InvalidArgument(f"{what} {raw!r} is not an s3:// URL (expected s3://BUCKET/PREFIX)")
    bucket, _, path = raw[len(SCHEME) :].partition("/")
    if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise InvalidArgument(
            f"{what} {raw!r}: {bucket!r} is not a valid bucket name "
            "(3-63 lowercase letters, digits, dots and hyphens)"
        )
    path = path.rstrip("/")
    segments = path.split("/") if path else []
    if any(s in ("", ".", "..") for s in segments):
        raise InvalidArgument(f"{what} {raw!r}: the prefix has an empty, '.' or '..' segment")
    prefix = "/".join(segments) + "/" if segments else ""
    if len(prefix) > _MAX_PREFIX:
        raise InvalidArgument(f"{what} {raw!r}: the prefix is longer than {_MAX_PREFIX} characters")
    return S3Location(bucket, prefix)
