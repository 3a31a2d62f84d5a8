"""End to end through the proxy to a real llama.cpp server (xllamacpp + SmolLM2-135M), driven by
the real ``openai`` client. The truth is the server's own accounting: its ``usage``, its
``timings`` and its Prometheus counters."""

from __future__ import annotations

import json
import re
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import Harness, StartProxy, eventually

PRICE = 27_778  # default: 1 USD per GPU-hour, in USD_MICROCENTS per second
MESSAGES = [{"role": "user", "content": "Name three colours."}]


async def llama_metrics(base: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as s, s.get(f"{base}/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^(llamacpp:[a-z_]+)\s+([0-9.e+-]+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


async def busy_slots(base: str) -> int:
    async with aiohttp.ClientSession() as s, s.get(f"{base}/slots") as r:
        slots = await r.json()
    return sum(1 for slot in slots if slot.get("is_processing"))


def expected_cost(timings: dict[str, Any]) -> int:
    gpu_ns = round((timings["prompt_ms"] + timings["predicted_ms"]) * 1_000_000)
    return -(-gpu_ns * PRICE // 1_000_000_000)


@pytest.fixture
async def proxied(
    start_proxy: StartProxy, llama_upstream: str
) -> tuple[Harness, openai.AsyncOpenAI]:
    h = await start_proxy(llama_upstream)
    key = h.key("acme")
    h.budget("acme", 100_000_000)  # $1
    client = openai.AsyncOpenAI(base_url=f"{h.url}/v1", api_key=key, max_retries=0)
    return h, client


async def test_chat_commits_the_servers_own_usage_and_compute_time(
    proxied: tuple[Harness, openai.AsyncOpenAI],
) -> None:
    h, client = proxied
    raw = await client.chat.completions.with_raw_response.create(
        model="smollm2",
        messages=MESSAGES,
        max_tokens=16,  # type: ignore[arg-type]
    )
    body = json.loads(raw.http_response.text)
    completion = raw.parse()
    rid = raw.headers["x-cycles-reservation-id"]
    [charge] = h.charges(rid)
    assert completion.usage is not None
    assert charge["tokens_input"] == completion.usage.prompt_tokens
    assert charge["tokens_output"] == completion.usage.completion_tokens
    timings = body["timings"]
    assert charge["gpu_seconds"] == pytest.approx(
        (timings["prompt_ms"] + timings["predicted_ms"]) / 1000, abs=1e-6
    )
    assert charge["amount"] == expected_cost(timings)
    bal = h.balance("acme")
    assert (bal.spent, bal.reserved) == (charge["amount"], 0)
    assert raw.headers["x-cycles-charged"] == str(charge["amount"])
    assert raw.headers["x-cycles-remaining"] == str(bal.remaining)
    assert bal.remaining == 100_000_000 - charge["amount"]


async def test_stream_without_include_usage_is_billed_but_the_client_sees_no_usage(
    proxied: tuple[Harness, openai.AsyncOpenAI], llama_upstream: str
) -> None:
    h, client = proxied
    before = await llama_metrics(llama_upstream)
    stream = await client.chat.completions.create(
        model="smollm2",
        messages=MESSAGES,
        max_tokens=12,
        stream=True,  # type: ignore[arg-type]
    )
    chunks = [c async for c in stream]
    after = await llama_metrics(llama_upstream)
    assert chunks, "the stream produced nothing"
    assert all(c.usage is None for c in chunks)  # the injected usage chunk was hidden
    assert all(c.choices for c in chunks)
    [charge] = h.charges()
    predicted = after["llamacpp:tokens_predicted_total"] - before["llamacpp:tokens_predicted_total"]
    assert charge["tokens_output"] == predicted
    server_seconds = (
        after["llamacpp:prompt_seconds_total"]
        + after["llamacpp:tokens_predicted_seconds_total"]
        - before["llamacpp:prompt_seconds_total"]
        - before["llamacpp:tokens_predicted_seconds_total"]
    )
    # the counters accumulate the same timings the usage chunk reports (rounded to ms there)
    assert charge["gpu_seconds"] == pytest.approx(server_seconds, rel=0.02, abs=0.005)


async def test_stream_with_include_usage_passes_the_usage_through(
    proxied: tuple[Harness, openai.AsyncOpenAI],
) -> None:
    h, client = proxied
    stream = await client.chat.completions.create(
        model="smollm2",
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    [charge] = h.charges()
    assert (charge["tokens_input"], charge["tokens_output"]) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )


async def test_completions_stream_usage_on_the_finish_chunk(
    proxied: tuple[Harness, openai.AsyncOpenAI], llama_upstream: str
) -> None:
    h, client = proxied
    before = await llama_metrics(llama_upstream)
    stream = await client.completions.create(
        model="smollm2", prompt="Once upon a time", max_tokens=10, stream=True
    )
    texts = [c.choices[0].text async for c in stream if c.choices]
    after = await llama_metrics(llama_upstream)
    assert "".join(texts)
    [charge] = h.charges()
    predicted = after["llamacpp:tokens_predicted_total"] - before["llamacpp:tokens_predicted_total"]
    assert charge["tokens_output"] == predicted == 10


async def test_embeddings_are_metered(proxied: tuple[Harness, openai.AsyncOpenAI]) -> None:
    h, client = proxied
    res = await client.embeddings.create(model="smollm2", input="budgets for GPUs")
    assert len(res.data[0].embedding) == 576
    [charge] = h.charges()
    assert charge["tokens_input"] == res.usage.prompt_tokens
    assert charge["action_kind"] == "llm.embedding"
    assert charge["amount"] > 0


async def test_client_disconnect_stops_generation_and_commits_the_partial_cost(
    proxied: tuple[Harness, openai.AsyncOpenAI], llama_upstream: str
) -> None:
    h, client = proxied
    before = await llama_metrics(llama_upstream)
    stream = await client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Write a very long story about a dragon."}],
        max_tokens=1500,
        stream=True,
    )
    n = 0
    async for _ in stream:
        n += 1
        if n == 5:
            break
    await stream.close()

    async def idle() -> bool:
        return await busy_slots(llama_upstream) == 0

    await eventually(idle)  # the proxy closed the upstream request: generation stopped
    await eventually(lambda: h.charges())
    [charge] = h.charges()
    after = await llama_metrics(llama_upstream)
    predicted = after["llamacpp:tokens_predicted_total"] - before["llamacpp:tokens_predicted_total"]
    assert predicted < 100  # stopped long before 1500 tokens
    assert charge["amount"] > 0  # committed, not released: the GPU time was spent
    assert charge["tokens_output"] >= 4
    [res] = h.reservations()
    assert res["status"] == "COMMITTED"
    assert h.balance("acme").reserved == 0


async def test_unknown_model_names_are_billed_under_the_name_asked_for(
    proxied: tuple[Harness, openai.AsyncOpenAI],
) -> None:
    h, client = proxied
    res = await client.chat.completions.create(
        model="not-a-real-model",
        messages=MESSAGES,
        max_tokens=4,  # type: ignore[arg-type]
    )
    assert res.model == "smollm2"  # a single-model server answers anyway
    [charge] = h.charges()
    assert charge["action_name"] == "ollama:not-a-real-model"
