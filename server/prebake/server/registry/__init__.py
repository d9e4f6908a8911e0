"""The SQLite registry of artifact manifests and compile jobs."""

from prebake.server.registry.registry import Registry
from prebake.server.registry.schema import SchemaTooNew

__all__ = ["Registry", "SchemaTooNew"]
