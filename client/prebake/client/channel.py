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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import grpc

from prebake.client.errors import from_rpc_error

T = TypeVar("T")

MAX_MESSAGE_BYTES = 16 << 20
# Pings detect a dead peer on a quiet stream (a job watch during a long compile). The
# prebake server accepts them every 10 s (`min_ping_interval_without_data_ms`); a
# server with gRPC's default policy (5 min) would answer GOAWAY "too_many_pings", which
# the client survives as an UNAVAILABLE and reconnects.
KEEPALIVE_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000


def create_channel(target: str) -> grpc.Channel:
    """An insecure channel to `target` ("host:port") with prebake's message limits."""
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 0),
        # gRPC stops pinging after 2 pings without data by default; a watch may be silent long.
        ("grpc.http2.max_pings_without_data", 0),
    ]
    return grpc.insecure_channel(target, options=options)


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
