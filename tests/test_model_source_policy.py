"""Model sources are server policy: allowed roots and s3:// prefixes, a per-model map, one
refusal for everything outside the set, conflicts instead of silent joins, and failure
text recorded safe to display. Real servers on loopback; no compiles."""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prebake.client import ArtifactKey, Client, errors
from prebake.compiler.worker import Worker, WorkerConfig
from prebake.core.text_safety import INVISIBLE_CATEGORIES, displayable, first_invisible
from prebake.server.app import BackgroundServer, background_server
from prebake.server.config import load_server_config
from prebake.server.model_sources import ModelSources
from prebake.v1 import jobs_pb2, key_pb2, registry_pb2, workers_pb2
from tests.test_worker import inductor_status

# A revision, so the client computes none from the (maybe missing) source it names.
KEY = ArtifactKey(
    kind="inductor",
    model="tiny/llama",
    model_revision="r1",
    instance_type="ml.c6a.4xlarge",
    sequence_length=32,
    batch_size=1,
    precision="fp32",
)
INDUCTOR = workers_pb2.Capability(
    kind=key_pb2.ARTIFACT_KIND_INDUCTOR, toolchain="torch-2.13.0", compile_targets=["cpu-avx2"]
)


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    """An allowed root with a checkpoint and a link out of it, and a secret dir outside."""
    root = tmp_path / "models"
    (root / "llama").mkdir(parents=True)
    (root / "llama" / "config.json").write_text("{}")
    secret = tmp_path / "private" / "checkpoint"
    secret.mkdir(parents=True)
    (secret / "config.json").write_text("{}")
    (root / "escape").symlink_to(secret)
    return {"root": root, "llama": root / "llama", "secret": secret, "escape": root / "escape"}


@pytest.fixture
def policy_server(tmp_path: Path, layout: dict[str, Path]) -> Iterator[BackgroundServer]:
    roots = f"{layout['root']},s3://bucket/models"
    mapping = f"mapped/llama={layout['secret']},tiny/s3={'s3://elsewhere/tiny'}"
    with background_server(tmp_path / "data", model_source_roots=roots, model_source_map=mapping) as srv:
        yield srv


@pytest.fixture
def c(policy_server: BackgroundServer) -> Iterator[Client]:
    with Client(policy_server.address, timeout=30.0) as client:
        yield client


def refusal(client: Client, source: str, key: ArtifactKey = KEY) -> str:
    """The message a lookup naming `source` is refused with, the source itself masked."""
    with pytest.raises(errors.InvalidArgument) as info:
        client.lookup(key, model_source=source)
    return str(info.value).replace(repr(source), "<source>")


def test_a_source_inside_an_allowed_root_makes_a_job_that_reads_it(
    c: Client, layout: dict[str, Path]
) -> None:
    response = c.lookup(KEY, model_source=f"{layout['llama']}/./")
    assert response.status == registry_pb2.LOOKUP_STATUS_MISS and response.job_created
    assert response.job.model_source == str(layout["llama"]), "recorded normalised"


def test_outside_missing_and_escaping_sources_get_one_message(c: Client, layout: dict[str, Path]) -> None:
    outside_existing = refusal(c, str(layout["secret"]))
    assert "not a model source this server allows" in outside_existing
    same = {
        "outside, missing": str(layout["secret"].parent / "nothing-here"),
        "inside, missing": str(layout["root"] / "nothing-here"),
        "dot-dot escape": f"{layout['root']}/../private/checkpoint",
        "symlink escape": str(layout["escape"]),
        "through a symlink, missing": str(layout["escape"] / "nothing-here"),
        "a file, not a directory": str(layout["llama"] / "config.json"),
        "a root's sibling by prefix": f"{layout['root']}-private",
    }
    for what, source in same.items():
        assert refusal(c, source) == outside_existing, what
    assert c.list_jobs().jobs == [], "nothing was enqueued"


