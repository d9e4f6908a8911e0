"""The metrics port: the status page in a real headless Chromium, and its HTTP behaviour.

The browser test runs a real server with `metrics_listen` on a free loopback port and a
real embedded inductor worker (as `prebake serve` starts it), triggers a miss, follows
the job on the page to completion, and reads what the page shows. Chromium is Debian's
(`apt-get install chromium`), driven by Playwright through `executable_path`; nothing is
downloaded. The test skips only when no Chromium binary is found.

The plain HTTP tests (urllib) cover routes, refusals and escaping of values that users and
workers control.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import html.parser
import logging
import os
import re
import shutil
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from prebake.client import ArtifactKey, Client
from prebake.core.digests import hash_bytes
from prebake.core.errors import FailedPrecondition
from prebake.core.units import human_bytes
from prebake.server import status_data
from prebake.server.app import BackgroundServer, background_server
from prebake.server.config import ServerConfig, load_server_config
from prebake.server.hit_history import HitHistory, Sample
from prebake.server.status_data import JOB_PAGE
from prebake.v1 import blobs_pb2, registry_pb2
from tests.auth_fixtures import make_token_file
from tests.conftest import INDUCTOR, INDUCTOR_KEY, make_artifact_dir
from tests.plugin_cli import PrebakeCli
from tests.processes import ServerProcess, wait_until
from tests.test_evaluations import sample as sample_evaluation

KEY = ArtifactKey(
    kind="inductor",
    model="tiny/llama",
    instance_type="ml.c6a.4xlarge",
    sequence_length=32,
    batch_size=1,
    precision="fp32",
)
COMPILE_TIMEOUT_MS = 240_000
QUOTA = 1 << 30
# Debian's flags for a headless Chromium on a machine without a network (see the module docstring).
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_binary() -> str | None:
    """Debian's Chromium (or PREBAKE_CHROMIUM), if installed."""
    candidates = [os.environ.get("PREBAKE_CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome"]
    for name in filter(None, candidates):
        found = shutil.which(name)
        if found:
            return found
    return None


# --- plain HTTP -----------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: str


def get(address: str, path: str, method: str = "GET", headers: dict[str, str] | None = None) -> Reply:
    request = urllib.request.Request(f"http://{address}{path}", method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return Reply(response.status, dict(response.headers), response.read().decode())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, dict(exc.headers), exc.read().decode())


@dataclass
class Parsed(html.parser.HTMLParser):
    """The tags and the text of a page."""

    tags: list[str] = field(default_factory=list)
    attributes: list[tuple[str, str | None]] = field(default_factory=list)
    chunks: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes += attrs

    def handle_data(self, data: str) -> None:
        self.chunks.append(data)

    @property
    def text(self) -> str:
        return "".join(self.chunks)


def next_link(page: str, link_id: str) -> str:
    """The href of the link with id `link_id` ("" if the page has none)."""
    found = re.search(f'<a id="{link_id}" href="([^"]*)"', page)
    return html.unescape(found.group(1)) if found else ""


def parse(page: str) -> Parsed:
    parsed = Parsed()
    parsed.feed(page)
    return parsed


@pytest.fixture
def status_server(tmp_path: Path) -> Iterator[BackgroundServer]:
    with background_server(tmp_path / "data", metrics_listen="127.0.0.1:0") as srv:
        yield srv


def test_routes_refusals_and_content_types(status_server: BackgroundServer) -> None:
    address = status_server.metrics_address
    assert address.startswith("127.0.0.1:") and not address.endswith(":0")

    page = get(address, "/")
    assert page.status == 200 and page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "script-src" not in page.headers["Content-Security-Policy"]  # default-src 'none': no scripts
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    assert "script" not in parse(page.body).tags
    head = get(address, "/", method="HEAD")
    assert head.status == 200 and head.body == "" and int(head.headers["Content-Length"]) > 0

    scraped = get(address, "/metrics")
    assert scraped.status == 200 and scraped.headers["Content-Type"].startswith("text/plain")
    assert "# TYPE" in scraped.body

    refused = {
        "/nothing-here": (404, "nothing at /nothing-here"),
        "/jobs/j-" + "0" * 24: (404, "no job j-" + "0" * 24),
        "/jobs/not-a-job": (400, "job ids look like j-<24 hex digits>"),
        "/?kind=tpu": (400, "kind 'tpu' is unknown; one of neuron, awq, inductor"),
        "/?job_state=done": (400, "job_state 'done' is unknown"),
        "/?artifacts_page=bogus": (400, "is not a token this server issued"),
        "/?jobs_page=bogus": (400, "is not a token this server issued"),
        "/?colour=red": (400, "unknown query parameter 'colour'"),
        "/?kind=awq&kind=neuron": (400, "'kind' is given 2 times"),
        "/?model=" + "m" * 300: (400, "model filter is 300 characters; at most 256"),
    }
    for path, (status, message) in refused.items():
        reply = get(address, path)
        assert reply.status == status, (path, reply)
        assert message in parse(reply.body).text, (path, reply.body)
        assert "Traceback" not in reply.body and 'File "' not in reply.body


def test_jobs_page_through_keyset_tokens_and_a_token_of_one_list_is_refused_by_another(
    status_server: BackgroundServer,
) -> None:
    with Client(status_server.address) as client:
        job_ids = [
            client.lookup(dataclasses.replace(INDUCTOR_KEY, sequence_length=seq)).job.job_id
            for seq in range(8, 8 + 8 * (JOB_PAGE + 3), 8)
        ]
    first = get(status_server.metrics_address, "/")
    shown = [v for k, v in parse(first.body).attributes if k == "data-job-id"]
    assert shown == job_ids[::-1][:JOB_PAGE]  # newest first
    older = next_link(first.body, "jobs-next")
    assert older, "more jobs than a page: a link to older ones"
    second = get(status_server.metrics_address, older)
    assert [v for k, v in parse(second.body).attributes if k == "data-job-id"] == job_ids[::-1][JOB_PAGE:]
    token = urllib.parse.parse_qs(urllib.parse.urlsplit(older).query)["jobs_page"][0]
    reply = get(status_server.metrics_address, f"/?artifacts_page={token}")
    assert reply.status == 400 and "not a token this server issued" in reply.body


def test_artifacts_filtered_by_instance_type_page_through_every_match_once(
    status_server: BackgroundServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    page_size = 5  # small pages, so that a few artifacts make several
    monkeypatch.setattr(status_data, "ARTIFACT_PAGE", page_size)
    # More matches than a page holds, interleaved with artifacts the filter skips.
    files = make_artifact_dir(tmp_path / "files", {"model.pt2": 64})
    wanted: set[str] = set()
    with Client(status_server.address) as client:
        for i in range(page_size + 3):
            for instance in ("ml.c6a.4xlarge", "ml.c7i.4xlarge"):
                key = dataclasses.replace(INDUCTOR_KEY, instance_type=instance, sequence_length=8 * (i + 1))
                published = client.publish(files, key)
                if instance == "ml.c6a.4xlarge":
                    wanted.add(published.artifact.artifact_id)
    seen: list[str] = []
    path = "/?" + urllib.parse.urlencode({"kind": "inductor", "instance_type": "ML.C6A.4xlarge"})
    pages = 0
    while path:
        reply = get(status_server.metrics_address, path)
        assert reply.status == 200, reply
        attributes = parse(reply.body).attributes
        seen += [v for k, v in attributes if k == "data-artifact-id" and v]
        path = next_link(reply.body, "artifacts-next")
        pages += 1
    assert pages >= 2 and sorted(seen) == sorted(wanted) and len(seen) == len(wanted)
    by_target = parse(get(status_server.metrics_address, "/?instance_type=cpu-avx512").body).attributes
    shown = {v for k, v in by_target if k == "data-artifact-id"}
    assert len(shown) >= page_size and not shown & wanted


HOSTILE_WORKER = '<img src=x onerror="alert(1)">'
HOSTILE_MESSAGE = '</td></tr></table><script>alert("message")</script>&amp;'
HOSTILE_ERROR = "<b>bold</b> error & <iframe src=//evil>"
HOSTILE_LOG = b"compiling...\n<script>alert('log')</script>\n\xff not utf-8\n"
HOSTILE_FILTER = '"><script>alert("filter")</script>'


def test_user_and_worker_text_is_escaped_everywhere(status_server: BackgroundServer) -> None:
    with Client(status_server.address) as client:
        job_id = client.lookup(INDUCTOR_KEY).job.job_id
        leased = client.lease_job(HOSTILE_WORKER, [INDUCTOR])
        assert leased.job.job_id == job_id
        client.heartbeat(job_id, leased.fencing_token, 0.5, HOSTILE_MESSAGE)
        overview = get(status_server.metrics_address, "/")
        log = blobs_pb2.Digest(hash=hash_bytes(HOSTILE_LOG), size_bytes=len(HOSTILE_LOG))
        client.upload_blob(HOSTILE_LOG, log)
        client.fail_job(job_id, leased.fencing_token, HOSTILE_ERROR, deterministic=True, log=log)
    detail = get(status_server.metrics_address, f"/jobs/{job_id}")
    reflected = get(status_server.metrics_address, "/?" + urllib.parse.urlencode({"model": HOSTILE_FILTER}))

    for reply in (overview, detail, reflected):
        assert reply.status == 200, reply
        parsed = parse(reply.body)
        # Nothing the values carry became markup...
        assert not {"script", "img", "iframe", "b"} & set(parsed.tags), parsed.tags
        assert not any(name.startswith("on") for name, _ in parsed.attributes)
    # ...and they read as the text they were.
    assert HOSTILE_WORKER in parse(overview.body).text and HOSTILE_MESSAGE in parse(overview.body).text
    detail_text = parse(detail.body).text
    assert HOSTILE_WORKER in detail_text and HOSTILE_MESSAGE in detail_text and HOSTILE_ERROR in detail_text
    assert "<script>alert('log')</script>" in detail_text and "\ufffd not utf-8" in detail_text
    assert ("value", HOSTILE_FILTER) in parse(reflected.body).attributes


def test_evaluations_show_per_level_with_their_price_and_escaped_source(
    status_server: BackgroundServer, tmp_path: Path
) -> None:
    with Client(status_server.address) as client:
        artifact_id = client.publish(
            make_artifact_dir(tmp_path / "artifact", {"model.pt2": 1024}, seed=5), INDUCTOR_KEY
        ).artifact.artifact_id
        assert "evaluations-empty" in get(status_server.metrics_address, "/").body
        stored = client.import_evaluation(artifact_id, sample_evaluation(source=HOSTILE_MESSAGE))
    reply = get(status_server.metrics_address, "/")
    assert reply.status == 200
    parsed = parse(reply.body)
    assert not {"script", "img", "iframe", "b"} & set(parsed.tags), parsed.tags
    assert ("data-evaluation-id", stored.evaluation_id) in parsed.attributes
    assert ("data-artifact-id", artifact_id) in parsed.attributes
    levels = re.findall(r'<li class="level" data-concurrency="(\d+)">(.*?)</li>', reply.body)
    # The sample's levels: TTFT 40 * c ms, ITL 9.5 + c ms, 64 * c output tok/s, $0.175 / c per 1M.
    assert [c for c, _ in levels] == ["1", "4"]
    assert html.unescape(levels[1][1]) == (
        "c=4: TTFT 160.0 ms · ITL 13.5 ms · 256.0 output tok/s · $0.0437/M tokens"
    )
    assert HOSTILE_MESSAGE in parsed.text


def test_a_non_loopback_metrics_port_needs_authentication(tmp_path: Path) -> None:
    config = ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data", metrics_listen="0.0.0.0:0")
    server = BackgroundServer(config)
    try:
        with pytest.raises(FailedPrecondition, match=r"--auth-file FILE") as refused:
            server.start()
    finally:
        server.stop()
    assert "refusing to serve metrics and the status page on 0.0.0.0:0" in str(refused.value)
    assert "--insecure-allow-anonymous" in str(refused.value)
    assert not (tmp_path / "data" / "registry.sqlite3").exists(), "refused before anything was opened"


def test_with_a_token_file_every_request_needs_a_reader_token(tmp_path: Path) -> None:
    tokens = make_token_file(tmp_path / "tokens")
    with background_server(tmp_path / "data", metrics_listen="0.0.0.0:0", auth_file=str(tokens.path)) as srv:
        port = srv.metrics_address.rpartition(":")[2]
        address = f"127.0.0.1:{port}"
        anonymous = get(address, "/")
        assert anonymous.status == 401 and anonymous.headers["WWW-Authenticate"].startswith("Basic")
        assert get(address, "/metrics", headers={"Authorization": "Bearer wrong"}).status == 401
        worker = get(address, "/", headers={"Authorization": f"Bearer {tokens.tokens['worker']}"})
        assert worker.status == 403 and "reader or admin role" in worker.body
        bearer = get(address, "/metrics", headers={"Authorization": f"Bearer {tokens.tokens['reader']}"})
        assert bearer.status == 200
        basic = base64.b64encode(f"me:{tokens.tokens['reader']}".encode()).decode()
        assert get(address, "/", headers={"Authorization": f"Basic {basic}"}).status == 200
        # The check comes first: an anonymous caller learns nothing about paths either.
        assert get(address, "/nothing").status == 401


def test_anonymous_non_loopback_only_when_allowed_explicitly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="prebake.server.http"),
        background_server(
            tmp_path / "data", metrics_listen="0.0.0.0:0", insecure_allow_anonymous=True
        ) as srv,
    ):
        port = srv.metrics_address.rpartition(":")[2]
        assert get(f"127.0.0.1:{port}", "/").status == 200
    assert "metrics and status page on 0.0.0.0:0 WITHOUT AUTHENTICATION" in caplog.text


