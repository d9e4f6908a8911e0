"""Authorization rules that depend on a request's fields, beyond `RPC_ROLES`.

* `PublishArtifact` with `replace` needs the admin role (a publisher may add artifacts,
  not swap the files of one deploy hosts already run). Replacing a pinned artifact also
  needs the request's `force` (enforced where the existing artifact is read, in
  `JobLifecycle.publish`, for every caller including admins).
* A lookup's miss may enqueue a compile job for a caller holding only `reader` only if
  the configuration's `reader_may_enqueue` is on (the default); publishers and admins
  always may. Otherwise the lookup answers the miss without creating a job and says why.

Each reads the current principal (`prebake.server.principal.current`); without
authentication that is ANONYMOUS, who holds every role, so nothing changes.
"""

from __future__ import annotations

from prebake.core.errors import PermissionDenied
from prebake.server.principal import Principal, Role, current

ENQUEUE_REFUSED = (
    "no artifact for this key; no job was created: this server lets readers only look up "
    "(reader_may_enqueue is off); ask a publisher or admin to enqueue the compile, or use a "
    "token with one of those roles"
)


def require_replace_allowed(replace: bool) -> None:
    """PermissionDenied unless the caller may `replace` (only admins may)."""
    principal = current()
    if replace and not principal.has(Role.ADMIN):
        raise PermissionDenied(
            f"{principal.name!r} may not replace an artifact: replace needs the admin role "
            "(publish without replace, or ask an admin)"
        )


def may_enqueue(reader_may_enqueue: bool, principal: Principal | None = None) -> bool:
    """Whether the caller's lookup may create a compile job on a miss."""
    who = current() if principal is None else principal
    return reader_may_enqueue or who.has(Role.PUBLISHER) or who.has(Role.ADMIN)
