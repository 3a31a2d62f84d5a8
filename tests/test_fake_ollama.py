"""The fake Ollama upstream is faithful to ollama-api.md, driven with the real clients."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import ollama
import openai
import pytest
from pytest_aiohttp import AiohttpServer

# Make `tests.fakes` importable however pytest was started (plain `pytest` puts only tests/ on
# sys.path when tests/ has no __init__.py).
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.fakes.fake_ollama import (  # noqa: E402
    BUSY_MESSAGE,
    DEFAULT_ERROR_MESSAGE,
    FAKE_KEY,
    FakeOllama,
    FaultHeaderError,
    fake_embedding,
    fake_text,
    host_allowed,
    make_fake_ollama,
    origin_allowed,
    parse_fault_header,
    prompt_tokens_for,
    serve_fake_ollama,
)

Start = Callable[..., Awaitable[tuple[str, FakeOllama]]]
MS = 1_000_000  # nanoseconds


@pytest.fixture
def start(aiohttp_server: AiohttpServer) -> Start:
    """Start a fake on a real socket; returns (base URL, state)."""

    async def go(**options: Any) -> tuple[str, FakeOllama]:
        app = make_fake_ollama(**options)
        server = await aiohttp_server(app)
        return f"http://127.0.0.1:{server.port}", app[FAKE_KEY]

    return go


_OPEN_CLIENTS: list[ollama.AsyncClient | openai.AsyncOpenAI] = []


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    while _OPEN_CLIENTS:
        await _OPEN_CLIENTS.pop().close()


def ol(url: str, **kwargs: Any) -> ollama.AsyncClient:
    """The real ollama client (closed after the test)."""
    client = ollama.AsyncClient(host=url, **kwargs)
    _OPEN_CLIENTS.append(client)
    return client


def oa(url: str, **kwargs: Any) -> openai.AsyncOpenAI:
    """The real openai client, no retries (closed after the test)."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, **kwargs)
    _OPEN_CLIENTS.append(client)
    return client


async def read_sse(resp: aiohttp.ClientResponse) -> list[tuple[str | None, str]]:
    """(event name, data) pairs of an SSE body."""
    text = (await resp.read()).decode()
    assert text.endswith("\n\n")
    events = []
    for block in text.split("\n\n")[:-1]:
        name = None
        data = None
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                data = line[len("data: ") :]
            else:
                raise AssertionError(f"unexpected SSE line {line!r}")
        assert data is not None
        events.append((name, data))
    return events


# ------------------------------------------------------------------------------------------
# Native /api/generate and /api/chat
# ------------------------------------------------------------------------------------------


async def test_generate_non_streaming_with_ollama_client(start: Start) -> None:
    url, fake = await start()
    r = await ol(url).generate(model="llama3.2", prompt="why is the sky blue")
    assert r.done is True and r.done_reason == "stop"
    assert r.response == fake_text(8)
    assert r.eval_count == 8
    assert r.prompt_eval_count == prompt_tokens_for(
        "/api/generate", {"prompt": "why is the sky blue"}
    )
    assert r.prompt_eval_count == 5 + 5
    for name in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(getattr(r, name), int) and getattr(r, name) > 0
    assert r.context and len(r.context) == r.prompt_eval_count + r.eval_count
    rec = fake.last_request("/api/generate")
    assert rec.body_json["stream"] is False
    assert rec.headers["User-Agent"].startswith("ollama-python/")
    assert rec.status == 200
    assert rec.generation is not None and rec.generation.state == "done"
    assert fake.completed_generations == 1 and fake.active_generations == 0


async def test_generate_streams_ndjson_by_default(start: Start) -> None:
    url, _ = await start()
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{url}/api/generate", json={"model": "llama3.2", "prompt": "hi"}) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/x-ndjson"
        raw = await resp.read()
    lines = raw.split(b"\n")
    assert lines[-1] == b""  # every line is \n-terminated, no blank lines
    objs = [json.loads(line) for line in lines[:-1]]
    assert len(objs) == 9
    for obj in objs[:-1]:
        assert set(obj) == {"model", "created_at", "response", "done"}
        assert obj["done"] is False and obj["model"] == "llama3.2"
    assert "".join(o["response"] for o in objs) == fake_text(8)
    final = objs[-1]
    assert final["done"] is True and final["response"] == "" and final["done_reason"] == "stop"
    assert set(final) == {
        "model",
        "created_at",
        "response",
        "done",
        "done_reason",
        "context",
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_count",
        "eval_duration",
    }
    assert final["created_at"].endswith("Z")


