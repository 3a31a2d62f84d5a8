"""The proxy against a remote Cycles server (the spec-validating fake), driven by the real
``ollama`` client: tenancy, denial, and each failure policy end to end."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import ollama
import pytest

from cycles_proxy.authority.base import Unit
from cycles_proxy.observability import RequestRecord
from tests.conftest import Harness, StartProxy, eventually
from tests.fakes.fake_cycles import FakeCycles, FakeCyclesServer
from tests.fakes.fake_ollama import RunningFake, serve_fake_ollama

PRICE = 1_000_000
ACME_CYCLES_KEY = "cyc_live_acme_0123456789"
BETA_CYCLES_KEY = "cyc_live_beta_0123456789"


@pytest.fixture
async def upstream() -> AsyncIterator[RunningFake]:
    async with serve_fake_ollama(token_delay_s=0.002) as running:
        yield running


@pytest.fixture
async def cycles(tmp_path: Path) -> AsyncIterator[FakeCyclesServer]:
    fake = FakeCycles(
        keys={ACME_CYCLES_KEY: "acme", BETA_CYCLES_KEY: "beta"}, db_path=tmp_path / "cycles.db"
    )
    fake.ledger.set_budget("tenant:acme", Unit.USD_MICROCENTS, 100 * PRICE)
    fake.ledger.set_budget("tenant:beta", Unit.USD_MICROCENTS, 5)
    server = FakeCyclesServer(fake)
    await server.up()
    yield server
    await server.down()
    fake.assert_clean()  # every request the proxy sent conformed to the spec
    fake.close()


def client(h: Harness, key: str) -> ollama.AsyncClient:
    return ollama.AsyncClient(host=h.url, headers={"Authorization": f"Bearer {key}"})


async def remote_proxy(
    start_proxy: StartProxy, upstream: RunningFake, cycles: FakeCyclesServer, **extra: object
) -> Harness:
    return await start_proxy(
        upstream.url,
        cycles_base_url=cycles.url,
        cycles_tenant_keys={"acme": ACME_CYCLES_KEY, "beta": BETA_CYCLES_KEY},
        default_price_per_gpu_second=PRICE,
        **extra,
    )


async def test_remote_authority_guards_like_the_embedded_one(
    start_proxy: StartProxy, upstream: RunningFake, cycles: FakeCyclesServer
) -> None:
    h = await remote_proxy(start_proxy, upstream, cycles)
    acme, beta = h.key("acme"), h.key("beta")
    res = await client(h, acme).generate(model="llama3.2", prompt="hi", options={"num_predict": 4})
    assert res.done
    ledger = cycles.fake.ledger
    bal = ledger.get_balance("tenant:acme", Unit.USD_MICROCENTS)
    assert bal is not None and bal.spent > 0 and bal.reserved == 0
    with pytest.raises(ollama.ResponseError) as info:
        await client(h, beta).generate(model="llama3.2", prompt="hi")
    assert info.value.status_code == 429
    assert "budget exceeded for tenant 'beta'" in info.value.error
    assert len(upstream.fake.generations) == 1  # beta's request never reached the model
    assert [r.path for r in cycles.fake.requests if "commit" in r.path]


async def test_passthrough_keys_are_cycles_keys(
    start_proxy: StartProxy, upstream: RunningFake, cycles: FakeCyclesServer
) -> None:
    h = await start_proxy(
        upstream.url,
        cycles_base_url=cycles.url,
        cycles_key_passthrough=True,
        default_price_per_gpu_second=PRICE,
    )
    res = await client(h, ACME_CYCLES_KEY).chat(
        model="llama3.2", messages=[{"role": "user", "content": "x"}]
    )
    assert res.done
    bal = cycles.fake.ledger.get_balance("tenant:acme", Unit.USD_MICROCENTS)
    assert bal is not None and bal.spent > 0
    with pytest.raises(ollama.ResponseError) as info:
        await client(h, "cyc_live_unknown_key").chat(model="llama3.2", messages=[])
    assert info.value.status_code == 401
    [req] = [r for r in upstream.fake.requests if r.path == "/api/chat"]
    assert "Authorization" not in req.headers  # the Cycles key never reaches the model server


async def test_fail_closed_refuses_while_the_authority_is_down(
    start_proxy: StartProxy, upstream: RunningFake, cycles: FakeCyclesServer
) -> None:
    h = await remote_proxy(start_proxy, upstream, cycles, cycles_deadline_s=1.0)
    key = h.key("acme")
    await cycles.down()
    with pytest.raises(ollama.ResponseError) as info:
        await client(h, key).generate(model="llama3.2", prompt="hi")
    assert info.value.status_code == 503
    assert "budget authority is unreachable" in info.value.error
    assert not upstream.fake.requests
    await cycles.up()
    assert (await client(h, key).generate(model="llama3.2", prompt="hi")).done


async def test_fail_open_runs_and_settles_when_the_authority_is_back(
    start_proxy: StartProxy, upstream: RunningFake, cycles: FakeCyclesServer, tmp_path: Path
) -> None:
    h = await remote_proxy(
        start_proxy,
        upstream,
        cycles,
        failure_policy="fail_open",
        cycles_deadline_s=1.0,
        cycles_settle_deadline_s=1.0,
        journal_dir=tmp_path / "journal",
    )
    key = h.key("acme")
    seen: list[RequestRecord] = []
    h.proxy.observer.listeners.append(seen.append)
    await cycles.down()
    res = await client(h, key).generate(model="llama3.2", prompt="hi", options={"num_predict": 3})
    assert res.done  # the request ran although nobody could reserve it
    assert seen[0].settlement == "journaled"  # the access log says where the spend is
    authority = h.proxy.authority
    assert authority.pending() == 1  # type: ignore[attr-defined]
    await cycles.up()
    await authority.replay_journal()  # type: ignore[attr-defined]
    assert authority.pending() == 0  # type: ignore[attr-defined]
    bal = cycles.fake.ledger.get_balance("tenant:acme", Unit.USD_MICROCENTS)
    assert bal is not None and bal.spent > 0
    await authority.replay_journal()  # type: ignore[attr-defined]
    again = cycles.fake.ledger.get_balance("tenant:acme", Unit.USD_MICROCENTS)
    assert again is not None and again.spent == bal.spent  # delivered exactly once


async def test_shadow_mode_never_blocks_but_records(
    start_proxy: StartProxy, upstream: RunningFake, cycles: FakeCyclesServer
) -> None:
    h = await remote_proxy(start_proxy, upstream, cycles, failure_policy="shadow")
    beta = h.key("beta")  # a budget of 5 units: enforcement would deny
    seen: list[object] = []
    h.proxy.observer.listeners.append(seen.append)
    res = await client(h, beta).generate(model="llama3.2", prompt="hi")
    assert res.done
    assert getattr(seen[0], "extra", {}).get("shadow_denial") == "BUDGET_EXCEEDED"
    reserves = [r for r in cycles.fake.requests if r.path == "/v1/reservations"]
    assert reserves and all(r.body.get("dry_run") is True for r in reserves)
    await eventually(lambda: [r for r in cycles.fake.requests if r.path == "/v1/events"])


async def test_budget_gauges_and_status_cover_key_holders_before_their_first_request(
    start_proxy: StartProxy, upstream: RunningFake, cycles: FakeCyclesServer
) -> None:
    """With a remote authority the proxy has no list of budgets; it asks for the balances of
    the tenants it knows. A tenant that holds a proxy key is known from the key store, so its
    budget is on the dashboard before it has sent anything (not only after)."""
    from tests.test_operations import scrape

    h = await start_proxy(
        upstream.url,
        cycles_base_url=cycles.url,
        cycles_api_key=ACME_CYCLES_KEY,  # the default key; acme has none of its own
        default_price_per_gpu_second=PRICE,
        admin_port=0,
    )
    h.key("acme")
    revoked = h.keys.create("beta")[1]
    h.keys.revoke(revoked)  # a tenant whose only key is revoked is not asked for
    m = await scrape(h)
    assert m.total("cycles_proxy_budget_remaining", scope="tenant:acme") == 100 * PRICE
    assert not [r for r in cycles.fake.requests if r.query.get("tenant") == "beta"]
    assert h.running.admin_url is not None
    async with aiohttp.ClientSession() as s, s.get(f"{h.running.admin_url}/status") as r:
        page = await r.text()
    assert "acme" in page and "$1.00" in page
