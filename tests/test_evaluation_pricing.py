"""Prices: the formulas of prebake.core.pricing against the worked example done by hand, and the
instance price table (shipped, overridden, malformed, unknown types)."""

from __future__ import annotations

from pathlib import Path

import pytest

from prebake.core import pricing
from prebake.core.errors import InvalidKey
from prebake.core.evaluation_records import PriceInputs
from prebake.server.instance_catalog import InstanceCatalog
from prebake.server.price_table import SHIPPED, load_price_table

# The module docstring's worked example: ml.g5.2xlarge at 1.515 USD/h, 20 % off.
EXAMPLE = PriceInputs("ml.g5.2xlarge", 1.515, 0.2, "test")


def test_the_worked_example_by_hand() -> None:
    hourly = 1.515 * 0.8  # 1.212 USD/h
    assert pricing.effective_hourly_usd(EXAMPLE.hourly_usd, EXAMPLE.discount_rate) == pytest.approx(hourly)
    assert pricing.total_token_throughput(4, 25.0) == pytest.approx(160.0)  # 4 / 0.025 s
    # 160 tokens/s = 576,000 tokens/h; 1.212 USD buys 576,000 tokens.
    assert pricing.blended_price_per_million_tokens(EXAMPLE, 4, 25.0) == pytest.approx(hourly / 0.576)
    assert pricing.blended_price_per_million_tokens(EXAMPLE, 4, 25.0) == pytest.approx(2.1041667, rel=1e-6)
    assert pricing.price_per_million_tokens(EXAMPLE, 360.0) == pytest.approx(0.9351852, rel=1e-6)
    assert pricing.price_per_million_tokens(EXAMPLE, 120.0) == pytest.approx(2.8055556, rel=1e-6)


def test_no_discount_and_the_blend_at_three_to_one() -> None:
    full = PriceInputs("ml.g5.2xlarge", 3.6, 0.0, "test")
    # 3.6 USD/h at 1 token/s: 3600 tokens for 3.6 USD, 1000 USD per million.
    assert pricing.price_per_million_tokens(full, 1.0) == pytest.approx(1000.0)
    assert full.input_output_ratio == 3.0
    assert pricing.blend(1.0, 5.0) == pytest.approx((3 * 1.0 + 5.0) / 4)
    assert pricing.blend(1.0, 5.0, 1.0) == pytest.approx(3.0)


def test_more_concurrency_at_the_same_latency_is_cheaper_per_token() -> None:
    one = pricing.blended_price_per_million_tokens(EXAMPLE, 1, 25.0)
    assert pricing.blended_price_per_million_tokens(EXAMPLE, 4, 25.0) == pytest.approx(one / 4)


@pytest.mark.parametrize(
    ("hourly", "discount", "ratio", "message"),
    [
        (-1.0, 0.0, 3.0, "hourly_usd must not be negative"),
        (float("nan"), 0.0, 3.0, "hourly_usd must be a finite number"),
        (1.0, 1.0, 3.0, r"discount_rate must be in \[0, 1\)"),
        (1.0, -0.1, 3.0, r"discount_rate must be in \[0, 1\)"),
        (1.0, 0.0, 0.0, "input_output_ratio must be positive"),
    ],
)
def test_price_inputs_refuse_what_cannot_price(
    hourly: float, discount: float, ratio: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        pricing.check_price_inputs(PriceInputs("ml.g5.xlarge", hourly, discount, "test", ratio))


def test_rates_and_latencies_must_be_positive() -> None:
    with pytest.raises(ValueError, match="inter-token latency"):
        pricing.blended_price_per_million_tokens(EXAMPLE, 4, 0.0)
    with pytest.raises(ValueError, match="concurrency must be a positive integer"):
        pricing.total_token_throughput(0, 25.0)
    with pytest.raises(ValueError, match="tokens_per_second must be positive"):
        pricing.price_per_million_tokens(EXAMPLE, 0.0)
    with pytest.raises(ValueError, match="output_price must not be negative"):
        pricing.blend(1.0, -1.0)


# -- the price table --------------------------------------------------------------------------


def test_the_shipped_table_prices_every_catalogued_instance_type() -> None:
    table = load_price_table()
    catalog = InstanceCatalog.load_default()
    assert sorted(table.names()) == sorted(catalog.names())
    assert all(table.hourly_usd(name) > 0 for name in table)
    assert "recorded 2026-12-03" in table.source
    assert "us-east-1" in table.source


def test_price_inputs_from_the_table() -> None:
    table = load_price_table()
    inputs = table.price_inputs(" ML.G5.2XLARGE", 0.25)
    assert inputs == PriceInputs("ml.g5.2xlarge", 1.515, 0.25, table.source)
    assert table.price_inputs("g5.2xlarge").hourly_usd == 1.515  # "ml." is optional
    with pytest.raises(ValueError, match="discount_rate"):
        table.price_inputs("ml.g5.2xlarge", 1.5)


def test_an_unknown_type_is_refused_with_a_suggestion_and_the_known_types() -> None:
    table = load_price_table()
    with pytest.raises(InvalidKey) as caught:
        table.price_inputs("ml.g5.2xlarg")
    assert caught.value.field == "instance_type"
    message = str(caught.value)
    assert "no price for instance type 'ml.g5.2xlarg'" in message
    assert "did you mean 'ml.g5.2xlarge'" in message
    assert "ml.p5.48xlarge" in message  # the known types are listed
    assert SHIPPED in message or table.source in message


def test_an_override_file_replaces_the_shipped_table(tmp_path: Path) -> None:
    path = tmp_path / "prices.csv"
    path.write_text(
        "# source: our negotiated rates\n# recorded: 2026-11-30\n"
        "instance_type,hourly_usd\nml.c7i.xlarge,0.1\ninf2.xlarge, 0.5 \n"
    )
    table = load_price_table(path)
    assert table.names() == ("ml.c7i.xlarge", "ml.inf2.xlarge")
    assert table.source == "our negotiated rates, recorded 2026-11-30"
    assert table.price_inputs("ml.inf2.xlarge").hourly_usd == 0.5
    assert "ml.g5.xlarge" not in table
    path.write_text("instance_type,hourly_usd\nml.c7i.xlarge,0.1\n")
    assert load_price_table(path).source == str(path)  # no source comment: the file


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no header line"),
        ("# only a comment\n", "no header line"),
        ("instance,price\nml.c7i.xlarge,0.1\n", "line 1: the header must be instance_type,hourly_usd"),
        ("instance_type,hourly_usd\n", "lists no instance type"),
        ("instance_type,hourly_usd\nml.c7i.xlarge,cheap\n", "line 2: hourly_usd 'cheap' is not a number"),
        ("instance_type,hourly_usd\nml.c7i.xlarge,-1\n", "line 2: hourly_usd '-1' must be a non-negative"),
        ("instance_type,hourly_usd\nml.c7i.xlarge,inf\n", "line 2: hourly_usd 'inf' must be a non-negative"),
        ("instance_type,hourly_usd\n# note\nml.c7i.xlarge\n", "line 3: expected instance_type,hourly_usd"),
        ("instance_type,hourly_usd\nml.c7i.xlarge,1,2\n", "line 2: expected instance_type,hourly_usd"),
        ("instance_type,hourly_usd\nml.a,1\nML.A,2\n", "line 3: instance type 'ml.a' is listed twice"),
    ],
)
def test_malformed_files_are_refused_naming_the_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "prices.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as caught:
        load_price_table(path)
    assert str(path) in str(caught.value)


def test_a_missing_override_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_price_table(tmp_path / "absent.csv")
