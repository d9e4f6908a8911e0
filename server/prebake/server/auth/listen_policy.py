"""No anonymous server where others can reach it.

A write to the cache is code execution on every deploy host, so a server without
authentication may listen only on a loopback address (127.0.0.0/8, ::1, localhost),
unless the operator says `insecure_allow_anonymous` explicitly; then it starts with a
loud warning in the log. Pure functions; thread-safe.
"""

from __future__ import annotations

import ipaddress
import logging

from prebake.core.errors import FailedPrecondition

log = logging.getLogger("prebake.server.auth")


def is_loopback(listen: str) -> bool:
    """Whether "HOST:PORT" binds only loopback ("0.0.0.0", "[::]", ":PORT" and names other than
    localhost do not)."""
    host = listen.rpartition(":")[0].strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_anonymous_listen(listen: str, authenticated: bool, allow_anonymous: bool) -> None:
    """Refuse (FailedPrecondition) an unauthenticated server on a non-loopback address,
    unless allowed explicitly, in which case log a warning."""
    if authenticated or is_loopback(listen):
        return
    if not allow_anonymous:
        raise FailedPrecondition(
            f"refusing to listen on {listen} without authentication: anyone who reaches it could "
            "replace the artifacts deploy hosts run. Pass --auth-file FILE (make tokens with "
            "`prebake token add FILE --role ROLE --name NAME`), listen on 127.0.0.1, or, on a "
            "network you trust completely, --insecure-allow-anonymous"
        )
    banner = "!" * 78
    log.warning(
        "\n%s\nINSECURE: serving %s WITHOUT AUTHENTICATION (--insecure-allow-anonymous).\n"
        "Anyone who reaches this address may publish, replace and delete artifacts that deploy\n"
        "hosts load and run. Use --auth-file FILE unless this network is trusted completely.\n%s",
        banner,
        listen,
        banner,
    )
