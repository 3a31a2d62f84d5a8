"""The embedded SQLite ledger: Cycles v0 semantics (cycles-protocol.md §4-5), budget periods,
usage, durability, multi-process safety and the async authority's serialization.

Real SQLite files in ``tmp_path``; no mocks. Time is a fake clock so expiry and periods are exact.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from cycles_proxy.authority.base import (
    Action,
    Amount,
    Authority,
    AuthorityUnavailable,
    Balance,
    CyclesError,
    Decision,
    ErrorCode,
    Metrics,
    OveragePolicy,
    ReservationStatus,
    ReserveRequest,
    Subject,
    Unit,
    once_key,
)
from cycles_proxy.authority.embedded import (
    MAX_EXTENSIONS,
    SCHEMA_VERSION,
    EmbeddedAuthority,
    Ledger,
    _Op,
)

ROOT = Path(__file__).resolve().parents[1]
CR = Unit.CREDITS
TOK = Unit.TOKENS
ACT = Action(kind="llm.completion", name="ollama:llama3.2")
ACME = Subject(tenant="acme")
ACME_BOT = Subject(tenant="acme", app="bot")
ACME_BOT_AGENT = Subject(tenant="acme", app="bot", agent="llama")
DAY_MS = 86_400_000
# Wednesday 2026-03-11 12:00:00.500 UTC (the .5 s checks that Retry-After rounds up).
T0 = int(datetime(2026, 3, 11, 12, 0, 0, 500_000, tzinfo=UTC).timestamp() * 1000)


def utc_ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> int:
    return int(datetime(year, month, day, hour, minute, tzinfo=UTC).timestamp() * 1000)


class Clock:
    def __init__(self, now_ms: int = T0) -> None:
        self.now = now_ms

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "ledger.db"


@pytest.fixture
def ledger(db: Path, clock: Clock) -> Iterator[Ledger]:
    with Ledger(db, clock_ms=clock) as led:
        yield led


def key() -> str:
    return str(uuid.uuid4())


def rreq(
    amount: int,
    subject: Subject = ACME,
    *,
    unit: Unit = CR,
    idem: str | None = None,
    **kw: Any,
) -> ReserveRequest:
    return ReserveRequest(
        idempotency_key=idem or key(),
        subject=subject,
        action=ACT,
        estimate=Amount(unit, amount),
        **kw,
    )


def bal(ledger: Ledger, scope: str, unit: Unit = CR) -> Balance:
    b = ledger.get_balance(scope, unit)
    assert b is not None
    return b


def amounts(b: Balance) -> tuple[int, int, int, int]:
    """(spent, reserved, debt, remaining)"""
    return b.spent, b.reserved, b.debt, b.remaining


def refused(code: ErrorCode, fn: Any, *args: Any, **kwargs: Any) -> CyclesError:
    with pytest.raises(CyclesError) as info:
        fn(*args, **kwargs)
    assert info.value.code is code, info.value
    return info.value


def commit(ledger: Ledger, rid: str | None, actual: int, unit: Unit = CR, **kw: Any) -> Any:
    assert rid is not None
    return ledger.commit(
        rid, idempotency_key=kw.pop("idem", key()), actual=Amount(unit, actual), **kw
    )


def row_count(db: Path, table: str) -> int:
    con = sqlite3.connect(db)
    try:
        return int(con.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        con.close()


# ------------------------------------------------------------------------------- the file


def test_open_creates_schema_in_wal_mode(db: Path) -> None:
    with Ledger(db) as led:
        led.set_budget("tenant:acme", CR, 1)
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"budgets", "reservations", "idempotency", "charges"} <= tables
    finally:
        con.close()
    # Reopening an existing file is fine; a file from a newer build is refused.
    Ledger(db).close()
    con = sqlite3.connect(db)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.close()
    with pytest.raises(RuntimeError, match="newer"):
        Ledger(db)


def test_synchronous_is_configurable(db: Path) -> None:
    with pytest.raises(ValueError):
        Ledger(db, synchronous="sometimes")
    with Ledger(db, synchronous="full") as led:
        led.set_budget("tenant:acme", CR, 1)


# ------------------------------------------------------------------------------- reserve


def test_reserve_holds_every_budgeted_scope_and_skips_unbudgeted(ledger: Ledger) -> None:
    ledger.set_budget("tenant:acme", CR, 1_000)
    ledger.set_budget("tenant:acme/app:bot/agent:llama", CR, 300)
    res = ledger.reserve(rreq(120, ACME_BOT_AGENT, ttl_ms=30_000))
    assert res.decision is Decision.ALLOW
    assert res.reservation_id
    assert res.affected_scopes == (
        "tenant:acme",
        "tenant:acme/app:bot",
        "tenant:acme/app:bot/agent:llama",
    )
    assert res.scope_path == "tenant:acme/app:bot/agent:llama"
    assert res.reserved == Amount(CR, 120)
    assert res.expires_at_ms == T0 + 30_000
    assert res.remaining_ttl_ms == 30_000
    assert amounts(bal(ledger, "tenant:acme")) == (0, 120, 0, 880)
    assert amounts(bal(ledger, "tenant:acme/app:bot/agent:llama")) == (0, 120, 0, 180)
    assert ledger.get_balance("tenant:acme/app:bot", CR) is None
    assert [b.scope for b in res.balances] == ["tenant:acme", "tenant:acme/app:bot/agent:llama"]
    assert [b.reserved for b in res.balances] == [120, 120]


def test_scope_values_are_lower_cased(ledger: Ledger) -> None:
    ledger.set_budget("tenant:ACME/app:Bot", CR, 100)
    assert bal(ledger, "tenant:acme/app:bot").allocated == 100
    res = ledger.reserve(rreq(10, Subject(tenant="Acme", app="BOT")))
    assert res.affected_scopes == ("tenant:acme", "tenant:acme/app:bot")
    assert bal(ledger, "tenant:acme/app:bot").reserved == 10


def test_one_short_scope_fails_the_whole_reserve(ledger: Ledger) -> None:
    ledger.set_budget("tenant:acme", CR, 1_000)
    ledger.set_budget("tenant:acme/app:bot", CR, 50)
    err = refused(ErrorCode.BUDGET_EXCEEDED, ledger.reserve, rreq(51, ACME_BOT))
    assert err.http_status == 409
    assert err.details["scope"] == "tenant:acme/app:bot"
    assert err.retry_after_s is None  # no period: no refill time to announce
    assert bal(ledger, "tenant:acme").reserved == 0
    assert bal(ledger, "tenant:acme/app:bot").reserved == 0
    # Exactly the remaining amount fits.
    ledger.reserve(rreq(50, ACME_BOT))
    assert bal(ledger, "tenant:acme").reserved == 50


def test_no_budget_is_not_found_and_other_unit_is_unit_mismatch(ledger: Ledger) -> None:
    err = refused(ErrorCode.NOT_FOUND, ledger.reserve, rreq(1, ACME_BOT))
    assert err.http_status == 404
    assert "tenant:acme/app:bot" in err.message
    ledger.set_budget("tenant:acme/app:bot", TOK, 100)
    err = refused(ErrorCode.UNIT_MISMATCH, ledger.reserve, rreq(1, ACME_BOT, unit=CR))
    assert err.http_status == 400
    assert err.details == {
        "scope": "tenant:acme/app:bot",
        "requested_unit": "CREDITS",
        "expected_units": ["TOKENS"],
    }
    # A budget in the right unit on any derived scope is enough: the TOKENS one is skipped.
    ledger.set_budget("tenant:acme", CR, 100)
    ledger.reserve(rreq(1, ACME_BOT, unit=CR))
    assert bal(ledger, "tenant:acme/app:bot", TOK).reserved == 0


def test_reserve_fail_fast_order(ledger: Ledger) -> None:
    """FROZEN -> CLOSED -> is_over_limit -> debt with no overdraft -> remaining < estimate."""
    scope = "tenant:acme"
    ledger.set_budget(scope, CR, 100, overdraft_limit=50)
    r = ledger.reserve(rreq(100, overage_policy=OveragePolicy.ALLOW_WITH_OVERDRAFT))
    commit(ledger, r.reservation_id, 120)  # 20 of debt
    ledger.set_budget(scope, CR, 100)  # overdraft limit back to 0, debt stays
    # An uncovered event under ALLOW_IF_AVAILABLE charges nothing and marks the scope over limit.
    ev = ledger.event(idempotency_key=key(), subject=ACME, action=ACT, actual=Amount(CR, 10))
    assert ev.charged == Amount(CR, 0)
    ledger.set_budget_status(scope, CR, "FROZEN")
    b = bal(ledger, scope)
    assert (b.debt, b.overdraft_limit, b.is_over_limit, b.remaining) == (20, 0, True, -20)

    def expect(code: ErrorCode) -> None:
        refused(code, ledger.reserve, rreq(1_000))
        dry = ledger.reserve(rreq(1_000, dry_run=True))
        assert (dry.decision, dry.reason_code) == (Decision.DENY, code.value)

    expect(ErrorCode.BUDGET_FROZEN)
    ledger.set_budget_status(scope, CR, "CLOSED")
    expect(ErrorCode.BUDGET_CLOSED)
    ledger.set_budget_status(scope, CR, "ACTIVE")
    expect(ErrorCode.OVERDRAFT_LIMIT_EXCEEDED)
    # Funding so that remaining >= 0 and debt <= limit reconciles the over-limit state ...
    ledger.set_budget(scope, CR, 200, overdraft_limit=20)
    assert not bal(ledger, scope).is_over_limit
    ledger.set_budget(scope, CR, 200)  # ... and with no overdraft allowed, debt blocks.
    expect(ErrorCode.DEBT_OUTSTANDING)
    ledger.set_budget(scope, CR, 200, overdraft_limit=50)  # debt within an overdraft is fine
    expect(ErrorCode.BUDGET_EXCEEDED)
    ok = ledger.reserve(rreq(80))  # remaining = 200 - 100 - 20 = 80
    assert ok.decision is Decision.ALLOW


def test_over_limit_blocks_even_when_remaining_would_do(ledger: Ledger) -> None:
    ledger.set_budget("tenant:acme", CR, 1_000)
    ledger.set_budget("tenant:acme/app:bot", CR, 1_000_000)
    a = ledger.reserve(rreq(500, ACME_BOT))
    b = ledger.reserve(rreq(400, ACME_BOT))
    # delta 200 but the tenant has 100 left: capped, the tenant scope goes over limit.
    assert commit(ledger, a.reservation_id, 700).charged == Amount(CR, 600)
    assert not bal(ledger, "tenant:acme/app:bot").is_over_limit
    ledger.release(b.reservation_id or "", idempotency_key=key())
    tenant = bal(ledger, "tenant:acme")
    assert tenant.is_over_limit and tenant.remaining == 400
    refused(ErrorCode.OVERDRAFT_LIMIT_EXCEEDED, ledger.reserve, rreq(1, ACME_BOT))


def test_fail_fast_checks_scopes_in_canonical_order(ledger: Ledger) -> None:
    ledger.set_budget("tenant:acme", CR, 10)
    ledger.set_budget("tenant:acme/app:bot", CR, 1_000)
    ledger.set_budget_status("tenant:acme/app:bot", CR, "FROZEN")
    err = refused(ErrorCode.BUDGET_EXCEEDED, ledger.reserve, rreq(11, ACME_BOT))
    assert err.details["scope"] == "tenant:acme"
    refused(ErrorCode.BUDGET_FROZEN, ledger.reserve, rreq(10, ACME_BOT))


def test_request_validation(ledger: Ledger) -> None:
    ledger.set_budget("tenant:acme", CR, 1_000)
    bad: list[dict[str, Any]] = [
        {"ttl_ms": 999},
        {"ttl_ms": 86_400_001},
        {"grace_period_ms": -1},
        {"grace_period_ms": 60_001},
    ]
    for kw in bad:
        refused(ErrorCode.INVALID_REQUEST, ledger.reserve, rreq(1, **kw))
    ledger.reserve(rreq(1, ttl_ms=1_000, grace_period_ms=0))
    ledger.reserve(rreq(1, ttl_ms=86_400_000, grace_period_ms=60_000))
    refused(ErrorCode.INVALID_REQUEST, ledger.reserve, rreq(-1))
    refused(ErrorCode.INVALID_REQUEST, ledger.reserve, rreq(1.5))  # type: ignore[arg-type]
    refused(ErrorCode.INVALID_REQUEST, ledger.reserve, rreq(1, idem="x" * 257))
    refused(ErrorCode.INVALID_REQUEST, ledger.set_budget, "app:bot/tenant:acme", CR, 1)
    refused(ErrorCode.INVALID_REQUEST, ledger.set_budget, "tenant:acme", CR, 2**63)
    r = ledger.reserve(rreq(1))
    assert r.reservation_id
    refused(
        ErrorCode.INVALID_REQUEST,
        ledger.extend,
        r.reservation_id,
        idempotency_key=key(),
        extend_by_ms=0,
    )
    refused(ErrorCode.INVALID_REQUEST, commit, ledger, r.reservation_id, -5)


def test_forbidden_for_another_tenant(ledger: Ledger) -> None:
    ledger.set_budget("tenant:acme", CR, 1_000)
    refused(ErrorCode.FORBIDDEN, ledger.reserve, rreq(1), tenant="globex")
    r = ledger.reserve(rreq(10), tenant="ACME")
    rid = r.reservation_id
    assert rid
    err = refused(ErrorCode.FORBIDDEN, commit, ledger, rid, 5, tenant="globex")
    assert err.http_status == 403
    refused(ErrorCode.FORBIDDEN, ledger.release, rid, idempotency_key=key(), tenant="globex")
    refused(
        ErrorCode.FORBIDDEN, ledger.extend, rid, idempotency_key=key(), extend_by_ms=1, tenant="x"
    )
    refused(ErrorCode.FORBIDDEN, ledger.balances, ACME, tenant="globex")
    assert commit(ledger, rid, 5, tenant="acme").charged == Amount(CR, 5)


# ------------------------------------------------------------------------------- commit


def test_commit_below_estimate_releases_the_rest(ledger: Ledger, db: Path) -> None:
    ledger.set_budget("tenant:acme", CR, 1_000)
    ledger.set_budget("tenant:acme/app:bot", CR, 500)
    r = ledger.reserve(rreq(100, ACME_BOT))
    c = commit(ledger, r.reservation_id, 30)
    assert c.charged == Amount(CR, 30)
    assert c.released == Amount(CR, 70)
    assert amounts(bal(ledger, "tenant:acme")) == (30, 0, 0, 970)
    assert amounts(bal(ledger, "tenant:acme/app:bot")) == (30, 0, 0, 470)
    assert c.balances == (bal(ledger, "tenant:acme"), bal(ledger, "tenant:acme/app:bot"))
    rec = ledger.get_reservation(r.reservation_id or "")
    assert rec is not None
    assert rec.status is ReservationStatus.COMMITTED
    assert rec.charged == Amount(CR, 30)
    assert rec.finalized_at_ms == T0


def test_commit_reject_refuses_any_overage(ledger: Ledger) -> None:
    """§5.3: under REJECT a commit above the reservation is refused (409 BUDGET_EXCEEDED) even
    when the budget could cover the difference; the reservation stays open."""
    ledger.set_budget("tenant:acme", CR, 1_000)
    r = ledger.reserve(rreq(100, overage_policy=OveragePolicy.REJECT))
    err = refused(ErrorCode.BUDGET_EXCEEDED, commit, ledger, r.reservation_id, 101)
    assert err.http_status == 409
    assert amounts(bal(ledger, "tenant:acme")) == (0, 100, 0, 900)
    rec = ledger.get_reservation(r.reservation_id or "")
    assert rec is not None and rec.status is ReservationStatus.ACTIVE
    assert commit(ledger, r.reservation_id, 100).charged == Amount(CR, 100)
    assert amounts(bal(ledger, "tenant:acme")) == (100, 0, 0, 900)


def test_commit_allow_if_available_covered(ledger: Ledger) -> None:
    ledger.set_budget("tenant:acme", CR, 1_000)
    r = ledger.reserve(rreq(100))
    c = commit(ledger, r.reservation_id, 250)
    assert (c.charged, c.released) == (Amount(CR, 250), Amount(CR, 0))
    b = bal(ledger, "tenant:acme")
    assert amounts(b) == (250, 0, 0, 750)
    assert not b.is_over_limit


def test_commit_allow_if_available_caps_at_minimum_remaining(ledger: Ledger) -> None:
    ledger.set_budget("tenant:acme", CR, 1_000)
    ledger.set_budget("tenant:acme/app:bot", CR, 300)
    r = ledger.reserve(rreq(200, ACME_BOT))
    # delta 150; tenant could cover 800, app only 100 -> charged = 200 + 100.
    c = commit(ledger, r.reservation_id, 350)
    assert c.charged == Amount(CR, 300)
    assert c.released == Amount(CR, 0)
    tenant, app = bal(ledger, "tenant:acme"), bal(ledger, "tenant:acme/app:bot")
    assert amounts(tenant) == (300, 0, 0, 700) and not tenant.is_over_limit
    assert amounts(app) == (300, 0, 0, 0) and app.is_over_limit
    refused(ErrorCode.OVERDRAFT_LIMIT_EXCEEDED, ledger.reserve, rreq(1, ACME_BOT))
    ledger.reserve(rreq(1, ACME))  # the tenant scope alone is fine


def test_commit_allow_if_available_caps_at_the_smallest_of_several_short_scopes(
    ledger: Ledger,
) -> None:
    ledger.set_budget("tenant:acme", CR, 1_000)
    ledger.set_budget("tenant:acme/app:bot", CR, 180)
    ledger.event(idempotency_key=key(), subject=ACME, action=ACT, actual=Amount(CR, 840))
    r = ledger.reserve(rreq(100, ACME_BOT))  # remaining: tenant 60, app 80
    c = commit(ledger, r.reservation_id, 250)  # delta 150 -> capped at 60
    assert c.charged == Amount(CR, 160)
    tenant, app = bal(ledger, "tenant:acme"), bal(ledger, "tenant:acme/app:bot")
    assert amounts(tenant) == (1_000, 0, 0, 0) and tenant.is_over_limit
    assert amounts(app) == (160, 0, 0, 20) and app.is_over_limit
    assert c.balances == (tenant, app)


def test_commit_allow_with_overdraft_accrues_debt(ledger: Ledger) -> None:
    ledger.set_budget("tenant:acme", CR, 100, overdraft_limit=50)
    r = ledger.reserve(rreq(80, overage_policy=OveragePolicy.ALLOW_WITH_OVERDRAFT))
    # remaining 20 < delta 40: debt 0 + 40 <= 50 -> charged in full, delta becomes debt.
    c = commit(ledger, r.reservation_id, 120)
    assert c.charged == Amount(CR, 120)
    b = bal(ledger, "tenant:acme")
    assert amounts(b) == (80, 0, 40, -20)
    assert not b.is_over_limit
    # Debt within an overdraft limit does not block reservations; remaining does.
    refused(ErrorCode.BUDGET_EXCEEDED, ledger.reserve, rreq(1))


def test_commit_allow_with_overdraft_beyond_limit(ledger: Ledger) -> None:
    ledger.set_budget("tenant:acme", CR, 100, overdraft_limit=30)
    r = ledger.reserve(rreq(80, overage_policy=OveragePolicy.ALLOW_WITH_OVERDRAFT))
    err = refused(ErrorCode.OVERDRAFT_LIMIT_EXCEEDED, commit, ledger, r.reservation_id, 120)
    assert err.details["overdraft_limit"] == 30
    assert amounts(bal(ledger, "tenant:acme")) == (0, 80, 0, 20)
    # Within the limit: 80 reserved + 30 overage.
    assert commit(ledger, r.reservation_id, 110).charged == Amount(CR, 110)
    assert amounts(bal(ledger, "tenant:acme")) == (80, 0, 30, -10)


def test_commit_allow_with_overdraft_without_limit_behaves_like_allow_if_available(
    ledger: Ledger,
) -> None:
    ledger.set_budget("tenant:acme", CR, 100)
    r = ledger.reserve(rreq(80, overage_policy=OveragePolicy.ALLOW_WITH_OVERDRAFT))
    c = commit(ledger, r.reservation_id, 120)
    assert c.charged == Amount(CR, 100)
    b = bal(ledger, "tenant:acme")
    assert amounts(b) == (100, 0, 0, 0)
    assert b.is_over_limit


def test_commit_unit_mismatch_unknown_and_finalized(ledger: Ledger) -> None:
    ledger.set_budget("tenant:acme", CR, 1_000)
    r = ledger.reserve(rreq(100))
    err = refused(ErrorCode.UNIT_MISMATCH, commit, ledger, r.reservation_id, 10, TOK)
    assert err.http_status == 400
    err = refused(ErrorCode.NOT_FOUND, commit, ledger, str(uuid.uuid4()), 10)
    assert err.http_status == 404
    commit(ledger, r.reservation_id, 10)
    err = refused(ErrorCode.RESERVATION_FINALIZED, commit, ledger, r.reservation_id, 10)
    assert err.http_status == 409
    rid = r.reservation_id or ""
    refused(ErrorCode.RESERVATION_FINALIZED, ledger.release, rid, idempotency_key=key())
    refused(
        ErrorCode.RESERVATION_FINALIZED,
        ledger.extend,
        rid,
        idempotency_key=key(),
        extend_by_ms=1_000,
    )
    assert amounts(bal(ledger, "tenant:acme")) == (10, 0, 0, 990)


# ------------------------------------------------------------------------------- release


def test_release_returns_the_reservation(ledger: Ledger) -> None:
    ledger.set_budget("tenant:acme", CR, 1_000)
    ledger.set_budget("tenant:acme/app:bot", CR, 500)
    r = ledger.reserve(rreq(100, ACME_BOT))
    rid = r.reservation_id or ""
    rel = ledger.release(rid, idempotency_key=key(), reason="upstream unreachable")
    assert rel.released == Amount(CR, 100)
    assert rel.balances == (bal(ledger, "tenant:acme"), bal(ledger, "tenant:acme/app:bot"))
    assert amounts(bal(ledger, "tenant:acme")) == (0, 0, 0, 1_000)
    assert amounts(bal(ledger, "tenant:acme/app:bot")) == (0, 0, 0, 500)
    rec = ledger.get_reservation(rid)
    assert rec is not None and rec.status is ReservationStatus.RELEASED
    refused(ErrorCode.RESERVATION_FINALIZED, ledger.release, rid, idempotency_key=key())
    refused(ErrorCode.RESERVATION_FINALIZED, commit, ledger, rid, 1)
    assert ledger.usage() == []  # a release charges nothing


# ------------------------------------------------------------------------------- extend


def test_extend_is_relative_to_expires_at(ledger: Ledger, clock: Clock) -> None:
    ledger.set_budget("tenant:acme", CR, 1_000)
    r = ledger.reserve(rreq(100, ttl_ms=10_000))
    rid = r.reservation_id or ""
    clock.advance(5_000)
    ext = ledger.extend(rid, idempotency_key=key(), extend_by_ms=3_000)
    assert ext.expires_at_ms == T0 + 13_000
    assert ext.remaining_ttl_ms == 8_000
    rec = ledger.get_reservation(rid)
    assert rec is not None
    assert (rec.expires_at_ms, rec.extension_count) == (T0 + 13_000, 1)
    # The reservation now outlives its original TTL: commit at T0+12s works.
    clock.advance(7_000)
    assert commit(ledger, rid, 50).charged == Amount(CR, 50)


def test_extend_limit(ledger: Ledger) -> None:
    ledger.set_budget("tenant:acme", CR, 1_000)
    rid = ledger.reserve(rreq(1, ttl_ms=1_000)).reservation_id or ""
    for i in range(MAX_EXTENSIONS):
        assert ledger.extend(rid, idempotency_key=f"x{i}", extend_by_ms=1_000).expires_at_ms == (
            T0 + 1_000 * (i + 2)
        )
    err = refused(
        ErrorCode.MAX_EXTENSIONS_EXCEEDED,
        ledger.extend,
        rid,
        idempotency_key="x-last",
        extend_by_ms=1_000,
    )
    assert err.http_status == 409
    # A same-key replay of an earlier extension is still answered (it does not extend again).
    again = ledger.extend(rid, idempotency_key="x0", extend_by_ms=1_000)
    assert again.expires_at_ms == T0 + 2_000


def test_extend_only_until_expires_at_but_commit_within_grace(ledger: Ledger, clock: Clock) -> None:
    ledger.set_budget("tenant:acme", CR, 1_000)
    rid = ledger.reserve(rreq(100, ttl_ms=1_000, grace_period_ms=2_000)).reservation_id or ""
    clock.advance(1_000)  # now == expires_at: still extendable
    ledger.extend(rid, idempotency_key=key(), extend_by_ms=1_000)
    clock.advance(1_001)  # past the new expires_at, inside the grace period
    err = refused(
        ErrorCode.RESERVATION_EXPIRED, ledger.extend, rid, idempotency_key=key(), extend_by_ms=1
    )
    assert err.http_status == 410
    assert commit(ledger, rid, 60).charged == Amount(CR, 60)


# ------------------------------------------------------------------------------- expiry


def test_sweep_expires_after_ttl_plus_grace(ledger: Ledger, clock: Clock) -> None:
    ledger.set_budget("tenant:acme", CR, 1_000)
    ledger.set_budget("tenant:acme/app:bot", CR, 500)
    rid = ledger.reserve(rreq(100, ACME_BOT, ttl_ms=1_000, grace_period_ms=500)).reservation_id
    keep = ledger.reserve(rreq(50, ACME_BOT, ttl_ms=10_000)).reservation_id
    assert rid and keep
    clock.advance(1_500)  # now == expires_at + grace: still committable
    assert ledger.sweep_expired() == 0
    clock.advance(1)
    assert ledger.sweep_expired() == 1
    assert ledger.sweep_expired() == 0
    assert amounts(bal(ledger, "tenant:acme")) == (0, 50, 0, 950)
    assert amounts(bal(ledger, "tenant:acme/app:bot")) == (0, 50, 0, 450)
    rec = ledger.get_reservation(rid)
    assert rec is not None and rec.status is ReservationStatus.EXPIRED
    err = refused(ErrorCode.RESERVATION_EXPIRED, commit, ledger, rid, 10)
    assert err.http_status == 410
    refused(ErrorCode.RESERVATION_EXPIRED, ledger.release, rid, idempotency_key=key())
    assert commit(ledger, keep, 50).charged == Amount(CR, 50)


def test_commit_after_grace_expires_without_a_sweep(ledger: Ledger, clock: Clock) -> None:
    ledger.set_budget("tenant:acme", CR, 1_000)
    rid = ledger.reserve(rreq(100, ttl_ms=1_000, grace_period_ms=0)).reservation_id or ""
    last_moment = ledger.reserve(rreq(10, ttl_ms=1_000, grace_period_ms=0)).reservation_id
    clock.advance(1_000)  # expires_at + grace is still inside the window
    assert commit(ledger, last_moment, 10).charged == Amount(CR, 10)
    clock.advance(1)
    err = refused(ErrorCode.RESERVATION_EXPIRED, commit, ledger, rid, 100)
    assert err.http_status == 410
    # The overdue reservation was expired on the spot: its amount is back, nothing charged.
    assert amounts(bal(ledger, "tenant:acme")) == (10, 0, 0, 990)
    rec = ledger.get_reservation(rid)
    assert rec is not None and rec.status is ReservationStatus.EXPIRED
    assert ledger.sweep_expired() == 0
    refused(ErrorCode.RESERVATION_EXPIRED, ledger.release, rid, idempotency_key=key())


def test_sweep_prunes_old_records(db: Path, clock: Clock) -> None:
    with Ledger(db, clock_ms=clock, retention_ms=DAY_MS) as ledger:
        ledger.set_budget("tenant:acme", CR, 1_000)
        r = ledger.reserve(rreq(10))
        commit(ledger, r.reservation_id, 10)
        assert row_count(db, "idempotency") == 2
        clock.advance(DAY_MS + 61_000)
        ledger.sweep_expired()
        assert row_count(db, "idempotency") == 0
        assert row_count(db, "reservations") == 0
        assert row_count(db, "charges") == 1  # usage history is kept


# ------------------------------------------------------------------------------- idempotency


def test_reserve_replay_returns_the_original(ledger: Ledger, clock: Clock) -> None:
    ledger.set_budget("tenant:acme", CR, 1_000)
    first = ledger.reserve(rreq(100, idem="k1", ttl_ms=10_000))
    clock.advance(4_000)
    again = ledger.reserve(rreq(100, idem="k1", ttl_ms=10_000))
    assert again.reservation_id == first.reservation_id
    assert again.expires_at_ms == first.expires_at_ms
    assert again.balances == first.balances
    assert again.remaining_ttl_ms == 6_000  # recomputed, not replayed
    assert bal(ledger, "tenant:acme").reserved == 100  # reserved once
    err = refused(ErrorCode.IDEMPOTENCY_MISMATCH, ledger.reserve, rreq(101, idem="k1"))
    assert err.http_status == 409
    # Flipping dry_run is a different payload in the same namespace.
    refused(
        ErrorCode.IDEMPOTENCY_MISMATCH,
        ledger.reserve,
        rreq(100, idem="k1", ttl_ms=10_000, dry_run=True),
    )
    commit(ledger, first.reservation_id, 100)
    assert ledger.reserve(rreq(100, idem="k1", ttl_ms=10_000)).remaining_ttl_ms == 0


def test_idempotency_is_per_tenant_and_endpoint(ledger: Ledger) -> None:
    ledger.set_budget("tenant:acme", CR, 1_000)
    ledger.set_budget("tenant:globex", CR, 1_000)
    a = ledger.reserve(rreq(10, ACME, idem="same"))
    g = ledger.reserve(rreq(20, Subject(tenant="globex"), idem="same"))
    assert a.reservation_id != g.reservation_id
    # The reserve's key may be reused for the commit (another endpoint).
    assert commit(ledger, a.reservation_id, 10, idem="same").charged == Amount(CR, 10)


def test_commit_replay_and_mismatch(ledger: Ledger) -> None:
    ledger.set_budget("tenant:acme", CR, 1_000)
    r1 = ledger.reserve(rreq(100))
    r2 = ledger.reserve(rreq(100))
    m = Metrics(tokens_input=3, tokens_output=4, custom={"gpu_seconds": 0.25})
    first = commit(ledger, r1.reservation_id, 70, idem="c1", metrics=m)
    again = commit(ledger, r1.reservation_id, 70, idem="c1", metrics=m)
    assert again == first
    assert bal(ledger, "tenant:acme").spent == 70  # charged once
    assert len(ledger.usage()) == 1 and ledger.usage()[0].requests == 1
    refused(ErrorCode.IDEMPOTENCY_MISMATCH, commit, ledger, r1.reservation_id, 71, idem="c1")
    refused(ErrorCode.IDEMPOTENCY_MISMATCH, commit, ledger, r2.reservation_id, 70, idem="c1")
    # A different key on an already committed reservation is "finalized", not a replay.
    refused(ErrorCode.RESERVATION_FINALIZED, commit, ledger, r1.reservation_id, 70, idem="c2")


def test_release_and_event_replay(ledger: Ledger) -> None:
    ledger.set_budget("tenant:acme", CR, 1_000)
    rid = ledger.reserve(rreq(100)).reservation_id or ""
    first = ledger.release(rid, idempotency_key="r1", reason="no work")
    assert ledger.release(rid, idempotency_key="r1", reason="no work") == first
    refused(ErrorCode.IDEMPOTENCY_MISMATCH, ledger.release, rid, idempotency_key="r1")
    e1 = ledger.event(idempotency_key="e1", subject=ACME, action=ACT, actual=Amount(CR, 5))
    e2 = ledger.event(idempotency_key="e1", subject=ACME, action=ACT, actual=Amount(CR, 5))
    assert e1 == e2
    assert bal(ledger, "tenant:acme").spent == 5
    refused(
        ErrorCode.IDEMPOTENCY_MISMATCH,
        ledger.event,
        idempotency_key="e1",
        subject=ACME,
        action=ACT,
        actual=Amount(CR, 6),
    )


def test_replay_survives_the_reservation_expiring(ledger: Ledger, clock: Clock) -> None:
    ledger.set_budget("tenant:acme", CR, 1_000)
    rid = ledger.reserve(rreq(100, ttl_ms=1_000, grace_period_ms=0)).reservation_id
    first = commit(ledger, rid, 40, idem="c")
    clock.advance(5_000)
    assert commit(ledger, rid, 40, idem="c") == first


# ------------------------------------------------------------------------------- dry run


def test_dry_run_mutates_nothing(ledger: Ledger, db: Path) -> None:
    ledger.set_budget("tenant:acme", CR, 100)
    before = bal(ledger, "tenant:acme")
    ok = ledger.reserve(rreq(60, dry_run=True))
    assert ok.decision is Decision.ALLOW
    assert ok.reservation_id is None and ok.expires_at_ms is None and ok.remaining_ttl_ms is None
    assert ok.affected_scopes == ("tenant:acme",)
    deny = ledger.reserve(rreq(101, dry_run=True))
    assert (deny.decision, deny.reason_code) == (Decision.DENY, "BUDGET_EXCEEDED")
    nf = ledger.reserve(rreq(1, Subject(tenant="globex"), dry_run=True))
    assert (nf.decision, nf.reason_code) == (Decision.DENY, "BUDGET_NOT_FOUND")
    refused(ErrorCode.UNIT_MISMATCH, ledger.reserve, rreq(1, unit=TOK, dry_run=True))
    assert bal(ledger, "tenant:acme") == before
    assert row_count(db, "reservations") == 0
    assert row_count(db, "idempotency") == 0
    # A dry run does not consume its key.
    same = rreq(60, idem="dry")
    assert ledger.reserve(dataclasses.replace(same, dry_run=True)).decision is Decision.ALLOW
    assert ledger.reserve(same).reservation_id


# ------------------------------------------------------------------------------- events


def test_event_policies(ledger: Ledger) -> None:
    ledger.set_budget("tenant:acme", CR, 1_000)
    ledger.set_budget("tenant:acme/app:bot", CR, 100)

    def ev(amount: int, policy: OveragePolicy) -> Any:
        return ledger.event(
            idempotency_key=key(),
            subject=ACME_BOT,
            action=ACT,
            actual=Amount(CR, amount),
            overage_policy=policy,
        )

    err = refused(ErrorCode.BUDGET_EXCEEDED, ev, 101, OveragePolicy.REJECT)
    assert err.details["scope"] == "tenant:acme/app:bot"
    assert bal(ledger, "tenant:acme").spent == 0
    assert ev(60, OveragePolicy.REJECT).charged == Amount(CR, 60)
    # ALLOW_IF_AVAILABLE caps at the minimum remaining (app: 40) and marks the scope.
    capped = ev(70, OveragePolicy.ALLOW_IF_AVAILABLE)
    assert capped.charged == Amount(CR, 40)
    assert amounts(bal(ledger, "tenant:acme")) == (100, 0, 0, 900)
    app = bal(ledger, "tenant:acme/app:bot")
    assert amounts(app) == (100, 0, 0, 0) and app.is_over_limit
    assert [c.cost for c in ledger.usage()] == [100]


def test_event_overdraft_limit(ledger: Ledger) -> None:
    ledger.set_budget("tenant:acme", CR, 100, overdraft_limit=30)

    def ev(amount: int) -> Any:
        return ledger.event(
            idempotency_key=key(),
            subject=ACME,
            action=ACT,
            actual=Amount(CR, amount),
            overage_policy=OveragePolicy.ALLOW_WITH_OVERDRAFT,
        )

    assert ev(90).charged == Amount(CR, 90)  # covered
    assert amounts(bal(ledger, "tenant:acme")) == (90, 0, 0, 10)
    refused(ErrorCode.OVERDRAFT_LIMIT_EXCEEDED, ev, 31)  # 10 left: 31 of debt > 30
    assert ev(30).charged == Amount(CR, 30)  # 30 of debt <= 30
    assert amounts(bal(ledger, "tenant:acme")) == (90, 0, 30, -20)
    refused(
        ErrorCode.NOT_FOUND,
        ledger.event,
        idempotency_key=key(),
        subject=Subject(tenant="globex"),
        action=ACT,
        actual=Amount(CR, 1),
    )
    refused(
        ErrorCode.UNIT_MISMATCH,
        ledger.event,
        idempotency_key=key(),
        subject=ACME,
        action=ACT,
        actual=Amount(TOK, 1),
    )


# ------------------------------------------------------------------------------- periods


def test_daily_period_refills_and_tells_when(ledger: Ledger, clock: Clock) -> None:
    ledger.set_budget("tenant:acme", CR, 100, period="daily")
    midnight = utc_ms(2026, 3, 12)
    assert bal(ledger, "tenant:acme").period_ends_at_ms == midnight
    commit(ledger, ledger.reserve(rreq(70)).reservation_id, 70)
    inflight = ledger.reserve(rreq(20, ttl_ms=86_400_000)).reservation_id
    err = refused(ErrorCode.BUDGET_EXCEEDED, ledger.reserve, rreq(11))
    # 11:59:59.5 until midnight, rounded up.
    assert err.retry_after_s == 43_200
    dry = ledger.reserve(rreq(11, dry_run=True))
    assert dry.retry_after_ms == 43_200_000
    clock.now = midnight - 1
    refused(ErrorCode.BUDGET_EXCEEDED, ledger.reserve, rreq(11))
    clock.now = midnight
    b = bal(ledger, "tenant:acme")
    # The new day: spent is reset, the in-flight reservation still holds its 20.
    assert amounts(b) == (0, 20, 0, 80)
    assert b.period_ends_at_ms == midnight + DAY_MS
    ledger.reserve(rreq(80))
    # The in-flight reservation is charged to the period it settles in.
    commit(ledger, inflight, 15)
    assert amounts(bal(ledger, "tenant:acme")) == (15, 80, 0, 5)


def test_period_roll_clears_debt_and_over_limit(ledger: Ledger, clock: Clock) -> None:
    ledger.set_budget("tenant:acme", CR, 100, period="daily")
    ledger.set_budget("tenant:globex", CR, 100, period="daily", overdraft_limit=50)
    commit(ledger, ledger.reserve(rreq(100)).reservation_id, 150)
    b = bal(ledger, "tenant:acme")
    assert b.is_over_limit
    globex = Subject(tenant="globex")
    awo = OveragePolicy.ALLOW_WITH_OVERDRAFT
    commit(ledger, ledger.reserve(rreq(100, globex, overage_policy=awo)).reservation_id, 130)
    assert amounts(bal(ledger, "tenant:globex")) == (100, 0, 30, -30)
    err = refused(ErrorCode.OVERDRAFT_LIMIT_EXCEEDED, ledger.reserve, rreq(1))
    assert err.retry_after_s == 43_200
    clock.now = utc_ms(2026, 3, 13, 8)  # more than one period later
    b = bal(ledger, "tenant:acme")
    assert amounts(b) == (0, 0, 0, 100) and not b.is_over_limit
    assert b.period_ends_at_ms == utc_ms(2026, 3, 14)
    ledger.reserve(rreq(100))
    assert amounts(bal(ledger, "tenant:globex")) == (0, 0, 0, 100)
    ledger.reserve(rreq(100, globex))


def test_debt_outstanding_carries_retry_after(ledger: Ledger) -> None:
    ledger.set_budget("tenant:acme", CR, 100, period="weekly", overdraft_limit=50)
    r = ledger.reserve(rreq(100, overage_policy=OveragePolicy.ALLOW_WITH_OVERDRAFT))
    commit(ledger, r.reservation_id, 110)
    ledger.set_budget("tenant:acme", CR, 100, period="weekly")
    err = refused(ErrorCode.DEBT_OUTSTANDING, ledger.reserve, rreq(1))
    monday = utc_ms(2026, 3, 16)
    assert err.retry_after_s == -(-(monday - T0) // 1000)


def test_weekly_and_monthly_windows(ledger: Ledger, clock: Clock) -> None:
    ledger.set_budget("tenant:acme", CR, 10, period="weekly")
    ledger.set_budget("tenant:globex", CR, 10, period="monthly")
    assert bal(ledger, "tenant:acme").period_ends_at_ms == utc_ms(2026, 3, 16)  # Monday
    assert bal(ledger, "tenant:globex").period_ends_at_ms == utc_ms(2026, 4, 1)
    clock.now = utc_ms(2026, 12, 31, 23, 59)
    assert bal(ledger, "tenant:acme").period_ends_at_ms == utc_ms(2027, 1, 4)  # a Monday
    assert bal(ledger, "tenant:globex").period_ends_at_ms == utc_ms(2027, 1, 1)
    assert datetime(2027, 1, 4, tzinfo=UTC).weekday() == 0


def test_changing_the_period_keeps_spent(ledger: Ledger, clock: Clock) -> None:
    ledger.set_budget("tenant:acme", CR, 100)
    commit(ledger, ledger.reserve(rreq(40)).reservation_id, 40)
    ledger.set_budget("tenant:acme", CR, 100, period="monthly")
    b = bal(ledger, "tenant:acme")
    assert (b.spent, b.period_ends_at_ms) == (40, utc_ms(2026, 4, 1))
    clock.now = utc_ms(2026, 4, 1)
    assert bal(ledger, "tenant:acme").spent == 0
    ledger.set_budget("tenant:acme", CR, 100)
    assert bal(ledger, "tenant:acme").period_ends_at_ms is None


# ------------------------------------------------------------------------------- management


def test_set_budget_keeps_spent_and_reserved(ledger: Ledger) -> None:
    ledger.set_budget("tenant:acme", CR, 100)
    commit(ledger, ledger.reserve(rreq(30)).reservation_id, 30)
    ledger.reserve(rreq(20))
    b = ledger.set_budget("tenant:acme", CR, 500, overdraft_limit=7)
    assert (b.allocated, b.spent, b.reserved, b.overdraft_limit, b.remaining) == (
        500,
        30,
        20,
        7,
        450,
    )
    assert bal(ledger, "tenant:acme") == b


def test_set_budget_clears_over_limit_only_when_reconciled(ledger: Ledger) -> None:
    ledger.set_budget("tenant:acme", CR, 100, overdraft_limit=50)
    r = ledger.reserve(rreq(100, overage_policy=OveragePolicy.ALLOW_IF_AVAILABLE))
    commit(ledger, r.reservation_id, 130)  # capped at 100, over limit
    assert bal(ledger, "tenant:acme").is_over_limit
    ledger.set_budget("tenant:acme", CR, 90, overdraft_limit=50)  # remaining -10 < 0
    assert bal(ledger, "tenant:acme").is_over_limit
    ledger.set_budget("tenant:acme", CR, 100, overdraft_limit=50)  # remaining 0
    assert not bal(ledger, "tenant:acme").is_over_limit


def test_list_balances_and_lookup(ledger: Ledger) -> None:
    ledger.set_budget("tenant:acme", CR, 1)
    ledger.set_budget("tenant:acme/app:bot", CR, 2)
    ledger.set_budget("tenant:acme", TOK, 3)
    ledger.set_budget("tenant:globex", CR, 4)
    assert [(b.scope, b.unit, b.allocated) for b in ledger.list_balances()] == [
        ("tenant:acme", CR, 1),
        ("tenant:acme", TOK, 3),
        ("tenant:acme/app:bot", CR, 2),
        ("tenant:globex", CR, 4),
    ]
    assert [b.allocated for b in ledger.list_balances("tenant:acme")] == [1, 3, 2]
    assert [b.allocated for b in ledger.list_balances("tenant:acme/")] == [2]
    assert ledger.get_balance("tenant:nobody", CR) is None
    rec = ledger.get_budget("tenant:acme", CR)
    assert rec is not None and rec.status == "ACTIVE" and rec.period is None
    assert [b.scope for b in ledger.balances(ACME_BOT)] == [
        "tenant:acme",
        "tenant:acme",
        "tenant:acme/app:bot",
    ]
    refused(ErrorCode.NOT_FOUND, ledger.set_budget_status, "tenant:nobody", CR, "FROZEN")
    refused(ErrorCode.INVALID_REQUEST, ledger.set_budget_status, "tenant:acme", CR, "ASLEEP")


def test_usage_report(ledger: Ledger, clock: Clock) -> None:
    ledger.set_budget("tenant:acme", CR, 10_000)
    ledger.set_budget("tenant:globex", CR, 10_000)
    small = Action(kind="llm.completion", name="ollama:smol")

    def run(subject: Subject, action: Action, cost: int, tin: int, tout: int, gpu: float) -> None:
        r = ledger.reserve(
            ReserveRequest(key(), subject, action, Amount(CR, cost + 10), ttl_ms=60_000)
        )
        m = Metrics(tokens_input=tin, tokens_output=tout, latency_ms=5, custom={"gpu_seconds": gpu})
        commit(ledger, r.reservation_id, cost, metrics=m)

    run(ACME, ACT, 100, 10, 20, 0.5)
    run(ACME, ACT, 50, 1, 2, 0.25)
    run(ACME, small, 7, 3, 4, 0.125)
    ledger.event(
        idempotency_key=key(),
        subject=Subject(tenant="globex"),
        action=ACT,
        actual=Amount(CR, 30),
        metrics=Metrics(tokens_input=9),
    )
    clock.advance(DAY_MS)
    day2 = clock.now
    run(ACME, ACT, 1, 1, 1, 1.0)
    rows = [
        (r.day, r.tenant, r.model, r.unit, r.requests, r.tokens_input, r.tokens_output, r.cost)
        for r in ledger.usage()
    ]
    assert rows == [
        ("2026-03-11", "acme", "ollama:llama3.2", CR, 2, 11, 22, 150),
        ("2026-03-11", "acme", "ollama:smol", CR, 1, 3, 4, 7),
        ("2026-03-11", "globex", "ollama:llama3.2", CR, 1, 9, 0, 30),
        ("2026-03-12", "acme", "ollama:llama3.2", CR, 1, 1, 1, 1),
    ]
    assert ledger.usage()[0].gpu_seconds == pytest.approx(0.75)
    assert ledger.usage()[2].gpu_seconds == 0.0
    assert [(r.day, r.cost) for r in ledger.usage(since_ms=day2)] == [("2026-03-12", 1)]
    assert [r.cost for r in ledger.usage(tenant="GLOBEX")] == [30]
    assert ledger.usage(since_ms=day2 + 1) == []


# ------------------------------------------------------------------------------- durability


def test_balances_survive_close_and_reopen(db: Path, clock: Clock) -> None:
    with Ledger(db, clock_ms=clock) as led:
        led.set_budget("tenant:acme", CR, 1_000, period="monthly", overdraft_limit=5)
        commit(led, led.reserve(rreq(100)).reservation_id, 60, idem="c")
        open_rid = led.reserve(rreq(200)).reservation_id
        before = led.list_balances()
    with Ledger(db, clock_ms=clock) as led:
        assert led.list_balances() == before
        assert amounts(led.list_balances()[0]) == (60, 200, 0, 740)
        # The open reservation is still there and can be settled after the restart.
        assert commit(led, open_rid, 150).charged == Amount(CR, 150)
        assert amounts(bal(led, "tenant:acme")) == (210, 0, 0, 790)


# ------------------------------------------------------------------------------- two writers


def test_two_ledgers_on_one_file_interleave(db: Path, clock: Clock) -> None:
    proxy = Ledger(db, clock_ms=clock)
    cli = Ledger(db, clock_ms=clock)
    try:
        cli.set_budget("tenant:acme", CR, 100)
        r = proxy.reserve(rreq(80))
        cli.set_budget("tenant:acme", CR, 300)  # the operator raises the allocation mid-flight
        assert bal(proxy, "tenant:acme").remaining == 220
        cli.event(idempotency_key=key(), subject=ACME, action=ACT, actual=Amount(CR, 50))
        commit(proxy, r.reservation_id, 70)
        assert amounts(bal(cli, "tenant:acme")) == (120, 0, 0, 180)
        cli.set_budget_status("tenant:acme", CR, "FROZEN")
        refused(ErrorCode.BUDGET_FROZEN, proxy.reserve, rreq(1))
    finally:
        proxy.close()
        cli.close()


def test_two_ledgers_in_parallel_threads(db: Path) -> None:
    """Two connections writing at once: every write waits for the other's transaction."""
    with Ledger(db) as setup:
        setup.set_budget("tenant:acme", CR, 10**12)
    n = 150
    errors: list[BaseException] = []

    def proxy_side() -> None:
        try:
            with Ledger(db) as led:
                for _ in range(n):
                    commit(led, led.reserve(rreq(10)).reservation_id, 7)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def cli_side() -> None:
        try:
            with Ledger(db) as led:
                for i in range(n):
                    led.event(idempotency_key=key(), subject=ACME, action=ACT, actual=Amount(CR, 3))
                    if i % 10 == 0:
                        led.set_budget("tenant:acme", CR, 10**12 + i)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=proxy_side), threading.Thread(target=cli_side)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with Ledger(db) as led:
        assert amounts(bal(led, "tenant:acme"))[:3] == (n * 10, 0, 0)
        assert sum(r.requests for r in led.usage()) == 2 * n
        assert row_count(db, "reservations") == n


