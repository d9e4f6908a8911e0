"""What a client presents to a server: a bearer token, and TLS material.

`Credentials` is immutable and holds the bytes, read once (`Credentials.load`), so that
a replacement channel (see `channel.Connection`) never re-reads files. A channel is
secure (TLS) when a CA bundle or a client certificate is given; the token, when given,
is sent as `authorization: Bearer <token>` metadata on every rpc, on a plaintext
loopback channel too (an interceptor adds it). `repr` never shows the token or the key.

Failures to read a file are `InvalidArgument` naming the file (never its content).
Thread-safe.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from prebake.core.errors import InvalidArgument


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument(
            f"cannot read the {what} {path}: {exc.strerror or type(exc).__name__}"
        ) from None


def read_token_file(path: str | Path) -> str:
    """The token in a file (its first non-blank line, stripped); InvalidArgument if none."""
    text = _read(path, "token file").decode("utf-8", "replace")
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    raise InvalidArgument(f"the token file {path} is empty")


@dataclass(frozen=True)
class Credentials:
    """A token and/or TLS material (PEM bytes); the default is none (plaintext, anonymous)."""

    token: str | None = field(default=None, repr=False)
    ca_bundle: bytes | None = field(default=None, repr=False)
    client_cert: bytes | None = field(default=None, repr=False)
    client_key: bytes | None = field(default=None, repr=False)

    @classmethod
    def load(
        cls,
        token: str | None = None,
        ca_bundle: str | Path | None = None,
        client_cert: str | Path | None = None,
        client_key: str | Path | None = None,
    ) -> Credentials:
        """Read the named PEM files. InvalidArgument for an unreadable file, a certificate
        without its key (or the reverse), or a token with whitespace or control characters."""
        if (client_cert is None) != (client_key is None):
            raise InvalidArgument("a client certificate needs its key, and a key its certificate: give both")
        if token is not None and (
            not token or not token.isprintable() or token != token.strip() or " " in token
        ):
            raise InvalidArgument(
                "the token is empty or holds spaces or control characters; check how it was copied"
            )
        return cls(
            token=token,
            ca_bundle=None if ca_bundle is None else _read(ca_bundle, "CA bundle"),
            client_cert=None if client_cert is None else _read(client_cert, "client certificate"),
            client_key=None if client_key is None else _read(client_key, "client key"),
        )

    @property
    def secure(self) -> bool:
        """Whether channels use TLS."""
        return self.ca_bundle is not None or self.client_cert is not None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata that carries the token (empty without one)."""
        return () if self.token is None else (("authorization", f"Bearer {self.token}"),)


ENV_TOKEN = "PREBAKE_TOKEN"
ENV_TOKEN_FILE = "PREBAKE_TOKEN_FILE"
ENV_CA_BUNDLE = "PREBAKE_CA_BUNDLE"
ENV_CLIENT_CERT = "PREBAKE_CLIENT_CERT"
ENV_CLIENT_KEY = "PREBAKE_CLIENT_KEY"


def from_settings(
    environ: Mapping[str, str],
    *,
    token: str | None = None,
    token_file: str | None = None,
    ca_bundle: str | None = None,
    client_cert: str | None = None,
    client_key: str | None = None,
) -> Credentials:
    """The credentials of command-line settings (None: not given), else the environment.

    The token: `token`, else `token_file`'s, else $PREBAKE_TOKEN, else $PREBAKE_TOKEN_FILE's.
    Files: the setting, else $PREBAKE_CA_BUNDLE / $PREBAKE_CLIENT_CERT / $PREBAKE_CLIENT_KEY.
    """
    if token is None and token_file:
        token = read_token_file(token_file)
    if token is None and environ.get(ENV_TOKEN):
        token = environ[ENV_TOKEN].strip()
    if token is None and environ.get(ENV_TOKEN_FILE):
        token = read_token_file(environ[ENV_TOKEN_FILE])
    return Credentials.load(
        token,
        ca_bundle or environ.get(ENV_CA_BUNDLE) or None,
        client_cert or environ.get(ENV_CLIENT_CERT) or None,
        client_key or environ.get(ENV_CLIENT_KEY) or None,
    )
