"""The one error model: each class has one status code, the mapping is the same both ways,
and the server never answers a transient or unexpected failure with a misleading code."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from prebake.client import errors as client_errors
from prebake.core import errors
from prebake.core.rpc_errors import BY_STATUS, INTERNAL_MESSAGE, from_rpc_error, to_status
from prebake.server.app import background_server
from prebake.server.status import domain_error
from prebake.server.storage.sqlite import connection as sqlite_connection
from prebake.v1 import key_pb2, registry_pb2, registry_pb2_grpc

ALL_CLASSES = sorted(
    (c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.PrebakeError)),
    key=lambda c: c.__name__,
)


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_every_class_stands_for_one_real_status(cls: type[errors.PrebakeError]) -> None:
    status = grpc.StatusCode[cls.code]
    owner = BY_STATUS[status]
    # A class is the owner of its code or a refinement of the owner: never a second meaning.
    assert issubclass(cls, owner)


OWNERS = sorted(set(BY_STATUS.values()), key=lambda c: c.__name__)


@pytest.mark.parametrize("owner", OWNERS, ids=lambda c: c.__name__)
def test_owner_classes_round_trip_through_grpc(owner: type[errors.PrebakeError]) -> None:
    code, message = to_status(errors.PrebakeError("m") if owner is errors.PrebakeError else owner("m"))
    back = from_rpc_error(FakeRpcError(code, message))
    assert type(back) is owner and str(back) == "m" and back.code == owner.code


def test_refinements_answer_with_their_owners_code() -> None:
    assert to_status(errors.InvalidKey("batch_size", "batch_size must be > 0")) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "batch_size must be > 0",
    )
    assert to_status(errors.UploadDigestMismatch("x"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert to_status(errors.Busy("x"))[0] == grpc.StatusCode.ABORTED
    assert to_status(errors.QuotaExceeded("x"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert to_status(errors.NoCapableWorker("x"))[0] == grpc.StatusCode.FAILED_PRECONDITION


def test_the_two_digest_mismatches_are_different_errors() -> None:
    assert issubclass(errors.UploadDigestMismatch, errors.InvalidArgument)
    assert issubclass(errors.DownloadDigestMismatch, errors.DataLoss)
    assert not issubclass(errors.UploadDigestMismatch, errors.DataLoss)
    assert not issubclass(errors.DownloadDigestMismatch, errors.InvalidArgument)


def test_only_transient_errors_are_retryable() -> None:
    retryable = {c.__name__ for c in ALL_CLASSES if c.retryable}
    assert retryable == {"Unavailable", "Aborted", "Busy"}
    assert from_rpc_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "down")).retryable
    assert not from_rpc_error(FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "bad")).retryable


def test_a_second_owner_of_a_code_is_refused() -> None:
    with pytest.raises(TypeError, match="already owns"):

        class Clash(errors.PrebakeError):  # pragma: no cover - refused at class creation
            code = "NOT_FOUND"


def test_unexpected_exceptions_become_internal_without_their_message() -> None:
    code, message = to_status(KeyError("/srv/secret/token.txt"))
    assert code == grpc.StatusCode.INTERNAL
    assert message == INTERNAL_MESSAGE and "secret" not in message and "Traceback" not in message


def test_client_names_are_the_core_classes() -> None:
    assert client_errors.InvalidArgument is errors.InvalidArgument
    assert client_errors.from_rpc_error is from_rpc_error


def test_sqlite_lock_errors_are_unavailable_other_sqlite_errors_internal() -> None:
    locked = domain_error(sqlite3.OperationalError("database is locked"))
    assert isinstance(locked, errors.Unavailable) and locked.retryable
    broken = sqlite3.OperationalError("no such table: artifacts")
    assert domain_error(broken) is broken
    assert to_status(domain_error(broken))[0] == grpc.StatusCode.INTERNAL


# -- a real lock on a real server ------------------------------------------------------


@pytest.fixture
def locked_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, sqlite3.Connection]]:
    # A short busy timeout so that the server gives up on the lock quickly.
    monkeypatch.setattr(sqlite_connection, "BUSY_TIMEOUT_MS", 200)
    data = tmp_path / "data"
    with background_server(data) as server:
        (db,) = [p for p in data.iterdir() if p.suffix in (".sqlite3", ".sqlite", ".db")]
        other = sqlite3.connect(db, isolation_level=None, timeout=0)
        try:
            yield server.address, other
        finally:
            if other.in_transaction:
                other.execute("ROLLBACK")
            other.close()


def test_a_locked_registry_answers_unavailable_not_internal(
    locked_server: tuple[str, sqlite3.Connection],
) -> None:
    address, other = locked_server
    key = key_pb2.ArtifactKey(
        kind=key_pb2.ARTIFACT_KIND_INDUCTOR,
        model="demo/tiny-llama",
        instance_type="ml.c7i.4xlarge",
        sequence_length=128,
        batch_size=1,
    )
    request = registry_pb2.LookupRequest(key=key, on_miss=registry_pb2.ON_MISS_ENQUEUE)
    with grpc.insecure_channel(address) as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        other.execute("BEGIN EXCLUSIVE")  # another process's writer holds the database
        with pytest.raises(grpc.RpcError) as info:
            stub.Lookup(request, timeout=30)
        err = info.value
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
        assert "busy" in (err.details() or "")
        translated = from_rpc_error(err, target=address)
        assert isinstance(translated, client_errors.Unavailable) and translated.retryable

        other.execute("ROLLBACK")
        # Retrying once the lock is gone succeeds: the failed attempt changed nothing.
        first = stub.Lookup(request, timeout=30)
        again = stub.Lookup(request, timeout=30)
    assert first.status == registry_pb2.LOOKUP_STATUS_MISS
    assert again.status == registry_pb2.LOOKUP_STATUS_COMPILING
    assert again.job.job_id == first.job.job_id
