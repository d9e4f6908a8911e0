"""The `LeaseJob` long poll as a cancellable call, so that stopping a worker need not wait it out.

Contract:
* Thread-safe: `lease` runs on the worker's thread; `cancel` and `close` may be called
  from any thread (a signal handler's included) at any time.
* `lease` returns the server's answer (with or without a job), or None once cancelled;
  a lease granted just before the cancel is still returned, so that the caller can
  release it. Other failures raise PrebakeError (from `prebake.client.errors`).
* After `cancel` every later `lease` returns None at once; `close` also closes the
  poller's own channel (a long poll cannot share the client's unary deadline).
"""

from __future__ import annotations

import threading

import grpc

from prebake.client.channel import create_channel, status_of
from prebake.client.credentials import Credentials
from prebake.client.errors import from_rpc_error
from prebake.v1 import workers_pb2, workers_pb2_grpc


class LeasePoller:
    """LeaseJob as a cancellable call, so that `stop()` need not wait out a 20 s long poll.

    Thread-safe: `lease` runs on the worker's thread, `close` from any thread.
    """

    def __init__(self, target: str, timeout: float, credentials: Credentials | None = None) -> None:
        self._target = target
        self._timeout = timeout
        self._channel = create_channel(target, credentials)
        self._stub = workers_pb2_grpc.WorkersStub(self._channel)
        self._lock = threading.Lock()
        self._future: grpc.Future[workers_pb2.LeaseJobResponse] | None = None
        self._closed = False

    def lease(self, request: workers_pb2.LeaseJobRequest) -> workers_pb2.LeaseJobResponse | None:
        """The server's answer; None when closed meanwhile. Raises PrebakeError."""
        with self._lock:
            if self._closed:
                return None
            future = self._stub.LeaseJob.future(request, timeout=request.wait_seconds + self._timeout)
            self._future = future
        try:
            response: workers_pb2.LeaseJobResponse = future.result()
            return response
        except grpc.FutureCancelledError:
            return None
        except grpc.RpcError as err:
            if self._closed and status_of(err) is grpc.StatusCode.CANCELLED:
                return None
            raise from_rpc_error(err, target=self._target) from None
        finally:
            with self._lock:
                self._future = None

    def cancel(self) -> None:
        """Abort the poll in flight (a lease already granted is still returned) and any later one."""
        with self._lock:
            self._closed = True
            if self._future is not None:
                self._future.cancel()

    def close(self) -> None:
        self.cancel()
        self._channel.close()