CLI_WRITER = """
import sys, uuid
sys.path.insert(0, {root!r})
from cycles_proxy.authority.base import Action, Amount, Subject, Unit
from cycles_proxy.authority.embedded import Ledger
with Ledger({db!r}) as led:
    for i in range({n}):
        led.event(idempotency_key=str(uuid.uuid4()), subject=Subject(tenant="acme"),
                  action=Action("cli.adjust", "manual"), actual=Amount(Unit.CREDITS, 1))
        if i % 25 == 0:
            led.set_budget("tenant:acme", Unit.CREDITS, 10**9 + i)
"""


def test_another_process_writes_concurrently(db: Path) -> None:
    with Ledger(db) as led:
        led.set_budget("tenant:acme", CR, 10**9)
    n = 200
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI_WRITER.format(root=str(ROOT), db=str(db), n=n)],
        stderr=subprocess.PIPE,
    )
    done = 0
    with Ledger(db) as led:
        while proc.poll() is None or done < n:
            commit(led, led.reserve(rreq(5)).reservation_id, 5)
            done += 1
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
        b = bal(led, "tenant:acme")
        assert (b.spent, b.reserved, b.debt) == (done * 5 + n, 0, 0)
        assert b.allocated == 10**9 + 175
        con = sqlite3.connect(db)
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        con.close()