@pytest.mark.slow
def test_serve_prints_the_metrics_address_and_closes_it_on_shutdown(
    tmp_path: Path, prebake: PrebakeCli
) -> None:
    assert "--metrics-listen HOST:PORT" in prebake("serve", "--help").out
    server = ServerProcess(
        tmp_path, "metrics", ["--metrics-listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "d")]
    )
    try:
        server.wait_ready()
        found = wait_until(
            lambda: re.search(r"status page on http://(127\.0\.0\.1:\d+)/, metrics on", server.log()),
            30,
            "the metrics address in the log",
        )
        assert found is not None
        address = found.group(1)
        assert get(address, "/metrics").status == 200 and get(address, "/").status == 200
    finally:
        assert server.stop() == 0, server.log()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://{address}/", timeout=5)


def test_metrics_listen_is_a_setting_with_flag_and_environment(tmp_path: Path) -> None:
    assert load_server_config({"metrics_listen": "127.0.0.1:9100"}, {}).metrics_listen == "127.0.0.1:9100"
    assert load_server_config({}, {"PREBAKE_METRICS_LISTEN": "[::1]:0"}).metrics_listen == "[::1]:0"
    for bad in ("9100", "localhost:http", "127.0.0.1:70000", ":9100"):
        with pytest.raises(ValueError, match=r"metrics_listen .*expected HOST:PORT"):
            load_server_config({"metrics_listen": bad}, {})
    with pytest.raises(ValueError, match="status_sample_seconds"):
        load_server_config({"status_sample_seconds": 0}, {})


def test_a_taken_metrics_port_is_refused_naming_it(status_server: BackgroundServer, tmp_path: Path) -> None:
    from prebake.server.exclusive_bind import CannotListen

    taken = status_server.metrics_address
    config = ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "other", metrics_listen=taken)
    with pytest.raises(
        CannotListen, match=f"cannot serve metrics on {taken}: port .* is in use by pid {os.getpid()}"
    ):
        BackgroundServer(config).start()


