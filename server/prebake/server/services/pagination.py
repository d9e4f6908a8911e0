"""Opaque page tokens for list rpcs (an offset, so a token stays valid across restarts)."""

from __future__ import annotations

import base64
import binascii

from prebake.server.errors import InvalidArgument

DEFAULT_PAGE = 100
MAX_PAGE = 1000


def page_size(requested: int) -> int:
    if requested == 0:
        return DEFAULT_PAGE
    if not 1 <= requested <= MAX_PAGE:
        raise InvalidArgument(f"page_size {requested} is outside 1-{MAX_PAGE} (0 means {DEFAULT_PAGE})")
    return requested


def decode(token: str) -> int:
    if not token:
        return 0
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
        prefix, _, number = text.partition(":")
        offset = int(number)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        offset = -1
        prefix = ""
    if prefix != "o" or offset < 0:
        raise InvalidArgument(f"page_token {token!r} is not a token this server issued; start without one")
    return offset


def encode(offset: int) -> str:
    return base64.urlsafe_b64encode(f"o:{offset}".encode()).decode()


def next_token(offset: int, limit: int, fetched: int) -> str:
    """Token for the following page, or "" on the last one.

    Callers fetch `limit + 1` rows, so a full page that happens to be the last one
    does not send the client an extra round trip for an empty page.
    """
    return encode(offset + limit) if fetched > limit else ""
