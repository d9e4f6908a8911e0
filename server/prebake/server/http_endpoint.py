"""The metrics port: Prometheus metrics at /metrics and the status page at / over HTTP.

`MetricsEndpoint.bind(...)` binds `metrics_listen` (port 0 picks a free port), `start()`
serves it on a thread of its own (the standard library's `ThreadingHTTPServer`, one
thread per request), `stop()` ends it. Nothing of a request runs on the gRPC event loop
but the reads themselves: the registry queries, `metrics.exposition` and the token check
are submitted to the loop (`asyncio.run_coroutine_threadsafe`) and waited for at most
`LOOP_TIMEOUT_SECONDS` (then 503); rendering happens on the request's thread.

Routes (GET and HEAD): `/` the status page (`?kind=&model=&instance_type=&job_state=` and
the page tokens `artifacts_page`, `jobs_page`), `/jobs/JOB_ID` one job with its events and
compile log, `/metrics`. Anything else is 404, a bad query value 400 with what is
accepted; an unexpected error is logged and answered 500 without details. Responses
forbid scripts and outside resources (Content-Security-Policy) and caching.

Access follows the gRPC port's rule (`check_metrics_listen`): without a token file only a
loopback address, unless `insecure_allow_anonymous`; with one, every request needs a token
holding the reader (or admin) role, as `Authorization: Bearer TOKEN` (Prometheus'
`authorization` setting) or as the password of HTTP basic authentication (browsers ask
for it). With `tls_cert`/`tls_key` the port serves HTTPS with the same certificate, and
with `tls_client_ca` it requires client certificates signed by those CAs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import logging
import socket
import socketserver
import ssl
import threading
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TypeVar

from prebake.core.errors import FailedPrecondition, InvalidArgument, NotFound, PrebakeError, Unauthenticated
from prebake.server import metrics, status_data, status_page
from prebake.server.auth.authenticator import Authenticator
from prebake.server.auth.listen_policy import is_loopback
from prebake.server.config import ServerConfig
from prebake.server.exclusive_bind import CannotListen, listening_owners
from prebake.server.hit_history import HitHistory
from prebake.server.principal import Role
from prebake.server.state import ServerState

log = logging.getLogger("prebake.server.http")

T = TypeVar("T")
LOOP_TIMEOUT_SECONDS = 10.0
HTML = "text/html; charset=utf-8"
SECURITY_HEADERS = {
    # No script, frame, plugin or outside resource: escaped text stays text even if a
    # value slipped through unescaped.
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    # Page tokens and filters are in the URLs.
    "Referrer-Policy": "no-referrer",
}
READ_ROLES = frozenset({Role.READER, Role.ADMIN})


def check_metrics_listen(config: ServerConfig, authenticated: bool) -> None:
    """Refuse (FailedPrecondition) a non-loopback `metrics_listen` without a token file unless
    `insecure_allow_anonymous`, in which case warn. Nothing to check when it is off."""
    listen = config.metrics_listen
    if not listen or authenticated or is_loopback(listen):
        return
    if not config.insecure_allow_anonymous:
        raise FailedPrecondition(
            f"refusing to serve metrics and the status page on {listen} without authentication: "
            "they show artifact names, workers and compile logs to anyone who reaches it. Pass "
            "--auth-file FILE (requests then need a reader token), use a loopback address such as "
            "127.0.0.1, or, on a network you trust completely, --insecure-allow-anonymous"
        )
    log.warning("INSECURE: metrics and status page on %s WITHOUT AUTHENTICATION", listen)


@dataclass(frozen=True)
class Response:
    status: HTTPStatus
    body: bytes
    content_type: str = HTML
    headers: Mapping[str, str] = field(default_factory=dict)


def _error(status: HTTPStatus, message: str, headers: Mapping[str, str] | None = None) -> Response:
    page = status_page.error_page(status.value, status.phrase, message)
    return Response(status, page.encode(), headers=headers or {})


def presented_token(authorization: str | None) -> str | None:
    """The token of an `Authorization` header: `Bearer TOKEN`, or basic authentication with
    the token as password (any user name); None without the header. Unauthenticated for a
    header of another shape."""
    if authorization is None:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return value
    if scheme.lower() == "basic" and value:
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise Unauthenticated("the basic authorization header is not base64 of USER:TOKEN") from None
        _, sep, password = decoded.partition(":")
        if sep and password:
            return password
    raise Unauthenticated("send 'Authorization: Bearer TOKEN', or the token as the basic-auth password")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    endpoint: MetricsEndpoint

    def handle_error(self, request: object, client_address: object) -> None:
        # A connection that broke off or failed its TLS handshake; nothing was answered.
        log.debug("metrics port connection from %s failed", client_address, exc_info=True)

    def server_bind(self) -> None:
        # HTTPServer's own server_bind asks DNS for the host's full name; nothing here needs it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    server_version = "prebake"
    sys_version = ""

    def do_GET(self) -> None:
        self._answer(head=False)

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def _answer(self, *, head: bool) -> None:
        try:
            response = self.server.endpoint.respond(self.path, self.headers.get("Authorization"))
        except Exception:
            log.exception("status page request %r failed", self.path[:200])
            response = _error(
                HTTPStatus.INTERNAL_SERVER_ERROR, "internal error; the server log has the details"
            )
        self.send_response(response.status)
        for name, value in {**SECURITY_HEADERS, **response.headers}.items():
            self.send_header(name, value)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if not head:
            self.wfile.write(response.body)

    def log_message(self, format: str, *args: object) -> None:  # the base class's name
        log.debug("%s %s", self.address_string(), format % args)


class MetricsEndpoint:
    """The HTTP listener of one server (see the module docstring). `address` is the bound
    HOST:PORT. Thread-safe: `respond` runs on request threads, everything it reads is read
    on `loop`."""

    def __init__(
        self,
        httpd: _HTTPServer,
        state: ServerState,
        history: HitHistory,
        loop: asyncio.AbstractEventLoop,
        authenticator: Authenticator | None,
    ) -> None:
        self._httpd = httpd
        httpd.endpoint = self
        self.state = state
        self.history = history
        self._loop = loop
        self._authenticator = authenticator
        self._thread: threading.Thread | None = None
        host = str(httpd.server_address[0])
        self.address = (
            f"[{host}]:{httpd.server_address[1]}" if ":" in host else f"{host}:{httpd.server_address[1]}"
        )
        self.scheme = "https" if isinstance(httpd.socket, ssl.SSLSocket) else "http"

    @classmethod
    def bind(
        cls,
        config: ServerConfig,
        state: ServerState,
        history: HitHistory,
        loop: asyncio.AbstractEventLoop,
        authenticator: Authenticator | None,
    ) -> MetricsEndpoint:
        """Bind `config.metrics_listen` (not serving yet). CannotListen if the port is taken
        (naming its owner where it can) or the address cannot be bound; FailedPrecondition
        for unusable TLS files."""
        host, _, port_text = config.metrics_listen.rpartition(":")
        host = host.strip("[]")
        server_class = _HTTPServer6 if ":" in host else _HTTPServer
        try:
            httpd = server_class((host, int(port_text)), _Handler)
        except OSError as exc:
            owners = listening_owners(int(port_text)) if exc.errno == errno.EADDRINUSE else []
            who = (
                f": port {port_text} is in use by " + "; ".join(o.describe() for o in owners)
                if owners
                else ""
            )
            raise CannotListen(
                f"cannot serve metrics on {config.metrics_listen}{who} ({exc.strerror or exc}); "
                "choose another --metrics-listen address"
            ) from exc
        if config.tls_cert:
            try:
                httpd.socket = _tls_context(config).wrap_socket(
                    httpd.socket, server_side=True, do_handshake_on_connect=False
                )
            except (OSError, ssl.SSLError) as exc:
                httpd.server_close()
                raise FailedPrecondition(f"cannot serve metrics over TLS: {exc}") from exc
        return cls(httpd, state, history, loop, authenticator)

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="prebake-http", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting requests and close the port (blocking; requests in progress end on
        their own threads)."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()

    # --- requests ----------------------------------------------------------------------------

    def _on_loop(self, make: Callable[[], Awaitable[T]]) -> T:
        async def run() -> T:
            return await make()

        future = asyncio.run_coroutine_threadsafe(run(), self._loop)
        try:
            return future.result(LOOP_TIMEOUT_SECONDS)
        except TimeoutError:
            future.cancel()
            raise

    def _admit(self, authorization: str | None) -> Response | None:
        """None if the request may proceed, else the 401/403 to send."""
        authenticator = self._authenticator
        if authenticator is None:
            return None
        challenge = {"WWW-Authenticate": 'Basic realm="prebake", charset="UTF-8"'}
        try:
            token = presented_token(authorization)
            if token is None:
                raise Unauthenticated(
                    "this server requires a token with the reader role: the password of basic "
                    "authentication, or 'Authorization: Bearer TOKEN'"
                )

            async def principal() -> frozenset[Role]:
                return authenticator.principal(token).roles

            roles = self._on_loop(principal)
        except Unauthenticated as exc:
            return _error(HTTPStatus.UNAUTHORIZED, exc.details, challenge)
        if not roles & READ_ROLES:
            return _error(HTTPStatus.FORBIDDEN, "this token does not hold the reader or admin role")
        return None

    def respond(self, target: str, authorization: str | None) -> Response:
        """The response to `GET target`."""
        refused = self._admit(authorization)
        if refused is not None:
            return refused
        url = urllib.parse.urlsplit(target)
        try:
            return self._route(url.path, url.query)
        except InvalidArgument as exc:
            return _error(HTTPStatus.BAD_REQUEST, exc.details)
        except NotFound as exc:
            return _error(HTTPStatus.NOT_FOUND, exc.details)
        except TimeoutError:
            return _error(
                HTTPStatus.SERVICE_UNAVAILABLE, "the server is too busy to answer now; retry shortly"
            )
        except PrebakeError as exc:
            if exc.code != "UNAVAILABLE":
                raise
            return _error(HTTPStatus.SERVICE_UNAVAILABLE, exc.details)

    def _route(self, path: str, query: str) -> Response:
        s = self.state
        if path == "/":
            params = urllib.parse.parse_qs(query, keep_blank_values=True, max_num_fields=32)
            wanted = status_data.parse_overview_query(params)
            overview = self._on_loop(lambda: status_data.overview(s, self.history, wanted))
            return Response(HTTPStatus.OK, status_page.render_overview(overview).encode())
        if path == "/metrics":
            # scrape: the storage gauges read now, not as of the last periodic refresh.
            body, content_type = self._on_loop(lambda: metrics.scrape(s))
            return Response(HTTPStatus.OK, body, content_type)
        if path.startswith("/jobs/"):
            job_id = status_data.parse_job_id(urllib.parse.unquote(path.removeprefix("/jobs/")))
            detail = self._on_loop(lambda: status_data.job_detail(s, job_id))
            return Response(HTTPStatus.OK, status_page.render_job(detail).encode())
        raise NotFound(f"nothing at {path[:200]}; the status page is at / and the metrics at /metrics")


def _tls_context(config: ServerConfig) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    if config.tls_client_ca:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(config.tls_client_ca)
    return context
