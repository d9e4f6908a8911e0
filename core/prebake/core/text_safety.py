"""Text that reaches people: no invisible characters, no terminal escapes, bounded length.

Two uses, one definition of "invisible" (`INVISIBLE_CATEGORIES`, `first_invisible`):

* names that must be refused outright (manifest paths, model sources): a file name with a
  bidirectional override (U+202E) or a zero-width character displays as another name;
* text recorded from an untrusted party and shown to others (a compile's failure text,
  a worker's progress message): `displayable` strips terminal escape sequences and
  invisible characters and caps the length, so one job's output cannot rewrite another
  deployer's terminal or flood it.

Stdlib only: the thin client imports this module. Pure functions, thread-safe.
"""

from __future__ import annotations

import re
import unicodedata

# Unicode general categories that never display as themselves: controls (Cc: C0, DEL, C1,
# which includes the 8-bit CSI), format characters (Cf: the bidirectional embeddings,
# overrides and isolates U+202A-202E and U+2066-2069, the marks U+200E/U+200F/U+061C,
# zero-width spaces and joiners, U+FEFF), line and paragraph separators (Zl, Zp) and
# lone surrogates (Cs).
INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})

# ESC-introduced sequences: CSI (ESC [ ... final byte), OSC/DCS/PM/APC/SOS strings (up to
# BEL or ST), and two-character escapes. Removed whole, so no parameters are left behind.
_ESCAPE_RE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]?"  # CSI
    r"|\x1b[\]PX^_][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC, DCS, SOS, PM, APC
    r"|\x1b[ -~]?"  # other escapes (and a lone ESC)
    r"|\x9b[0-?]*[ -/]*[@-~]?"  # 8-bit CSI
)
# Kept in multi-line text: they display as what they are.
_LAYOUT = frozenset("\n\t")


def first_invisible(text: str) -> str | None:
    """The first character of `text` in INVISIBLE_CATEGORIES, or None if there is none."""
    return next((c for c in text if unicodedata.category(c) in INVISIBLE_CATEGORIES), None)


def displayable(text: str, limit: int) -> str:
    """`text` safe to show on a terminal: escape sequences and invisible characters removed
    (newlines and tabs kept, carriage returns become newlines), at most `limit` characters.

    A longer text keeps its beginning and its end (a compile error's headline comes first,
    the log's last lines last) around a marker saying how much was left out.
    """
    clean = _ESCAPE_RE.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    clean = "".join(c for c in clean if c in _LAYOUT or unicodedata.category(c) not in INVISIBLE_CATEGORIES)
    if len(clean) <= limit:
        return clean
    marker = "\n[... {} characters left out ...]\n"
    # The count left out has at most as many digits as len(clean): the result fits.
    room = limit - len(marker.format(len(clean)))
    if room <= 0:
        return clean[:limit]
    head = room * 2 // 3
    tail = room - head
    return clean[:head] + marker.format(len(clean) - room) + clean[len(clean) - tail :]