def test_hit_history_intervals() -> None:
    history = HitHistory(capacity=3)
    for at, lookups, hits in ((0, 0, 0), (10, 4, 1), (20, 10, 7), (30, 10, 7)):
        history.sample(at, lookups, hits)
    # The oldest sample fell out of the ring.
    assert [(i.start, i.lookups, i.hits, i.ratio) for i in history.intervals()] == [
        (10, 6, 6, 1.0),
        (20, 0, 0, None),
    ]
    open_interval = history.intervals(Sample(35, 12, 7))[-1]
    assert (open_interval.start, open_interval.end, open_interval.lookups, open_interval.ratio) == (
        30,
        35,
        2,
        0.0,
    )
    history.sample(40, 3, 1)  # counters reset (a new process): counted from zero
    assert history.intervals()[-1].lookups == 3


# --- the browser ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no Chromium binary found (Debian: apt-get install chromium; or set PREBAKE_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=binary, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def compiling_server(tmp_path: Path, model_source_roots: str) -> Iterator[BackgroundServer]:
    """A server with the metrics port and a real embedded inductor worker, as `prebake serve` runs it."""
    from prebake.compiler.embedded import join_embedded_workers, run_embedded_workers

    with background_server(
        tmp_path / "data",
        metrics_listen="127.0.0.1:0",
        model_source_roots=model_source_roots,
        max_store_bytes=QUOTA,
        # 360 samples: a history of 6 min, longer than any compile here, so the miss stays in it.
        status_sample_seconds=1.0,
    ) as srv:
        assert srv.running is not None
        stop = threading.Event()
        workers = run_embedded_workers(
            srv.address, stop, tmp_path / "work", model_roots=srv.running.state.model_sources.worker_roots()
        )
        if not any("inductor" in t.name for t in workers):
            stop.set()
            join_embedded_workers(workers)
            pytest.fail(f"no embedded inductor worker started (threads: {[t.name for t in workers]})")
        try:
            yield srv
        finally:
            stop.set()
            join_embedded_workers(workers)


