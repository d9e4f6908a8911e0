"""Request ids: one id per client operation, carried as `x-request-id` metadata.

The thin client sends `REQUEST_ID_HEADER` with every rpc: the id of the innermost open
`request_scope` on the calling thread (or task), else a fresh one per rpc. The server
reads it (generating one when absent), binds it with `bind` for the rpc's task, logs it,
returns it in trailing metadata and records it on a job the rpc creates; a worker opens
a scope with the job's id while it works on the job, so its log lines and its rpcs for
the job carry the id of the lookup that created it.

The current id is a context variable: a thread or task sees its own; threads started
inside a scope see it only if started in a copy of the context (`contextvars.copy_context`).
Standard library only (the thin client imports this).
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import uuid
from collections.abc import Iterator

REQUEST_ID_HEADER = "x-request-id"
# What the server accepts from a client; anything else is replaced by a fresh id (an id is
# logged and stored, so it must not be able to forge log lines or grow without bound).
_VALID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("prebake_request_id", default=None)


def new_request_id() -> str:
    """A fresh id: 32 lowercase hex digits (uuid4)."""
    return uuid.uuid4().hex


def is_valid(request_id: str) -> bool:
    """Whether `request_id` is acceptable as given: 1-128 of A-Z a-z 0-9 . _ : -."""
    return bool(_VALID.match(request_id))


def current() -> str | None:
    """The id of the scope (or rpc) this code runs in, or None outside one."""
    return _current.get()


def bind(request_id: str | None) -> contextvars.Token[str | None]:
    """Make `request_id` current for this thread or task; pass the token to `unbind`."""
    return _current.set(request_id)


def unbind(token: contextvars.Token[str | None]) -> None:
    _current.reset(token)


@contextlib.contextmanager
def request_scope(request_id: str | None = None) -> Iterator[str]:
    """Run the block as one operation: every rpc in it sends the same id, which it yields.

    `request_id` given: that id (ValueError unless `is_valid`). None: the enclosing scope's
    id if there is one (a nested operation is part of the outer one), else a fresh id.
    """
    if request_id is not None and not is_valid(request_id):
        raise ValueError(f"request id {request_id!r}: expected 1-128 characters of A-Z a-z 0-9 . _ : -")
    chosen = request_id or _current.get() or new_request_id()
    token = _current.set(chosen)
    try:
        yield chosen
    finally:
        _current.reset(token)
