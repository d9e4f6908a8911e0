"""A small per-user memo of file digests, so that publishing unchanged files again skips them.

`publish` hashes a file while uploading it (it is read once), so it learns the digest only
after sending it. To still skip, on a later publish, the files the server already holds,
it remembers each digest under the file's stat identity: path, device, inode, size,
modification and change times (nanoseconds). Any write to a file, and any `utime`, sets
its change time to the current time, which no program can set back; so an entry whose
identity still matches names the same bytes, with one exception the memo refuses: a file
changed within the filesystem's timestamp granularity of the time it was read keeps its
times. So an entry is recorded only for a file whose times are `RACY_SECONDS` older than
the moment its reading began and whose identity did not change while it was read (as
git does for its index).

The memo is one JSON file (default `$PREBAKE_DIGEST_MEMO`, else
`$XDG_CACHE_HOME/prebake/digests.json`, else `~/.cache/prebake/digests.json`; the
variable set to `off` or empty disables it), of at most `MAX_ENTRIES` entries, the
least recently used dropped first, replaced atomically on `save`. It is only a memo: a
file that cannot be read or written, or that holds anything unexpected, is treated as
empty, and concurrent publishers may drop each other's entries (costing an upload, never
a wrong digest).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections import OrderedDict
from pathlib import Path

from prebake.core.digests import hash_problem

MAX_ENTRIES = 4096
RACY_SECONDS = 3.0
ENV = "PREBAKE_DIGEST_MEMO"
_VERSION = 1


def default_path() -> Path | None:
    """Where the memo lives for this user, or None if `$PREBAKE_DIGEST_MEMO` disables it."""
    configured = os.environ.get(ENV)
    if configured is not None:
        return None if configured in ("", "off") else Path(configured)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "prebake" / "digests.json"


def identity(path: Path, st: os.stat_result) -> str:
    """The memo's key for `path` as `st` describes it."""
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{os.path.abspath(path)}"


class DigestMemo:
    """Digests of files by stat identity; see the module docstring. Not thread-safe."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._entries: OrderedDict[str, str] = OrderedDict()
        self._changed = False
        if path is not None:
            self._entries = _load(path)

    @classmethod
    def default(cls) -> DigestMemo:
        return cls(default_path())

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, path: Path, st: os.stat_result) -> str | None:
        """The digest hash recorded for `path` in the state `st`, or None."""
        key = identity(path, st)
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
        return found

    def record(self, path: Path, before: os.stat_result, digest_hash: str, read_started_ns: int) -> None:
        """Remember `digest_hash` for `path`, read from `read_started_ns` (`time.time_ns()`) in the
        state `before`, unless the file changed meanwhile or its times are too recent to rely on."""
        if self.path is None:
            return
        try:
            after = os.stat(path)
        except OSError:
            return
        key = identity(path, before)
        margin = int(RACY_SECONDS * 1e9)
        if (
            identity(path, after) != key
            or max(before.st_mtime_ns, before.st_ctime_ns) > read_started_ns - margin
        ):
            return
        self._entries[key] = digest_hash
        self._entries.move_to_end(key)
        while len(self._entries) > MAX_ENTRIES:
            self._entries.popitem(last=False)
        self._changed = True

    def save(self) -> None:
        """Write the memo if it changed; failures are ignored (it is only a memo)."""
        if self.path is None or not self._changed:
            return
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".digests-", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump({"version": _VERSION, "entries": list(self._entries.items())}, f)
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            self._changed = False


def _load(path: Path) -> OrderedDict[str, str]:
    entries: OrderedDict[str, str] = OrderedDict()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return entries
    if not isinstance(data, dict) or data.get("version") != _VERSION:
        return entries
    listed = data.get("entries")
    if not isinstance(listed, list):
        return entries
    for item in listed[-MAX_ENTRIES:]:
        if (
            isinstance(item, list)
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], str)
            and hash_problem(item[1]) is None
        ):
            entries[item[0]] = item[1]
    return entries
