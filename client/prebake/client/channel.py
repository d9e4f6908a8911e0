"""Channel creation, bounded retries and idle detection for streams.

Policy, in one place:
* Only UNAVAILABLE is retried automatically (the contract marks it transient for every
  rpc); every other status is an answer and is raised as is.
* Retries are bounded, with exponential backoff and jitter, so a fleet of booting
  instances does not hammer a restarting server in lockstep.
* Unary calls carry a deadline (the client's `timeout`). Streams carry none, since a
  multi-GiB transfer has no natural bound; instead an `IdleWatchdog` cancels a stream
  that makes no progress for a while, and the caller resumes it from where it was.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import grpc

from prebake.client.credentials import Credentials
from prebake.client.errors import InvalidArgument, from_rpc_error
from prebake.core import request_ids
from prebake.core.request_ids import REQUEST_ID_HEADER
from prebake.v1 import (
    admin_pb2_grpc,
    blobs_pb2_grpc,
    catalog_pb2_grpc,
    jobs_pb2_grpc,
    registry_pb2_grpc,
    workers_pb2_grpc,
)

T = TypeVar("T")

MAX_MESSAGE_BYTES = 16 << 20
# Pings detect a dead peer on a quiet stream (a job watch during a long compile). The
# prebake server accepts them every 10 s (`min_ping_interval_without_data_ms`); a
# server with gRPC's default policy (5 min) would answer GOAWAY "too_many_pings", which
# the client survives as an UNAVAILABLE and reconnects.
KEEPALIVE_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000


class _ClientCallDetails(grpc.ClientCallDetails):
    def __init__(
        self, details: grpc.ClientCallDetails, metadata: tuple[tuple[str, str | bytes], ...]
    ) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


# The interceptor bases are generic only in the type stubs (not subscriptable at run time).
class _MetadataInterceptor(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """Adds fixed metadata (the bearer token) and the request id to every call of a channel.

    The request id (`x-request-id`) is the current `prebake.core.request_ids` scope's, or a
    fresh one for a call outside any scope; a call that already carries one keeps it.
    """

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        given = tuple(details.metadata or ())
        if any(key == REQUEST_ID_HEADER for key, _ in given):
            return _ClientCallDetails(details, (*given, *self._metadata))
        rid = request_ids.current() or request_ids.new_request_id()
        return _ClientCallDetails(details, (*given, *self._metadata, (REQUEST_ID_HEADER, rid)))

    def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request_iterator)


# What a target may start with besides HOST:PORT: gRPC's own name resolvers. A URL scheme
# (http://, grpc://) is none of them; gRPC would try to resolve it as a host name and
# answer "Misformatted domain name" only after every retry.
TARGET_FORMS = "HOST:PORT, [IPv6]:PORT, unix:PATH, dns:HOST:PORT, ipv4:ADDR:PORT or ipv6:[ADDR]:PORT"
_RESOLVER_SCHEMES = ("dns", "unix", "unix-abstract", "ipv4", "ipv6", "vsock")
_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)")


def check_target(target: str) -> str:
    """`target` if it is an address gRPC can dial (see TARGET_FORMS), else InvalidArgument.

    The message names the accepted forms and, for a URL, the address it probably meant
    (TLS is --ca-bundle / `ca_bundle`, never https://).
    """
    url = _URL.fullmatch(target.strip())
    if not target.strip():
        raise InvalidArgument(f"the server address is empty; give {TARGET_FORMS}")
    if url is None or url["scheme"].lower() in _RESOLVER_SCHEMES:
        return target
    meant = url["rest"].split("/", 1)[0]
    hint = f" (did you mean {meant!r}?)" if meant else ""
    tls = (
        " TLS comes from a CA bundle (--ca-bundle), not from https://."
        if url["scheme"].lower().endswith("s")
        else ""
    )
    raise InvalidArgument(f"server address {target!r} is a URL; give {TARGET_FORMS}{hint}.{tls}")


def create_channel(target: str, credentials: Credentials | None = None) -> grpc.Channel:
    """A channel to `target` ("host:port"; see `check_target`) with prebake's message limits.

    TLS when `credentials` carry a CA bundle or a client certificate (else plaintext);
    their token, if any, goes with every call as `authorization: Bearer` metadata, and
    every call carries an `x-request-id` (see `_MetadataInterceptor`).
    """
    check_target(target)
    creds = credentials or Credentials()
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 0),
        # gRPC stops pinging after 2 pings without data by default; a watch may be silent long.
        ("grpc.http2.max_pings_without_data", 0),
        # Channels share connections through a global pool unless told otherwise; a
        # replacement channel (see Connection) must really open a new connection.
        ("grpc.use_local_subchannel_pool", 1),
    ]
    if creds.secure:
        tls = grpc.ssl_channel_credentials(creds.ca_bundle, creds.client_key, creds.client_cert)
        channel = grpc.secure_channel(target, tls, options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    return grpc.intercept_channel(channel, _MetadataInterceptor(creds.metadata))


@dataclass(frozen=True)
class Stubs:
    """One channel and a stub per service on it."""

    channel: grpc.Channel
    registry: registry_pb2_grpc.RegistryStub
    blobs: blobs_pb2_grpc.BlobsStub
    jobs: jobs_pb2_grpc.JobsStub
    admin: admin_pb2_grpc.AdminStub
    workers: workers_pb2_grpc.WorkersStub
    catalog: catalog_pb2_grpc.CatalogStub

    @classmethod
    def open(cls, target: str, credentials: Credentials | None = None) -> Stubs:
        channel = create_channel(target, credentials)
        return cls(
            channel=channel,
            registry=registry_pb2_grpc.RegistryStub(channel),
            blobs=blobs_pb2_grpc.BlobsStub(channel),
            jobs=jobs_pb2_grpc.JobsStub(channel),
            admin=admin_pb2_grpc.AdminStub(channel),
            workers=workers_pb2_grpc.WorkersStub(channel),
            catalog=catalog_pb2_grpc.CatalogStub(channel),
        )


class Connection:
    """A client's channel to one server, replaced when a stream stalls on it.

    A connection silently dropped by a NAT or load balancer keeps every new call on it
    stalled too, until keepalive gives up on it (tens of seconds). When an idle
    watchdog fires, the caller hands back the stubs it used and `replace` swaps in a
    channel on a fresh connection, once per stale channel however many threads notice.
    The stale channel is closed with the Connection, not at once: other threads may
    still be finishing calls on it. Thread-safe.
    """

    def __init__(self, target: str, credentials: Credentials | None = None) -> None:
        self._target = target
        self._credentials = credentials
        self._lock = threading.Lock()
        self._stubs = Stubs.open(target, credentials)
        self._retired: list[grpc.Channel] = []

    @property
    def stubs(self) -> Stubs:
        return self._stubs

    def replace(self, stale: Stubs) -> None:
        with self._lock:
            if self._stubs is stale:
                # Two generations back, any call still on a channel has stalled on it
                # long since: close those rather than keep them for the client's life.
                for old in self._retired[:-1]:
                    old.close()
                self._retired = [*self._retired[-1:], stale.channel]
                self._stubs = Stubs.open(self._target, self._credentials)

    def close(self) -> None:
        with self._lock:
            for channel in (*self._retired, self._stubs.channel):
                channel.close()
            self._retired.clear()


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently UNAVAILABLE is retried.

    `retries` is the number of attempts after the first one. The pause before retry
    n (0-based) is drawn uniformly from [b/2, b] with b = min(max_backoff,
    initial_backoff * multiplier**n).
    """

    retries: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0

    def backoff(self, retry: int) -> float:
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier**retry)
        return random.uniform(ceiling / 2, ceiling)


