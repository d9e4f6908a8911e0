"""Guards on the architecture: rpc coverage, dependency direction, stub freshness, and
shared knowledge (the key's fields, the kinds) defined once."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from prebake.client import Client
from prebake.core.key_fields import KEY_FIELDS, KINDS
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


def _loaded_after(imports: str, forbidden: tuple[str, ...]) -> list[str]:
    """Modules matching `forbidden` (top-level names or dotted prefixes) that `imports` loads,
    in a fresh interpreter (this process has long imported everything)."""
    code = (
        f"import sys; {imports};"
        f"bad = sorted(m for m in sys.modules"
        f" if any(m == f or m.startswith(f + '.') for f in {forbidden!r}));"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


def test_client_import_does_not_pull_in_server_or_heavy_deps() -> None:
    forbidden = ("prebake.server", "boto3", "botocore", "sqlite_utils", "torch")
    assert _loaded_after("import prebake.client, prebake.client.cli", forbidden) == []


def _sources(folder: str) -> Iterator[tuple[str, ast.Module]]:
    """(path relative to the checkout, parsed module) of every hand-written source file."""
    for path in sorted((ROOT / folder).rglob("*.py")):
        if path.name.endswith(("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")):
            continue
        yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text(), str(path))


def _imports(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """(line, module) of every import, at top level or inside functions."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
            # `from prebake import client` names the package in the alias.
            yield from ((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)


def _offending_imports(folders: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path}:{line} imports {module}"
        for folder in folders
        for path, tree in _sources(folder)
        for line, module in _imports(tree)
        if any(module == f or module.startswith(f + ".") for f in forbidden)
    ]


def test_the_server_imports_nothing_from_the_client() -> None:
    # Shared knowledge lives in prebake.core; the client's CLI, commands and rendering
    # are the client's own. (The embedded workers of `serve` are prebake.compiler's.)
    assert _offending_imports(("server",), ("prebake.client",)) == []


def test_core_depends_on_no_other_prebake_package() -> None:
    forbidden = ("prebake.client", "prebake.server", "prebake.compiler")
    assert _offending_imports(("core",), forbidden) == []
    core_modules = sorted(p.stem for p in (ROOT / "core" / "prebake" / "core").glob("*.py"))
    imports = "import " + ", ".join(f"prebake.core.{m}" for m in core_modules if m != "__init__")
    assert _loaded_after(imports, forbidden) == []


# A literal listing every kind or every key field retypes what the contract defines
# (prebake.core.key_fields derives both from the descriptors). Tables keyed by kind or
# field are fine when they assert coverage at import (see key_fields.require_*).
# Offenders in modules other work is changing right now, to be fixed at merge; each entry
# must still offend, so that a fixed one is removed from here.
PENDING_RETYPED: dict[str, str] = {}


def _retyped_in(tree: ast.AST) -> list[str]:
    """What each tuple, list or set literal in `tree` lists completely: kinds, key fields."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            words = {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
            for what, names in (("kinds", KINDS), ("key fields", KEY_FIELDS)):
                if set(names) <= words:
                    found.append(f"{what} (line {node.lineno})")
    return found


def _retyped_lists() -> dict[str, list[str]]:
    lists: dict[str, list[str]] = {}
    for folder in ("core", "client", "server", "compiler"):
        for path, tree in _sources(folder):
            if found := _retyped_in(tree):
                lists[path] = found
    return lists


def test_the_kinds_and_the_key_fields_are_listed_once() -> None:
    found = _retyped_lists()
    new = {path: what for path, what in found.items() if path not in PENDING_RETYPED}
    assert new == {}, "list the kinds/key fields from prebake.core.key_fields instead of retyping them"
    for path, what in PENDING_RETYPED.items():
        assert any(w.startswith(what) for w in found.get(path, [])), f"{path} is fixed: drop it from PENDING"


def test_the_retyped_list_scan_recognises_what_it_forbids() -> None:
    # The guard above is only worth something if its scan finds a retyped list.
    fields = ", ".join(repr(f) for f in (*KEY_FIELDS, "digest"))
    source = f"KINDS = {tuple(KINDS)!r}\nFIELDS = {{{fields}}}\nSOME = ('neuron', 'model')\n"
    assert _retyped_in(ast.parse(source)) == ["kinds (line 1)", "key fields (line 2)"]
