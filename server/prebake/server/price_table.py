"""The instance price table: instance type -> hourly USD, and the `PriceInputs` an evaluation records.

Shipped as package data (`prebake.server.data/instance_prices.csv`, next to the instance
catalog it covers), overridable by a file of the same format. Why the server: the price of
an evaluation is policy like the instance catalog (one table per registry, one override
flag), and the worker's layer (`prebake.compiler`) must not import the server. The server
resolves `price_inputs(instance_type, discount_rate)` when it enqueues or imports an
evaluation and hands the `PriceInputs` (`prebake.core.evaluation_records`) to the worker with the
job; the worker computes the prices with `prebake.core.pricing`, so every worker prices the
same way whatever table it could have found locally, and the inputs are recorded.

Format: CSV with the header `instance_type,hourly_usd`; lines starting with `#` are
comments. Two comments are read: `# source: TEXT` and `# recorded: DATE`, which become each
`PriceInputs.price_source` ("TEXT, recorded DATE"); without them the file's path is the source.
Immutable once loaded, so one table is shared by every thread.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator, Mapping
from importlib import resources
from pathlib import Path

from prebake.core.errors import InvalidKey
from prebake.core.evaluation_records import PriceInputs
from prebake.core.pricing import check_price_inputs
from prebake.core.suggest import did_you_mean
from prebake.server.instance_catalog import normalize_instance_name

SHIPPED = "prebake.server.data/instance_prices.csv"
COLUMNS = ("instance_type", "hourly_usd")


class PriceTable:
    """Hourly on-demand USD per normalised instance type, and where the figures came from."""

    def __init__(self, prices: Mapping[str, float], source: str) -> None:
        """ValueError for a name not in normalised form (ml.*, lowercase) or a negative price."""
        for name, hourly in prices.items():
            if name != normalize_instance_name(name):
                raise ValueError(f"instance type {name!r} is not in normalised form (ml.*, lowercase)")
            if not math.isfinite(hourly) or hourly < 0:
                raise ValueError(f"instance type {name!r}: hourly_usd must be a non-negative number")
        self._prices = dict(prices)
        self.source = source

    def hourly_usd(self, instance_type: str) -> float:
        """The hourly price of `instance_type` (case-insensitive, "ml." optional); InvalidKey if unknown."""
        key = normalize_instance_name(instance_type)
        price = self._prices.get(key)
        if price is None:
            known = list(self._prices)
            raise InvalidKey(
                "instance_type",
                f"no price for instance type {instance_type.strip()!r} in {self.source}"
                f"{did_you_mean(key, known) or ';'} known: {', '.join(known)}",
            )
        return price

    def price_inputs(self, instance_type: str, discount_rate: float = 0.0) -> PriceInputs:
        """What an evaluation on `instance_type` records; InvalidKey for an unknown type,
        ValueError for a discount outside [0, 1)."""
        hourly = self.hourly_usd(instance_type)
        price = PriceInputs(normalize_instance_name(instance_type), hourly, discount_rate, self.source)
        check_price_inputs(price)
        return price

    def names(self) -> tuple[str, ...]:
        """Every instance type with a price, in file order."""
        return tuple(self._prices)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and normalize_instance_name(name) in self._prices

    def __iter__(self) -> Iterator[str]:
        return iter(self._prices)

    def __len__(self) -> int:
        return len(self._prices)


def load_price_table(path: Path | None = None) -> PriceTable:
    """The shipped table, or the file at `path` (same format; see the module docstring).

    ValueError naming the file and line for a missing column, a malformed or negative
    price, a duplicate or an empty table; OSError if `path` cannot be read.
    """
    if path is None:
        text = resources.files("prebake.server.data").joinpath("instance_prices.csv").read_text("utf-8")
        return _parse(text, SHIPPED)
    return _parse(Path(path).read_text(encoding="utf-8"), str(path))


def _parse(text: str, where: str) -> PriceTable:
    notes: dict[str, str] = {}
    rows: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("#"):
            label, sep, value = stripped.lstrip("#").strip().partition(":")
            if sep and label.strip().lower() in ("source", "recorded"):
                notes[label.strip().lower()] = value.strip()
        elif stripped:
            rows.append((number, line))
    if not rows:
        raise ValueError(f"{where}: no header line ({','.join(COLUMNS)})")
    header_line, header = rows[0][0], next(csv.reader([rows[0][1]]))
    if [c.strip() for c in header] != list(COLUMNS):
        raise ValueError(
            f"{where}, line {header_line}: the header must be {','.join(COLUMNS)}, not {','.join(header)}"
        )
    prices: dict[str, float] = {}
    for number, line in rows[1:]:
        cells = [c.strip() for c in next(csv.reader([line]))]
        if len(cells) != len(COLUMNS) or not cells[0]:
            raise ValueError(f"{where}, line {number}: expected {','.join(COLUMNS)}, got {line.strip()!r}")
        name = normalize_instance_name(cells[0])
        try:
            hourly = float(cells[1])
        except ValueError:
            raise ValueError(f"{where}, line {number}: hourly_usd {cells[1]!r} is not a number") from None
        if not math.isfinite(hourly) or hourly < 0:
            raise ValueError(f"{where}, line {number}: hourly_usd {cells[1]!r} must be a non-negative number")
        if name in prices:
            raise ValueError(f"{where}, line {number}: instance type {name!r} is listed twice")
        prices[name] = hourly
    if not prices:
        raise ValueError(f"{where}: the table lists no instance type")
    source = notes.get("source", where)
    if "recorded" in notes:
        source = f"{source}, recorded {notes['recorded']}"
    return PriceTable(prices, source)