def is_unavailable(err: BaseException) -> bool:
    return isinstance(err, grpc.RpcError) and _status(err) is grpc.StatusCode.UNAVAILABLE


def status_of(err: BaseException) -> grpc.StatusCode | None:
    """The status code of a failed rpc, or None for any other exception."""
    return _status(err) if isinstance(err, grpc.RpcError) else None


def _status(err: grpc.RpcError) -> grpc.StatusCode | None:
    code = getattr(err, "code", None)
    value = code() if callable(code) else None
    return value if isinstance(value, grpc.StatusCode) else None


def call_with_retry(
    fn: Callable[[], T],
    policy: RetryPolicy,
    target: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run `fn`, retrying on UNAVAILABLE per `policy`; raise any failure as PrebakeError.

    `fn` must be safe to repeat (every rpc that the contract says to retry on
    UNAVAILABLE is). `target` is recorded on the `Unavailable` raised at the end.
    """
    retry = 0
    while True:
        try:
            return fn()
        except grpc.RpcError as err:
            if not is_unavailable(err) or retry >= policy.retries:
                raise from_rpc_error(err, target=target) from None
        sleep(policy.backoff(retry))
        retry += 1


class _Cancellable(Protocol):
    def cancel(self) -> object: ...


class IdleWatchdog:
    """Cancels an rpc that has made no progress for `idle_seconds`.

    Use as a context manager around the loop that drives the call and `kick()` on every
    message. After the loop fails, `fired` tells whether the CANCELLED status came from
    the watchdog (a stall: resume) rather than from anyone else. One helper thread per
    watched call; it exits with the context.
    """

    def __init__(self, call: _Cancellable, idle_seconds: float) -> None:
        self._call = call
        self._idle = idle_seconds
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prebake-idle-watchdog", daemon=True)
        self.fired = False

    def kick(self, idle_seconds: float | None = None) -> None:
        """Record progress; optionally change the allowed idle time from now on."""
        if idle_seconds is not None:
            self._idle = idle_seconds
        self._last = time.monotonic()

    def __enter__(self) -> IdleWatchdog:
        self._last = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            remaining = self._last + self._idle - time.monotonic()
            if remaining <= 0:
                self.fired = True
                self._call.cancel()
                return
            if self._stop.wait(remaining):
                return


def cancel_call(call: _Cancellable) -> None:
    """Cancel an rpc (a no-op once it has finished)."""
    call.cancel()


def stalled(err: BaseException, watchdog: IdleWatchdog) -> bool:
    """Whether a stream failure is worth resuming: UNAVAILABLE or our own idle cancel."""
    if is_unavailable(err):
        return True
    return watchdog.fired and status_of(err) is grpc.StatusCode.CANCELLED
