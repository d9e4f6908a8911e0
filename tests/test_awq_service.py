"""A real AWQ job end to end through the service.

Lookup miss (enqueues) -> a real `prebake worker --kind awq` quantizes a tiny Llama with
llm-compressor -> the worker publishes -> `ensure` fetches the checkpoint -> transformers
loads it and runs a forward pass. And AWQ keys are weight-only: a later lookup with any
batch size or sequence length hits the same artifact.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from prebake.client import ArtifactKey, Client
from prebake.compiler.awq import AwqBackend
from prebake.server.app import BackgroundServer, background_server
from prebake.v1 import registry_pb2

AVAILABLE, WHY = AwqBackend().available()
# It builds its own tiny checkpoint, so the conftest rule does not mark it `compile`.
pytestmark = [pytest.mark.slow, pytest.mark.compile, pytest.mark.skipif(not AVAILABLE, reason=WHY)]
KEY = ArtifactKey(kind="awq", model="tiny/llama", instance_type="ml.g5.12xlarge")


@pytest.fixture
def server(tmp_path: Path, model_source_roots: str) -> Iterator[BackgroundServer]:
    with background_server(
        tmp_path / "data", lease_seconds=10.0, model_source_roots=model_source_roots
    ) as srv:
        yield srv


def test_awq_job_end_to_end_through_the_service(server: BackgroundServer, tmp_path: Path) -> None:
    from prebake.compiler.tiny_llama import build_tiny_llama

    model_dir = build_tiny_llama(tmp_path / "tiny-llama", hidden_size=128, num_layers=2)
    worker_cmd = [sys.executable, "-m", "prebake.client.cli", "--server", server.address, "worker"]
    worker_cmd += ["--kind", "awq", "--work-dir", str(tmp_path / "work"), "--max-jobs", "1"]
    with Client(server.address, timeout=30.0) as client:
        miss = client.lookup(KEY, model_source=str(model_dir))
        assert miss.status == registry_pb2.LOOKUP_STATUS_MISS and miss.job_created
        log = (tmp_path / "worker.log").open("w")
        worker = subprocess.Popen(worker_cmd, stderr=log, stdout=log)
        try:
            result = client.ensure(KEY, tmp_path / "deploy", model_source=str(model_dir), timeout=300)
        finally:
            worker.wait(timeout=120)
            log.close()
        assert worker.returncode == 0, (tmp_path / "worker.log").read_text()[-3000:]
        assert result.job_id == miss.job.job_id
        job = client.get_job(miss.job.job_id)
        assert job.attempts == 1 and job.log.hash, "compiled once; the log was kept"

        deploy = tmp_path / "deploy"
        config = json.loads((deploy / "config.json").read_text())
        assert config["quantization_config"]["format"] == "pack-quantized"
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(deploy, local_files_only=True)
        logits = model(input_ids=torch.arange(16).unsqueeze(0)).logits
        assert logits.shape == (1, 16, 512) and torch.isfinite(logits).all()

        artifact = client.get_artifact(result.artifact_id)
        assert artifact.producer.toolchain_versions["llmcompressor"].startswith("0.14")
        # Weight-only: any batch size, sequence length or GPU instance hits this artifact.
        for batch, seq, instance in ((1, 0, "ml.g5.12xlarge"), (8, 4096, "ml.g6.12xlarge"), (64, 32768, "")):
            asked = ArtifactKey(
                kind="awq", model="tiny/llama", batch_size=batch, sequence_length=seq, instance_type=instance
            )
            hit = client.lookup(asked, model_source=str(model_dir))
            assert (
                hit.status == registry_pb2.LOOKUP_STATUS_HIT
                and hit.artifact.artifact_id == result.artifact_id
            )
