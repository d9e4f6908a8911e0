"""What `prebake.server.app` needs to start a server with its configured security.

`ServerSecurity.from_config(config)` reads the token file and certificate files and
applies the listen policy, all before anything is opened, so a mistake is refused at
start-up with the file (and line) named:
* `interceptors`: the auth interceptor when a token file is configured, else none
  (every caller is ANONYMOUS);
* `credentials`: TLS server credentials, or None for plaintext;
* `mint_embedded_token()`: a token for the server's own in-process workers (principal
  "embedded", role worker), held in memory only; None without authentication;
* `add_local_port(server)`: with TLS, in-process workers cannot dial the TLS port (they
  hold no CA or client certificate), so the server also listens on a Unix socket in a
  fresh 0700 directory that only its own user can enter; returns the target to dial
  (and `close()` removes the directory). Without TLS the TCP address is used as is.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from prebake.server.auth.authenticator import Authenticator
from prebake.server.auth.interceptor import AuthInterceptor
from prebake.server.auth.listen_policy import check_anonymous_listen
from prebake.server.auth.tls import server_credentials
from prebake.server.config import ServerConfig
from prebake.server.principal import Role

EMBEDDED_PRINCIPAL = "embedded"


@dataclass
class ServerSecurity:
    authenticator: Authenticator | None
    credentials: grpc.ServerCredentials | None
    _local_dir: Path | None = field(default=None, init=False)

    @classmethod
    def from_config(cls, config: ServerConfig) -> ServerSecurity:
        """Read the configured files and check the listen policy (FailedPrecondition if refused)."""
        authenticator = (
            Authenticator(Path(config.auth_file), trust_certificates=bool(config.tls_client_ca))
            if config.auth_file
            else None
        )
        check_anonymous_listen(config.listen, authenticator is not None, config.insecure_allow_anonymous)
        credentials = (
            server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
            if config.tls_cert
            else None
        )
        return cls(authenticator, credentials)

    def interceptors(self) -> list[grpc.aio.ServerInterceptor[Any, Any]]:
        return [] if self.authenticator is None else [AuthInterceptor(self.authenticator)]

    def mint_embedded_token(self) -> str | None:
        if self.authenticator is None:
            return None
        return self.authenticator.mint(EMBEDDED_PRINCIPAL, {Role.WORKER})

    def add_local_port(self, server: grpc.aio.Server, address: str, private: bool = False) -> str:
        """The target in-process clients dial (see the module docstring). `private`: a
        socket of this process's own even without TLS (when serving processes share the
        TCP port, only this process knows the embedded workers' minted token)."""
        if self.credentials is None and not (private and self.authenticator is not None):
            return address
        self._local_dir = Path(tempfile.mkdtemp(prefix="prebake-"))
        target = f"unix:{self._local_dir / 'embedded.sock'}"
        server.add_insecure_port(target)
        return target

    def close(self) -> None:
        if self._local_dir is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(self._local_dir)
            self._local_dir = None