async def test_stream_false_is_one_json_object(start: Start) -> None:
    url, _ = await start()
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{url}/api/chat",
            json={
                "model": "llama3.2",
                "stream": False,
                "messages": [{"role": "user", "content": "x"}],
            },
        ) as resp,
    ):
        assert resp.headers["Content-Type"].startswith("application/json")
        obj = json.loads(await resp.read())
    assert obj["message"] == {"role": "assistant", "content": fake_text(8)}
    assert obj["done"] is True and "context" not in obj


async def test_generate_streaming_with_ollama_client_and_num_predict(start: Start) -> None:
    url, fake = await start(default_num_predict=4)
    client = ol(url)
    parts = [
        p
        async for p in await client.generate(
            model="llama3.2", prompt="a b c", stream=True, options={"num_predict": 3}
        )
    ]
    assert [p.response for p in parts[:-1]] == ["The", " quick", " brown"]
    assert parts[-1].done and parts[-1].done_reason == "length" and parts[-1].eval_count == 3
    r = await client.generate(model="llama3.2", prompt="a")
    assert r.eval_count == 4 and r.done_reason == "stop"  # default length, natural stop
    assert fake.generations[0].chunks_sent == 3


async def test_chat_with_ollama_client(start: Start) -> None:
    url, _ = await start()
    client = ol(url)
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello there you"},
    ]
    r = await client.chat(model="qwen2.5:0.5b", messages=msgs)
    assert r.message.role == "assistant" and r.message.content == fake_text(8)
    assert r.prompt_eval_count == 5 + 2 + 3 == prompt_tokens_for("/api/chat", {"messages": msgs})
    assert r.model == "qwen2.5:0.5b"
    parts = [p async for p in await client.chat(model="qwen2.5:0.5b", messages=msgs, stream=True)]
    assert "".join(p.message.content or "" for p in parts) == fake_text(8)
    assert parts[-1].done and parts[-1].eval_count == 8 and parts[-1].total_duration


async def test_reported_durations_are_real_time(start: Start) -> None:
    url, fake = await start(token_delay_s=0.02, prompt_token_delay_s=0.005, load_delay_s=0.05)
    t = time.perf_counter()
    r = await ol(url).generate(
        model="llama3.2", prompt="one two three four five", options={"num_predict": 5}
    )
    wall = time.perf_counter() - t
    assert r.prompt_eval_count == 10
    assert r.eval_duration is not None and r.prompt_eval_duration is not None
    assert r.load_duration is not None and r.total_duration is not None
    assert 100 * MS <= r.eval_duration < 180 * MS  # 5 tokens x 20 ms
    assert 50 * MS <= r.prompt_eval_duration < 110 * MS  # 10 tokens x 5 ms
    assert 50 * MS <= r.load_duration < 110 * MS  # cold load
    parts = r.load_duration + r.prompt_eval_duration + r.eval_duration
    assert parts <= r.total_duration <= wall * 1e9
    gen = fake.last_generation
    assert gen.eval_ns == r.eval_duration and gen.prompt_eval_ns == r.prompt_eval_duration
    assert gen.compute_ns == r.eval_duration + r.prompt_eval_duration
    assert gen.reported["total_duration"] == r.total_duration
    # warm model: no load delay the second time
    r2 = await ol(url).generate(model="llama3.2", prompt="x", options={"num_predict": 1})
    assert r2.load_duration is not None and r2.load_duration < 20 * MS


async def test_load_and_unload(start: Start) -> None:
    url, fake = await start(load_delay_s=0.03)
    client = ol(url)
    r = await client.generate(model="llama3.2")  # empty prompt = load
    assert r.done and r.done_reason == "load" and r.response == ""
    assert [m.model for m in (await client.ps()).models] == ["llama3.2:latest"]
    assert fake.last_generation.kind == "load" and fake.last_generation.load_ns >= 30 * MS
    r = await client.generate(model="llama3.2", keep_alive=0)
    assert r.done_reason == "unload"
    assert (await client.ps()).models == []
    c = await client.chat(model="llama3.2", messages=[])
    assert c.done_reason == "load" and c.message.content == ""
    c = await client.chat(model="llama3.2", messages=[], keep_alive="0s")
    assert c.done_reason == "unload"


async def test_omit_metrics_and_missing_fields(start: Start) -> None:
    url, _ = await start(omit_metrics=("prompt_eval_count",))
    r = await ol(url).generate(model="llama3.2", prompt="x")
    assert r.prompt_eval_count is None and r.eval_count == 8
    c = await oa(url).chat.completions.create(
        model="llama3.2", messages=[{"role": "user", "content": "x"}]
    )
    assert c.usage is not None and c.usage.prompt_tokens == 0 and c.usage.completion_tokens == 8


# ------------------------------------------------------------------------------------------
# Embeddings
# ------------------------------------------------------------------------------------------


