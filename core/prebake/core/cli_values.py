"""Parsers of command-line values, shared by the commands of every part of `prebake`.

Each is an argparse `type=`: it returns the value or raises `argparse.ArgumentTypeError`
with a message that says what was expected (the `prebake` parser reports it as invalid
input, exit 10). A name from a fixed set (`kind`, or any `one_of`) that is not in it is
refused with the closest names (`prebake.core.suggest`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from prebake.core.names import kind_names
from prebake.core.suggest import unknown

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def size(text: str) -> int:
    """Bytes, with an optional binary suffix: 1048576, 512M, 64G, 2TiB."""
    raw = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (raw[:-1], raw[-1]) if raw and raw[-1] in _SIZE_UNITS else (raw, "")
    try:
        value = int(float(number) * _SIZE_UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a size such as 1048576, 512M or 64G, got {text!r}"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a size cannot be negative: {text!r}")
    return value


def _number(text: str, kind: type[float] | type[int], expected: str) -> float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def positive_seconds(text: str) -> float:
    """A number of seconds above 0 (a timeout)."""
    value = _number(text, float, "a number of seconds")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def seconds(text: str) -> float:
    """A number of seconds, 0 or more (a grace period)."""
    value = _number(text, float, "a number of seconds")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more seconds, got {text!r}")
    return value


def count(text: str) -> int:
    """A whole number, 0 or more."""
    value = int(_number(text, int, "a whole number"))
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """A whole number, 1 or more (a shape, a degree, a concurrency)."""
    value = int(_number(text, int, "a whole number"))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive (1 or more); got {text!r}")
    return value


def one_of(
    what: str, names: Sequence[str], normalize: Callable[[str], str] = str.lower
) -> Callable[[str], str]:
    """A type accepting the `names` (after `normalize`), refusing others with "did you mean"."""
    known = list(names)

    def parse(text: str) -> str:
        value = normalize(text.strip())
        if value not in known:
            raise argparse.ArgumentTypeError(unknown(what, text, known))
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


# --kind on every command: "neuron", also "NEURON" and the enum's "ARTIFACT_KIND_NEURON".
kind = one_of("kind", kind_names(), lambda text: text.lower().removeprefix("artifact_kind_"))