@pytest.mark.slow
def test_the_status_page_follows_a_compile_in_a_real_browser(
    browser: Any, compiling_server: BackgroundServer, tiny_model: Path
) -> None:
    from playwright.sync_api import expect

    base = f"http://{compiling_server.metrics_address}"
    page = browser.new_page()
    page.goto(base + "/")
    expect(page.locator("h1")).to_have_text("prebake status")
    expect(page.locator("p.jobs-empty")).to_have_text("no jobs")
    with Client(compiling_server.address, timeout=30) as client:
        miss = client.lookup(KEY, model_source=str(tiny_model))
        assert miss.status == registry_pb2.LOOKUP_STATUS_MISS
        job_id = miss.job.job_id

        page.goto(base + "/")
        row = page.locator(f'tr.job[data-job-id="{job_id}"]')
        expect(row.locator("td.state")).to_have_text(re.compile("^(queued|leased|succeeded)$"))
        page.click(f'a[href="/jobs/{job_id}"]')
        assert page.url == f"{base}/jobs/{job_id}"
        # The page reloads itself while the job is active.
        expect(page.locator("#job-state")).to_have_text("succeeded", timeout=COMPILE_TIMEOUT_MS)
        expect(page.locator("#job-progress")).to_have_text("100.0%")
        expect(page.locator("#job-worker")).to_contain_text("embedded")
        states = page.locator("tr.event td.state").all_inner_texts()
        assert states[0] == "queued" and "leased" in states and states[-1] == "succeeded", states
        expect(page.locator("#job-log")).not_to_be_empty()
        artifact_id = page.locator("#job-artifact").inner_text()
        assert artifact_id == client.get_job(job_id).artifact_id != ""
        compile_log = b"".join(client.read_blob(client.get_job(job_id).log)).decode()
        # (HTML parsing turns the progress bars' carriage returns into line feeds.)
        shown_log = page.locator("#job-log").text_content() or ""
        assert shown_log == compile_log.replace("\r\n", "\n").replace("\r", "\n")
        assert page.locator("meta[http-equiv=refresh]").count() == 0, "a finished job's page stops reloading"

        hit = client.lookup(KEY, model_source=str(tiny_model))  # the same revision: the checkpoint's digest
        assert hit.status == registry_pb2.LOOKUP_STATUS_HIT
        artifact = client.get_artifact(artifact_id)
        stats = client.get_stats()

    page.click("text=status page")
    artifact_row = page.locator(f'tr.artifact[data-artifact-id="{artifact_id}"]')
    expect(artifact_row.locator("td.model")).to_have_text("tiny/llama")
    expect(artifact_row.locator("td.size")).to_have_text(human_bytes(artifact.total_size_bytes))
    assert artifact_row.locator("td.size").get_attribute("data-bytes") == str(artifact.total_size_bytes)
    expect(artifact_row.locator("td.hits")).to_have_text("1")
    expect(artifact_row.locator("td.last-access")).not_to_have_text("-")

    job_row = page.locator(f'tr.job[data-job-id="{job_id}"]')
    expect(job_row.locator("td.state")).to_have_text("succeeded")
    expect(job_row.locator("td.progress")).to_have_text("100.0%")

    worker_rows = page.locator("tr.worker", has_text="inductor")
    expect(worker_rows.first.locator("td.liveness")).to_have_text("live")
    expect(worker_rows.first.locator(".capability").first).to_contain_text("inductor torch-2.13.0 for cpu-")

    used = page.locator("#store-used")
    assert int(used.get_attribute("data-bytes") or 0) >= artifact.total_size_bytes
    assert used.get_attribute("data-quota") == str(QUOTA)
    expect(used).to_contain_text(f"of {human_bytes(QUOTA)}")
    assert stats.blob_bytes >= artifact.total_size_bytes

    ratio = page.locator("#hit-ratio")
    expect(ratio).to_have_text("50.0%")  # one miss, one hit
    assert (ratio.get_attribute("data-lookups"), ratio.get_attribute("data-hits")) == ("2", "1")
    # The miss and the hit fell into different sampled intervals: 0% then 100%.
    expect(page.locator("#hit-sparkline polyline")).to_have_count(1)
    ratios = page.locator("tr.interval td:last-child").all_inner_texts()
    assert ratios[0] == "100.0%" and ratios[-1] == "0.0%", ratios

    # An evaluation of the artifact shows, per concurrency level.
    with Client(compiling_server.address) as client:
        evaluation = client.import_evaluation(artifact_id, sample_evaluation())
    page.reload()
    evaluated = page.locator(f'tr.evaluation[data-evaluation-id="{evaluation.evaluation_id}"]')
    expect(evaluated.locator("td.artifact")).to_have_text(artifact_id)
    expect(evaluated.locator("li.level")).to_have_count(2)
    expect(evaluated.locator('li.level[data-concurrency="1"]')).to_contain_text("TTFT 40.0 ms")

    # The search form, as a person would use it.
    search = page.locator("#artifact-search button[type=submit]")
    page.select_option("#artifact-search select[name=kind]", "inductor")
    page.fill("#artifact-search input[name=model]", "tiny/llama")
    page.fill("#artifact-search input[name=instance_type]", "ml.c6a.4xlarge")
    search.click()
    expect(page.locator("tr.artifact")).to_have_count(1)
    page.fill("#artifact-search input[name=instance_type]", "ml.inf2.48xlarge")
    search.click()
    expect(page.locator("p.artifacts-empty")).to_have_text("no artifacts match")
    page.fill("#artifact-search input[name=instance_type]", "cpu-avx2")  # a compile target works too
    search.click()
    expect(page.locator("tr.artifact")).to_have_count(1)
    page.select_option("#artifact-search select[name=kind]", "neuron")
    search.click()
    expect(page.locator("p.artifacts-empty")).to_have_text("no artifacts match")
    page.close()
