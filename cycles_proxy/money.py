"""Amounts people can read and write, converted exactly to integer ledger units.

``USD_MICROCENTS``: 1 USD = 100,000,000. Parsing uses ``Decimal`` so no float ever touches an
amount; a result that is not a whole number of units is rounded half-up once, at the end.
"""

from __future__ import annotations

import re
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

MICROCENTS_PER_USD = 100_000_000

_SCALE = {"": 1, "k": 1_000, "m": 1_000_000, "b": 1_000_000_000}
_TIME = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "hour": 3600}
_RE = re.compile(
    r"""^\s*(?P<dollar>\$)?\s*(?P<num>[0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*
    (?P<suffix>usd|cents?|k|m|b)?\s*(?:/\s*(?P<per>s|sec|min|m|h|hr|hour))?\s*$""",
    re.IGNORECASE | re.VERBOSE,
)


class AmountError(ValueError):
    pass


def parse_amount(value: Any, *, per_second: bool = False) -> int:
    """Parse ``5usd``, ``$0.50``, ``25cents``, ``1500000`` (raw units), ``10k``, ``2.5m`` and,
    for prices (``per_second=True``), a rate such as ``1usd/h`` (converted to per second)."""
    if isinstance(value, bool):
        raise AmountError("an amount must be a number, not true/false")
    if isinstance(value, int):
        if value < 0:
            raise AmountError("an amount cannot be negative")
        return value
    if isinstance(value, float):
        raise AmountError(
            f'write {value} as a string with a unit (e.g. "{value}usd") or as whole units'
        )
    if not isinstance(value, str):
        raise AmountError(f"cannot read an amount from {value!r}")
    m = _RE.match(value)
    if not m:
        raise AmountError(
            f"cannot read the amount {value!r}; use whole units (1500000), "
            "dollars (5usd, $0.50), cents (25cents) or k/m suffixes (10k)"
        )
    try:
        num = Decimal(m["num"])
    except InvalidOperation:  # pragma: no cover - the regex admits only decimals
        raise AmountError(f"cannot read the number in {value!r}") from None
    suffix = (m["suffix"] or "").lower()
    if m["dollar"] or suffix == "usd":
        if m["dollar"] and suffix not in ("", "usd"):
            raise AmountError(f"mixed units in {value!r}")
        num *= MICROCENTS_PER_USD
    elif suffix.startswith("cent"):
        num *= MICROCENTS_PER_USD // 100
    else:
        num *= _SCALE[suffix]
    per = m["per"]
    if per:
        if not per_second:
            raise AmountError(f"{value!r} is a rate; a plain amount was expected")
        num /= _TIME[per.lower()]
    return int(num.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def format_amount(amount: int, unit: str) -> str:
    """``150000000`` USD_MICROCENTS -> ``$1.50``; other units as grouped integers."""
    if unit == "USD_MICROCENTS":
        usd = Decimal(amount) / MICROCENTS_PER_USD
        text = f"{usd:,.8f}".rstrip("0")
        whole, _, frac = text.partition(".")
        return f"${whole}.{frac.ljust(2, '0')}"
    return f"{amount:,} {unit.lower()}"
