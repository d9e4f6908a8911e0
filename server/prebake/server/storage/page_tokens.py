"""Opaque, keyset page tokens for list primitives.

A token names the position after the last item of a page (its sort key), never an
offset: the next page costs the same however deep it is, and items inserted meanwhile
shift nothing. The text is URL-safe base64 of a small JSON array tagged with the list it
belongs to and the query's filters, so a token of one list or query is refused by
another; callers treat it as opaque.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Generic, TypeVar

from prebake.core.digests import hash_bytes
from prebake.core.errors import InvalidArgument

T = TypeVar("T")
MAX_TOKEN_CHARS = 512


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list: its items and the token of the next page ("" on the last)."""

    items: list[T]
    next_token: str = ""


def list_tag(name: str, filters: list[str | bool | list[str]]) -> str:
    """The tag of list `name` under one query: a token's position is only meaningful
    among the rows the same filters select, so another query's token must not fit."""
    return f"{name}:{hash_bytes(json.dumps(filters, separators=(',', ':')).encode())[:12]}"


def encode(tag: str, position: list[str | float | int]) -> str:
    text = json.dumps([tag, *position], separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode(tag: str, token: str, shape: tuple[type, ...]) -> list[str | float | int] | None:
    """The position in `token` (None for ""), checked against `tag` and `shape`.

    Raises `InvalidArgument` for anything this server did not issue for this list.
    """
    if not token:
        return None
    refused = InvalidArgument(
        f"page_token {token[:40]!r}{'...' if len(token) > 40 else ''} is not a token this server "
        "issued for this list; start again without one"
    )
    if len(token) > MAX_TOKEN_CHARS:
        raise refused
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode())
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise refused from None
    if not isinstance(data, list) or len(data) != len(shape) + 1 or data[0] != tag:
        raise refused
    position = data[1:]
    for value, kind in zip(position, shape, strict=True):
        ok = isinstance(value, kind) and not isinstance(value, bool)
        if kind is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        # A number too large for a float or a SQLite integer is nothing we issued.
        if not ok or (isinstance(value, int | float) and not abs(value) < 2**62):
            raise refused
    return list(position)