async def test_embed_and_legacy_embeddings(start: Start) -> None:
    url, _ = await start(embedding_dim=8)
    client = ol(url)
    r = await client.embed(model="nomic-embed-text", input=["hello world", "x"])
    assert r.embeddings == [fake_embedding("hello world", 8), fake_embedding("x", 8)]
    assert r.prompt_eval_count == (2 + 2) + (1 + 2)
    assert r.total_duration and r.load_duration
    r = await client.embed(model="nomic-embed-text", input="single")
    assert len(r.embeddings) == 1
    legacy = await client.embeddings(model="nomic-embed-text", prompt="hello world")
    assert legacy.embedding == fake_embedding("hello world", 8)
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{url}/api/embeddings", json={"model": "nomic-embed-text", "prompt": "a"}) as resp,
    ):
        assert set(json.loads(await resp.read())) == {"embedding"}  # no metrics at all


async def test_embedding_model_cannot_generate(start: Start) -> None:
    url, _ = await start()
    with pytest.raises(ollama.ResponseError) as err:
        await ol(url).generate(model="nomic-embed-text", prompt="x")
    assert err.value.status_code == 400 and "does not support generate" in err.value.error


# ------------------------------------------------------------------------------------------
# OpenAI-compatible routes
# ------------------------------------------------------------------------------------------


async def test_openai_chat_non_streaming(start: Start) -> None:
    url, fake = await start()
    c = await oa(url).chat.completions.create(
        model="llama3.2", messages=[{"role": "user", "content": "hi there"}]
    )
    assert c.object == "chat.completion" and c.system_fingerprint == "fp_ollama"
    assert c.choices[0].message.content == fake_text(8) and c.choices[0].finish_reason == "stop"
    assert c.usage is not None
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (7, 8, 15)
    rec = fake.last_request("/v1/chat/completions")
    assert rec.headers["Authorization"] == "Bearer x"
    assert rec.headers["x-stainless-retry-count"] == "0"


async def test_openai_chat_streaming_usage_only_on_request(start: Start) -> None:
    url, _ = await start()
    client = oa(url)
    msgs: Any = [{"role": "user", "content": "hi"}]
    chunks = [
        c
        async for c in await client.chat.completions.create(
            model="llama3.2", messages=msgs, stream=True
        )
    ]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == fake_text(8)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)
    chunks = [
        c
        async for c in await client.chat.completions.create(
            model="llama3.2",
            messages=msgs,
            stream=True,
            max_tokens=2,
            stream_options={"include_usage": True},
        )
    ]
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 2 and chunks[-1].usage.prompt_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])


async def test_openai_chat_sse_framing(start: Start) -> None:
    url, _ = await start(default_num_predict=2)
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}], "stream": True}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/v1/chat/completions", json=body) as resp:
            assert resp.headers["Content-Type"] == "text/event-stream"
            events = await read_sse(resp)
        assert [e[1] for e in events][-1] == "[DONE]"
        objs = [json.loads(d) for _, d in events[:-1]]
        assert [o["choices"][0]["delta"] for o in objs] == [
            {"role": "assistant", "content": ""},
            {"content": "The"},
            {"content": " quick"},
            {},
        ]
        assert objs[-1]["choices"][0]["finish_reason"] == "stop"
        assert all("usage" not in o for o in objs)  # Ollama omits the field
        body["stream_options"] = {"include_usage": True}
        async with s.post(f"{url}/v1/chat/completions", json=body) as resp:
            events = await read_sse(resp)
        usage_chunk = json.loads(events[-2][1])
        assert usage_chunk["choices"] == [] and usage_chunk["usage"]["total_tokens"] == 6 + 2
        # non-streaming JSON when "stream" is absent
        del body["stream"], body["stream_options"]
        async with s.post(f"{url}/v1/chat/completions", json=body) as resp:
            assert resp.headers["Content-Type"] == "application/json"
            assert json.loads(await resp.read())["usage"]["completion_tokens"] == 2


async def test_openai_completions_zero_usage_quirk(start: Start) -> None:
    url, _ = await start()
    client = oa(url)
    chunks = [
        c
        async for c in await client.completions.create(
            model="llama3.2",
            prompt="say something",
            stream=True,
            max_tokens=3,
            stream_options={"include_usage": True},
        )
    ]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == fake_text(3)
    for c in chunks[:-1]:  # every chunk carries a zero-filled usage object ...
        assert c.usage is not None and c.usage.total_tokens == 0
    assert chunks[-2].choices[0].finish_reason == "length"
    last = chunks[-1]  # ... and only the final choices-less one has the real numbers
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (7, 3)
    done = await client.completions.create(model="llama3.2", prompt="x")
    assert done.choices[0].text == fake_text(8) and done.usage is not None
    assert done.usage.total_tokens == 6 + 8


