"""The fields of an artifact key and the artifact kinds, read from the contract once.

`KEY_FIELDS` are the `prebake.v1.ArtifactKey` field names in declaration order (the order
of key tables and diffs); `KINDS` are the short kind names (`prebake.core.names`). Both
come from the generated descriptors, so a field or kind added to the proto reaches every
module without retyping a list. A module that keeps a table per field or per kind calls
`require_fields` / `require_kinds` at import, so a new field or kind fails loudly there
instead of being silently ignored.
"""

from __future__ import annotations

from collections.abc import Iterable

from prebake.core.names import kind_names
from prebake.v1 import key_pb2

KEY_FIELDS: tuple[str, ...] = tuple(f.name for f in key_pb2.ArtifactKey.DESCRIPTOR.fields)
KINDS: tuple[str, ...] = tuple(kind_names())

# Key fields by wire type, for code that treats them generically (parsing, rendering);
# `kind` (an enum) and `options` (a map) are in neither.
INT_FIELDS: tuple[str, ...] = tuple(
    f.name for f in key_pb2.ArtifactKey.DESCRIPTOR.fields if f.cpp_type == f.CPPTYPE_INT64
)
STRING_FIELDS: tuple[str, ...] = tuple(
    f.name for f in key_pb2.ArtifactKey.DESCRIPTOR.fields if f.cpp_type == f.CPPTYPE_STRING
)


def require_fields(names: Iterable[str], where: str) -> None:
    """Raise RuntimeError unless `names` are exactly the key's fields (`where` names the table)."""
    _require(set(names), set(KEY_FIELDS), "key fields", where)


def require_kinds(names: Iterable[str], where: str) -> None:
    """Raise RuntimeError unless `names` are exactly the artifact kinds (`where` names the table)."""
    _require(set(names), set(KINDS), "kinds", where)


def _require(got: set[str], want: set[str], what: str, where: str) -> None:
    if got != want:
        missing, extra = sorted(want - got), sorted(got - want)
        raise RuntimeError(
            f"{where} is out of date with the contract's {what}: missing {missing}, extra {extra}"
        )
