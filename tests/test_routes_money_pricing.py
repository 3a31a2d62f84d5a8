"""Route classification (including path tricks), amounts people write, and integer pricing."""

from __future__ import annotations

import pytest

from cycles_proxy.authority.base import Unit
from cycles_proxy.money import AmountError, format_amount, parse_amount
from cycles_proxy.pricing import Pricing
from cycles_proxy.routes import Dialect, Kind, classify
from cycles_proxy.settings import PriceRule, Settings


@pytest.mark.parametrize(
    ("path", "kind", "endpoint"),
    [
        ("/api/chat", Kind.METERED, "chat"),
        ("/v1/chat/completions", Kind.METERED, "chat_completions"),
        ("/v1/responses", Kind.METERED, "responses"),
        ("/api/tags", Kind.PASS, ""),
        ("/api/some-new-route", Kind.PASS, ""),
        ("/", Kind.PUBLIC, ""),
        ("/api/pull", Kind.ADMIN_ONLY, ""),
        ("/api/blobs/sha256:abc", Kind.ADMIN_ONLY, ""),
        # spellings that must not dodge metering or the admin rule
        ("/api//chat", Kind.METERED, "chat"),
        ("/api/./chat", Kind.METERED, "chat"),
        ("/api/x/../chat", Kind.METERED, "chat"),
        ("/api/chat/", Kind.METERED, "chat"),
        ("/api/%63hat", Kind.METERED, "chat"),
        ("/api%2Fchat", Kind.METERED, "chat"),
        ("/api%252Fgenerate", Kind.METERED, "generate"),
        ("//api/pull", Kind.ADMIN_ONLY, ""),
        ("/API/PULL", Kind.ADMIN_ONLY, ""),
        ("/api/tags/../pull", Kind.ADMIN_ONLY, ""),
        ("/api\\delete", Kind.ADMIN_ONLY, ""),
    ],
)
def test_classify(path: str, kind: Kind, endpoint: str) -> None:
    r = classify(path)
    assert r.kind is kind
    assert r.endpoint == endpoint


def test_dialect_follows_the_prefix() -> None:
    assert classify("/v1/models").dialect is Dialect.OPENAI
    assert classify("/api/tags").dialect is Dialect.OLLAMA


@pytest.mark.parametrize(
    ("text", "units"),
    [
        ("5usd", 500_000_000),
        ("$0.50", 50_000_000),
        ("25cents", 25_000_000),
        ("1500000", 1_500_000),
        ("10k", 10_000),
        ("2.5m", 2_500_000),
        (42, 42),
    ],
)
def test_parse_amount(text: str | int, units: int) -> None:
    assert parse_amount(text) == units


def test_rates_convert_to_per_second_exactly() -> None:
    assert parse_amount("1usd/h", per_second=True) == 27_778  # 100_000_000 / 3600, rounded
    assert parse_amount("0.36usd/h", per_second=True) == 10_000
    with pytest.raises(AmountError):
        parse_amount("1usd/h")  # a rate where an amount is expected


@pytest.mark.parametrize("bad", ["", "five", "-3", "1.5.2", "$5k", 1.5, True, -1])
def test_bad_amounts_are_refused(bad: object) -> None:
    with pytest.raises(AmountError):
        parse_amount(bad)


def test_format_amount() -> None:
    assert format_amount(150_000_000, "USD_MICROCENTS") == "$1.50"
    assert format_amount(1234, "TOKENS") == "1,234 tokens"
    assert format_amount(30_000_000, "USD_MICROCENTS") == "$0.30"
    assert format_amount(1, "USD_MICROCENTS") == "$0.00000001"
    assert format_amount(0, "USD_MICROCENTS") == "$0.00"


def test_pricing_is_integer_and_rounds_up() -> None:
    s = Settings(
        default_price_per_gpu_second=1000,
        prices=[PriceRule(model="llama3*", per_gpu_second=3, per_output_token=2)],
        default_estimate_seconds=2.0,
    )
    p = Pricing(s)
    assert p.actual("qwen", 1, None, None) == 1  # 1 ns of GPU is never free
    assert p.actual("qwen", 1_500_000_000, 10, 10) == 1500
    assert p.actual("llama3.2", 1_000_000_000, 10, 4) == 3 + 8  # first matching rule wins
    assert isinstance(p.actual("qwen", 123_456_789, 1, 1), int)


def test_tokens_unit_counts_tokens() -> None:
    p = Pricing(Settings(unit=Unit.TOKENS))
    assert p.actual("any", 5_000_000_000, 30, 12) == 42


def test_settings_reject_bad_values() -> None:
    with pytest.raises(ValueError):
        Settings(upstream="127.0.0.1:11435")  # no scheme
    with pytest.raises(ValueError):
        Settings(gpu_time="sometimes")