async def test_openai_completions_prompt_must_be_string(start: Start) -> None:
    url, _ = await start()
    with pytest.raises(openai.BadRequestError) as err:
        await oa(url).completions.create(model="llama3.2", prompt=["a", "b"])
    assert err.value.status_code == 400
    assert isinstance(err.value.body, dict) and err.value.body["type"] == "invalid_request_error"


async def test_openai_embeddings_float_and_base64(start: Start) -> None:
    url, _ = await start(embedding_dim=4)
    client = oa(url)
    e = await client.embeddings.create(
        model="nomic-embed-text", input=["a b", "c"]
    )  # base64 on the wire
    assert [round(x, 5) for x in e.data[0].embedding] == [
        round(x, 5) for x in fake_embedding("a b", 4)
    ]
    assert e.usage.prompt_tokens == e.usage.total_tokens == (2 + 2) + (1 + 2)
    e = await client.embeddings.create(model="nomic-embed-text", input="c", encoding_format="float")
    assert e.data[0].embedding == fake_embedding("c", 4)
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{url}/v1/embeddings",
            json={"model": "nomic-embed-text", "input": "c", "encoding_format": "base64"},
        ) as resp,
    ):
        b64 = json.loads(await resp.read())["data"][0]["embedding"]
    assert struct.unpack("<4f", base64.b64decode(b64)) == pytest.approx(
        fake_embedding("c", 4), abs=1e-6
    )


async def test_openai_responses(start: Start) -> None:
    url, _ = await start()
    client = oa(url)
    r = await client.responses.create(model="llama3.2", input="hello", instructions="be nice")
    assert r.output_text == fake_text(8)
    assert r.usage is not None and (r.usage.input_tokens, r.usage.output_tokens) == (8, 8)
    events = [
        e
        async for e in await client.responses.create(
            model="llama3.2", input="hello", stream=True, max_output_tokens=2
        )
    ]
    assert [e.type for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    completed = events[-1]
    assert completed.type == "response.completed"
    assert completed.response.usage is not None and completed.response.usage.output_tokens == 2
    assert [e.sequence_number for e in events] == list(range(len(events)))
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{url}/v1/responses", json={"model": "llama3.2", "input": "x", "stream": True}
        ) as resp,
    ):
        sse = await read_sse(resp)
    assert all(name == json.loads(data)["type"] for name, data in sse)  # event: + data: framing
    assert sse[-1][0] == "response.completed"  # no [DONE] on /v1/responses


async def test_openai_models(start: Start) -> None:
    url, _ = await start()
    client = oa(url)
    ids = [m.id async for m in client.models.list()]
    assert ids == ["llama3.2:latest", "qwen2.5:0.5b", "nomic-embed-text:latest"]
    m = await client.models.retrieve("llama3.2")
    assert m.id == "llama3.2" and m.owned_by == "library"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("nope")


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------


