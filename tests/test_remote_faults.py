"""RemoteAuthority under faults: recovery rules (cycles-protocol.md §6, §5.5, §5.6).

Scenario ids follow the client-recovery profile: CR-CORE-001 (lost commit response -> retry with
the same key), CR-CORE-002 (expired commit -> event with the same key), CR-CORE-003 (heartbeat
transport error is non-fatal), CR-CORE-004 (protocol-invalid 2xx stays ambiguous), CR-BOUNDARY-001
(no actual known -> no settlement). Every test ends with the fake asserting that no request broke
``cycles-protocol-v0.yaml``. Heartbeat tests run on a virtual clock shared by the fake's ledger and
the authority, so schedules are checked exactly without waiting.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import stat
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cycles_proxy.authority.base import (
    Action,
    Amount,
    AuthorityUnavailable,
    CyclesError,
    ErrorCode,
    Metrics,
    OveragePolicy,
    ReserveRequest,
    Subject,
    Unit,
)
from cycles_proxy.authority.journal import Journal
from cycles_proxy.authority.remote import (
    HeartbeatStop,
    RemoteAuthority,
    SettlementDeferred,
)

try:
    from tests.fakes.fake_cycles import FakeCycles, FakeCyclesServer, Fault, VirtualClock
except ImportError:  # pytest's rootdir-less import mode puts tests/ itself on sys.path
    from fakes.fake_cycles import (  # type: ignore[no-redef]
        FakeCycles,
        FakeCyclesServer,
        Fault,
        VirtualClock,
    )

TOK = Unit.TOKENS
ACME = Subject(tenant="acme", app="ollama-proxy", agent="llama3")
ACTION = Action(kind="llm.completion", name="ollama:llama3")
KEYS = {"acme": "key-acme", "other": "key-other"}


@dataclass
class Env:
    fake: FakeCycles
    server: FakeCyclesServer
    clock: VirtualClock
    tmp: Path
    made: list[RemoteAuthority] = field(default_factory=list)

    def authority(self, *, virtual: bool = False, **kw: Any) -> RemoteAuthority:
        kw.setdefault("tenant_keys", KEYS)
        kw.setdefault("deadline_s", 3.0)
        kw.setdefault("settle_deadline_s", 3.0)
        if virtual:
            kw.setdefault("clock", self.clock.monotonic)
            kw.setdefault("sleep", self.clock.sleep)
        a = RemoteAuthority(self.server.url, **kw)
        self.made.append(a)
        return a

    def spent(self, scope: str = "tenant:acme") -> int:
        b = self.fake.ledger.get_balance(scope, TOK)
        assert b is not None
        return b.spent

    def reserved(self, scope: str = "tenant:acme") -> int:
        b = self.fake.ledger.get_balance(scope, TOK)
        assert b is not None
        return b.reserved


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    clock = VirtualClock()
    fake = FakeCycles(
        keys={"key-acme": "acme", "key-other": "other"},
        db_path=tmp_path / "fake.db",
        clock_ms=clock.now_ms,
    )
    fake.ledger.set_budget("tenant:acme", TOK, 10_000)
    server = FakeCyclesServer(fake)
    await server.up()
    e = Env(fake, server, clock, tmp_path)
    try:
        yield e
    finally:
        for a in e.made:
            await a.close()
        await server.down()
    fake.assert_clean()
    fake.close()


def req(amount: int = 100, **kw: Any) -> ReserveRequest:
    return ReserveRequest(
        idempotency_key=kw.pop("idem", None) or f"res-{uuid.uuid4().hex}",
        subject=kw.pop("subject", ACME),
        action=ACTION,
        estimate=Amount(TOK, amount),
        **kw,
    )


async def reserve(a: RemoteAuthority, amount: int = 100, **kw: Any) -> str:
    res = await a.reserve(req(amount, **kw))
    assert res.reservation_id
    return res.reservation_id


def sha(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


async def eventually(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


# ----------------------------------------------------------------------------- commit recovery


async def test_cr_core_001_lost_commit_response_is_retried_with_the_same_key(env: Env) -> None:
    a = env.authority()
    rid = await reserve(a, 300)
    env.fake.inject("commit", Fault.drop(), calls=[1])  # applied, response lost
    out = await a.commit(
        rid,
        idempotency_key="commit-1",
        actual=Amount(TOK, 120),
        metrics=Metrics(tokens_input=5, tokens_output=9, custom={"gpu_seconds": 0.5}),
    )
    assert out.charged == Amount(TOK, 120)
    commits = env.fake.requests_for("commit")
    assert [c.status for c in commits] == [None, 200]
    assert {c.body["idempotency_key"] for c in commits} == {"commit-1"}
    assert {c.headers["X-Idempotency-Key"] for c in commits} == {"commit-1"}
    assert commits[0].body == commits[1].body  # the same body is resent
    assert env.spent() == 120  # charged once
    assert env.reserved() == 0
    env.fake.assert_clean()


async def test_lost_reserve_response_replays_the_same_reservation(env: Env) -> None:
    a = env.authority()
    env.fake.inject("reserve", Fault.drop(), calls=[1])
    env.fake.inject("reserve", Fault.error(503, apply=True), calls=[2])
    rid = await reserve(a, 250, idem="reserve-1")
    reserves = env.fake.requests_for("reserve")
    assert [r.status for r in reserves] == [None, 503, 200]
    assert {r.body["idempotency_key"] for r in reserves} == {"reserve-1"}
    assert env.reserved() == 250  # reserved once
    await a.commit(rid, idempotency_key="c", actual=Amount(TOK, 250))
    assert env.spent() == 250
    env.fake.assert_clean()


@pytest.mark.parametrize(
    ("fault", "statuses"),
    [
        (Fault.error(503), [503, 503, 200]),
        (Fault.error(500, apply=True), [500, 500, 200]),
        (Fault.refuse(), [None, None, 200]),
    ],
    ids=["503-before-apply", "500-after-apply", "connection-reset"],
)
async def test_5xx_then_success(env: Env, fault: Fault, statuses: list[int | None]) -> None:
    a = env.authority()
    rid = await reserve(a, 100)
    env.fake.inject("commit", fault, times=2)
    out = await a.commit(rid, idempotency_key="commit-5xx", actual=Amount(TOK, 80))
    assert out.charged == Amount(TOK, 80)
    assert [c.status for c in env.fake.requests_for("commit")] == statuses
    assert env.spent() == 80
    env.fake.assert_clean()


async def test_429_retry_after_is_honoured(env: Env) -> None:
    a = env.authority(settle_deadline_s=10.0)
    rid = await reserve(a)
    env.fake.inject("commit", Fault.throttle("1"), calls=[1])
    out = await a.commit(rid, idempotency_key="commit-429", actual=Amount(TOK, 10))
    assert out.charged == Amount(TOK, 10)
    first, second = env.fake.requests_for("commit")
    assert first.status == 429 and second.status == 200
    assert second.at - first.at >= 0.9  # waited for Retry-After: 1 (generous bound)
    assert second.body == first.body
    env.fake.assert_clean()


async def test_429_longer_than_the_deadline_surfaces_limit_exceeded(env: Env) -> None:
    a = env.authority(deadline_s=2.0)
    env.fake.inject("reserve", Fault.throttle("30"))
    started = time.monotonic()
    with pytest.raises(CyclesError) as info:
        await a.reserve(req())
    assert info.value.code is ErrorCode.LIMIT_EXCEEDED
    assert info.value.retry_after_s == 30
    assert time.monotonic() - started < 1.5  # did not sleep into a wait it could never finish
    assert len(env.fake.requests_for("reserve")) == 1
    env.fake.assert_clean()


async def test_cr_core_002_forced_410_commit_becomes_event_with_the_same_key(env: Env) -> None:
    a = env.authority()
    rid = await reserve(a, 100, overage_policy=OveragePolicy.ALLOW_IF_AVAILABLE)
    env.fake.inject("commit", Fault.expire())
    out = await a.commit(
        rid,
        idempotency_key="commit-410",
        actual=Amount(TOK, 70),
        metrics=Metrics(tokens_output=7),
        metadata={"route": "/api/chat"},
    )
    assert out.charged == Amount(TOK, 70)
    (commit,) = env.fake.requests_for("commit")
    (event,) = env.fake.requests_for("event")
    assert commit.status == 410 and event.status == 201
    assert event.body == {
        "idempotency_key": "commit-410",
        "subject": ACME.to_dict(),
        "action": ACTION.to_dict(),
        "actual": {"unit": "TOKENS", "amount": 70},
        "overage_policy": "ALLOW_IF_AVAILABLE",
        "metrics": {"tokens_output": 7},
        "metadata": {"route": "/api/chat", "recovered_reservation_id": rid},
    }
    assert event.headers["X-Idempotency-Key"] == "commit-410"
    assert env.spent() == 70
    env.fake.assert_clean()


async def test_cr_core_002_genuinely_expired_reservation_is_recovered_as_event(env: Env) -> None:
    a = env.authority()
    rid = await reserve(a, 100, ttl_ms=1_000, grace_period_ms=0)
    env.clock.advance(5.0)  # the stream outlived the lease (no heartbeat)
    out = await a.commit(rid, idempotency_key="commit-late", actual=Amount(TOK, 90))
    assert out.charged == Amount(TOK, 90)
    assert [c.status for c in env.fake.requests_for("commit")] == [410]
    (event,) = env.fake.requests_for("event")
    assert event.body["idempotency_key"] == "commit-late"
    assert event.body["metadata"] == {"recovered_reservation_id": rid}
    assert (env.spent(), env.reserved()) == (90, 0)
    # a replayed settlement (same key) does not charge twice
    again = await a.event(
        idempotency_key="commit-late",
        subject=ACME,
        action=ACTION,
        actual=Amount(TOK, 90),
        metadata={"recovered_reservation_id": rid},
    )
    assert again.charged == Amount(TOK, 90)
    assert env.spent() == 90
    env.fake.assert_clean()


async def test_cr_core_004_schema_invalid_2xx_is_ambiguous_and_retried(env: Env) -> None:
    a = env.authority()
    rid = await reserve(a)
    env.fake.inject("commit", Fault.invalid(), calls=[1])  # applied, body breaks CommitResponse
    out = await a.commit(rid, idempotency_key="commit-bad2xx", actual=Amount(TOK, 33))
    assert out.charged == Amount(TOK, 33)
    assert [c.status for c in env.fake.requests_for("commit")] == [200, 200]
    assert env.spent() == 33
    env.fake.assert_clean()


async def test_finalized_on_a_retried_commit_means_it_landed(env: Env) -> None:
    a = env.authority()
    rid = await reserve(a, 100)
    env.fake.inject("commit", Fault.error(503, apply=True), calls=[1])
    env.fake.inject("commit", Fault.error(code=ErrorCode.RESERVATION_FINALIZED), calls=[2])
    out = await a.commit(rid, idempotency_key="commit-f", actual=Amount(TOK, 40))
    assert out.charged == Amount(TOK, 40)
    assert out.released == Amount(TOK, 60)
    assert env.spent() == 40
    assert a.pending() == 0
    env.fake.assert_clean()


async def test_finalized_on_a_first_commit_is_an_error(env: Env) -> None:
    a = env.authority()
    rid = await reserve(a, 100)
    await a.release(rid, idempotency_key="rel")
    with pytest.raises(CyclesError) as info:
        await a.commit(rid, idempotency_key="commit-after-release", actual=Amount(TOK, 40))
    assert info.value.code is ErrorCode.RESERVATION_FINALIZED
    assert env.spent() == 0
    env.fake.assert_clean()


async def test_genuine_4xx_is_neither_retried_nor_journaled(env: Env) -> None:
    a = env.authority(journal=Journal(env.tmp / "journal"))
    rid = await reserve(a, 100)
    with pytest.raises(CyclesError) as info:
        await a.commit(rid, idempotency_key="c", actual=Amount(Unit.CREDITS, 1))
    assert info.value.code is ErrorCode.UNIT_MISMATCH
    assert len(env.fake.requests_for("commit")) == 1
    assert a.pending() == 0
    env.fake.assert_clean()


async def test_authority_never_releases_on_its_own(env: Env) -> None:
    a = env.authority(journal=Journal(env.tmp / "journal"), settle_deadline_s=0.3)
    rid = await reserve(a, 100)
    env.fake.inject("*", Fault.error(503))
    with pytest.raises(SettlementDeferred):
        await a.commit(rid, idempotency_key="c", actual=Amount(TOK, 1))
    await a.close()
    assert env.fake.requests_for("release") == []
    env.fake.assert_clean()


async def test_cr_boundary_001_no_actual_no_settlement(env: Env) -> None:
    a = env.authority(virtual=True)
    res = await a.reserve(req(100, ttl_ms=10_000))
    hb = asyncio.create_task(a.heartbeat(res, 10_000))
    env.clock.set_limit(5.0)
    await env.clock.parked()
    hb.cancel()  # the stream ended without any usage known: nothing to settle
    with pytest.raises(asyncio.CancelledError):
        await hb
    await a.close()
    endpoints = {r.endpoint for r in env.fake.requests}
    assert endpoints <= {"reserve", "extend"}
    assert env.spent() == 0
    env.fake.assert_clean()


# ----------------------------------------------------------------------------- unavailability


async def test_slow_server_past_the_deadline_is_unavailable(env: Env) -> None:
    a = env.authority(deadline_s=0.6, read_timeout_s=0.25)
    env.fake.inject("reserve", Fault.slow(3.0))
    started = time.monotonic()
    with pytest.raises(AuthorityUnavailable):
        await a.reserve(req())
    assert time.monotonic() - started < 2.5
    env.fake.assert_clean()


async def test_dead_server_is_unavailable(env: Env) -> None:
    a = env.authority(deadline_s=0.5)
    await reserve(a)  # a live keep-alive connection exists
    await env.server.down()
    started = time.monotonic()
    with pytest.raises(AuthorityUnavailable):
        await a.reserve(req())
    with pytest.raises(AuthorityUnavailable):
        await a.balances(ACME)
    assert time.monotonic() - started < 3.0
    env.fake.assert_clean()


async def test_server_5xx_forever_is_unavailable_not_a_protocol_error(env: Env) -> None:
    a = env.authority(deadline_s=0.4)
    env.fake.inject("reserve", Fault.error(500))
    with pytest.raises(AuthorityUnavailable):
        await a.reserve(req())
    assert len(env.fake.requests_for("reserve")) >= 2
    assert len({r.body["idempotency_key"] for r in env.fake.requests_for("reserve")}) == 1
    env.fake.assert_clean()


# ----------------------------------------------------------------------------- journal


async def test_journal_undelivered_commit_survives_a_restart(env: Env) -> None:
    jdir = env.tmp / "journal"
    a1 = env.authority(journal=Journal(jdir), settle_deadline_s=0.4)
    rid = await reserve(a1, 300)
    await env.server.down()
    with pytest.raises(SettlementDeferred) as info:
        await a1.commit(
            rid,
            idempotency_key="commit-journal",
            actual=Amount(TOK, 120),
            metrics=Metrics(tokens_input=1, tokens_output=2),
        )
    assert info.value.record_id == sha(rid)
    assert a1.pending() == 1
    path = jdir / f"v2-{sha(rid)}.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    text = path.read_text()
    assert "key-acme" not in text  # never the raw key
    record = json.loads(text)
    assert record["mode"] == "commit"
    assert record["endpoint"] == f"/v1/reservations/{rid}/commit"
    assert record["idempotency_key"] == "commit-journal"
    assert record["tenant"] == "acme" and record["key_hash"] == sha("key-acme")
    assert record["body"]["actual"] == {"unit": "TOKENS", "amount": 120}
    assert record["fallback_body"]["subject"] == ACME.to_dict()
    await a1.close()  # the process goes away

    await env.server.up()
    a2 = env.authority(journal=Journal(jdir))
    assert a2.pending() == 1
    await a2.start()  # replays what the earlier process left
    assert a2.pending() == 0
    assert not path.exists()
    delivered = [c for c in env.fake.requests_for("commit") if c.status == 200]
    assert len(delivered) == 1
    assert delivered[0].body["idempotency_key"] == "commit-journal"
    assert delivered[0].api_key == "key-acme"
    assert (env.spent(), env.reserved()) == (120, 0)
    report = await a2.replay_journal()  # nothing left: nothing sent, nothing charged
    assert report.delivered == 0 and report.pending == 0
    assert len(env.fake.requests_for("commit")) == 1
    assert env.spent() == 120
    env.fake.assert_clean()


async def test_journal_replay_twice_delivers_exactly_once(env: Env) -> None:
    jdir = env.tmp / "journal"
    a1 = env.authority(journal=Journal(jdir), settle_deadline_s=0.3)
    rid = await reserve(a1, 100)
    env.fake.inject("commit", Fault.drop(), times=1)  # applied, but the client never knows
    env.fake.inject("commit", Fault.error(503), calls=range(2, 100))
    with pytest.raises(SettlementDeferred):
        await a1.commit(rid, idempotency_key="commit-twice", actual=Amount(TOK, 55))
    env.fake.clear_faults()
    # two processes replaying the same journal directory
    r1 = await env.authority(journal=Journal(jdir)).replay_journal()
    r2 = await env.authority(journal=Journal(jdir)).replay_journal()
    assert r1.delivered + r2.delivered >= 1
    assert env.spent() == 55
    env.fake.assert_clean()


async def test_journal_replays_an_expired_commit_as_an_event(env: Env) -> None:
    jdir = env.tmp / "journal"
    a1 = env.authority(journal=Journal(jdir), settle_deadline_s=0.3)
    rid = await reserve(a1, 100, ttl_ms=2_000, grace_period_ms=0)
    await env.server.down()
    with pytest.raises(SettlementDeferred):
        await a1.commit(rid, idempotency_key="commit-exp", actual=Amount(TOK, 64))
    await a1.close()
    env.clock.advance(60.0)  # the reservation expires while Cycles is down
    await env.server.up()
    a2 = env.authority(journal=Journal(jdir))
    report = await a2.replay_journal()
    assert (report.delivered, report.recovered_as_event, report.pending) == (1, 1, 0)
    (commit,) = env.fake.requests_for("commit")
    (event,) = env.fake.requests_for("event")
    assert commit.status == 410 and event.status == 201
    assert event.body["idempotency_key"] == "commit-exp"
    assert event.body["metadata"] == {"recovered_reservation_id": rid}
    assert event.body["subject"] == ACME.to_dict()
    assert (env.spent(), env.reserved()) == (64, 0)
    env.fake.assert_clean()


async def test_journal_keeps_and_reports_genuine_rejections(env: Env) -> None:
    jdir = env.tmp / "journal"
    a1 = env.authority(journal=Journal(jdir), settle_deadline_s=0.3)
    rid = await reserve(a1, 100)
    await env.server.down()
    with pytest.raises(SettlementDeferred):
        await a1.commit(rid, idempotency_key="commit-403", actual=Amount(TOK, 10))
    await env.server.up()
    wrong = env.authority(journal=Journal(jdir), tenant_keys={"acme": "key-other"})
    report = await wrong.replay_journal()
    assert report.rejected == [(sha(rid), "FORBIDDEN", report.rejected[0][2])]
    assert report.pending == 1
    record = json.loads((jdir / f"v2-{sha(rid)}.json").read_text())
    assert record["last_error"].startswith("FORBIDDEN")
    fixed = env.authority(journal=Journal(jdir))
    report = await fixed.replay_journal()
    assert (report.delivered, report.pending) == (1, 0)
    assert env.spent() == 10
    env.fake.assert_clean()


async def test_journal_pass_through_key_is_needed_again_to_replay(env: Env) -> None:
    jdir = env.tmp / "journal"
    a1 = env.authority(journal=Journal(jdir), tenant_keys={}, settle_deadline_s=0.3)
    view = a1.with_api_key("key-acme")
    rid = await reserve(view, 100)
    await env.server.down()
    with pytest.raises(SettlementDeferred):
        await view.commit(rid, idempotency_key="commit-pt", actual=Amount(TOK, 25))
    assert "key-acme" not in (jdir / f"v2-{sha(rid)}.json").read_text()
    await env.server.up()
    a2 = env.authority(journal=Journal(jdir), tenant_keys={})
    report = await a2.replay_journal()
    assert report.missing_key == [sha(rid)] and report.pending == 1
    assert await a2.resolve_tenant("key-acme") == "acme"  # the caller shows up again
    report = await a2.replay_journal()
    assert (report.delivered, report.pending) == (1, 0)
    assert env.spent() == 25
    env.fake.assert_clean()


async def test_background_replay_delivers_when_the_server_returns(env: Env) -> None:
    a = env.authority(
        journal=Journal(env.tmp / "journal"), settle_deadline_s=0.3, replay_interval_s=0.05
    )
    await a.start()
    rid = await reserve(a, 100)
    await env.server.down()
    with pytest.raises(SettlementDeferred):
        await a.commit(rid, idempotency_key="commit-bg", actual=Amount(TOK, 42))
    assert a.pending() == 1
    await env.server.up()
    await eventually(lambda: a.pending() == 0)
    assert env.spent() == 42
    env.fake.assert_clean()


async def test_undeliverable_event_is_journaled_by_idempotency_key(env: Env) -> None:
    jdir = env.tmp / "journal"
    a = env.authority(journal=Journal(jdir), settle_deadline_s=0.3)
    await env.server.down()
    with pytest.raises(SettlementDeferred) as info:
        await a.event(
            idempotency_key="event-1", subject=ACME, action=ACTION, actual=Amount(TOK, 17)
        )
    assert info.value.record_id == sha("event-1")
    record = json.loads((jdir / f"v2-{sha('event-1')}.json").read_text())
    assert (record["mode"], record["endpoint"]) == ("event", "/v1/events")
    await env.server.up()
    report = await a.replay_journal()
    assert report.delivered == 1
    (event,) = env.fake.requests_for("event")
    assert event.body["idempotency_key"] == "event-1"
    assert env.spent() == 17
    env.fake.assert_clean()


async def test_throttled_commit_is_journaled_with_a_not_before_time(env: Env) -> None:
    jdir = env.tmp / "journal"
    a = env.authority(journal=Journal(jdir), settle_deadline_s=1.0)
    rid = await reserve(a, 100)
    env.fake.inject("commit", Fault.throttle("120"))
    with pytest.raises(SettlementDeferred):
        await a.commit(rid, idempotency_key="commit-throttled", actual=Amount(TOK, 5))
    record = json.loads((jdir / f"v2-{sha(rid)}.json").read_text())
    assert record["not_before_ms"] > time.time() * 1000 + 100_000
    report = await a.replay_journal()  # too early: not even attempted
    assert (report.deferred, report.pending) == (1, 1)
    assert len(env.fake.requests_for("commit")) == 1
    env.fake.clear_faults()
    env.fake.assert_clean()


# ----------------------------------------------------------------------------- tenancy


async def test_wrong_key_is_unauthorized_and_foreign_tenant_forbidden(env: Env) -> None:
    bad = env.authority(tenant_keys={"acme": "not-a-key"})
    with pytest.raises(CyclesError) as info:
        await bad.reserve(req())
    assert info.value.code is ErrorCode.UNAUTHORIZED
    wrong = env.authority(tenant_keys={"acme": "key-other"})
    with pytest.raises(CyclesError) as info:
        await wrong.reserve(req())
    assert info.value.code is ErrorCode.FORBIDDEN
    assert [r.status for r in env.fake.requests_for("reserve")] == [401, 403]  # no retries
    no_key = env.authority(tenant_keys={"other": "key-other"})
    with pytest.raises(CyclesError) as info:
        await no_key.reserve(req())
    assert info.value.code is ErrorCode.UNAUTHORIZED
    env.fake.assert_clean()


async def test_pass_through_keys(env: Env) -> None:
    a = env.authority(tenant_keys={})
    assert await a.resolve_tenant("key-acme") == "acme"
    assert await a.resolve_tenant("key-acme") == "acme"  # cached per key hash
    assert await a.resolve_tenant("nope") is None
    assert await a.resolve_tenant("nope") is None
    assert len(env.fake.requests_for("list")) == 2
    results = await asyncio.gather(*(a.resolve_tenant("key-other") for _ in range(5)))
    assert results == ["other"] * 5
    assert len(env.fake.requests_for("list")) == 3  # concurrent lookups share one request
    for r in env.fake.requests_for("list"):
        assert r.query == {"limit": "1"}

    view = a.with_api_key("key-acme")
    rid = await reserve(view, 100)
    await a.commit(rid, idempotency_key="c-pt", actual=Amount(TOK, 9))  # remembered key
    rid2 = await reserve(view, 100)
    await view.release(rid2, idempotency_key="r-pt")
    used = {r.api_key for r in env.fake.requests if r.endpoint != "list"}
    assert used == {"key-acme"}
    assert env.spent() == 9
    with pytest.raises(CyclesError) as info:
        await a.reserve(req())  # no configured key and no pass-through key
    assert info.value.code is ErrorCode.UNAUTHORIZED
    env.fake.assert_clean()


async def test_many_concurrent_requests_share_one_client_without_overspend(env: Env) -> None:
    env.fake.ledger.set_budget("tenant:acme/app:ollama-proxy", TOK, 5_000)
    a = env.authority(deadline_s=10.0, settle_deadline_s=10.0)

    async def one(i: int) -> bool:
        try:
            rid = await reserve(a, 100, overage_policy=OveragePolicy.REJECT)
        except CyclesError as exc:
            assert exc.code is ErrorCode.BUDGET_EXCEEDED
            return False
        await a.commit(rid, idempotency_key=f"c-{i}", actual=Amount(TOK, 100))
        return True

    done = await asyncio.gather(*(one(i) for i in range(200)))
    assert sum(done) == 50
    assert env.spent("tenant:acme/app:ollama-proxy") == 5_000
    env.fake.assert_clean()


# ----------------------------------------------------------------------------- heartbeat


def extend_times(env: Env, start_ms: int) -> list[int]:
    return [r.ledger_ms - start_ms for r in env.fake.requests_for("extend")]


async def test_heartbeat_schedule_follows_the_spec(env: Env) -> None:
    a = env.authority(virtual=True, heartbeat_attempt_timeout_s=3.0)
    t0 = env.clock.now_ms()
    res = await a.reserve(req(100, ttl_ms=10_000))
    env.clock.set_limit(40.0)
    hb = asyncio.create_task(a.heartbeat(res, 10_000))
    await env.clock.parked()
    # lead 10000, attempt_budget max(3000, 1000, 2*0) = 3000, safety 1000 -> retry_reserve 7000:
    # first beat at 3000; then lead 17000 -> next_delay 10000 after each response.
    assert extend_times(env, t0) == [3_000, 13_000, 23_000, 33_000]
    bodies = [r.body for r in env.fake.requests_for("extend")]
    assert all(b["extend_by_ms"] == 10_000 for b in bodies)
    assert len({b["idempotency_key"] for b in bodies}) == 4  # a fresh key per beat
    hb.cancel()
    with pytest.raises(asyncio.CancelledError):
        await hb
    env.fake.assert_clean()


async def test_heartbeat_keeps_a_short_ttl_alive_and_stops_on_finalized(env: Env) -> None:
    a = env.authority(virtual=True, heartbeat_attempt_timeout_s=3.0)
    res = await a.reserve(req(500, ttl_ms=10_000, grace_period_ms=0))
    assert res.reservation_id
    env.clock.set_limit(90.0)  # a 90 s hold on a 10 s lease
    hb = asyncio.create_task(a.heartbeat(res, 10_000))
    await env.clock.parked()
    env.clock.advance(90.0 - env.clock.monotonic())
    out = await a.commit(res.reservation_id, idempotency_key="c-hb", actual=Amount(TOK, 450))
    assert out.charged == Amount(TOK, 450)
    assert env.fake.requests_for("event") == []  # a real commit, not a 410 recovery
    env.clock.set_limit(float("inf"))
    result = await asyncio.wait_for(hb, 5.0)
    assert result.reason == HeartbeatStop.PERMANENT
    assert result.code is ErrorCode.RESERVATION_FINALIZED
    assert result.extensions == 9
    rec = env.fake.ledger.get_reservation(res.reservation_id)
    assert rec is not None and rec.extension_count == 9
    assert (env.spent(), env.reserved()) == (450, 0)
    env.fake.assert_clean()


async def test_cr_core_003_heartbeat_transport_error_is_non_fatal(env: Env) -> None:
    a = env.authority(virtual=True, heartbeat_attempt_timeout_s=3.0)
    t0 = env.clock.now_ms()
    res = await a.reserve(req(100, ttl_ms=10_000))
    env.fake.inject("extend", Fault.error(503), calls=[1])
    env.fake.inject("extend", Fault.drop(), calls=[3])
    env.clock.set_limit(20.0)
    hb = asyncio.create_task(a.heartbeat(res, 10_000))
    await env.clock.parked()
    ext = env.fake.requests_for("extend")
    # beat at 3000 fails; current lead 7000, window 7000-3000-1000 = 3000,
    # retry after min(30000, 7000/4, 3000) = 1750 with the SAME key; then lead 15250 -> +8250;
    # that beat is lost after applying: lead 7000 -> same-key retry after 1750 replays it.
    assert extend_times(env, t0) == [3_000, 4_750, 13_000, 14_750]
    assert ext[0].body["idempotency_key"] == ext[1].body["idempotency_key"]
    assert ext[2].body["idempotency_key"] == ext[3].body["idempotency_key"]
    assert ext[1].body["idempotency_key"] != ext[2].body["idempotency_key"]
    rec = env.fake.ledger.get_reservation(res.reservation_id or "")
    assert rec is not None and rec.extension_count == 2  # the lost beat applied once
    assert not hb.done()
    hb.cancel()
    with pytest.raises(asyncio.CancelledError):
        await hb
    env.fake.assert_clean()


@pytest.mark.parametrize("retry_after", ["1", None])
async def test_heartbeat_429(env: Env, retry_after: str | None) -> None:
    a = env.authority(virtual=True, heartbeat_attempt_timeout_s=3.0)
    t0 = env.clock.now_ms()
    res = await a.reserve(req(100, ttl_ms=10_000))
    env.fake.inject("extend", Fault.throttle(retry_after), calls=[1])
    env.clock.set_limit(10.0)
    hb = asyncio.create_task(a.heartbeat(res, 10_000))
    if retry_after is None:  # cannot know when retrying is allowed: stop, never guess earlier
        result = await asyncio.wait_for(hb, 5.0)
        assert result.reason == HeartbeatStop.THROTTLED
        assert extend_times(env, t0) == [3_000]
    else:
        await env.clock.parked()
        assert extend_times(env, t0) == [3_000, 4_000]
        hb.cancel()
        with pytest.raises(asyncio.CancelledError):
            await hb
    env.fake.assert_clean()


async def test_heartbeat_stops_when_no_retry_fits_the_lease(env: Env) -> None:
    a = env.authority(virtual=True, heartbeat_attempt_timeout_s=3.0)
    res = await a.reserve(req(100, ttl_ms=10_000))
    env.fake.inject("extend", Fault.error(503))
    result = await asyncio.wait_for(a.heartbeat(res, 10_000), 5.0)
    assert result.reason == HeartbeatStop.RETRY_WINDOW_EXHAUSTED
    assert result.extensions == 0
    assert len(env.fake.requests_for("extend")) >= 2
    assert len({r.body["idempotency_key"] for r in env.fake.requests_for("extend")}) == 1
    env.fake.assert_clean()


async def test_heartbeat_zero_delay_guard(env: Env) -> None:
    a = env.authority(virtual=True, heartbeat_attempt_timeout_s=3.0)
    res = await a.reserve(req(100, ttl_ms=1_000))
    result = await asyncio.wait_for(a.heartbeat(res, 1_000), 5.0)
    # lead 1000 < retry_reserve 7000: one immediate fresh extension, still 0 -> stop
    assert result.reason == HeartbeatStop.LEASE_TOO_SHORT
    assert result.extensions == 1
    assert len(env.fake.requests_for("extend")) == 1
    env.fake.assert_clean()


async def test_heartbeat_stops_on_expired_and_max_extensions(env: Env) -> None:
    a = env.authority(virtual=True, heartbeat_attempt_timeout_s=3.0)
    res = await a.reserve(req(100, ttl_ms=10_000))
    env.fake.inject("extend", Fault.error(code=ErrorCode.MAX_EXTENSIONS_EXCEEDED), calls=[1])
    result = await asyncio.wait_for(a.heartbeat(res, 10_000), 5.0)
    assert (result.reason, result.code) == (
        HeartbeatStop.PERMANENT,
        ErrorCode.MAX_EXTENSIONS_EXCEEDED,
    )
    env.fake.clear_faults()
    res2 = await a.reserve(req(100, ttl_ms=10_000))
    env.clock.advance(30.0)
    result = await asyncio.wait_for(a.heartbeat(res2, 10_000), 5.0)
    assert result.code is ErrorCode.RESERVATION_EXPIRED
    env.fake.assert_clean()


async def test_heartbeat_fallback_without_remaining_ttl(env: Env) -> None:
    env.fake.inject("reserve", Fault.no_ttl())
    env.fake.inject("extend", Fault.no_ttl())
    a = env.authority(virtual=True, heartbeat_attempt_timeout_s=3.0)
    t0 = env.clock.now_ms()
    res = await a.reserve(req(100, ttl_ms=10_000, grace_period_ms=0))
    assert res.remaining_ttl_ms is None and res.reservation_id
    env.clock.set_limit(60.0)
    hb = asyncio.create_task(a.heartbeat(res, 10_000))
    await env.clock.parked()
    times = extend_times(env, t0)
    assert times[0] == 0  # first fallback extension fires immediately
    assert len(times) <= 10
    # the lease never lapsed: every extension landed before the expiry it extended
    expiries = [10_000 + 10_000 * i for i in range(len(times))]
    assert all(t < exp for t, exp in zip(times, expiries, strict=True))
    env.clock.advance(60.0 - env.clock.monotonic())
    out = await a.commit(res.reservation_id, idempotency_key="c-fb", actual=Amount(TOK, 1))
    assert out.charged == Amount(TOK, 1)
    assert env.fake.requests_for("event") == []
    env.clock.set_limit(float("inf"))
    result = await asyncio.wait_for(hb, 5.0)
    assert result.code is ErrorCode.RESERVATION_FINALIZED
    env.fake.assert_clean()


async def test_heartbeat_through_pass_through_view(env: Env) -> None:
    a = env.authority(virtual=True, tenant_keys={}, heartbeat_attempt_timeout_s=3.0)
    view = a.with_api_key("key-other")
    env.fake.ledger.set_budget("tenant:other", TOK, 1_000)
    res = await view.reserve(req(10, subject=Subject(tenant="other"), ttl_ms=10_000))
    env.clock.set_limit(5.0)
    hb = asyncio.create_task(view.heartbeat(res, 10_000))
    await env.clock.parked()
    assert [r.api_key for r in env.fake.requests_for("extend")] == ["key-other"]
    hb.cancel()
    with pytest.raises(asyncio.CancelledError):
        await hb
    env.fake.assert_clean()


async def test_journal_sets_aside_unreadable_records(env: Env) -> None:
    jdir = env.tmp / "journal"
    jdir.mkdir()
    (jdir / f"v2-{sha('x')}.json").write_text("{not json")
    journal = Journal(jdir)
    assert journal.pending() == 0
    assert (jdir / f"v2-{sha('x')}.json.corrupt").exists()
    assert stat.S_IMODE(os.stat(jdir).st_mode) == 0o700
    env.fake.assert_clean()


async def test_from_settings(env: Env) -> None:
    from cycles_proxy.settings import Settings

    settings = Settings(
        cycles_base_url=env.server.url,
        cycles_api_key="key-acme",
        cycles_tenant_keys={"other": "key-other"},
    )
    a = RemoteAuthority.from_settings(settings, journal_dir=env.tmp / "journal")
    env.made.append(a)
    await a.start()
    rid = await reserve(a, 10)
    await a.commit(rid, idempotency_key="c-settings", actual=Amount(TOK, 10))
    assert a.pending() == 0
    assert {r.api_key for r in env.fake.requests} == {"key-acme"}
    env.fake.assert_clean()
