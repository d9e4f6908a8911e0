"""moto in server mode, in its own process on a free loopback port: the S3 and DynamoDB of the tests.

Tests reach it only through boto3 over HTTP, with the endpoint in boto3's standard environment
variables (`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL_DYNAMODB`), exactly as prebake reaches AWS.

Two flavours:

* **threaded** (moto's default): fast for bulk transfers and many clients, but it does not apply
  conditional writes atomically under races (two conditional UpdateItem calls both succeeded in 8
  of 150 rounds of 16-way races), so a race test against it could fail for moto's sake.
* **serial** (werkzeug with `threaded=False`): one request at a time, so every conditional write and
  transaction is atomic. Race tests (contract suites, single flight across replicas, leases) use
  this one: a failure there is a bug in prebake.

Run as a module to serve: ``python -m tests.aws_emulator [--serial]`` prints ``PORT <n>`` once it
listens, then serves until killed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REGION = "us-east-1"
# moto accepts any credentials; these keep boto3 from looking for real ones (never use real ones).
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
}


@dataclass(frozen=True)
class Emulator:
    """A running moto server: where it is, and the environment that points boto3 at it."""

    endpoint: str
    serial: bool

    @property
    def env(self) -> dict[str, str]:
        """boto3's standard variables for this endpoint (no prebake-specific settings exist)."""
        return {
            **CREDENTIALS,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ENDPOINT_URL_DYNAMODB": self.endpoint,
            # No instance-metadata lookups and no shared config from the developer's home.
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def apply(self) -> None:
        """Point boto3 in this process (and the children it starts) at this emulator."""
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL"):
            os.environ.pop(name, None)
        os.environ.update(self.env)

    def unique_name(self, stem: str) -> str:
        """A bucket or table prefix no other test uses (tests share one emulator per session)."""
        return f"{stem}-{uuid.uuid4().hex[:12]}"

    def create_bucket(self, stem: str = "prebake-test") -> str:
        import boto3

        name = self.unique_name(stem)
        boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION).create_bucket(Bucket=name)
        return name


@contextlib.contextmanager
def running_emulator(serial: bool, log_dir: Path | None = None) -> Iterator[Emulator]:
    """Start moto in a child process, wait until it answers, stop it on exit."""
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "tests.aws_emulator", *(["--serial"] if serial else [])]
    log = open(log_dir / f"moto-{'serial' if serial else 'threaded'}.log", "wb") if log_dir else None  # noqa: SIM115
    proc = subprocess.Popen(
        cmd,
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=log if log else subprocess.DEVNULL,
        env={**os.environ, **CREDENTIALS},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()
        if not line.startswith("PORT "):
            raise RuntimeError(f"moto server did not start (exit {proc.poll()}): {line!r}")
        endpoint = f"http://127.0.0.1:{int(line.split()[1])}"
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto server started but does not answer") from None
                time.sleep(0.05)
        yield Emulator(endpoint=endpoint, serial=serial)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log:
            log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serial", action="store_true", help="serve one request at a time (race tests)")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    args = parser.parse_args()
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    app = DomainDispatcherApplication(create_backend_app)
    server = make_server(
        "127.0.0.1", args.port, app, threaded=not args.serial, request_handler=MotoRequestHandler
    )
    print(f"PORT {server.server_port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