async def test_unknown_model_both_dialects(start: Start) -> None:
    url, fake = await start()
    with pytest.raises(ollama.ResponseError) as err:
        await ol(url).chat(model="mistral", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 404
    assert err.value.error == 'model "mistral" not found, try pulling it first'
    with pytest.raises(openai.NotFoundError) as oerr:
        await oa(url).chat.completions.create(
            model="mistral", messages=[{"role": "user", "content": "x"}]
        )
    assert oerr.value.body == {
        "message": 'model "mistral" not found, try pulling it first',
        "type": "not_found_error",
        "param": None,
        "code": None,
    }
    assert fake.started_generations == 0


async def test_malformed_json(start: Start) -> None:
    url, _ = await start()
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/api/generate", data=b"{not json") as resp:
            assert resp.status == 400
            assert "error" in json.loads(await resp.read())
        async with s.post(f"{url}/api/generate", data=b"") as resp:
            assert json.loads(await resp.read()) == {"error": "missing request body"}
        async with s.post(f"{url}/v1/chat/completions", data=b"[1,") as resp:
            assert resp.status == 400
            err = json.loads(await resp.read())["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["type"] == "invalid_request_error"


async def test_unknown_routes_are_go_404(start: Start) -> None:
    url, fake = await start()
    async with aiohttp.ClientSession() as s:
        for method, path in [("GET", "/api/nope"), ("GET", "/api/generate"), ("PUT", "/v1/models")]:
            async with s.request(method, f"{url}{path}") as resp:
                assert resp.status == 404
                assert resp.headers["Content-Type"] == "text/plain"
                assert await resp.read() == b"404 page not found"
    assert [r.status for r in fake.requests] == [404, 404, 404]


async def test_fault_header_validation(start: Start) -> None:
    url, _ = await start()
    assert parse_fault_header("error_after_chunks=2; chunk_delay_s=0.5,truncate") == {
        "error_after_chunks": 2,
        "chunk_delay_s": 0.5,
        "truncate": True,
    }
    assert parse_fault_header("none")["status"] is None
    assert parse_fault_header("omit_metrics=eval_count|eval_duration")["omit_metrics"] == (
        "eval_count",
        "eval_duration",
    )
    with pytest.raises(FaultHeaderError):
        parse_fault_header("explode=1")
    with pytest.raises(FaultHeaderError):
        parse_fault_header("status=abc")
    with pytest.raises(ollama.ResponseError) as err:
        await ol(url, headers={"x-fake-fault": "bogus"}).list()
    assert err.value.status_code == 400 and "x-fake-fault" in err.value.error


# ------------------------------------------------------------------------------------------
# Fault injection
# ------------------------------------------------------------------------------------------


async def test_mid_stream_error_raises_response_error(start: Start) -> None:
    url, fake = await start()
    client = ol(url, headers={"x-fake-fault": "error_after_chunks=2"})
    got: list[str] = []
    with pytest.raises(ollama.ResponseError) as err:
        async for part in await client.generate(model="llama3.2", prompt="x", stream=True):
            got.append(part.response or "")
    assert got == ["The", " quick"]
    assert err.value.error == DEFAULT_ERROR_MESSAGE
    gen = fake.last_generation
    assert gen.state == "error" and gen.fault == "error" and gen.chunks_sent == 2
    assert fake.last_request().status == 200  # the status was already 200
    # non-streaming: a proper 500 instead
    with pytest.raises(ollama.ResponseError) as err:
        await client.generate(model="llama3.2", prompt="x")
    assert err.value.status_code == 500


async def test_mid_stream_error_on_sse(start: Start) -> None:
    url, _ = await start(error_after_chunks=1, error_message="boom")  # app-level fault
    stream = await oa(url).chat.completions.create(
        model="llama3.2", messages=[{"role": "user", "content": "x"}], stream=True
    )
    seen = []
    with pytest.raises(openai.APIError) as err:
        async for chunk in stream:
            seen.append(chunk)
    assert err.value.message == "boom"
    assert len(seen) == 2  # role chunk + one content chunk


async def test_status_fault_before_any_byte(start: Start) -> None:
    url, fake = await start()
    client = ol(url, headers={"x-fake-fault": "status=503"})
    with pytest.raises(ollama.ResponseError) as err:
        async for _ in await client.generate(model="llama3.2", prompt="x", stream=True):
            pass  # the client raises when the stream is iterated
    assert err.value.status_code == 503 and err.value.error == BUSY_MESSAGE
    with pytest.raises(openai.InternalServerError) as oerr:
        await oa(url).chat.completions.create(
            model="llama3.2",
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"x-fake-fault": "status=503"},
        )
    assert oerr.value.status_code == 503 and isinstance(oerr.value.body, dict)
    assert oerr.value.body["type"] == "api_error"
    assert fake.started_generations == 0
    # app-level fault, cleared per request with `none`
    fake.options.status = 500
    with pytest.raises(ollama.ResponseError):
        await ol(url).list()
    assert (await ol(url, headers={"x-fake-fault": "none"}).list()).models


async def test_reset_after_chunks(start: Start) -> None:
    url, fake = await start()
    client = ol(url, headers={"x-fake-fault": "reset_after_chunks=3"})
    got: list[str] = []
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        async for part in await client.generate(model="llama3.2", prompt="x", stream=True):
            got.append(part.response or "")
    assert got == ["The", " quick", " brown"]
    assert fake.last_generation.state == "reset"
    client = ol(url, headers={"x-fake-fault": "reset_after_chunks=0"})
    with pytest.raises(httpx.ReadError):  # RST before any byte: ECONNRESET
        await client.generate(model="llama3.2", prompt="x")
    assert fake.last_request().status == 0
    client = ol(url, headers={"x-fake-fault": "close_after_chunks=0"})
    with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
        await client.generate(model="llama3.2", prompt="x")
    client = ol(url, headers={"x-fake-fault": "close_after_chunks=2"})
    got.clear()
    with pytest.raises(httpx.RemoteProtocolError):  # incomplete chunked body
        async for part in await client.generate(model="llama3.2", prompt="x", stream=True):
            got.append(part.response or "")
    assert got == ["The", " quick"]
    assert [g.state for g in fake.generations] == ["reset", "reset", "close", "close"]


async def test_truncate(start: Start) -> None:
    url, fake = await start()
    client = ol(url, headers={"x-fake-fault": "truncate_after_chunks=2"})
    parts = [
        p
        async for p in await client.chat(
            model="llama3.2", messages=[{"role": "user", "content": "x"}], stream=True
        )
    ]
    assert len(parts) == 2 and not any(p.done for p in parts)  # ends cleanly, no done object
    assert fake.last_generation.state == "truncated"
    client = ol(url, headers={"x-fake-fault": "truncate"})
    gparts = [p async for p in await client.generate(model="llama3.2", prompt="x", stream=True)]
    assert len(gparts) == 8 and not gparts[-1].done
    with pytest.raises(httpx.RemoteProtocolError):  # non-streaming: half a JSON body, then FIN
        await client.generate(model="llama3.2", prompt="x")
    assert fake.last_generation.state == "truncated" and fake.last_request().status == 200
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{url}/v1/chat/completions",
            json={
                "model": "llama3.2",
                "messages": [{"role": "user", "content": "x"}],
                "stream": True,
            },
            headers={"x-fake-fault": "truncate_after_chunks=1"},
        ) as resp,
    ):
        events = await read_sse(resp)
    assert len(events) == 2 and events[-1][1] != "[DONE]"