# ------------------------------------------------------------------------------- invariants


class LedgerMachine(RuleBasedStateMachine):
    """Random operations; after each one, every stored number reconciles with the records.

    For each budget: ``reserved`` equals the sum of its ACTIVE reservations, ``spent + debt``
    equals everything charged to it, nothing is negative, what operations return equals what a
    fresh read sees, and ``remaining`` is ``allocated - spent - reserved - debt`` straight from
    the table. Under REJECT-only traffic no scope spends beyond its allocation."""

    SCOPES = ("tenant:acme", "tenant:acme/app:bot")

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.db = Path(self.dir.name) / "ledger.db"
        self.clock = Clock()
        self.ledger = Ledger(self.db, clock_ms=self.clock)
        self.active: dict[str, tuple[int, tuple[str, ...]]] = {}  # id -> (amount, scopes)
        self.charged = dict.fromkeys(self.SCOPES, 0)
        self.reject_only = True  # no overage was let through and no allocation changed
        self.nonnegative = True  # no overdraft was used and no allocation changed

    @initialize(
        tenant=st.integers(0, 2_000),
        app=st.integers(0, 1_000),
        limit=st.sampled_from([0, 0, 100]),
    )
    def budgets(self, tenant: int, app: int, limit: int) -> None:
        self.ledger.set_budget("tenant:acme", CR, tenant, overdraft_limit=limit)
        self.ledger.set_budget("tenant:acme/app:bot", CR, app, overdraft_limit=limit)

    def _scopes(self, subject: Subject) -> tuple[str, ...]:  # the budgeted ones
        return tuple(s for s in subject.scopes() if s in self.SCOPES)

    @rule(
        amount=st.integers(0, 600),
        app=st.booleans(),
        policy=st.sampled_from(list(OveragePolicy)),
        ttl=st.integers(1_000, 5_000),
    )
    def reserve(self, amount: int, app: bool, policy: OveragePolicy, ttl: int) -> None:
        subject = ACME_BOT if app else ACME
        try:
            r = self.ledger.reserve(
                rreq(amount, subject, overage_policy=policy, ttl_ms=ttl, grace_period_ms=500)
            )
        except CyclesError as exc:
            assert exc.code in {
                ErrorCode.BUDGET_EXCEEDED,
                ErrorCode.OVERDRAFT_LIMIT_EXCEEDED,
                ErrorCode.DEBT_OUTSTANDING,
            }
            return
        assert r.reservation_id is not None
        self.active[r.reservation_id] = (amount, self._scopes(subject))
        self._returned(r.balances)

    @precondition(lambda self: bool(self.active))
    @rule(data=st.data(), actual=st.integers(0, 900))
    def commit(self, data: st.DataObject, actual: int) -> None:
        rid = data.draw(st.sampled_from(list(self.active)))
        amount, scopes = self.active[rid]
        rec = self.ledger.get_reservation(rid)
        assert rec is not None
        try:
            c = commit(self.ledger, rid, actual)
        except CyclesError as exc:
            if exc.code is ErrorCode.RESERVATION_EXPIRED:
                del self.active[rid]
                return
            assert exc.code in {ErrorCode.BUDGET_EXCEEDED, ErrorCode.OVERDRAFT_LIMIT_EXCEEDED}
            assert actual > amount
            return
        if rec.overage_policy is not OveragePolicy.REJECT and actual > amount:
            self.reject_only = False
            if rec.overage_policy is OveragePolicy.ALLOW_WITH_OVERDRAFT:
                self.nonnegative = False
        del self.active[rid]
        assert c.charged.amount <= actual
        assert c.charged.amount + c.released.amount >= min(actual, amount)
        for s in scopes:
            self.charged[s] += c.charged.amount
        self._returned(c.balances)

    @precondition(lambda self: bool(self.active))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(list(self.active)))
        try:
            rel = self.ledger.release(rid, idempotency_key=key())
        except CyclesError as exc:
            assert exc.code is ErrorCode.RESERVATION_EXPIRED
        else:
            assert rel.released.amount == self.active[rid][0]
            self._returned(rel.balances)
        del self.active[rid]

    @precondition(lambda self: bool(self.active))
    @rule(data=st.data(), by=st.integers(1, 3_000))
    def extend(self, data: st.DataObject, by: int) -> None:
        rid = data.draw(st.sampled_from(list(self.active)))
        try:
            self.ledger.extend(rid, idempotency_key=key(), extend_by_ms=by)
        except CyclesError as exc:
            assert exc.code in {ErrorCode.RESERVATION_EXPIRED, ErrorCode.MAX_EXTENSIONS_EXCEEDED}

    @rule(
        amount=st.integers(0, 400),
        app=st.booleans(),
        policy=st.sampled_from(list(OveragePolicy)),
    )
    def event(self, amount: int, app: bool, policy: OveragePolicy) -> None:
        subject = ACME_BOT if app else ACME
        try:
            ev = self.ledger.event(
                idempotency_key=key(),
                subject=subject,
                action=ACT,
                actual=Amount(CR, amount),
                overage_policy=policy,
            )
        except CyclesError as exc:
            assert exc.code in {ErrorCode.BUDGET_EXCEEDED, ErrorCode.OVERDRAFT_LIMIT_EXCEEDED}
            return
        assert ev.charged is not None
        if policy is not OveragePolicy.REJECT and ev.charged.amount != amount:
            self.reject_only = False
        if policy is OveragePolicy.ALLOW_WITH_OVERDRAFT:
            self.reject_only = self.nonnegative = False
        for s in self._scopes(subject):
            self.charged[s] += ev.charged.amount
        self._returned(ev.balances)

    @rule(ms=st.integers(0, 4_000))
    def time_passes(self, ms: int) -> None:
        self.clock.advance(ms)

    @rule()
    def sweep(self) -> None:
        self.ledger.sweep_expired()
        for rid in list(self.active):
            rec = self.ledger.get_reservation(rid)
            assert rec is not None
            if rec.status is ReservationStatus.EXPIRED:
                del self.active[rid]

    @rule(scope=st.sampled_from(SCOPES), allocated=st.integers(0, 3_000))
    def fund(self, scope: str, allocated: int) -> None:
        current = bal(self.ledger, scope)
        self.ledger.set_budget(scope, CR, allocated, overdraft_limit=current.overdraft_limit)
        self.reject_only = self.nonnegative = False

    @invariant()
    def books_balance(self) -> None:
        # Reservations expired lazily by a commit/release are no longer active either.
        for rid in list(self.active):
            rec = self.ledger.get_reservation(rid)
            assert rec is not None
            if rec.status is not ReservationStatus.ACTIVE:
                del self.active[rid]
        con = sqlite3.connect(self.db)
        try:
            raw = {
                row[0]: row[1:]
                for row in con.execute(
                    "SELECT scope, allocated, spent, reserved, debt FROM budgets WHERE unit = ?",
                    (CR.value,),
                )
            }
        finally:
            con.close()
        for scope in self.SCOPES:
            b = bal(self.ledger, scope)
            allocated, spent, reserved, debt = raw[scope]
            assert (b.allocated, b.spent, b.reserved, b.debt) == (allocated, spent, reserved, debt)
            assert b.remaining == allocated - spent - reserved - debt
            assert min(spent, reserved, debt) >= 0
            assert reserved == sum(a for a, ss in self.active.values() if scope in ss)
            assert spent + debt == self.charged[scope]
            if self.reject_only:
                assert spent <= allocated
            if self.nonnegative:
                assert b.remaining >= 0

    def _returned(self, balances: tuple[Balance, ...]) -> None:
        """What an operation returns is what is now stored."""
        assert balances
        for b in balances:
            assert bal(self.ledger, b.scope) == b

    def teardown(self) -> None:
        self.ledger.close()
        self.dir.cleanup()


