"""`ArtifactKey`: a configuration as a deployer states it, as an immutable value.

The client does not normalise or validate keys: the server does, and answers
INVALID_ARGUMENT with a message naming the field. An unknown `kind` string is sent as
ARTIFACT_KIND_UNSPECIFIED so that the server's message is the one the user sees.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from prebake.core.key_fields import KEY_FIELDS, require_fields
from prebake.core.names import kind_name, kind_to_proto
from prebake.v1 import key_pb2


class FrozenOptions(Mapping[str, str]):
    """A read-only, hashable, picklable copy of a key's options."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, str] | None = None) -> None:
        self._data = dict(data or {})

    def __getitem__(self, name: str) -> str:
        return self._data[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __repr__(self) -> str:
        return repr(self._data)

    def __reduce__(self) -> tuple[type[FrozenOptions], tuple[dict[str, str]]]:
        return (FrozenOptions, (self._data,))


@dataclass(frozen=True)
class ArtifactKey:
    """Everything that makes an ahead-of-time compiled artifact unique.

    Immutable and hashable (usable as a dict key); `options` is copied into a read-only
    mapping. Fields left at their defaults are "unset": the server fills per-kind
    defaults before hashing, so stating a default and omitting it give the same key.
    """

    kind: str
    model: str
    model_revision: str = ""
    instance_type: str = ""
    sequence_length: int = 0
    batch_size: int = 0
    tensor_parallel_degree: int = 0
    precision: str = ""
    toolchain: str = ""
    options: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Copy so a caller mutating its dict afterwards cannot change a frozen key.
        object.__setattr__(self, "options", FrozenOptions(self.options))

    def to_proto(self) -> key_pb2.ArtifactKey:
        """The wire form (a new message each time). Raises TypeError if a field has the
        wrong type."""
        return key_pb2.ArtifactKey.FromString(_wire_form(self))

    @classmethod
    def from_proto(cls, proto: key_pb2.ArtifactKey) -> ArtifactKey:
        """The key a proto states (e.g. `ResolvedKey.key`, the normalised form)."""
        values: dict[str, Any] = {name: getattr(proto, name) for name in KEY_FIELDS}
        values["kind"] = kind_name(proto.kind)
        values["options"] = dict(proto.options)
        return cls(**values)

    def describe(self) -> str:
        """A one-line human summary, listing only the fields that are set."""
        head = f"{self.kind or '?'}:{self.model}"
        parts = [f"{head}@{self.model_revision}" if self.model_revision else head]
        labels = (
            ("instance", self.instance_type),
            ("seq", self.sequence_length),
            ("batch", self.batch_size),
            ("tp", self.tensor_parallel_degree),
            ("precision", self.precision),
            ("toolchain", self.toolchain),
        )
        parts.extend(f"{label}={value}" for label, value in labels if value)
        parts.extend(f"{k}={v}" for k, v in sorted(self.options.items()))
        return " ".join(parts)


@functools.lru_cache(maxsize=1024)
def _wire_form(key: ArtifactKey) -> bytes:
    # Memoised: a deployer or prewarm run looks the same keys up again and again, and
    # building the message field by field was most of the client's own time per hit.
    values: dict[str, Any] = {name: getattr(key, name) for name in KEY_FIELDS}
    values["kind"] = kind_to_proto(key.kind)
    values["options"] = dict(key.options)
    return key_pb2.ArtifactKey(**values).SerializeToString()


# The dataclass spells the fields out for type checkers; the contract decides which exist.
require_fields((f.name for f in fields(ArtifactKey)), "prebake.client.ArtifactKey")