async def test_stall_keeps_connection_open_until_client_leaves(start: Start) -> None:
    url, fake = await start()
    client = ol(url, timeout=0.3, headers={"x-fake-fault": "stall_after_chunks=2"})
    got = []
    t = time.perf_counter()
    with pytest.raises(httpx.ReadTimeout):
        async for part in await client.generate(model="llama3.2", prompt="x", stream=True):
            got.append(part)
    assert len(got) == 2 and time.perf_counter() - t >= 0.3
    await fake.wait_until(lambda: fake.cancelled_generations == 1)
    gen = fake.last_generation
    assert gen.fault == "stall" and gen.state == "cancelled" and gen.chunks_sent == 2


async def test_slow_first_byte_and_chunk_delay(start: Start) -> None:
    url, _ = await start()
    headers = {"x-fake-fault": "slow_first_byte_s=0.2, chunk_delay_s=0.02"}
    async with aiohttp.ClientSession() as s:
        t = time.perf_counter()
        async with s.post(
            f"{url}/api/generate", json={"model": "llama3.2", "prompt": "x"}, headers=headers
        ) as resp:
            ttfb = time.perf_counter() - t
            await resp.read()
            total = time.perf_counter() - t
        t = time.perf_counter()
        async with s.get(f"{url}/api/tags", headers=headers) as resp:
            assert resp.status == 200
        assert time.perf_counter() - t >= 0.2
    assert ttfb >= 0.2 and total >= 0.2 + 7 * 0.02


# ------------------------------------------------------------------------------------------
# Disconnects, cancellation and queueing
# ------------------------------------------------------------------------------------------


async def _close_after(stream: AsyncIterator[Any], n: int) -> int:
    got = 0
    async for _ in stream:
        got += 1
        if got == n:
            break
    await stream.aclose()  # type: ignore[attr-defined]
    return got


async def test_disconnect_stops_generation_ollama_client(start: Start) -> None:
    url, fake = await start(token_delay_s=0.01)
    stream = await ol(url).generate(
        model="llama3.2", prompt="x", stream=True, options={"num_predict": 1000}
    )
    assert await _close_after(stream, 3) == 3
    await fake.wait_until(lambda: fake.cancelled_generations == 1)
    gen = fake.last_generation
    assert gen.cancelled and not gen.active and gen.tokens_generated < 50
    produced = gen.tokens_generated
    await asyncio.sleep(0.1)
    assert gen.tokens_generated == produced  # really stopped
    assert fake.active_generations == 0 and fake.running_generations == 0
    assert fake.last_request().status == 200


async def test_disconnect_stops_generation_openai_client(start: Start) -> None:
    url, fake = await start(token_delay_s=0.01)
    stream = await oa(url).chat.completions.create(
        model="llama3.2", messages=[{"role": "user", "content": "x"}], stream=True, max_tokens=1000
    )
    seen = 0
    async for _ in stream:
        seen += 1
        if seen == 3:
            break
    await stream.close()
    await fake.wait_until(lambda: fake.cancelled_generations == 1)
    assert fake.last_generation.tokens_generated < 50


