"""Who is calling: the principal an rpc runs as, and the roles it holds.

The authentication interceptor (`prebake.server.auth`) resolves every call to a
`Principal` before the handler runs and binds it with `bind`; handlers, rate limits and
audit records read it with `current()`. Without authentication (the embedded default on
loopback) every caller is `ANONYMOUS`, which holds every role.

`current()` is a context variable: each rpc's task sees its own principal, and code run
on the server's thread pool through `ServerState.run_blocking` inherits it (asyncio
copies the context). Thread-safe.
"""

from __future__ import annotations

import contextvars
import enum
from dataclasses import dataclass


class Role(enum.StrEnum):
    """What a principal may do; each rpc names the roles that may call it."""

    # Look keys up, fetch artifacts, watch jobs (and, if configured, enqueue a miss).
    READER = "reader"
    # Lease, heartbeat, upload, complete and fail compile jobs.
    WORKER = "worker"
    # Publish artifacts compiled elsewhere.
    PUBLISHER = "publisher"
    # Delete, pin, replace, collect garbage, verify, import.
    ADMIN = "admin"


ALL_ROLES = frozenset(Role)


@dataclass(frozen=True)
class Principal:
    """A caller: a name for logs, limits and audit, and the roles it holds.

    `name` is the token entry's name, a client certificate's subject, "embedded" for the
    server's own in-process workers, or "anonymous". `authenticated` is False only for
    callers of a server without authentication.
    """

    name: str
    roles: frozenset[Role]
    authenticated: bool = True

    def has(self, role: Role) -> bool:
        return role in self.roles


ANONYMOUS = Principal("anonymous", ALL_ROLES, authenticated=False)

_current: contextvars.ContextVar[Principal] = contextvars.ContextVar("prebake_principal", default=ANONYMOUS)


def current() -> Principal:
    """The principal of the rpc being handled (ANONYMOUS outside one, or without auth)."""
    return _current.get()


def bind(principal: Principal) -> contextvars.Token[Principal]:
    """Make `principal` current for this task; pass the token to `unbind` when it ends."""
    return _current.set(principal)


def unbind(token: contextvars.Token[Principal]) -> None:
    _current.reset(token)
