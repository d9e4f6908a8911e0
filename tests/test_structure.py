"""Guards on the architecture: rpc coverage, dependency direction, stub freshness."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from prebake.client import Client
from prebake.server.services.admin_service import AdminService
from prebake.server.services.blobs_service import BlobsService
from prebake.server.services.catalog_service import CatalogService
from prebake.server.services.jobs_service import JobsService
from prebake.server.services.registry_service import RegistryService
from prebake.server.services.workers_service import WorkersService
from prebake.v1 import admin_pb2, blobs_pb2, catalog_pb2, jobs_pb2, registry_pb2, workers_pb2

ROOT = Path(__file__).resolve().parent.parent
SERVICES = [
    (registry_pb2.DESCRIPTOR.services_by_name["Registry"], RegistryService),
    (blobs_pb2.DESCRIPTOR.services_by_name["Blobs"], BlobsService),
    (jobs_pb2.DESCRIPTOR.services_by_name["Jobs"], JobsService),
    (admin_pb2.DESCRIPTOR.services_by_name["Admin"], AdminService),
    (workers_pb2.DESCRIPTOR.services_by_name["Workers"], WorkersService),
    (catalog_pb2.DESCRIPTOR.services_by_name["Catalog"], CatalogService),
]
ALL_RPCS = [
    (service.full_name, method.name, impl) for service, impl in SERVICES for method in service.methods
]


# Bare verbs would be ambiguous on a client that wraps four services.
CLIENT_NAMES = {"prebake.v1.Blobs.Read": "read_blob", "prebake.v1.Blobs.Write": "write_blob"}


def client_name(service: str, rpc: str) -> str:
    return CLIENT_NAMES.get(f"{service}.{rpc}") or re.sub(r"(?<!^)(?=[A-Z])", "_", rpc).lower()


@pytest.mark.parametrize(("service", "rpc", "impl"), ALL_RPCS, ids=[f"{s}.{r}" for s, r, _ in ALL_RPCS])
def test_every_rpc_is_implemented_by_the_server(service: str, rpc: str, impl: type) -> None:
    # The generated base class answers UNIMPLEMENTED; the service must override it.
    assert rpc in vars(impl), f"{impl.__name__} does not implement {service}.{rpc}"


@pytest.mark.parametrize(("service", "rpc", "impl"), ALL_RPCS, ids=[f"{s}.{r}" for s, r, _ in ALL_RPCS])
def test_every_rpc_is_wrapped_by_the_client(service: str, rpc: str, impl: type) -> None:
    name = client_name(service, rpc)
    assert callable(getattr(Client, name, None)), f"Client has no {name}() for {service}.{rpc}"


def test_all_services_are_covered() -> None:
    files = [registry_pb2, blobs_pb2, jobs_pb2, admin_pb2, workers_pb2, catalog_pb2]
    declared = {s.full_name for f in files for s in f.DESCRIPTOR.services_by_name.values()}
    assert declared == {s.full_name for s, _ in SERVICES}


def test_client_import_does_not_pull_in_server_or_heavy_deps() -> None:
    code = (
        "import sys, prebake.client, prebake.client.cli;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'sqlite_utils', 'botocore')"
        " or m.startswith('prebake.server'));"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_no_prebake_init_in_any_source_folder() -> None:
    for folder in ("proto", "core", "client", "server", "compiler"):
        assert not (ROOT / folder / "prebake" / "__init__.py").exists(), folder


def test_generated_stubs_match_the_protos() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_every_rpc_documents_its_status_codes() -> None:
    for proto in (ROOT / "proto" / "prebake" / "v1").glob("*.proto"):
        text = proto.read_text()
        for match in re.finditer(r"((?://[^\n]*\n\s*)+)rpc (\w+)", text):
            comment, name = match.group(1), match.group(2)
            assert "Errors:" in comment or "UNAVAILABLE" in comment, (
                f"{proto.name}: rpc {name} lists no status codes"
            )