def test_ledger_identity_under_random_operations() -> None:
    run_state_machine_as_test(
        LedgerMachine,
        settings=settings(
            max_examples=60,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


# One operation of a differential round: ("reserve", amount, subject index, policy, key) |
# ("commit", reservation index, actual, key) | ("release", index, key) |
# ("extend", index, by_ms, key) | ("event", amount, subject index, policy, key).
# A few fixed keys make replays and mismatches (also within one batch) common.
POLICIES = st.sampled_from(list(OveragePolicy))
KEYS = st.sampled_from(["k0", "k1", "k2"]) | st.uuids().map(str)
SUBJECTS = [
    Subject(tenant=t, app=a)
    for t in ("acme", "globex", "initech", "umbrella")
    for a in (None, "bot")
]
OPS = st.one_of(
    st.tuples(st.just("reserve"), st.integers(0, 500), st.integers(0, 7), POLICIES, KEYS),
    st.tuples(st.just("commit"), st.integers(0, 30), st.integers(0, 700), KEYS),
    st.tuples(st.just("release"), st.integers(0, 30), KEYS),
    st.tuples(st.just("extend"), st.integers(0, 30), st.integers(1, 3_000), KEYS),
    st.tuples(st.just("event"), st.integers(0, 300), st.integers(0, 7), POLICIES, KEYS),
)


def _outcome(result: Any, ids: list[str]) -> Any:
    """A result with its random ids replaced by their index, comparable across ledgers."""
    if isinstance(result, CyclesError):
        return ("error", result.code, result.retry_after_s)
    if isinstance(result, Exception):
        raise result
    fields = {
        f: getattr(result, f)
        for f in result.__dataclass_fields__
        if f not in ("reservation_id", "event_id")
    }
    rid = getattr(result, "reservation_id", None)
    if rid is not None:
        if rid not in ids:
            ids.append(rid)
        fields["reservation_id"] = ids.index(rid)
    return fields


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rounds=st.lists(
        st.tuples(st.lists(OPS, min_size=1, max_size=12), st.integers(0, 3_000)),
        min_size=1,
        max_size=8,
    ),
    limit=st.sampled_from([0, 150]),
)
def test_group_commit_answers_exactly_like_one_transaction_per_operation(
    rounds: list[tuple[list[tuple[Any, ...]], int]], limit: int
) -> None:
    """Ledger.run_many (bulk loads, one write per table) vs. the same operations one by one."""
    with tempfile.TemporaryDirectory() as tmp:
        clock = Clock()
        one, many = (
            Ledger(Path(tmp) / "a.db", clock_ms=clock),
            Ledger(Path(tmp) / "b.db", clock_ms=clock),
        )
        ids_one: list[str] = []
        ids_many: list[str] = []
        try:
            for led in (one, many):
                for t in ("acme", "globex", "initech", "umbrella"):
                    led.set_budget(f"tenant:{t}", CR, 2_000, overdraft_limit=limit)
                    led.set_budget(f"tenant:{t}/app:bot", CR, 700, period="daily")
            for ops, advance in rounds:
                calls_one: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
                calls_many: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
                for op in ops:
                    name = op[0]
                    for ids, calls in ((ids_one, calls_one), (ids_many, calls_many)):
                        if name in ("reserve", "event"):
                            subject = SUBJECTS[op[2]]
                            if name == "reserve":
                                req = rreq(
                                    op[1],
                                    subject,
                                    overage_policy=op[3],
                                    idem=op[4],
                                    ttl_ms=2_000,
                                    grace_period_ms=500,
                                )
                                calls.append(("reserve", (req,), {}))
                            else:
                                calls.append(
                                    (
                                        "event",
                                        (),
                                        {
                                            "idempotency_key": op[4],
                                            "subject": subject,
                                            "action": ACT,
                                            "actual": Amount(CR, op[1]),
                                            "overage_policy": op[3],
                                        },
                                    )
                                )
                            continue
                        rid = ids[op[1] % len(ids)] if ids else "no-such-reservation"
                        if name == "commit":
                            kw: dict[str, Any] = {
                                "idempotency_key": op[3],
                                "actual": Amount(CR, op[2]),
                            }
                        elif name == "release":
                            kw = {"idempotency_key": op[2]}
                        else:
                            kw = {"idempotency_key": op[3], "extend_by_ms": op[2]}
                        calls.append((name, (rid,), kw))
                expected = []
                for name, args, kwargs in calls_one:
                    try:
                        expected.append(getattr(one, name)(*args, **kwargs))
                    except CyclesError as exc:
                        expected.append(exc)
                batch = [_Op(n, a, k) for n, a, k in calls_many]
                got = [value for _, value in many.run_many(batch)]
                assert [_outcome(r, ids_many) for r in got] == [
                    _outcome(r, ids_one) for r in expected
                ]
                assert many.list_balances() == one.list_balances()
                for rid_one, rid_many in zip(ids_one, ids_many, strict=True):
                    a, b = one.get_reservation(rid_one), many.get_reservation(rid_many)
                    assert a is not None and b is not None
                    assert dataclasses.replace(b, reservation_id=a.reservation_id) == a
                clock.advance(advance)
                assert many.sweep_expired() == one.sweep_expired()
            assert [(r.requests, r.cost) for r in many.usage()] == [
                (r.requests, r.cost) for r in one.usage()
            ]
        finally:
            one.close()
            many.close()


def test_a_batch_costs_a_few_statements_whatever_its_size(ledger: Ledger) -> None:
    """The point of the group commit: under load the worker makes a handful of SQLite calls
    per batch (each one hands the GIL to the event loop), not a dozen per request."""
    for t in range(20):
        ledger.set_budget(f"tenant:t{t}", CR, 10_000)
        ledger.set_budget(f"tenant:t{t}/app:bot", CR, 10_000)
    statements: list[str] = []
    ledger._conn.set_trace_callback(statements.append)
    subjects = [Subject(tenant=f"t{i % 20}", app="bot") for i in range(100)]
    reserved = ledger.run_many([_Op("reserve", (rreq(3, s),), {}) for s in subjects])
    assert all(ok for ok, _ in reserved)
    assert len(statements) <= 10, statements
    statements.clear()
    commits = [
        _Op("commit", (r.reservation_id,), {"idempotency_key": key(), "actual": Amount(CR, 2)})
        for _, r in reserved
    ]
    assert all(ok for ok, _ in ledger.run_many(commits))
    assert len(statements) <= 12, statements
    ledger._conn.set_trace_callback(None)
    assert amounts(bal(ledger, "tenant:t0")) == (10, 0, 0, 9_990)
    assert sum(r.requests for r in ledger.usage()) == 100


# ------------------------------------------------------------------------------- the authority


async def test_embedded_authority_is_an_authority(db: Path, clock: Clock) -> None:
    auth = EmbeddedAuthority(db, clock_ms=clock, sweep_interval_s=0)
    assert isinstance(auth, Authority)
    assert auth.name == "embedded"
    await auth.start()
    await auth.call(auth.ledger.set_budget, "tenant:acme", CR, 100)
    r = await auth.reserve(rreq(40, ACME_BOT))
    assert r.reservation_id
    assert (
        await auth.extend(r.reservation_id, idempotency_key=key(), extend_by_ms=5)
    ).expires_at_ms
    c = await auth.commit(r.reservation_id, idempotency_key=key(), actual=Amount(CR, 30))
    assert c.charged == Amount(CR, 30)
    r2 = await auth.reserve(rreq(10))
    assert r2.reservation_id
    rel = await auth.release(r2.reservation_id, idempotency_key=key())
    assert rel.released == Amount(CR, 10)
    ev = await auth.event(idempotency_key=key(), subject=ACME, action=ACT, actual=Amount(CR, 5))
    assert ev.charged == Amount(CR, 5)
    [b] = await auth.balances(ACME_BOT)
    assert amounts(b) == (35, 0, 0, 65)
    with pytest.raises(CyclesError) as info:
        await auth.reserve(rreq(66))
    assert info.value.code is ErrorCode.BUDGET_EXCEEDED
    await auth.close()
    await auth.close()  # idempotent
    with pytest.raises(AuthorityUnavailable):
        await auth.reserve(rreq(1))


async def test_concurrent_reserves_never_overspend(db: Path) -> None:
    auth = EmbeddedAuthority(db, sweep_interval_s=0)
    await auth.start()
    try:
        await auth.call(auth.ledger.set_budget, "tenant:acme", CR, 7 * 13 + 12)
        await auth.call(auth.ledger.set_budget, "tenant:acme/app:bot", CR, 10_000)
        results = await asyncio.gather(
            *(auth.reserve(rreq(13, ACME_BOT)) for _ in range(50)), return_exceptions=True
        )
        ok = [r for r in results if not isinstance(r, BaseException)]
        denied = [r for r in results if isinstance(r, BaseException)]
        assert len(ok) == 7
        assert all(isinstance(e, CyclesError) for e in denied)
        assert {e.code for e in denied if isinstance(e, CyclesError)} == {ErrorCode.BUDGET_EXCEEDED}
        assert len({r.reservation_id for r in ok}) == 7
        [tenant, app] = await auth.balances(ACME_BOT)
        assert tenant.reserved == app.reserved == 7 * 13
        assert tenant.remaining == 12
        # Settle them all concurrently too: exactly what was reserved is spent.
        commits = await asyncio.gather(
            *(
                auth.commit(r.reservation_id or "", idempotency_key=key(), actual=Amount(CR, 13))
                for r in ok
            )
        )
        assert sum(c.charged.amount for c in commits) == 7 * 13
        [tenant, app] = await auth.balances(ACME_BOT)
        assert amounts(tenant) == (91, 0, 0, 12)
    finally:
        await auth.close()


async def test_a_cancelled_call_that_has_not_run_does_not_run(db: Path) -> None:
    auth = EmbeddedAuthority(db, sweep_interval_s=0)
    try:
        await auth.call(auth.ledger.set_budget, "tenant:acme", CR, 100)
        busy = asyncio.ensure_future(auth.call(time.sleep, 0.3))  # occupy the worker
        await asyncio.sleep(0.05)
        doomed = asyncio.ensure_future(auth.reserve(rreq(10)))
        await asyncio.sleep(0.01)
        doomed.cancel()
        await busy
        await auth.call(lambda: None)  # drain the queue
        assert doomed.cancelled()
        assert row_count(db, "reservations") == 0
    finally:
        await auth.close()


async def test_authority_sweeps_at_start_and_in_the_background(db: Path, clock: Clock) -> None:
    with Ledger(db, clock_ms=clock) as led:
        led.set_budget("tenant:acme", CR, 100)
        led.reserve(rreq(30, ttl_ms=1_000, grace_period_ms=0))  # left behind by a crash
    clock.advance(1_001)
    auth = EmbeddedAuthority(db, clock_ms=clock, sweep_interval_s=0.02)
    await auth.start()
    try:
        [b] = await auth.balances(ACME)
        assert b.reserved == 0  # swept at start
        await auth.reserve(rreq(40, ttl_ms=1_000, grace_period_ms=0))
        clock.advance(1_001)
        for _ in range(200):
            [b] = await auth.balances(ACME)
            if b.reserved == 0:
                break
            await asyncio.sleep(0.01)
        assert b.reserved == 0  # swept by the background task
    finally:
        await auth.close()
    assert auth._sweeper is None


async def test_sqlite_failures_surface_as_authority_unavailable(db: Path) -> None:
    auth = EmbeddedAuthority(db, sweep_interval_s=0)
    try:

        def broken() -> None:
            raise sqlite3.OperationalError("disk I/O error")

        with pytest.raises(AuthorityUnavailable, match="disk I/O error"):
            await auth.call(broken)
        # Other calls in the same batch are unaffected.
        await auth.call(auth.ledger.set_budget, "tenant:acme", CR, 100)
        results = await asyncio.gather(
            auth.call(broken), auth.reserve(rreq(10)), return_exceptions=True
        )
        assert isinstance(results[0], AuthorityUnavailable)
        assert not isinstance(results[1], BaseException)
    finally:
        await auth.close()


async def test_a_failed_call_in_a_group_commit_leaves_no_trace(db: Path) -> None:
    """Calls queued together share one transaction; one that fails midway is rolled back to
    its savepoint while the others of the batch are committed."""
    auth = EmbeddedAuthority(db, sweep_interval_s=0)
    try:
        await auth.call(auth.ledger.set_budget, "tenant:acme", CR, 100)

        def write_then_fail() -> None:
            with auth.ledger._tx() as con:
                con.execute("UPDATE budgets SET allocated = 0")
                raise RuntimeError("half done")

        busy = asyncio.ensure_future(auth.call(time.sleep, 0.2))  # queue up behind this
        await asyncio.sleep(0.05)
        before = asyncio.ensure_future(auth.reserve(rreq(10)))
        failing = asyncio.ensure_future(auth.call(write_then_fail))
        after = asyncio.ensure_future(auth.reserve(rreq(20)))
        await busy
        with pytest.raises(RuntimeError, match="half done"):
            await failing
        assert (await before).reservation_id and (await after).reservation_id
        [b] = await auth.balances(ACME)
        assert (b.allocated, b.reserved) == (100, 30)
    finally:
        await auth.close()


def test_single_use_keys_are_not_stored_but_ordinary_keys_replay(ledger: Ledger, db: Path) -> None:
    ledger.set_budget("tenant:acme", CR, 1000)

    def stored() -> int:
        conn = sqlite3.connect(db)
        try:
            return int(conn.execute("SELECT count(*) FROM idempotency").fetchone()[0])
        finally:
            conn.close()

    once = ledger.reserve(rreq(100, idem=once_key()))
    commit(ledger, once.reservation_id, 40, idem=once_key())
    assert stored() == 0  # the proxy's own single-use keys cost no idempotency rows
    assert amounts(bal(ledger, "tenant:acme")) == (40, 0, 0, 960)
    k = key()
    first = ledger.reserve(rreq(100, idem=k))
    assert ledger.reserve(rreq(100, idem=k)).reservation_id == first.reservation_id
    assert stored() == 1
    assert bal(ledger, "tenant:acme").reserved == 100  # the replay reserved nothing more
