"""One behaviour suite for both budget authorities (design.md §6: identical from the proxy's side).

Every test runs twice: against ``EmbeddedAuthority`` on a temporary SQLite file, and against
``RemoteAuthority`` talking over a real socket to the fake Cycles server (which validates every
request against ``cycles-protocol-v0.yaml``). Both ledgers run on a virtual clock so expiry is
deterministic. Amounts, outcomes and error codes must be the same.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cycles_proxy.authority.base import (
    HTTP_STATUS,
    Action,
    Amount,
    Authority,
    Balance,
    CyclesError,
    Decision,
    ErrorCode,
    Metrics,
    OveragePolicy,
    Reservation,
    ReserveRequest,
    Subject,
    Unit,
)
from cycles_proxy.authority.embedded import EmbeddedAuthority
from cycles_proxy.authority.remote import RemoteAuthority

try:
    from tests.fakes.fake_cycles import FakeCycles, FakeCyclesServer, VirtualClock
except ImportError:  # pytest's rootdir-less import mode puts tests/ itself on sys.path
    from fakes.fake_cycles import (  # type: ignore[no-redef]
        FakeCycles,
        FakeCyclesServer,
        VirtualClock,
    )

TOK = Unit.TOKENS
ACME = Subject(tenant="acme", app="ollama-proxy", agent="llama3")
ACTION = Action(kind="llm.completion", name="ollama:llama3", tags=("test",))


@dataclass
class Backend:
    kind: str
    auth: Authority
    clock: VirtualClock
    fake: FakeCycles | None
    embedded: EmbeddedAuthority | None

    async def ledger(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run a Ledger method (budget setup, sweeps) on whichever ledger backs this authority."""
        if self.embedded is not None:
            return await self.embedded.call(getattr(self.embedded.ledger, method), *args, **kwargs)
        assert self.fake is not None
        return getattr(self.fake.ledger, method)(*args, **kwargs)

    async def budget(self, scope: str, allocated: int, unit: Unit = TOK, **kw: Any) -> None:
        await self.ledger("set_budget", scope, unit, allocated, **kw)

    async def balance(self, scope: str, unit: Unit = TOK) -> Balance:
        b = await self.ledger("get_balance", scope, unit)
        assert b is not None
        return b  # type: ignore[no-any-return]


