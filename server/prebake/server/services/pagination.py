"""Page sizes of list rpcs (the page tokens themselves are the storage's, opaque and keyset)."""

from __future__ import annotations

from prebake.core.errors import InvalidArgument

DEFAULT_PAGE = 100
MAX_PAGE = 1000


def page_size(requested: int) -> int:
    if requested == 0:
        return DEFAULT_PAGE
    if not 1 <= requested <= MAX_PAGE:
        raise InvalidArgument(f"page_size {requested} is outside 1-{MAX_PAGE} (0 means {DEFAULT_PAGE})")
    return requested
