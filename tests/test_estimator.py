"""The learned estimator on its own: rates, overheads, typical lengths, bounds, persistence."""

from __future__ import annotations

from pathlib import Path

from cycles_proxy.estimator import MIN_SAMPLES, Estimator
from cycles_proxy.pricing import Pricing
from cycles_proxy.settings import Settings

PRICE = 1_000_000  # per GPU-second: 1 unit per microsecond


def make(tmp_path: Path | None = None, **kw: float) -> Estimator:
    pricing = Pricing(Settings(default_price_per_gpu_second=PRICE))
    return Estimator(
        pricing,
        default_seconds=kw.get("default_seconds", 30.0),
        max_seconds=kw.get("max_seconds", 600.0),
        safety_factor=kw.get("safety", 1.0),
        db=tmp_path / "rates.db" if tmp_path else None,
    )


def teach(e: Estimator, n: int = MIN_SAMPLES, *, out: int = 20, billed_extra: int = 0) -> None:
    for _ in range(n):
        # 40 prompt tokens at 1 ms each, `out` tokens at 10 ms each
        e.observe(
            "m",
            tokens_in=40,
            tokens_out=out,
            prompt_ns=40_000_000,
            eval_ns=out * 10_000_000,
            billed_ns=40_000_000 + out * 10_000_000 + billed_extra,
        )


def test_default_until_enough_samples_then_learned() -> None:
    e = make()
    assert e.estimate("m", 160, None).amount == 30 * PRICE
    teach(e, MIN_SAMPLES - 1)
    assert e.estimate("m", 160, None).source == "default"
    teach(e, 1)
    est = e.estimate("m", 160, 50)  # 160 chars ~ 40 tokens; 50 output tokens requested
    assert est.source == "learned"
    assert est.amount == (40 * 1_000_000 + 50 * 10_000_000) * PRICE // 1_000_000_000


def test_typical_length_is_used_when_the_caller_sets_no_cap() -> None:
    e = make()
    teach(e, 10, out=20)
    est = e.estimate("m", 160, None)
    assert est.tokens_out == 20
    assert est.amount == (40 * 1_000_000 + 20 * 10_000_000) * PRICE // 1_000_000_000


def test_billed_time_beyond_compute_is_learned_as_overhead() -> None:
    e = make()
    teach(e, 10, out=20, billed_extra=100_000_000)  # e.g. a model load every time
    est = e.estimate("m", 160, 20)
    compute = 40 * 1_000_000 + 20 * 10_000_000
    assert est.amount == (compute + 100_000_000) * PRICE // 1_000_000_000


def test_safety_factor_and_upper_bound() -> None:
    e = make(safety=2.0, max_seconds=0.3)
    teach(e, 5)
    assert e.estimate("m", 160, 10).amount == 2 * (40 + 100) * 1000 * PRICE // 1_000_000
    assert e.estimate("m", 160, 10_000).amount == 300_000  # 0.3 s at most


def test_affordable_tokens_inverts_the_estimate() -> None:
    e = make()
    teach(e, 5)
    est = e.estimate("m", 160, 1000)
    budget = e.estimate("m", 160, 37).amount
    assert e.affordable_tokens(est, budget) == 37


def test_rates_survive_a_restart(tmp_path: Path) -> None:
    e = make(tmp_path)
    teach(e, 5, billed_extra=7_000_000)
    assert e.flush() == 1
    again = make(tmp_path)
    assert again.estimate("m", 160, 20) == e.estimate("m", 160, 20)
    assert again.estimate("m", 160, 20).source == "learned"
