"""Resolve a caller's credentials to a `Principal`, from the token file and in-memory tokens.

`Authenticator.principal(token, cert_subjects)`:
* a bearer token is hashed (SHA-256) and compared with every token entry in constant time
  (`hmac.compare_digest`, no early exit), and with the tokens minted in memory (`mint`,
  e.g. the embedded workers' one); no match is `Unauthenticated`;
* without a token, a verified client certificate whose subject an entry names
  (`cert_subject`) is that entry's principal; certificates count only when the server
  verifies them (`trust_certificates`, i.e. mutual TLS is on);
* neither is `Unauthenticated`.

The token file is re-read whenever its identity (device, inode, size, mtime) changes,
checked on every call (one `stat`), so `prebake token revoke` takes effect with the next
rpc and no restart. A file that becomes unreadable or malformed refuses every token and
certificate from it (fail closed, logged once per change) until it is fixed; minted
tokens keep working. Messages never contain a token.

Used from the server's event loop only (not thread-safe); the file is small, so reading
it inline is cheaper than a thread hop.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from prebake.core.errors import Unauthenticated
from prebake.server.auth.tokens import TokenEntry, TokenFileError, new_token, read_entries, token_hash
from prebake.server.principal import Principal, Role

log = logging.getLogger("prebake.server.auth")

NO_CREDENTIALS = (
    "this server requires authentication: send a token (prebake --token-file FILE or "
    "PREBAKE_TOKEN; Client(token=...)), or a client certificate the server knows; the "
    "server's operator makes tokens with `prebake token add`"
)
BAD_TOKEN = (
    "the token was not accepted (unknown, revoked or mistyped); ask the server's operator "
    "for a valid one (`prebake token list` shows the names in use)"
)
BROKEN_FILE = "the server's token file is unusable right now; ask its operator to check the server log"


@dataclass(frozen=True)
class _Snapshot:
    """One reading of the token file: its entries with their principals, made once."""

    identity: tuple[int, int, int, int] | None
    entries: tuple[tuple[TokenEntry, Principal], ...]
    error: str


def _principal(entry: TokenEntry) -> Principal:
    return Principal(entry.name, frozenset(Role(r) for r in entry.roles))


class Authenticator:
    """Who a caller is, from the token file at `path` and tokens minted in memory."""

    def __init__(self, path: Path, *, trust_certificates: bool = False) -> None:
        self.path = path
        self.trust_certificates = trust_certificates
        self._minted: list[tuple[str, Principal]] = []  # (token hash, principal)
        self._snapshot = _Snapshot(None, (), "not read yet")
        self._refresh()
        if self._snapshot.error:
            # At start-up a broken file is the operator's mistake to fix now.
            raise TokenFileError(self._snapshot.error)

    def mint(self, name: str, roles: Iterable[Role]) -> str:
        """A new token for an in-process caller, valid until the server stops (never stored)."""
        token = new_token()
        self._minted.append((token_hash(token), Principal(name, frozenset(roles))))
        return token

    def _identity(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def _refresh(self) -> None:
        identity = self._identity()
        if identity is not None and identity == self._snapshot.identity:
            return
        try:
            entries = tuple((e, _principal(e)) for e in read_entries(self.path))
        except TokenFileError as exc:
            if str(exc) != self._snapshot.error:
                log.error("token file refused, no token from it is accepted until it is fixed: %s", exc)
            self._snapshot = _Snapshot(identity, (), str(exc))
            return
        if self._snapshot.identity is not None or self._snapshot.error != "not read yet":
            log.info("token file %s re-read: %d entries", self.path, len(entries))
        self._snapshot = _Snapshot(identity, entries, "")

    def principal(self, token: str | None, cert_subjects: Iterable[str] = ()) -> Principal:
        """The caller's principal; Unauthenticated (with what to do) if there is none."""
        self._refresh()
        snapshot = self._snapshot
        if token is not None:
            presented = token_hash(token)
            found: Principal | None = None
            # Compare against every entry, whatever matches, so timing says nothing.
            for stored, minted in self._minted:
                if hmac.compare_digest(stored, presented):
                    found = minted
            for entry, principal in snapshot.entries:
                if entry.sha256 and hmac.compare_digest(entry.sha256, presented):
                    found = principal
            if found is not None:
                return found
            raise Unauthenticated(BROKEN_FILE if snapshot.error else BAD_TOKEN)
        if self.trust_certificates:
            subjects = {_normalise_subject(s) for s in cert_subjects}
            for entry, principal in snapshot.entries:
                if entry.cert_subject and _normalise_subject(entry.cert_subject) in subjects:
                    return principal
        raise Unauthenticated(BROKEN_FILE if snapshot.error else NO_CREDENTIALS)


def _normalise_subject(subject: str) -> tuple[str, ...]:
    """A subject for comparison: its attributes, stripped and in a fixed order.

    TLS reports subjects in RFC 4514 order (the last RDN first: "O=org,CN=name"), people
    write them either way ("CN=name, O=org"); both name the same certificate here. The
    client CA vouches for the whole subject, so order carries no authority.
    """
    return tuple(sorted(part.strip() for part in subject.split(",") if part.strip()))
