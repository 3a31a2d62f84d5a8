"""Fair metering and estimates that don't starve tenants (issue 4), against the fake Ollama."""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import AsyncIterator
from typing import Any

import ollama
import openai
import pytest

from cycles_proxy.observability import RequestRecord
from tests.conftest import Harness, StartProxy
from tests.fakes.fake_ollama import RunningFake, serve_fake_ollama

PRICE = 1_000_000  # per GPU-second


def client(h: Harness, key: str, **headers: str) -> ollama.AsyncClient:
    return ollama.AsyncClient(host=h.url, headers={"Authorization": f"Bearer {key}", **headers})


def records(h: Harness) -> list[RequestRecord]:
    seen: list[RequestRecord] = []
    h.proxy.observer.listeners.append(seen.append)
    return seen


@pytest.fixture
async def queued_fake() -> AsyncIterator[RunningFake]:
    # one request at a time, like OLLAMA_NUM_PARALLEL=1: the second one waits in the queue
    async with serve_fake_ollama(parallel=1, token_delay_s=0.02) as running:
        yield running


async def test_a_tenant_is_not_billed_for_waiting_behind_another(
    start_proxy: StartProxy, queued_fake: RunningFake
) -> None:
    h = await start_proxy(queued_fake.url, default_price_per_gpu_second=PRICE)
    a, b = h.key("alpha"), h.key("beta")
    h.budget("alpha", 100 * PRICE)
    h.budget("beta", 100 * PRICE)
    seen = records(h)
    first = asyncio.create_task(
        client(h, a).generate(model="llama3.2", prompt="long", options={"num_predict": 25})
    )
    await queued_fake.fake.wait_until(lambda: queued_fake.fake.running_generations == 1)
    await client(h, b).generate(model="llama3.2", prompt="short", options={"num_predict": 3})
    await first
    gen_b = next(g for g in queued_fake.fake.generations if g.planned_tokens == 3)
    assert gen_b.queue_wait_ns > 200_000_000  # it really waited behind alpha's 25 tokens
    rec_b = next(r for r in seen if r.tenant == "beta")
    compute_b = gen_b.reported["prompt_eval_duration"] + gen_b.reported["eval_duration"]
    assert rec_b.gpu_seconds == pytest.approx(compute_b / 1e9, abs=1e-6)
    assert h.balance("beta").spent == -(-compute_b * PRICE // 1_000_000_000)
    assert h.balance("beta").spent < h.balance("alpha").spent


@pytest.fixture
async def fake() -> AsyncIterator[RunningFake]:
    async with serve_fake_ollama(token_delay_s=0.01, prompt_token_delay_s=0.001) as running:
        yield running


async def test_learned_estimates_converge_and_survive_a_restart(
    start_proxy: StartProxy, fake: RunningFake, tmp_path: Any
) -> None:
    db = tmp_path / "shared.db"
    h = await start_proxy(fake.url, default_price_per_gpu_second=PRICE, db=db)
    key = h.key("acme")
    h.budget("acme", 1000 * PRICE)
    seen = records(h)
    c = client(h, key)
    for i in range(8):
        await c.generate(model="llama3.2", prompt=f"tell me {i}")  # no cap: typical length
    ratios = [r.extra["estimate_ratio"] for r in seen]
    assert ratios[0] > 100  # the 30 s default against a 0.1 s answer
    learned = ratios[3:]
    assert 1 / 1.5 <= statistics.median(learned) <= 1.5
    await h.running.runner.cleanup()  # flushes what was learned to the ledger file

    h2 = await start_proxy(fake.url, default_price_per_gpu_second=PRICE, db=db)
    seen2 = records(h2)
    await client(h2, key).generate(model="llama3.2", prompt="again")
    assert 1 / 1.5 <= seen2[0].extra["estimate_ratio"] <= 1.5


async def learn(h: Harness, key: str, n: int = 4) -> None:
    c = client(h, key)
    for i in range(n):
        await c.generate(model="llama3.2", prompt=f"warm {i}", options={"num_predict": 10})


async def test_degrade_to_fit_answers_shorter_instead_of_denying(
    start_proxy: StartProxy, fake: RunningFake
) -> None:
    h = await start_proxy(fake.url, default_price_per_gpu_second=PRICE)
    key = h.key("acme")
    h.budget("acme", 1000 * PRICE)
    await learn(h, key)
    # leave the tenant enough for roughly 40 tokens, then ask for 400
    per_token = PRICE * 0.01 * 1.25
    spent = h.balance("acme").spent
    h.budget("acme", spent + int(40 * per_token) + PRICE // 100)
    res = await client(h, key).generate(
        model="llama3.2", prompt="a long one", options={"num_predict": 400}
    )
    assert res.done_reason == "length"
    assert 16 <= (res.eval_count or 0) < 80  # capped to what the budget pays for
    bal = h.balance("acme")
    assert bal.spent <= bal.allocated and bal.reserved == 0
    # the OpenAI dialect gets finish_reason "length" the same way
    h.budget("acme", bal.spent + int(40 * per_token) + PRICE // 100)
    sdk = openai.AsyncOpenAI(base_url=f"{h.url}/v1", api_key=key, max_retries=0)
    out = await sdk.chat.completions.create(
        model="llama3.2", messages=[{"role": "user", "content": "x"}], max_tokens=400
    )
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None and 16 <= out.usage.completion_tokens < 80
    # with less than a useful minimum left, it is a plain denial
    h.budget("acme", h.balance("acme").spent + int(5 * per_token))
    with pytest.raises(ollama.ResponseError) as info:
        await client(h, key).generate(model="llama3.2", prompt="x", options={"num_predict": 400})
    assert info.value.status_code == 429


async def test_degrade_can_be_turned_off(start_proxy: StartProxy, fake: RunningFake) -> None:
    h = await start_proxy(fake.url, default_price_per_gpu_second=PRICE, degrade_to_fit=False)
    key = h.key("acme")
    h.budget("acme", 1000 * PRICE)
    await learn(h, key)
    h.budget("acme", h.balance("acme").spent + PRICE // 2)
    with pytest.raises(ollama.ResponseError) as info:
        await client(h, key).generate(model="llama3.2", prompt="x", options={"num_predict": 400})
    assert info.value.status_code == 429


async def admitted(h: Harness, key: str, requests: int) -> int:
    c = client(h, key)
    ok = 0
    for i in range(requests):
        try:
            await c.generate(model="llama3.2", prompt=f"q{i}")
            ok += 1
        except ollama.ResponseError as exc:
            assert exc.status_code == 429
    return ok


async def test_learned_and_degraded_admit_more_than_worst_case_without_overspending(
    start_proxy: StartProxy,
) -> None:
    """Many small requests against a tight budget: each answer costs ~0.02 GPU-seconds, while
    a fixed worst-case estimate holds 2 s for each."""
    async with serve_fake_ollama(token_delay_s=0.002) as f:
        results: dict[str, int] = {}
        for mode, smart in (("worst_case", False), ("learned", True)):
            h = await start_proxy(
                f.url,
                default_price_per_gpu_second=PRICE,
                default_estimate_seconds=2.0,
                learn_estimates=smart,
                degrade_to_fit=smart,
            )
            key = h.key("acme")
            h.budget("acme", int(2.2 * PRICE))
            results[mode] = await admitted(h, key, 40)
            bal = h.balance("acme")
            assert bal.spent <= bal.allocated
            assert bal.reserved == 0
    assert results["learned"] == 40
    assert results["worst_case"] < 40
