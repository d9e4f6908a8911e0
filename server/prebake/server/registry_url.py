"""The `dynamodb://TABLE_PREFIX` registry URL and its table-prefix rule.

Here rather than in `storage.dynamodb` so that the configuration can check a registry
URL without boto3 installed. Pure functions, thread-safe.
"""

from __future__ import annotations

import re

from prebake.core.errors import InvalidArgument

SCHEME = "dynamodb://"
# DynamoDB table names are 3-255 characters of A-Z a-z 0-9 _ . -; the registry's are
# PREFIX-SUFFIX and the longest suffix is "-blob-refs" (10 characters).
_PREFIX_RE = re.compile(r"[A-Za-z0-9_.-]{1,245}")


def validate_table_prefix(prefix: str) -> str:
    """`prefix` if it makes valid table names, else `InvalidArgument` saying what is allowed."""
    if not _PREFIX_RE.fullmatch(prefix):
        raise InvalidArgument(
            f"DynamoDB table prefix {prefix!r} must be 1-245 letters, digits, '_', '-' or '.' "
            f"(as in {SCHEME}prebake-prod)"
        )
    return prefix