@pytest.mark.parametrize(
    ("fault", "stream"),
    [("", True), ("", False), ("stall_after_chunks=1", True), ("slow_first_byte_s=5", True)],
)
async def test_disconnect_detected_without_handler_cancellation(fault: str, stream: bool) -> None:
    """The watchdog notices a closed socket even when nothing is written and aiohttp does not
    cancel the handler (AppRunner's default)."""
    async with serve_fake_ollama(handler_cancellation=False, token_delay_s=0.05) as srv:
        headers = {"x-fake-fault": fault} if fault else {}
        body = {
            "model": "llama3.2",
            "prompt": "x",
            "stream": stream,
            "options": {"num_predict": 500},
        }
        timeout = aiohttp.ClientTimeout(total=0.3)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            with pytest.raises(asyncio.TimeoutError):
                async with s.post(f"{srv.url}/api/generate", json=body, headers=headers) as resp:
                    await resp.read()
        await srv.fake.wait_until(lambda: srv.fake.cancelled_generations == 1)
        gen = srv.fake.last_generation
        assert gen.tokens_generated < 20 and srv.fake.active_generations == 0
        produced = gen.tokens_generated
        await asyncio.sleep(0.15)
        assert gen.tokens_generated == produced


async def test_queueing_shows_in_load_duration_only(start: Start) -> None:
    url, fake = await start(parallel=1, token_delay_s=0.02)
    client = ol(url)

    async def one() -> ollama.GenerateResponse:
        return await client.generate(model="llama3.2", prompt="x", options={"num_predict": 5})

    results = await asyncio.gather(one(), one())
    first, second = sorted(results, key=lambda r: r.load_duration or 0)
    assert fake.peak_running_generations == 1
    assert first.load_duration is not None and second.load_duration is not None
    assert second.eval_duration is not None and second.total_duration is not None
    assert first.load_duration < 30 * MS
    assert second.load_duration >= 90 * MS  # waited for the first request's ~100 ms
    assert 100 * MS <= second.eval_duration < 170 * MS  # queue wait not in eval_duration
    assert second.total_duration >= second.load_duration + second.eval_duration
    waits = sorted(g.queue_wait_ns for g in fake.generations)
    assert waits[0] < 10 * MS and waits[1] >= 90 * MS


async def test_queue_full_is_503(start: Start) -> None:
    url, fake = await start(parallel=1, max_queue=1, token_delay_s=0.02)
    client = ol(url)
    results = await asyncio.gather(
        *(
            client.generate(model="llama3.2", prompt="x", options={"num_predict": 5})
            for _ in range(3)
        ),
        return_exceptions=True,
    )
    errors = [r for r in results if isinstance(r, ollama.ResponseError)]
    assert len(errors) == 1 and errors[0].status_code == 503 and errors[0].error == BUSY_MESSAGE
    assert fake.rejected_generations == 1 and fake.completed_generations == 2


async def test_disconnect_while_queued(start: Start) -> None:
    url, fake = await start(parallel=1, token_delay_s=0.02)
    client = ol(url)
    first = asyncio.create_task(
        client.generate(model="llama3.2", prompt="x", options={"num_predict": 10})
    )
    await fake.wait_until(lambda: fake.running_generations == 1)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.05)) as s:
        with pytest.raises(asyncio.TimeoutError):
            await s.post(f"{url}/api/generate", json={"model": "llama3.2", "prompt": "y"})
    await fake.wait_until(lambda: fake.cancelled_generations == 1)
    queued = fake.generations[1]
    assert queued.cancelled and queued.tokens_generated == 0
    assert (await first).eval_count == 10
    assert fake.queued_generations == 0 and fake.active_generations == 0


# ------------------------------------------------------------------------------------------
# Host / Origin checks
# ------------------------------------------------------------------------------------------


async def test_host_check_403(start: Start) -> None:
    url, fake = await start()
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{url}/api/tags", headers={"Host": "evil.example.com"}) as resp:
            assert resp.status == 403
            assert await resp.read() == b""
        for host in [
            "localhost:11434",
            "127.0.0.1",
            "[::1]:80",
            "10.1.2.3:8",
            "box.local",
            "a.localhost",
        ]:
            async with s.get(f"{url}/api/tags", headers={"Host": host}) as resp:
                assert resp.status == 200, host
        async with s.get(f"{url}/", headers={"Origin": "https://evil.example.com"}) as resp:
            assert resp.status == 403
        async with s.get(f"{url}/", headers={"Origin": "http://localhost:3000"}) as resp:
            assert resp.status == 200
            assert resp.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    with pytest.raises(ollama.ResponseError) as err:
        await ol(url, headers={"Host": "proxy.example.com:11434"}).list()
    assert err.value.status_code == 403
    assert fake.requests[0].status == 403 and fake.requests[0].headers["Host"] == "evil.example.com"


async def test_host_and_origin_checks_can_be_relaxed(start: Start) -> None:
    url, _ = await start(check_host=False, allowed_origins=["https://app.example.com"])
    async with aiohttp.ClientSession() as s:
        headers = {"Host": "evil.example.com", "Origin": "https://app.example.com"}
        async with s.get(f"{url}/api/version", headers=headers) as resp:
            assert resp.status == 200


