"""Log set-up (text and JSON), log settings, and request ids from the client's side."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from prebake.client import Client
from prebake.core import request_ids
from prebake.core.logs import direct_handler, log_settings, setup_logging
from prebake.core.request_ids import request_scope
from prebake.server.app import BackgroundServer
from prebake.server.config import load_server_config
from prebake.server.rpc_observer import RpcLine, RpcLines
from tests.conftest import LLAMA3_8B_INF2


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """Logging set up to a buffer; the root logger restored afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    buffer = io.StringIO()
    yield buffer
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)


def test_json_lines_are_one_object_each_with_the_request_id_and_fields(stream: io.StringIO) -> None:
    setup_logging("json", "info", stream)
    log = logging.getLogger("prebake.test")
    with request_scope("rid-1"):
        log.info("rpc %s", "X", extra={"fields": {"method": "X", "code": "OK", "duration_ms": 1.5}})
        try:
            raise RuntimeError("boom\nsecond line")
        except RuntimeError:
            log.exception("failed")
    log.info("outside")
    log.debug("not at info level")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    first, second, third = (json.loads(line) for line in lines)
    assert first["message"] == "rpc X" and first["request_id"] == "rid-1" and first["level"] == "info"
    assert (first["method"], first["code"], first["duration_ms"]) == ("X", "OK", 1.5)
    assert first["logger"] == "prebake.test" and first["time"].endswith("Z")
    assert second["request_id"] == "rid-1" and "RuntimeError: boom" in second["exc"]
    assert "request_id" not in third


def test_text_lines_tag_the_request_id_and_a_second_setup_replaces_the_first(stream: io.StringIO) -> None:
    setup_logging("json", "info", stream)
    setup_logging("text", "debug", stream)
    log = logging.getLogger("prebake.test")
    with request_scope("rid-2"):
        log.debug("inside")
    log.warning("outside")
    inside, outside = stream.getvalue().splitlines()
    assert inside.endswith("DEBUG prebake.test [rid-2]: inside")
    assert outside.endswith("WARNING prebake.test: outside")


def test_log_settings_come_from_flags_then_environment_and_are_checked() -> None:
    assert log_settings(None, None, {}) == ("text", "info")
    env = {"PREBAKE_LOG_FORMAT": "json", "PREBAKE_LOG_LEVEL": "DEBUG"}
    assert log_settings(None, None, env) == ("json", "debug")
    assert log_settings("text", "warning", env) == ("text", "warning")
    with pytest.raises(ValueError, match="log_format 'xml'"):
        log_settings(None, None, {"PREBAKE_LOG_FORMAT": "xml"})
    config = load_server_config({"log_level": "error"}, {"PREBAKE_LOG_FORMAT": "json"})
    assert (config.log_format, config.log_level) == ("json", "error")
    with pytest.raises(ValueError, match="log_level 'loud'"):
        load_server_config({}, {"PREBAKE_LOG_LEVEL": "loud"})


def test_request_scopes_nest_and_refuse_ids_that_could_forge_log_lines() -> None:
    assert request_ids.current() is None
    with request_scope() as outer:
        assert len(outer) == 32 and request_ids.current() == outer
        with request_scope() as inner:
            assert inner == outer  # part of the outer operation
        with request_scope("explicit") as named:
            assert named == "explicit"
        assert request_ids.current() == outer
    assert request_ids.current() is None
    for bad in ("", "a b", "x\n{}", "é", "x" * 129):
        with pytest.raises(ValueError), request_scope(bad):
            pass


def test_jobs_record_the_client_operations_request_id(tmp_path: Path) -> None:
    config = load_server_config({"listen": "127.0.0.1:0", "data_dir": str(tmp_path / "data")}, {})
    with BackgroundServer(replace(config, embedded_workers=0)) as server, Client(server.address) as client:
        with request_scope("deploy-42"):
            named = client.lookup(LLAMA3_8B_INF2)
        fresh = [client.lookup(replace(LLAMA3_8B_INF2, batch_size=b)) for b in (1, 2)]
    assert named.job_created and named.job.request_id == "deploy-42"
    ids = [r.job.request_id for r in fresh]
    assert all(r.job_created for r in fresh) and all(len(i) == 32 for i in ids) and ids[0] != ids[1]


def _rpc_lines(lines: list[RpcLine]) -> None:
    async def turn() -> None:
        writer = RpcLines()
        for line in lines:
            writer.add(line)
        await asyncio.sleep(0)  # the lines of a turn are written on the next

    asyncio.run(turn())


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_rpc_lines_written_directly_read_as_those_logged_through_logging(
    stream: io.StringIO, log_format: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup_logging(log_format, "info", stream)
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, "_prebake", False)]
    monkeypatch.setattr(root, "handlers", ours)  # without pytest's capture: the deployed set-up
    rpc = logging.getLogger("prebake.server.rpc")
    assert direct_handler(rpc, logging.INFO) is ours[0]
    lines = [
        RpcLine(logging.INFO, "prebake.v1.Registry/Lookup", "OK", 0.000312, "ipv4:127.0.0.1:4242", "rid-7"),
        RpcLine(logging.INFO, "prebake.v1.Blobs/Read", "NOT_FOUND", 0.0421, "ipv6:[::1]:80", "rid-8"),
    ]
    _rpc_lines(lines)
    direct = stream.getvalue().splitlines()
    stream.truncate(0)
    stream.seek(0)
    # Anything else on the way and they go through logging, one record each.
    capture = logging.NullHandler()
    rpc.addHandler(capture)
    try:
        assert direct_handler(rpc, logging.INFO) is None
        _rpc_lines(lines)
    finally:
        rpc.removeHandler(capture)
    logged = stream.getvalue().splitlines()
    assert len(direct) == len(logged) == 2
    if log_format == "json":
        for a, b in zip(direct, logged, strict=True):
            left, right = json.loads(a), json.loads(b)
            assert {left.pop("ts"), left.pop("time")} and {right.pop("ts"), right.pop("time")}
            assert left == right
        assert json.loads(direct[1])["duration_ms"] == 42.1
    else:
        # "2026-12-03 13:53:58,448 " then the rest, the same either way.
        assert [line[24:] for line in direct] == [line[24:] for line in logged]
        assert direct[0][24:] == (
            "INFO prebake.server.rpc [rid-7]: "
            "rpc prebake.v1.Registry/Lookup OK 0.31 ms from ipv4:127.0.0.1:4242"
        )
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", direct[0][:24])


def test_nothing_is_written_directly_past_a_filter_or_a_level(
    stream: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup_logging("text", "warning", stream)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [h for h in root.handlers if getattr(h, "_prebake", False)])
    rpc = logging.getLogger("prebake.server.rpc")
    assert direct_handler(rpc, logging.INFO) is None  # below the level
    assert direct_handler(rpc, logging.WARNING) is not None
    quiet = logging.Filter("nothing.here")
    rpc.addFilter(quiet)
    try:
        assert direct_handler(rpc, logging.WARNING) is None
    finally:
        rpc.removeFilter(quiet)