def test_a_refusal_reveals_no_path_and_a_relative_source_is_refused_plainly(
    c: Client, layout: dict[str, Path]
) -> None:
    message = refusal(c, "/etc")
    assert "/etc" not in message and str(layout["root"]) not in message
    # The client sends local sources absolute; a raw relative one would be relative to
    # the server's working directory.
    request = registry_pb2.LookupRequest(key=KEY.to_proto(), model_source="models/llama")
    with pytest.raises(grpc.RpcError) as info:
        c._conn.stubs.registry.Lookup(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not an absolute path" in str(info.value.details())


def test_the_per_model_map_gives_the_source_when_a_lookup_names_none(
    c: Client, layout: dict[str, Path]
) -> None:
    mapped = replace(KEY, model="mapped/llama")
    response = c.lookup(mapped)
    assert response.job.model_source == str(layout["secret"]), "the operator's mapping, outside the roots"
    # Naming the mapped source is allowed; another model may not name it.
    assert c.lookup(mapped, model_source=str(layout["secret"])).job.job_id == response.job.job_id
    assert "not a model source this server allows" in refusal(c, str(layout["secret"]))
    # Unmapped and unnamed: a job without a source, as before (the worker fails it).
    assert c.lookup(replace(KEY, model="other/model")).job.model_source == ""


def test_s3_prefixes_are_allowed_by_whole_segments(c: Client) -> None:
    allowed = c.lookup(KEY, model_source="s3://bucket/models/llama")
    assert allowed.job.model_source == "s3://bucket/models/llama"
    refused = refusal(c, "s3://bucket/models-private/llama", replace(KEY, batch_size=2))
    for source in ("s3://bucket/other/llama", "s3://other-bucket/models/llama", "s3://bucket/models/../x"):
        key = replace(KEY, batch_size=3)
        if ".." in source:
            with pytest.raises(errors.InvalidArgument, match="segment"):
                c.lookup(key, model_source=source)
        else:
            assert refusal(c, source, key) == refused, source
    # A mapped S3 source outside the prefixes is the operator's choice.
    mapped = c.lookup(replace(KEY, model="tiny/s3"), model_source="s3://elsewhere/tiny/")
    assert mapped.job.model_source == "s3://elsewhere/tiny/"


def test_a_different_source_for_an_active_job_is_a_conflict_not_a_join(
    c: Client, layout: dict[str, Path]
) -> None:
    first = c.lookup(KEY, model_source=str(layout["llama"]))
    other = layout["root"] / "other"
    other.mkdir()
    with pytest.raises(errors.FailedPrecondition) as info:
        c.lookup(KEY, model_source=str(other))
    assert first.job.job_id in str(info.value) and repr(str(layout["llama"])) in str(info.value)
    # The same source (written differently) and no source at all join the job, which shows
    # what it reads.
    for source in (f"{layout['llama']}/", ""):
        joined = c.lookup(KEY, model_source=source)
        assert joined.status == registry_pb2.LOOKUP_STATUS_COMPILING and not joined.job_created
        assert (joined.job.job_id, joined.job.model_source) == (first.job.job_id, str(layout["llama"]))


def test_a_conflict_does_not_show_a_source_outside_the_current_policy(
    tmp_path: Path, layout: dict[str, Path]
) -> None:
    data = tmp_path / "data"
    with (
        background_server(data, model_source_roots=str(layout["secret"].parent)) as srv,
        Client(srv.address) as c,
    ):
        job = c.lookup(KEY, model_source=str(layout["secret"])).job
    with (
        background_server(data, model_source_roots=str(layout["root"])) as srv,
        Client(srv.address) as c,
        pytest.raises(errors.FailedPrecondition) as info,
    ):
        c.lookup(KEY, model_source=str(layout["llama"]))
    assert job.job_id in str(info.value)
    assert "private" not in str(info.value) and "another model source" in str(info.value)


def test_failure_text_is_recorded_capped_and_without_escapes(c: Client, layout: dict[str, Path]) -> None:
    created = c.lookup(KEY, model_source=str(layout["llama"]))
    lease = c.lease_job("w1", [INDUCTOR])
    assert lease.job.job_id == created.job.job_id
    hostile = (
        "\x1b[2J\x1b[1;1Hcompile ok\x1b]0;owned\x07 \u202egnp.exe\u200b\r\nfake prompt $ \x9b31m"
        + "A" * 20_000
    )
    c.fail_job(lease.job.job_id, lease.fencing_token, hostile[:16_000], deterministic=True)
    failed = c.lookup(KEY, model_source=str(layout["llama"]))
    assert failed.status == registry_pb2.LOOKUP_STATUS_FAILED
    shown = failed.error
    assert shown == failed.job.error
    assert shown.startswith("compile ok gnp.exe\nfake prompt $ AAA"), shown[:80]
    assert len(shown) <= 4096 and "characters left out" in shown
    assert not any(ch in shown for ch in "\x1b\x07\x9b\r\u202e\u200b")


def test_a_worker_re_checks_a_local_source_against_its_roots(tmp_path: Path, layout: dict[str, Path]) -> None:
    # The server allows a wider root than the worker: the worker refuses before reading.
    with (
        background_server(tmp_path / "data", model_source_roots=str(tmp_path)) as srv,
        Client(srv.address, timeout=30.0) as c,
    ):
        response = c.lookup(KEY, model_source=str(layout["secret"]))
        config = WorkerConfig(
            server=srv.address,
            work_dir=tmp_path / "work",
            max_jobs=1,
            worker_id="unit",
            model_roots=(layout["root"],),
        )
        assert Worker(config, backends={"inductor": inductor_status()}).run() == 1
        job = c.get_job(response.job.job_id)
    assert job.state == jobs_pb2.JOB_STATE_FAILED and job.error_class == jobs_pb2.ERROR_CLASS_DETERMINISTIC
    assert "not under this worker's model source roots" in job.error


def test_settings_from_flags_environment_and_toml(tmp_path: Path) -> None:
    toml = tmp_path / "prebake.toml"
    toml.write_text(
        '[server]\nmodel_source_roots = ["/srv/models", "s3://bucket/models"]\n'
        '[server.model_source_map]\n"meta-llama/Meta-Llama-3-8B" = "s3://bucket/models/llama3-8b"\n'
    )
    config = load_server_config({}, {}, toml)
    sources = ModelSources.from_config(config.model_source_roots, config.model_source_map, config.data_dir)
    assert sources.local_roots == ("/srv/models",)
    assert [str(p) for p in sources.s3_prefixes] == ["s3://bucket/models/"]
    assert sources.mapped == {"meta-llama/Meta-Llama-3-8B": "s3://bucket/models/llama3-8b/"}
    env = {"PREBAKE_MODEL_SOURCE_ROOTS": "/a,/b", "PREBAKE_MODEL_SOURCE_MAP": "m=/a/m"}
    assert load_server_config({}, env).model_source_roots == "/a,/b"
    # The default: the data directory's models/ only.
    default = load_server_config({"data_dir": str(tmp_path / "d")}, {})
    assert ModelSources.from_config("", "", default.data_dir).local_roots == (
        os.path.normpath(tmp_path / "d" / "models"),
    )
    for bad in ({"model_source_roots": "/a/../b"}, {"model_source_map": "m"}, {"model_source_map": "m=rel"}):
        with pytest.raises(ValueError, match="model_source"):
            load_server_config(bad, {})


def test_the_default_allows_the_data_directorys_models_and_nothing_else(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "models" / "llama").mkdir(parents=True)
    (tmp_path / "home" / "llama").mkdir(parents=True)
    with background_server(data) as srv, Client(srv.address) as c:
        made = c.lookup(KEY, model_source=str(data / "models" / "llama"))
        assert made.job.model_source == str(data / "models" / "llama")
        assert "not a model source this server allows" in refusal(c, str(tmp_path / "home" / "llama"))
        assert "not a model source this server allows" in refusal(c, str(data / "registry.sqlite3"))


@settings(max_examples=200, deadline=None)
@given(text=st.text(), limit=st.integers(min_value=0, max_value=300))
def test_displayable_text_is_bounded_and_has_nothing_invisible(text: str, limit: int) -> None:
    shown = displayable(text, limit)
    assert len(shown) <= limit
    assert all(c in "\n\t" or unicodedata.category(c) not in INVISIBLE_CATEGORIES for c in shown)
    if len(text) <= limit and first_invisible(text) is None:
        assert shown == text, "plain text is kept as it is"
