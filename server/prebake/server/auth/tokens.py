"""The token file: who may call a server, one JSON object per line.

Format (UTF-8, one entry per line; blank lines and lines starting with `#` are ignored):

    {"name": "deploy-fleet", "roles": ["reader"], "sha256": "<64 hex>", "created": "2026-12-02T06:30:00Z"}
    {"name": "worker-1", "roles": ["worker"], "cert_subject": "CN=worker-1", "created": "..."}

* `name`: unique in the file; the principal's name in logs, limits and audit.
* `roles`: one or more of reader, worker, publisher, admin.
* exactly one of `sha256` (the SHA-256, hex, of the bearer token; the token itself is
  never stored) or `cert_subject` (a client certificate's subject as TLS reports it,
  e.g. "CN=worker-1,O=prebake", attributes in any order; honoured only by a server that
  verifies client certificates, `--tls-client-ca`).
* `created`: when the entry was added (ISO 8601, UTC), for people.

Tokens are `secrets.token_urlsafe(32)` (256 random bits) behind a `pbk_` prefix that
secret scanners can match: a plain SHA-256 is then an adequate stored hash (no
dictionary can reach such a token), and comparisons use `hmac.compare_digest`.

Edits (`add_entry`, `revoke_entry`) rewrite the file atomically (a temporary file in the
same directory, fsynced, renamed over it) with mode 0600, so a server re-reading it never
sees half a file. They are not safe against two concurrent edits of one file (the last
rename wins); run them one at a time. Reading is thread-safe.

Standard library only (the `prebake token` command loads this module).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import secrets
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from prebake.core.errors import FailedPrecondition, InvalidArgument

ROLE_NAMES = ("reader", "worker", "publisher", "admin")
TOKEN_PREFIX = "pbk_"
MAX_NAME = 128
_HEX = frozenset("0123456789abcdef")


class TokenFileError(FailedPrecondition):
    """The token file cannot be used; the message names the file (and line) and what is wrong."""


@dataclass(frozen=True)
class TokenEntry:
    """One line of the token file. Exactly one of `sha256` and `cert_subject` is set."""

    name: str
    roles: tuple[str, ...]
    sha256: str = ""
    cert_subject: str = ""
    created: str = ""

    def to_line(self) -> str:
        record: dict[str, object] = {"name": self.name, "roles": list(self.roles)}
        if self.sha256:
            record["sha256"] = self.sha256
        if self.cert_subject:
            record["cert_subject"] = self.cert_subject
        record["created"] = self.created
        return json.dumps(record, separators=(", ", ": "))


def new_token() -> str:
    """A fresh bearer token: 256 random bits, URL-safe, with the `pbk_` prefix."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """The stored form of a token: SHA-256, lowercase hex."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def check_name(name: str) -> str:
    """`name` if usable as an entry name; InvalidArgument saying why not."""
    if not name or len(name) > MAX_NAME or not name.isprintable() or name != name.strip():
        raise InvalidArgument(
            f"name {name!r}: expected 1-{MAX_NAME} printable characters without leading or trailing spaces"
        )
    return name


def check_roles(roles: Iterable[str]) -> tuple[str, ...]:
    """The roles, deduplicated in the canonical order; InvalidArgument for an unknown or no role."""
    given = list(roles)
    unknown = sorted(set(given) - set(ROLE_NAMES))
    if unknown or not given:
        raise InvalidArgument(f"roles {unknown or given}: expected one or more of {', '.join(ROLE_NAMES)}")
    return tuple(r for r in ROLE_NAMES if r in given)


def parse_line(text: str, where: str) -> TokenEntry:
    """One entry from its line; TokenFileError naming `where` ("FILE:LINE") if malformed."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TokenFileError(f"{where}: not a JSON object ({exc.msg})") from None
    if not isinstance(record, dict):
        raise TokenFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - {"name", "roles", "sha256", "cert_subject", "created"})
    if unknown:
        raise TokenFileError(f"{where}: unknown fields {unknown}")
    name, roles = record.get("name"), record.get("roles")
    sha256, subject = record.get("sha256", ""), record.get("cert_subject", "")
    created = record.get("created", "")
    if not isinstance(name, str) or not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise TokenFileError(f'{where}: needs "name" (a string) and "roles" (a list of role names)')
    if not isinstance(sha256, str) or not isinstance(subject, str) or not isinstance(created, str):
        raise TokenFileError(f'{where}: "sha256", "cert_subject" and "created" must be strings')
    try:
        check_name(name)
        checked_roles = check_roles(roles)
    except InvalidArgument as exc:
        raise TokenFileError(f"{where}: {exc}") from None
    if bool(sha256) == bool(subject):
        raise TokenFileError(f'{where}: entry {name!r} needs exactly one of "sha256" and "cert_subject"')
    if sha256 and (len(sha256) != 64 or not set(sha256) <= _HEX):
        raise TokenFileError(f'{where}: entry {name!r}: "sha256" must be 64 lowercase hex digits')
    return TokenEntry(name, checked_roles, sha256, subject.strip(), created)


def read_entries(path: Path) -> list[TokenEntry]:
    """Every entry of the token file; TokenFileError naming the file and line if unusable.

    A missing file is an error (a server told to authenticate must not serve everyone
    because a path is wrong). Duplicate names are an error.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise TokenFileError(f"cannot read token file {path}: {reason}") from None
    return parse_entries(text, str(path))


def parse_entries(text: str, source: str) -> list[TokenEntry]:
    entries: list[TokenEntry] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        entry = parse_line(stripped, f"{source}:{number}")
        if entry.name in seen:
            raise TokenFileError(
                f"{source}:{number}: name {entry.name!r} is already used on line {seen[entry.name]}"
            )
        seen[entry.name] = number
        entries.append(entry)
    return entries


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def add_entry(path: Path, name: str, roles: Sequence[str], cert_subject: str = "") -> str | None:
    """Append an entry to the token file (created, 0600, if missing); return its new token.

    With `cert_subject` the entry names a client certificate instead and no token is
    made (returns None). Raises InvalidArgument for a bad name or role or a name in use (nothing is
    written), TokenFileError if the file is unusable.
    """
    check_name(name)
    checked = check_roles(roles)
    existing = read_entries(path) if path.exists() else []
    if any(e.name == name for e in existing):
        raise InvalidArgument(
            f"{path}: an entry named {name!r} exists already; revoke it first or pick another name"
        )
    token = None if cert_subject else new_token()
    entry = TokenEntry(
        name,
        checked,
        sha256="" if token is None else token_hash(token),
        cert_subject=cert_subject.strip(),
        created=_now(),
    )
    _rewrite(path, [*(e.to_line() for e in existing), entry.to_line()])
    return token


def revoke_entry(path: Path, name: str) -> TokenEntry:
    """Remove the entry named `name`; return it. InvalidArgument if there is none."""
    entries = read_entries(path)
    gone = [e for e in entries if e.name == name]
    if not gone:
        known = ", ".join(e.name for e in entries) or "none"
        raise InvalidArgument(f"{path}: no entry named {name!r} (entries: {known})")
    kept = [e for e in entries if e.name != name]
    _rewrite(path, [e.to_line() for e in kept])
    return gone[0]


def _rewrite(path: Path, lines: list[str]) -> None:
    """Replace the file with `lines` atomically, mode 0600; comments of the old file are kept."""
    comments: list[str] = []
    with contextlib.suppress(OSError):
        comments = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip().startswith("#")]
    body = "".join(f"{line}\n" for line in (*comments, *lines))
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise TokenFileError(
            f"cannot write token file {path}: {exc.strerror or type(exc).__name__}"
        ) from None
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(body)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
