""" "Did you mean" for a value that is not one of a known set, worded once for every side.

The CLI (argparse types and choices), the server's key validation and its catalogs all
refuse an unknown name with the same shape of message, so a typo reads the same whether
the CLI or the server caught it:

    unknown kind 'nueron'; did you mean 'neuron'? (one of neuron, awq, inductor)

Close matches come from `difflib` (ratio 0.6, as its default), best first.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

# More than this many known values are not listed in full (an instance catalog has dozens).
MAX_LISTED = 12


def close_matches(value: str, known: Sequence[str], n: int = 3) -> list[str]:
    """Up to `n` of `known` that look like `value`, best first (case-insensitive)."""
    by_lower = {name.lower(): name for name in known}
    return [by_lower[m] for m in difflib.get_close_matches(value.strip().lower(), list(by_lower), n=n)]


def either(names: Sequence[str]) -> str:
    """'a', 'a' or 'b', 'a', 'b' or 'c' (each quoted)."""
    quoted = [repr(name) for name in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def did_you_mean(value: str, known: Sequence[str]) -> str:
    """ "; did you mean 'x'?" when something in `known` is close to `value`, else ""."""
    close = close_matches(value, known)
    return f"; did you mean {either(close)}?" if close else ""


def unknown(what: str, value: str, known: Sequence[str]) -> str:
    """The message for `value` that is no `what` of `known` (see the module docstring)."""
    listed = ", ".join(known) if len(known) <= MAX_LISTED else ", ".join([*known[:MAX_LISTED], "..."])
    shown = value if len(value) <= 80 else f"{value[:80]}..."
    return f"unknown {what} {shown!r}{did_you_mean(value, known)} (one of {listed})"