def test_host_and_origin_rules() -> None:
    assert host_allowed("localhost") and host_allowed("") and host_allowed("0.0.0.0:1")
    assert host_allowed("172.20.0.1") and host_allowed("[fd00::1]:1") and host_allowed("x.internal")
    assert not host_allowed("8.8.8.8") and not host_allowed("example.com:11434")
    assert not host_allowed("172.32.0.1")
    assert origin_allowed("app://whatever") and origin_allowed("chrome-extension://abc")
    assert origin_allowed("http://h:1", host="h:1")  # same origin
    assert not origin_allowed("http://localhost.evil.com")


# ------------------------------------------------------------------------------------------
# Pass-through / management routes
# ------------------------------------------------------------------------------------------


async def test_root_version_tags_show_ps(start: Start) -> None:
    url, _ = await start(version="0.9.9")
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{url}/") as resp:
            assert await resp.text() == "Ollama is running"
        async with s.head(f"{url}/") as resp:
            assert resp.status == 200
        async with s.get(f"{url}/api/version") as resp:
            assert json.loads(await resp.read()) == {"version": "0.9.9"}
    client = ol(url)
    models = (await client.list()).models
    assert [m.model for m in models] == [
        "llama3.2:latest",
        "qwen2.5:0.5b",
        "nomic-embed-text:latest",
    ]
    assert models[0].details is not None and models[0].details.format == "gguf"
    show = await client.show("llama3.2")
    assert show.capabilities == ["completion"] and show.modelinfo
    with pytest.raises(ollama.ResponseError) as err:
        await client.show("nope")
    assert err.value.status_code == 404
    assert (await client.ps()).models == []
    await client.generate(model="llama3.2", prompt="x")
    (loaded,) = (await client.ps()).models
    assert loaded.model == "llama3.2:latest" and loaded.size_vram and loaded.expires_at


async def test_pull_push_create_copy_delete(start: Start) -> None:
    url, fake = await start(pull_progress_chunks=2)
    client = ol(url)
    statuses = [p.status async for p in await client.pull("gemma3:1b", stream=True)]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert len(statuses) == 1 + 3 + 3
    assert (await client.pull("gemma3:1b")).status == "success"  # stream:false -> last status
    assert fake.find_model("gemma3:1b") is not None
    assert (await client.push("gemma3:1b")).status == "success"
    assert (await client.create("mine", from_="llama3.2", system="hi")).status == "success"
    assert (await client.copy("mine", "mine2")).status == "success"
    assert (await client.delete("mine")).status == "success"
    with pytest.raises(ollama.ResponseError) as err:
        await client.delete("mine")
    assert err.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as err:
        await client.copy("nope", "x")
    assert err.value.status_code == 404
    assert {r.method for r in fake.requests_to("/api/delete")} == {"DELETE"}
    assert fake.requests_to("/api/delete")[0].body_json == {"model": "mine"}
    # a mid-stream error works on progress streams too
    client = ol(url, headers={"x-fake-fault": "error_after_chunks=1"})
    with pytest.raises(ollama.ResponseError):
        async for _ in await client.pull("x", stream=True):
            pass


async def test_blobs(start: Start, tmp_path: Path) -> None:
    url, fake = await start()
    payload = bytes(range(256)) * 4096  # 1 MiB
    path = tmp_path / "blob.bin"
    path.write_bytes(payload)
    client = ol(url)
    digest = await client.create_blob(path)
    assert digest == "sha256:" + hashlib.sha256(payload).hexdigest()
    assert fake.blobs[digest] == len(payload) and fake.blob_bytes_received == len(payload)
    rec = fake.last_request()
    assert rec.status == 201 and rec.body_size == len(payload) and rec.body == b""
    async with aiohttp.ClientSession() as s:
        async with s.head(f"{url}/api/blobs/{digest}") as resp:
            assert resp.status == 200
        async with s.head(f"{url}/api/blobs/sha256:{'0' * 64}") as resp:
            assert resp.status == 404
        async with s.post(f"{url}/api/blobs/sha256:{'0' * 64}", data=b"abc") as resp:
            assert resp.status == 400
            assert "digest mismatch" in json.loads(await resp.read())["error"]
        async with s.post(f"{url}/api/blobs/md5:abc", data=b"abc") as resp:
            assert resp.status == 400


# ------------------------------------------------------------------------------------------
# Standalone runner
# ------------------------------------------------------------------------------------------


async def test_standalone_runner() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.fakes.fake_ollama",
        "--port",
        "0",
        "-o",
        "default_num_predict=3",
        cwd=_ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
        url = line.strip().rsplit(" ", 1)[-1]
        assert url.startswith("http://127.0.0.1:")
        r = await ol(url).generate(model="llama3.2", prompt="x")
        assert r.response == fake_text(3)
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
