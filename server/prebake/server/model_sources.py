"""Model sources are server policy: which checkpoints a compile job may read.

A lookup's `model_source` tells a worker what to read and compile; the compiled artifact
is then served to anyone. So the server, not the caller, decides what may be read:

* `model_source_roots`: local directories and `s3://` prefixes a lookup may name a source
  inside of (default: the data directory's `models/`, so a local developer can compile
  without configuring anything, and nothing else on the host is readable);
* `model_source_map`: per model, the source of a job whose lookup names none. A mapped
  source is allowed as is (the operator named it), even outside the roots.

`ModelSources.resolve` is the policy point: every job's source has passed it, so a remote
worker can compile what its job says. A local source must be an absolute path without
`..`, lexically under a root, an existing directory on the server host, and under a root
with symbolic links resolved. Every way of failing those gives the same message, so an
answer never tells whether a path outside the allowed set exists. Workers on the server
host re-check local sources before reading (`WorkerConfig.model_roots`).

Immutable after construction; thread-safe. The checks read the file system (a few
lstat calls), cheap enough for the event loop.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from prebake.core.errors import FailedPrecondition, InvalidArgument
from prebake.core.s3_urls import S3Location, is_s3_url, parse_s3_url
from prebake.core.source_roots import lexical_path, lexically_within, really_within, s3_within
from prebake.core.text_safety import first_invisible
from prebake.server.model_catalog import canonical_model_name

MAX_MODEL_SOURCE = 1024
# Under the data directory, the local root when none is configured.
DEFAULT_ROOT = "models"


@dataclass(frozen=True)
class ModelSources:
    """The allowed set (local roots, S3 prefixes) and the per-model sources."""

    local_roots: tuple[str, ...]
    s3_prefixes: tuple[S3Location, ...]
    # model name (as normalised in keys) -> source
    mapped: Mapping[str, str]

    @classmethod
    def from_config(cls, roots: str, mapping: str, data_dir: Path) -> ModelSources:
        """Parse `model_source_roots` and `model_source_map`; ValueError if malformed."""
        local: list[str] = []
        prefixes: list[S3Location] = []
        for item in _items(roots):
            if is_s3_url(item):
                prefixes.append(_s3(item, "model_source_roots"))
            elif ".." in item.split(os.sep):
                raise ValueError(f"model_source_roots entry {item!r}: no '..' components")
            else:
                local.append(os.path.normpath(os.path.abspath(item)))
        if not local and not prefixes:
            local.append(os.path.normpath(os.path.abspath(data_dir / DEFAULT_ROOT)))
        mapped: dict[str, str] = {}
        for item in _items(mapping):
            model, sep, source = (part.strip() for part in item.partition("="))
            if not sep or not model or not source:
                raise ValueError(f"model_source_map entry {item!r}: expected MODEL=SOURCE")
            if is_s3_url(source):
                _s3(source, f"model_source_map entry for {model}")
            elif lexical_path(source) is None:
                raise ValueError(
                    f"model_source_map entry for {model}: {source!r} is not an absolute path "
                    "without '..', nor an s3:// URL"
                )
            # Keyed as keys name models, so that any name of a catalog model finds its entry.
            mapped[canonical_model_name(model)] = _canonical(source)
        return cls(tuple(local), tuple(prefixes), mapped)

    def worker_roots(self) -> tuple[Path, ...]:
        """Local directories a worker on this host may read: the roots and the mapped local
        sources (for `WorkerConfig.model_roots`)."""
        mapped = [s for s in self.mapped.values() if not is_s3_url(s)]
        return tuple(Path(p) for p in (*self.local_roots, *mapped))

    def resolve(self, model: str, requested: str) -> tuple[str, bool]:
        """The source a job for `model` reads, and whether the caller named it.

        No `requested` source: the mapped one, or "" (the job then fails: nothing to
        read). A requested source must be the mapped one or inside the allowed set; local
        paths are recorded normalised. Raises InvalidArgument, with one message for
        everything outside the set, missing or escaping through `..` or a link.
        """
        text = requested.strip()
        if not text:
            return self.mapped.get(model, ""), False
        if len(text) > MAX_MODEL_SOURCE:
            raise InvalidArgument(f"model_source is {len(text)} characters; at most {MAX_MODEL_SOURCE}")
        if first_invisible(text) is not None:
            raise InvalidArgument("model_source contains control or invisible characters")
        if is_s3_url(text):
            location = parse_s3_url(text, "model_source")
            if str(location) == self.mapped.get(model) or s3_within(location, self.s3_prefixes):
                return text, True
            raise _refused(text)
        if "://" in text:
            raise InvalidArgument(
                f"model_source {_show(text)}: only local directories and s3:// prefixes are supported"
            )
        path = lexical_path(text)
        if path is None and not os.path.isabs(text):
            raise InvalidArgument(
                f"model_source {_show(text)} is not an absolute path; name the checkpoint "
                "directory as the server's host sees it"
            )
        if path is not None and path == self.mapped.get(model):
            return path, True
        if path is None or not self._readable(path):
            raise _refused(text)
        return path, True

    def _readable(self, path: str) -> bool:
        # Lexical first: nothing outside the roots is ever looked at on disk.
        if not lexically_within(path, self.local_roots):
            return False
        return os.path.isdir(path) and really_within(path, self.local_roots)

    def visible(self, source: str) -> bool:
        """Whether `source` may be shown to any caller: inside the allowed set (or mapped),
        judged lexically. A job recorded under an older policy may hold another path."""
        if _canonical(source) in self.mapped.values():
            return True
        if is_s3_url(source):
            try:
                return s3_within(parse_s3_url(source), self.s3_prefixes)
            except InvalidArgument:
                return False
        path = lexical_path(source)
        return path is not None and lexically_within(path, self.local_roots)

    def conflict(self, job_id: str, job_source: str, requested: str) -> FailedPrecondition | None:
        """The error for a lookup that names `requested` while the key's active job reads
        `job_source`, or None if they are the same source."""
        if same_source(job_source, requested):
            return None
        shown = _show(job_source) if job_source and self.visible(job_source) else "another model source"
        if not job_source:
            shown = "no model source"
        return FailedPrecondition(
            f"job {job_id} is already compiling this key from {shown}, not from the model_source "
            "this lookup names: look it up without a model_source (or with the job's) to join it, "
            "or wait for the job to finish (or cancel it) and look up again"
        )


def same_source(a: str, b: str) -> bool:
    """Whether two accepted sources name the same checkpoint (compared normalised)."""
    return _canonical(a) == _canonical(b)


def _canonical(source: str) -> str:
    text = source.strip()
    if is_s3_url(text):
        try:
            return str(parse_s3_url(text))
        except InvalidArgument:
            return text
    return lexical_path(text) or text


def _refused(text: str) -> InvalidArgument:
    return InvalidArgument(
        f"model_source {_show(text)} is not a model source this server allows: name an existing "
        "checkpoint directory under one of its model source roots, or an s3:// prefix under an "
        "allowed one (server settings model_source_roots and model_source_map)"
    )


def _s3(text: str, what: str) -> S3Location:
    try:
        return parse_s3_url(text, what)
    except InvalidArgument as exc:
        raise ValueError(str(exc)) from None


def _items(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _show(text: str, limit: int = 200) -> str:
    return repr(text if len(text) <= limit else f"{text[:limit]}...")
