"""examples/node, a JavaScript client built from proto/ alone, against a real server.

`npm ci` installs its locked dependencies into a copy of the example (the source tree is
left alone); the test skips, saying why, where node or npm is missing or the npm registry
cannot be reached. The example looks up, uploads, publishes and fetches; the test checks
what it printed and, through the Python client, what the server now holds: the same key
digest, artifact id and file digests, so both languages agree on the key and the digest format.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from prebake.client import Client
from prebake.client.artifact_key import ArtifactKey
from prebake.core.digests import hash_bytes
from prebake.server.app import BackgroundServer
from prebake.v1 import registry_pb2

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "node"
MODEL = "example-org/node-example"
# npm's words for a registry it cannot reach (then the test skips; any other failure fails it).
OFFLINE = re.compile(r"ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ECONNRESET|ETIMEDOUT|ENETUNREACH|network", re.I)


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for examples/node (Debian: apt-get install nodejs npm)")
    work = tmp_path_factory.mktemp("node-example")
    for name in ("package.json", "package-lock.json", "client.js"):
        shutil.copy(EXAMPLE / name, work / name)
    result = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--prefer-offline"],
        cwd=work,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    if result.returncode != 0:
        output = result.stdout + result.stderr
        said = [line for line in output.splitlines() if OFFLINE.search(line)]
        if said:
            pytest.skip(f"npm ci could not reach the registry: {said[0].strip()}")
        pytest.fail(f"npm ci failed:\n{output}")
    return work


def run_example(example: Path, address: str) -> list[str]:
    result = subprocess.run(
        ["node", "client.js", address, MODEL],
        cwd=example,
        env={**os.environ, "PREBAKE_PROTO_DIR": str(ROOT / "proto")},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.splitlines()


def test_node_client_looks_up_uploads_publishes_and_fetches(example: Path, server: BackgroundServer) -> None:
    lines = run_example(example, server.address)
    # kind: 'neuron' is dropped by proto-loader; the server's answer names what to send instead.
    assert lines[0].startswith("short kind name refused: kind is required")
    assert "ARTIFACT_KIND_NEURON (1)" in lines[0]
    assert lines[1].startswith("lookup LOOKUP_STATUS_MISS key ")
    assert lines[2] == "uploaded 3 of 3 blobs"
    assert re.fullmatch(r"published [0-9a-f]{32} created=true", lines[3])
    assert re.fullmatch(r"lookup LOOKUP_STATUS_HIT artifact [0-9a-f]{32} \(exact key match\)", lines[4])
    assert sum(1 for line in lines if line.startswith("fetched ") and line.endswith(" verified")) == 3
    result = json.loads(lines[-1].removeprefix("RESULT "))

    key = ArtifactKey(
        kind="neuron",
        model=MODEL,
        instance_type="ml.inf2.48xlarge",
        sequence_length=8192,
        batch_size=8,
        tensor_parallel_degree=24,
        precision="bf16",
    )
    with Client(server.address) as client:
        hit = client.lookup(key, on_miss="report")
        assert hit.status == registry_pb2.LOOKUP_STATUS_HIT
        assert hit.key.digest == result["key_digest"] == lines[1].rsplit(" ", 1)[1]
        artifact = client.get_artifact(result["artifact_id"])
        assert artifact.artifact_id == hit.artifact.artifact_id
        assert artifact.manifest_digest == result["manifest_digest"]
        assert {f.path: f.digest.hash for f in artifact.files} == result["files"]
        assert {f.path: f.executable for f in artifact.files} == {
            "bin/run.sh": True,
            "compiled/model.neff": False,
            "config.json": False,
        }
        assert artifact.producer.worker == "publish:node-example"
        config = b"".join(client.read_blob(next(f.digest for f in artifact.files if f.path == "config.json")))
        assert json.loads(config) == {"model": MODEL, "from": "node"}
        assert hash_bytes(config) == result["files"]["config.json"]

    # A second run finds everything there: nothing uploaded, the publish a no-op, still verified.
    again = run_example(example, server.address)
    assert again[1] == f"lookup LOOKUP_STATUS_HIT key {result['key_digest']}"
    assert again[2] == "uploaded 0 of 3 blobs" and again[3].endswith("created=false")
