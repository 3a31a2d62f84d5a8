"""The proxy in front of the faithful fake Ollama, driven by the real ``ollama`` and ``openai``
clients: metering, denial, keys and roles, pass-through edits, faults and settlement."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import ollama
import openai
import pytest

from cycles_proxy.authority.base import OveragePolicy
from cycles_proxy.observability import RequestRecord
from tests.conftest import Harness, StartProxy, eventually
from tests.fakes.fake_ollama import FakeOllama, RunningFake, fake_text, serve_fake_ollama

PRICE = 1_000_000  # per GPU-second: large, so tiny fake durations still cost whole units


@pytest.fixture
async def fake() -> AsyncIterator[RunningFake]:
    async with serve_fake_ollama(token_delay_s=0.002) as running:
        yield running


@pytest.fixture
async def proxy(start_proxy: StartProxy, fake: RunningFake) -> Harness:
    h = await start_proxy(fake.url, default_price_per_gpu_second=PRICE)
    h.extra["key"] = h.key("acme")
    h.budget("acme", 100 * PRICE)
    return h


def client(h: Harness, key: str | None = None) -> ollama.AsyncClient:
    key = key if key is not None else h.extra["key"]
    return ollama.AsyncClient(host=h.url, headers={"Authorization": f"Bearer {key}"})


def generations(f: FakeOllama) -> list[Any]:
    return [g for g in f.generations if g.kind != "load"]


def expected_amount(reported: dict[str, int]) -> int:
    ns = sum(reported.get(k, 0) for k in ("prompt_eval_duration", "eval_duration", "load_duration"))
    return -(-ns * PRICE // 1_000_000_000)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("route", ["chat", "generate"])
async def test_real_ollama_client_is_metered_exactly(
    proxy: Harness, fake: RunningFake, route: str, stream: bool
) -> None:
    c = client(proxy)
    if route == "chat":
        call = c.chat(
            model="llama3.2",
            messages=[{"role": "user", "content": "hello there"}],
            stream=stream,
            options={"num_predict": 6},
        )
    else:
        call = c.generate(
            model="llama3.2", prompt="hello there", stream=stream, options={"num_predict": 6}
        )
    if stream:
        parts = [p async for p in await call]  # type: ignore[misc]
        final = parts[-1]
        text = "".join((p.message.content if route == "chat" else p.response) or "" for p in parts)
    else:
        final = await call  # type: ignore[misc]
        text = (final.message.content if route == "chat" else final.response) or ""
    assert text == fake_text(6)
    assert final.done and final.eval_count == 6
    [gen] = generations(fake.fake)
    [charge] = proxy.charges()
    assert charge["tokens_input"] == gen.reported["prompt_eval_count"]
    assert charge["tokens_output"] == gen.reported["eval_count"] == 6
    # compute time plus the load time (alone at the upstream, so no queue wait in it)
    reported_ns = sum(
        gen.reported[k] for k in ("prompt_eval_duration", "eval_duration", "load_duration")
    )
    assert charge["gpu_seconds"] == pytest.approx(reported_ns / 1e9, abs=1e-6)
    assert charge["amount"] == expected_amount(gen.reported)
    bal = proxy.balance("acme")
    assert (bal.spent, bal.reserved) == (charge["amount"], 0)
    # the tenant's key never reaches the upstream; Host is the upstream's own
    [req] = [r for r in fake.fake.requests if r.path == f"/api/{route}"]
    assert "Authorization" not in req.headers
    assert req.headers["Host"] == f"127.0.0.1:{fake.port}"


async def test_embeddings_native_are_metered(proxy: Harness, fake: RunningFake) -> None:
    res = await client(proxy).embed(model="nomic-embed-text", input=["a b", "c"])
    assert len(res.embeddings) == 2
    [charge] = proxy.charges()
    assert charge["tokens_input"] == res.prompt_eval_count
    assert charge["action_kind"] == "llm.embedding"
    assert charge["amount"] > 0


async def test_balance_moves_by_exactly_the_committed_costs(proxy: Harness) -> None:
    c = client(proxy)
    for i in range(5):
        await c.generate(model="llama3.2", prompt=f"n {i}", options={"num_predict": 3})
    total = sum(ch["amount"] for ch in proxy.charges())
    bal = proxy.balance("acme")
    assert bal.spent == total
    assert bal.remaining == 100 * PRICE - total
    assert bal.reserved == 0


async def test_denial_is_a_429_in_ollama_dialect_and_the_upstream_sees_nothing(
    start_proxy: StartProxy, fake: RunningFake
) -> None:
    h = await start_proxy(fake.url, default_price_per_gpu_second=PRICE)
    key = h.key("poor")
    h.budget("poor", 5, period="daily")
    with pytest.raises(ollama.ResponseError) as info:
        await client(h, key).chat(model="llama3.2", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 429
    assert "budget exceeded for tenant 'poor'" in info.value.error
    assert not [r for r in fake.fake.requests if r.path == "/api/chat"]
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{h.url}/api/generate",
            json={"model": "llama3.2", "prompt": "x"},
            headers={"Authorization": f"Bearer {key}"},
        ) as r,
    ):
        assert r.status == 429
        assert r.headers["x-should-retry"] == "false"
        assert 0 < int(r.headers["Retry-After"]) <= 86_400  # until the daily refill
        body = await r.json()
        assert set(body) == {"error"}
    assert h.balance("poor").spent == 0


async def test_openai_sdk_sends_one_post_on_denial_despite_its_retries(
    start_proxy: StartProxy, fake: RunningFake
) -> None:
    h = await start_proxy(fake.url, default_price_per_gpu_second=PRICE)
    key = h.key("poor")
    h.budget("poor", 5)
    seen: list[RequestRecord] = []
    h.proxy.observer.listeners.append(seen.append)
    sdk = openai.AsyncOpenAI(base_url=f"{h.url}/v1", api_key=key)  # default max_retries=2
    with pytest.raises(openai.RateLimitError) as info:
        await sdk.chat.completions.create(
            model="llama3.2", messages=[{"role": "user", "content": "hi"}]
        )
    assert info.value.status_code == 429
    body = info.value.body
    assert isinstance(body, dict) and body["code"] == "budget_exceeded"
    assert len(seen) == 1
    assert not fake.fake.requests


async def test_openai_client_through_the_proxy_to_ollamas_v1(
    proxy: Harness, fake: RunningFake
) -> None:
    sdk = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key=proxy.extra["key"], max_retries=0)
    res = await sdk.chat.completions.create(
        model="llama3.2", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert res.choices[0].message.content == fake_text(4)
    stream = await sdk.chat.completions.create(
        model="llama3.2", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == fake_text(5)
    assert all(c.usage is None for c in chunks)
    # the proxy asked Ollama for usage on the caller's behalf ...
    [_, streamed] = [r for r in fake.fake.requests if r.path == "/v1/chat/completions"]
    assert streamed.body_json["stream_options"] == {"include_usage": True}
    # ... and billed it
    charges = proxy.charges()
    assert [c["tokens_output"] for c in charges] == [4, 5]


async def test_missing_and_unknown_keys_get_401_in_each_dialect(
    proxy: Harness, fake: RunningFake
) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{proxy.url}/api/chat", json={"model": "llama3.2"}) as r:
            assert r.status == 401
            assert "missing API key" in (await r.json())["error"]
        async with s.post(
            f"{proxy.url}/v1/chat/completions",
            json={"model": "llama3.2", "messages": []},
            headers={"Authorization": "Bearer cyp_wrong"},
        ) as r:
            assert r.status == 401
            err = (await r.json())["error"]
            assert err["type"] == "authentication_error" and "invalid API key" in err["message"]
        # the literal placeholder keys clients send when unconfigured count as missing
        async with s.get(f"{proxy.url}/api/tags", headers={"Authorization": "Bearer ollama"}) as r:
            assert r.status == 401
    assert not fake.fake.requests


async def test_anonymous_tenant_serves_keyless_clients(
    start_proxy: StartProxy, fake: RunningFake
) -> None:
    h = await start_proxy(fake.url, anonymous_tenant="shared", default_price_per_gpu_second=PRICE)
    h.budget("shared", 100 * PRICE)
    res = await ollama.AsyncClient(host=h.url).generate(model="llama3.2", prompt="hi")
    assert res.done
    assert h.balance("shared").spent == h.charges()[0]["amount"] > 0


async def test_model_management_needs_an_admin_key(proxy: Harness, fake: RunningFake) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        await client(proxy).pull("llama3.2")
    assert info.value.status_code == 403
    assert "admin key" in info.value.error
    assert not fake.fake.requests
    admin = proxy.key("ops", role="admin")
    progress = await client(proxy, admin).pull("llama3.2")
    assert progress.status == "success"


async def test_blob_upload_streams_through_for_admins(proxy: Harness, fake: RunningFake) -> None:
    admin = proxy.key("ops", role="admin")
    blob = bytes(range(256)) * (40 * 1024)  # 10 MiB
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(blob), 65536):
            yield blob[i : i + 65536]

    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{proxy.url}/api/blobs/{digest}",
            data=chunks(),
            headers={"Authorization": f"Bearer {admin}"},
        ) as r,
    ):
        assert r.status == 201
    assert fake.fake.blobs[digest] == len(blob)


async def test_passthrough_is_byte_exact_and_rewrites_host(
    proxy: Harness, fake: RunningFake
) -> None:
    key = proxy.extra["key"]
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.get(f"{fake.url}/api/tags") as direct:
            direct_body = await direct.read()
        async with s.get(
            f"{proxy.url}/api/tags",
            headers={"Authorization": f"Bearer {key}", "Host": "gpu.example.com"},
        ) as r:
            assert r.status == 200  # Ollama would answer 403 to a foreign Host
            assert await r.read() == direct_body
        async with s.get(
            f"{proxy.url}/api/brand-new-route?x=1", headers={"Authorization": f"Bearer {key}"}
        ) as r:
            assert r.status == 404
            assert await r.read() == b"404 page not found"
        async with s.head(f"{proxy.url}/") as r:  # the CLI's liveness check needs no key
            assert r.status == 200
    paths = [(r.path, r.query_string) for r in fake.fake.requests]
    assert ("/api/brand-new-route", "x=1") in paths


async def test_upstream_key_replaces_the_tenants(
    start_proxy: StartProxy, fake: RunningFake
) -> None:
    h = await start_proxy(fake.url, upstream_api_key="upstream-secret")
    key = h.key("acme")
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{h.url}/api/tags", headers={"Authorization": f"Bearer {key}"}) as r,
    ):
        assert r.status == 200
    [req] = fake.fake.requests
    assert req.headers["Authorization"] == "Bearer upstream-secret"


async def test_mid_stream_error_reaches_the_client_and_the_work_is_committed(
    proxy: Harness, fake: RunningFake
) -> None:
    c = ollama.AsyncClient(
        host=proxy.url,
        headers={
            "Authorization": f"Bearer {proxy.extra['key']}",
            "x-fake-fault": "error_after_chunks=3",
        },
    )
    with pytest.raises(ollama.ResponseError):
        async for _ in await c.chat(
            model="llama3.2", messages=[{"role": "user", "content": "x"}], stream=True
        ):
            pass
    [charge] = proxy.charges()
    assert charge["amount"] > 0
    assert charge["tokens_output"] == 3  # counted from the stream: no final metrics came
    [res] = proxy.reservations()
    assert res["status"] == "COMMITTED"


async def test_upstream_refusal_releases_the_reservation(proxy: Harness, fake: RunningFake) -> None:
    c = ollama.AsyncClient(
        host=proxy.url,
        headers={"Authorization": f"Bearer {proxy.extra['key']}", "x-fake-fault": "status=503"},
    )
    with pytest.raises(ollama.ResponseError) as info:
        await c.generate(model="llama3.2", prompt="x")
    assert info.value.status_code == 503  # Ollama's own answer, passed through
    assert "server busy" in info.value.error
    [res] = proxy.reservations()
    assert res["status"] == "RELEASED"
    bal = proxy.balance("acme")
    assert (bal.spent, bal.reserved) == (0, 0)
    # unknown model: Ollama's 404 passes through, nothing is charged
    with pytest.raises(ollama.ResponseError) as info:
        await client(proxy).generate(model="no-such-model", prompt="x")
    assert info.value.status_code == 404 and "not found" in info.value.error
    assert proxy.balance("acme").spent == 0


async def test_unreachable_upstream_is_a_502_and_nothing_is_charged(
    start_proxy: StartProxy,
) -> None:
    h = await start_proxy("http://127.0.0.1:9", default_price_per_gpu_second=PRICE)
    key = h.key("acme")
    h.budget("acme", 100 * PRICE)
    with pytest.raises(ollama.ResponseError) as info:
        await client(h, key).generate(model="llama3.2", prompt="x")
    assert info.value.status_code == 502
    assert "unreachable" in info.value.error
    [res] = h.reservations()
    assert res["status"] == "RELEASED"
    assert h.balance("acme").remaining == 100 * PRICE


async def test_client_disconnect_cancels_upstream_and_commits_elapsed(
    proxy: Harness, fake: RunningFake
) -> None:
    async with aiohttp.ClientSession() as s:
        r = await s.post(
            f"{proxy.url}/api/generate",
            json={"model": "llama3.2", "prompt": "x", "options": {"num_predict": 500}},
            headers={
                "Authorization": f"Bearer {proxy.extra['key']}",
                "x-fake-fault": "token_delay_s=0.02",
            },
        )
        for _ in range(3):
            await r.content.readline()
        r.close()
    await fake.fake.wait_until(lambda: fake.fake.cancelled_generations == 1, timeout_s=5)
    await eventually(lambda: proxy.charges())
    [charge] = proxy.charges()
    assert charge["amount"] > 0 and charge["tokens_output"] >= 2
    [gen] = generations(fake.fake)
    assert gen.tokens_generated < 500
    assert proxy.balance("acme").reserved == 0


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{oops", "not valid JSON"),
        (b'{"messages": []}', '"model" is required'),
        (b'{"model": "llama3.2", "stream": "yes"}', '"stream" must be true or false'),
    ],
)
async def test_bad_input_gets_a_clear_400_and_costs_nothing(
    proxy: Harness, fake: RunningFake, body: bytes, fragment: str
) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{proxy.url}/api/chat",
            data=body,
            headers={"Authorization": f"Bearer {proxy.extra['key']}"},
        ) as r:
            assert r.status == 400
            assert fragment in (await r.json())["error"]
        async with s.post(
            f"{proxy.url}/v1/chat/completions",
            data=body,
            headers={"Authorization": f"Bearer {proxy.extra['key']}"},
        ) as r:
            assert r.status == 400
            assert fragment in (await r.json())["error"]["message"]
    assert not fake.fake.requests
    assert proxy.reservations() == []


async def test_oversized_body_is_a_413(start_proxy: StartProxy, fake: RunningFake) -> None:
    h = await start_proxy(fake.url, max_body_bytes=2048)
    key = h.key("acme")
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{h.url}/api/generate",
            data=json.dumps({"model": "llama3.2", "prompt": "x" * 5000}),
            headers={"Authorization": f"Bearer {key}"},
        ) as r,
    ):
        assert r.status == 413
        assert "max_body_bytes" in (await r.json())["error"]


async def test_concurrent_requests_never_overspend_with_reject(
    start_proxy: StartProxy, fake: RunningFake
) -> None:
    # each request reserves 1 s x 1000 = 1000 units; the budget affords exactly 5 at once,
    # and the fake is slow enough that all 30 reserve before any of them settles
    h = await start_proxy(
        fake.url,
        default_price_per_gpu_second=1000,
        default_estimate_seconds=1.0,
        overage_policy=OveragePolicy.REJECT,
        degrade_to_fit=False,
        learn_estimates=False,
    )
    key = h.key("acme")
    h.budget("acme", 5000)
    c = ollama.AsyncClient(
        host=h.url,
        headers={"Authorization": f"Bearer {key}", "x-fake-fault": "token_delay_s=0.05"},
    )

    async def one(i: int) -> int:
        try:
            await c.generate(model="llama3.2", prompt=f"p{i}", options={"num_predict": 8})
            return 200
        except ollama.ResponseError as exc:
            return exc.status_code

    statuses = await asyncio.gather(*(one(i) for i in range(30)))
    assert sorted(statuses) == [200] * 5 + [429] * 25
    assert len(generations(fake.fake)) == 5  # the denied ones never reached the model
    bal = h.balance("acme")
    assert bal.spent <= bal.allocated
    assert bal.spent == sum(ch["amount"] for ch in h.charges())
    assert bal.reserved == 0
    assert {r["status"] for r in h.reservations()} == {"COMMITTED"}


async def test_a_stream_longer_than_its_lease_keeps_its_reservation(
    start_proxy: StartProxy, fake: RunningFake
) -> None:
    # a 1 s lease and no grace: without extensions the commit would find it expired
    h = await start_proxy(
        fake.url, default_price_per_gpu_second=PRICE, reservation_ttl_ms=1000, grace_period_ms=0
    )
    key = h.key("acme")
    h.budget("acme", 100 * PRICE)
    c = ollama.AsyncClient(
        host=h.url, headers={"Authorization": f"Bearer {key}", "x-fake-fault": "token_delay_s=0.1"}
    )
    parts = [
        p
        async for p in await c.generate(
            model="llama3.2", prompt="x", stream=True, options={"num_predict": 70}
        )
    ]
    assert parts[-1].done
    [res] = h.reservations()
    assert res["status"] == "COMMITTED"
    # ~7 s of stream, extended every half second: past the 10 extensions a Cycles reference
    # server grants, which the embedded ledger must not copy (max_reservation_extensions)
    assert res["extension_count"] > 10
    assert h.balance("acme").spent == h.charges()[0]["amount"]
