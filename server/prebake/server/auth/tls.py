"""Server TLS credentials from the configured certificate files.

`tls_cert` and `tls_key` (PEM) turn TLS on; `tls_client_ca` (PEM bundle) turns on mutual
TLS: every client must present a certificate signed by one of those CAs, verified during
the handshake (a client without one never reaches an rpc). A verified certificate's
subject may stand for a token-file entry (`cert_subject`). Reading fails with
FailedPrecondition naming the file.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from prebake.core.errors import FailedPrecondition


def read_pem(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise FailedPrecondition(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise FailedPrecondition(f"the {what} {path} is not PEM (no -----BEGIN line)")
    return data


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials:
    """Credentials for `add_secure_port`: the server's chain and key, and the client CAs."""
    chain = read_pem(cert, "TLS certificate (tls_cert)")
    private = read_pem(key, "TLS key (tls_key)")
    roots = read_pem(client_ca, "client CA bundle (tls_client_ca)") if client_ca else None
    return grpc.ssl_server_credentials(
        [(private, chain)], root_certificates=roots, require_client_auth=roots is not None
    )