@pytest.fixture(params=["embedded", "remote"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    clock = VirtualClock()
    if request.param == "embedded":
        emb = EmbeddedAuthority(tmp_path / "ledger.db", clock_ms=clock.now_ms, sweep_interval_s=0)
        await emb.start()
        try:
            yield Backend("embedded", emb, clock, None, emb)
        finally:
            await emb.close()
        return
    fake = FakeCycles(
        keys={"key-acme": "acme", "key-other": "other"},
        db_path=tmp_path / "fake.db",
        clock_ms=clock.now_ms,
        auto_sweep=False,  # the embedded sweeper is off too: expiry is swept explicitly
    )
    async with FakeCyclesServer(fake) as server:
        remote = RemoteAuthority(
            server.url,
            tenant_keys={"acme": "key-acme", "other": "key-other"},
            default_api_key="key-acme",
            deadline_s=5.0,
        )
        await remote.start()
        try:
            yield Backend("remote", remote, clock, fake, None)
        finally:
            await remote.close()
    fake.assert_clean()
    fake.close()


def key() -> str:
    return uuid.uuid4().hex


def req(
    amount: int,
    *,
    subject: Subject = ACME,
    idem: str | None = None,
    ttl_ms: int = 60_000,
    grace_ms: int = 5_000,
    policy: OveragePolicy = OveragePolicy.ALLOW_IF_AVAILABLE,
    dry_run: bool = False,
    unit: Unit = TOK,
    metadata: dict[str, Any] | None = None,
) -> ReserveRequest:
    return ReserveRequest(
        idempotency_key=idem or key(),
        subject=subject,
        action=ACTION,
        estimate=Amount(unit, amount),
        ttl_ms=ttl_ms,
        grace_period_ms=grace_ms,
        overage_policy=policy,
        dry_run=dry_run,
        metadata=metadata,
    )


async def expect_error(code: ErrorCode, coro: Any) -> CyclesError:
    with pytest.raises(CyclesError) as info:
        await coro
    assert info.value.code is code, info.value
    assert info.value.http_status == HTTP_STATUS[code]
    return info.value


def core(b: Balance) -> tuple[str, Unit, int, int, int, int, bool]:
    return (b.scope, b.unit, b.allocated, b.spent, b.reserved, b.debt, b.is_over_limit)


# ----------------------------------------------------------------------------- reserve


async def test_reserve_allow_shape_and_balances(backend: Backend) -> None:
    await backend.budget("tenant:acme", 1_000)
    await backend.budget("tenant:acme/app:ollama-proxy", 500)
    res = await backend.auth.reserve(req(100, ttl_ms=30_000))
    assert res.decision is Decision.ALLOW
    assert res.reservation_id
    assert res.affected_scopes == (
        "tenant:acme",
        "tenant:acme/app:ollama-proxy",
        "tenant:acme/app:ollama-proxy/agent:llama3",
    )
    assert res.scope_path == "tenant:acme/app:ollama-proxy/agent:llama3"
    assert res.reserved == Amount(TOK, 100)
    assert res.expires_at_ms == backend.clock.now_ms() + 30_000
    assert res.remaining_ttl_ms == 30_000
    assert sorted(core(b) for b in res.balances) == [
        ("tenant:acme", TOK, 1_000, 0, 100, 0, False),
        ("tenant:acme/app:ollama-proxy", TOK, 500, 0, 100, 0, False),
    ]
    assert (await backend.balance("tenant:acme")).remaining == 900


async def test_reserve_is_atomic_across_scopes(backend: Backend) -> None:
    await backend.budget("tenant:acme", 1_000)
    await backend.budget("tenant:acme/app:ollama-proxy", 50)
    err = await expect_error(ErrorCode.BUDGET_EXCEEDED, backend.auth.reserve(req(100)))
    assert err.http_status == 409
    # nothing was reserved anywhere
    assert (await backend.balance("tenant:acme")).reserved == 0
    assert (await backend.balance("tenant:acme/app:ollama-proxy")).reserved == 0


async def test_reserve_without_budget_and_in_wrong_unit(backend: Backend) -> None:
    err = await expect_error(ErrorCode.NOT_FOUND, backend.auth.reserve(req(1)))
    assert err.http_status == 404
    await backend.budget("tenant:acme", 1_000, Unit.USD_MICROCENTS)
    err = await expect_error(ErrorCode.UNIT_MISMATCH, backend.auth.reserve(req(1)))
    assert err.http_status == 400
    assert err.details.get("expected_units") == ["USD_MICROCENTS"]


async def test_frozen_budget_denies(backend: Backend) -> None:
    await backend.budget("tenant:acme", 1_000)
    await backend.ledger("set_budget_status", "tenant:acme", TOK, "FROZEN")
    await expect_error(ErrorCode.BUDGET_FROZEN, backend.auth.reserve(req(1)))


async def test_dry_run_reports_deny_without_reserving(backend: Backend) -> None:
    await backend.budget("tenant:acme", 100)
    ok = await backend.auth.reserve(req(50, dry_run=True))
    assert ok.decision is Decision.ALLOW
    assert ok.reservation_id is None and ok.expires_at_ms is None
    assert ok.remaining_ttl_ms is None
    deny = await backend.auth.reserve(req(500, dry_run=True))
    assert deny.decision is Decision.DENY
    assert deny.reason_code == "BUDGET_EXCEEDED"
    assert deny.reservation_id is None
    nobudget = await backend.auth.reserve(req(1, dry_run=True, subject=Subject(tenant="other")))
    assert nobudget.decision is Decision.DENY
    assert nobudget.reason_code == "BUDGET_NOT_FOUND"
    assert (await backend.balance("tenant:acme")).reserved == 0


# ----------------------------------------------------------------------------- commit / release


async def test_commit_below_estimate_releases_the_rest(backend: Backend) -> None:
    await backend.budget("tenant:acme", 1_000)
    res = await backend.auth.reserve(req(300))
    assert res.reservation_id
    out = await backend.auth.commit(
        res.reservation_id,
        idempotency_key=key(),
        actual=Amount(TOK, 120),
        metrics=Metrics(tokens_input=10, tokens_output=110, latency_ms=900, custom={"gpu_s": 1}),
        metadata={"route": "/api/chat"},
    )
    assert out.charged == Amount(TOK, 120)
    assert out.released == Amount(TOK, 180)
    assert [core(b) for b in out.balances] == [("tenant:acme", TOK, 1_000, 120, 0, 0, False)]
    b = await backend.balance("tenant:acme")
    assert (b.spent, b.reserved, b.remaining) == (120, 0, 880)


async def test_release_returns_everything(backend: Backend) -> None:
    await backend.budget("tenant:acme", 1_000)
    res = await backend.auth.reserve(req(300))
    assert res.reservation_id
    out = await backend.auth.release(
        res.reservation_id, idempotency_key=key(), reason="upstream unreachable"
    )
    assert out.released == Amount(TOK, 300)
    b = await backend.balance("tenant:acme")
    assert (b.spent, b.reserved) == (0, 0)
    await expect_error(
        ErrorCode.RESERVATION_FINALIZED,
        backend.auth.commit(res.reservation_id, idempotency_key=key(), actual=Amount(TOK, 1)),
    )


async def test_unknown_reservation_is_not_found(backend: Backend) -> None:
    await backend.budget("tenant:acme", 1_000)
    rid = str(uuid.uuid4())
    await expect_error(
        ErrorCode.NOT_FOUND,
        backend.auth.release(rid, idempotency_key=key()),
    )
    await expect_error(
        ErrorCode.NOT_FOUND,
        backend.auth.extend(rid, idempotency_key=key(), extend_by_ms=1_000),
    )


async def test_commit_unit_mismatch(backend: Backend) -> None:
    await backend.budget("tenant:acme", 1_000)
    res = await backend.auth.reserve(req(100))
    assert res.reservation_id
    await expect_error(
        ErrorCode.UNIT_MISMATCH,
        backend.auth.commit(
            res.reservation_id, idempotency_key=key(), actual=Amount(Unit.CREDITS, 1)
        ),
    )


# ----------------------------------------------------------------------------- idempotency


async def test_reserve_replay_returns_the_same_reservation(backend: Backend) -> None:
    await backend.budget("tenant:acme", 1_000)
    k = key()
    first = await backend.auth.reserve(req(100, idem=k))
    backend.clock.advance(2.0)
    again = await backend.auth.reserve(req(100, idem=k))
    assert again.reservation_id == first.reservation_id
    assert again.expires_at_ms == first.expires_at_ms
    # remaining_ttl_ms is recomputed on replay (spec IDEMPOTENCY)
    assert again.remaining_ttl_ms == 58_000
    assert (await backend.balance("tenant:acme")).reserved == 100
    await expect_error(ErrorCode.IDEMPOTENCY_MISMATCH, backend.auth.reserve(req(101, idem=k)))


async def test_commit_replay_charges_once_and_other_key_is_finalized(backend: Backend) -> None:
    await backend.budget("tenant:acme", 1_000)
    res = await backend.auth.reserve(req(100))
    assert res.reservation_id
    k = key()
    one = await backend.auth.commit(res.reservation_id, idempotency_key=k, actual=Amount(TOK, 70))
    two = await backend.auth.commit(res.reservation_id, idempotency_key=k, actual=Amount(TOK, 70))
    assert one.charged == two.charged == Amount(TOK, 70)
    assert (await backend.balance("tenant:acme")).spent == 70
    await expect_error(
        ErrorCode.IDEMPOTENCY_MISMATCH,
        backend.auth.commit(res.reservation_id, idempotency_key=k, actual=Amount(TOK, 71)),
    )
    await expect_error(
        ErrorCode.RESERVATION_FINALIZED,
        backend.auth.commit(res.reservation_id, idempotency_key=key(), actual=Amount(TOK, 70)),
    )
    await expect_error(
        ErrorCode.RESERVATION_FINALIZED,
        backend.auth.release(res.reservation_id, idempotency_key=key()),
    )
    assert (await backend.balance("tenant:acme")).spent == 70


async def test_event_replay_charges_once(backend: Backend) -> None:
    await backend.budget("tenant:acme", 1_000)
    k = key()
    one = await backend.auth.event(
        idempotency_key=k, subject=ACME, action=ACTION, actual=Amount(TOK, 40)
    )
    two = await backend.auth.event(
        idempotency_key=k, subject=ACME, action=ACTION, actual=Amount(TOK, 40)
    )
    assert one.event_id == two.event_id
    assert (await backend.balance("tenant:acme")).spent == 40


# ----------------------------------------------------------------------------- extend / expiry


async def test_extend_is_relative_to_current_expiry(backend: Backend) -> None:
    await backend.budget("tenant:acme", 1_000)
    res = await backend.auth.reserve(req(10, ttl_ms=10_000))
    assert res.reservation_id and res.expires_at_ms
    backend.clock.advance(4.0)
    ext = await backend.auth.extend(res.reservation_id, idempotency_key=key(), extend_by_ms=10_000)
    assert ext.expires_at_ms == res.expires_at_ms + 10_000
    assert ext.remaining_ttl_ms == 16_000


async def test_extend_limit(backend: Backend) -> None:
    await backend.budget("tenant:acme", 1_000)
    res = await backend.auth.reserve(req(10, ttl_ms=10_000))
    assert res.reservation_id
    for _ in range(10):
        await backend.auth.extend(res.reservation_id, idempotency_key=key(), extend_by_ms=1_000)
    await expect_error(
        ErrorCode.MAX_EXTENSIONS_EXCEEDED,
        backend.auth.extend(res.reservation_id, idempotency_key=key(), extend_by_ms=1_000),
    )


async def test_expiry_grace_and_sweep(backend: Backend) -> None:
    await backend.budget("tenant:acme", 1_000)
    late = await backend.auth.reserve(req(100, ttl_ms=10_000, grace_ms=5_000))
    gone = await backend.auth.reserve(req(200, ttl_ms=10_000, grace_ms=5_000))
    assert late.reservation_id and gone.reservation_id
    backend.clock.advance(12.0)  # past expires_at, inside the grace period
    await expect_error(
        ErrorCode.RESERVATION_EXPIRED,
        backend.auth.extend(late.reservation_id, idempotency_key=key(), extend_by_ms=1_000),
    )
    out = await backend.auth.commit(
        late.reservation_id, idempotency_key=key(), actual=Amount(TOK, 60)
    )
    assert out.charged == Amount(TOK, 60)
    backend.clock.advance(4.0)  # past expires_at + grace
    err = await expect_error(
        ErrorCode.RESERVATION_EXPIRED,
        backend.auth.release(gone.reservation_id, idempotency_key=key()),
    )
    assert err.http_status == 410
    await backend.ledger("sweep_expired")
    b = await backend.balance("tenant:acme")
    assert (b.spent, b.reserved, b.remaining) == (60, 0, 940)


# ----------------------------------------------------------------------------- overage


async def test_overage_reject(backend: Backend) -> None:
    await backend.budget("tenant:acme", 1_000)
    res = await backend.auth.reserve(req(100, policy=OveragePolicy.REJECT))
    assert res.reservation_id
    await expect_error(
        ErrorCode.BUDGET_EXCEEDED,
        backend.auth.commit(res.reservation_id, idempotency_key=key(), actual=Amount(TOK, 101)),
    )
    out = await backend.auth.commit(
        res.reservation_id, idempotency_key=key(), actual=Amount(TOK, 100)
    )
    assert out.charged == Amount(TOK, 100)


async def test_overage_allow_if_available_caps_and_blocks(backend: Backend) -> None:
    await backend.budget("tenant:acme", 150)
    res = await backend.auth.reserve(req(100))
    assert res.reservation_id
    out = await backend.auth.commit(
        res.reservation_id, idempotency_key=key(), actual=Amount(TOK, 400)
    )
    assert out.charged == Amount(TOK, 150)  # reserved + min(delta, remaining)
    b = await backend.balance("tenant:acme")
    assert (b.spent, b.debt, b.is_over_limit) == (150, 0, True)
    await expect_error(ErrorCode.OVERDRAFT_LIMIT_EXCEEDED, backend.auth.reserve(req(1)))


async def test_overage_with_overdraft(backend: Backend) -> None:
    await backend.budget("tenant:acme", 200, overdraft_limit=100)
    a = await backend.auth.reserve(req(100, policy=OveragePolicy.ALLOW_WITH_OVERDRAFT))
    b2 = await backend.auth.reserve(req(100, policy=OveragePolicy.ALLOW_WITH_OVERDRAFT))
    assert a.reservation_id and b2.reservation_id
    out = await backend.auth.commit(
        a.reservation_id, idempotency_key=key(), actual=Amount(TOK, 160)
    )
    assert out.charged == Amount(TOK, 160)
    b = await backend.balance("tenant:acme")
    assert (b.spent, b.reserved, b.debt, b.remaining, b.is_over_limit) == (100, 100, 60, -60, False)
    await expect_error(
        ErrorCode.OVERDRAFT_LIMIT_EXCEEDED,
        backend.auth.commit(b2.reservation_id, idempotency_key=key(), actual=Amount(TOK, 150)),
    )
    await expect_error(ErrorCode.BUDGET_EXCEEDED, backend.auth.reserve(req(1)))


async def test_debt_without_overdraft_blocks_reserve(backend: Backend) -> None:
    await backend.budget("tenant:acme", 100, overdraft_limit=100)
    res = await backend.auth.reserve(req(100, policy=OveragePolicy.ALLOW_WITH_OVERDRAFT))
    assert res.reservation_id
    await backend.auth.commit(res.reservation_id, idempotency_key=key(), actual=Amount(TOK, 130))
    await backend.budget("tenant:acme", 1_000, overdraft_limit=0)
    b = await backend.balance("tenant:acme")
    assert (b.debt, b.is_over_limit) == (30, False)
    await expect_error(ErrorCode.DEBT_OUTSTANDING, backend.auth.reserve(req(1)))


async def test_event_policies(backend: Backend) -> None:
    await backend.budget("tenant:acme", 100)
    await expect_error(
        ErrorCode.BUDGET_EXCEEDED,
        backend.auth.event(
            idempotency_key=key(),
            subject=ACME,
            action=ACTION,
            actual=Amount(TOK, 101),
            overage_policy=OveragePolicy.REJECT,
        ),
    )
    ev = await backend.auth.event(
        idempotency_key=key(),
        subject=ACME,
        action=ACTION,
        actual=Amount(TOK, 130),
        metrics=Metrics(tokens_output=3),
        metadata={"why": "fail_open"},
    )
    assert ev.event_id
    assert ev.charged == Amount(TOK, 100)  # capped at what remained
    b = await backend.balance("tenant:acme")
    assert (b.spent, b.is_over_limit) == (100, True)


async def test_balances_by_subject(backend: Backend) -> None:
    await backend.budget("tenant:acme", 1_000)
    await backend.budget("tenant:acme/app:ollama-proxy/agent:llama3", 10, Unit.CREDITS)
    await backend.auth.reserve(req(5))
    got = sorted(core(b) for b in await backend.auth.balances(ACME))
    assert got == [
        ("tenant:acme", TOK, 1_000, 0, 5, 0, False),
        ("tenant:acme/app:ollama-proxy/agent:llama3", Unit.CREDITS, 10, 0, 0, 0, False),
    ]


async def test_reservation_result_types(backend: Backend) -> None:
    await backend.budget("tenant:acme", 1_000)
    assert isinstance(backend.auth, Authority)
    assert backend.auth.name == backend.kind
    res = await backend.auth.reserve(req(1, metadata={"request_id": "r-1"}))
    assert isinstance(res, Reservation)
    assert isinstance(res.reserved, Amount) and isinstance(res.reserved.amount, int)
