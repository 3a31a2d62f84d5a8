"""Request parsing and usage scanning: pure functions, driven with real wire formats."""

from __future__ import annotations

import json

import pytest

from cycles_proxy.dialects import ollama, openai
from cycles_proxy.dialects.common import BadRequest


# --- request parsing ----------------------------------------------------------------------------
def test_native_stream_defaults_follow_ollama() -> None:
    assert ollama.parse_request("chat", b'{"model":"m","messages":[]}').stream is True
    assert ollama.parse_request("generate", b'{"model":"m","prompt":"hi"}').stream is True
    assert ollama.parse_request("chat", b'{"model":"m","stream":false}').stream is False
    assert ollama.parse_request("embed", b'{"model":"m","input":"x","stream":true}').stream is False


def test_openai_streams_only_when_asked() -> None:
    body = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
    assert openai.parse_request("chat_completions", body).stream is False
    body2 = b'{"model":"m","messages":[],"stream":true}'
    assert openai.parse_request("chat_completions", body2).stream is True


def test_output_caps_are_read_from_each_dialects_field() -> None:
    p = ollama.parse_request("generate", b'{"model":"m","prompt":"x","options":{"num_predict":7}}')
    assert p.max_output_tokens == 7
    p = ollama.parse_request("generate", b'{"model":"m","prompt":"x","options":{"num_predict":-1}}')
    assert p.max_output_tokens is None  # -1 means unlimited in Ollama
    p = openai.parse_request(
        "chat_completions",
        b'{"model":"m","messages":[],"max_tokens":9,"max_completion_tokens":5}',
    )
    assert p.max_output_tokens == 5  # the newer field wins
    p = openai.parse_request("responses", b'{"model":"m","input":"x","max_output_tokens":11}')
    assert p.max_output_tokens == 11


@pytest.mark.parametrize(
    ("endpoint", "raw", "fragment"),
    [
        ("chat", b"", "empty"),
        ("chat", b"{not json", "not valid JSON"),
        ("chat", b"[1,2]", "JSON object"),
        ("chat", b'{"messages":[]}', '"model" is required'),
        ("chat", b'{"model":"m","stream":"yes"}', '"stream" must be true or false'),
        ("generate", b'{"model":"m","prompt":5}', '"prompt" must be a string'),
        ("generate", b'{"model":"m","options":{"num_predict":"10"}}', "num_predict"),
        ("embed", b'{"model":"m"}', '"input" is required'),
        ("chat", b"\xff\xfe{}", "UTF-8"),
    ],
)
def test_bad_native_requests_say_what_to_fix(endpoint: str, raw: bytes, fragment: str) -> None:
    with pytest.raises(BadRequest) as info:
        ollama.parse_request(endpoint, raw)
    assert fragment in info.value.message


def test_deeply_nested_json_is_a_clear_error() -> None:
    raw = b'{"model":"m","messages":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(BadRequest) as info:
        ollama.parse_request("chat", raw)
    assert "nested" in info.value.message


def test_usage_injection_and_caps_edit_only_the_parsed_body() -> None:
    p = openai.parse_request("chat_completions", b'{"model":"m","messages":[],"stream":true}')
    assert openai.needs_usage_injection("chat_completions", p)
    openai.inject_usage(p)
    assert p.body["stream_options"] == {"include_usage": True}
    p2 = openai.parse_request(
        "chat_completions",
        b'{"model":"m","messages":[],"stream":true,"stream_options":{"include_usage":true}}',
    )
    assert not openai.needs_usage_injection("chat_completions", p2)
    openai.set_output_cap("chat_completions", p2, 3)
    assert p2.body["max_tokens"] == 3
    n = ollama.parse_request("chat", b'{"model":"m","options":{"num_predict":50}}')
    ollama.set_output_cap(n, 10)
    assert n.body["options"]["num_predict"] == 10


# --- NDJSON scanning ---------------------------------------------------------------------------
FINAL = {
    "model": "llama3.2",
    "created_at": "2023-08-04T19:22:45.499127Z",
    "response": "",
    "done": True,
    "done_reason": "stop",
    "total_duration": 10706818083,
    "load_duration": 6338219291,
    "prompt_eval_count": 26,
    "prompt_eval_duration": 130079000,
    "eval_count": 259,
    "eval_duration": 4232710000,
}


def ndjson_stream(n: int) -> bytes:
    lines = [
        json.dumps({"model": "llama3.2", "response": f"t{i}", "done": False}, separators=(",", ":"))
        for i in range(n)
    ]
    lines.append(json.dumps(FINAL, separators=(",", ":")))
    return ("\n".join(lines) + "\n").encode()


@pytest.mark.parametrize("split", [1, 3, 7, 64, 10_000])
def test_ndjson_usage_survives_any_chunking_and_bytes_pass_unchanged(split: int) -> None:
    data = ndjson_stream(5)
    s = ollama.NdjsonScanner()
    out = b"".join(s.feed(data[i : i + split]) for i in range(0, len(data), split)) + s.finish()
    assert out == data
    u = s.usage
    assert (u.tokens_input, u.tokens_output) == (26, 259)
    assert u.reported_compute_ns == 130079000 + 4232710000
    assert u.reported_load_ns == 6338219291
    assert u.complete and u.chunks == 5 and u.finish_reason == "stop"


def test_ndjson_mid_stream_error_and_truncation() -> None:
    s = ollama.NdjsonScanner()
    s.feed(b'{"response":"a","done":false}\n{"error":"model crashed"}\n')
    s.finish()
    assert s.usage.error == "model crashed"
    assert not s.usage.complete
    assert s.usage.tokens_output is None  # unknown, not zero


def test_missing_native_fields_stay_unknown() -> None:
    s = ollama.JsonScanner()
    s.feed(b'{"model":"m","done":true,"eval_count":3}')
    s.finish()
    assert s.usage.tokens_input is None
    assert s.usage.tokens_output == 3
    assert s.usage.reported_compute_ns is None


def test_embed_json_reports_compute_as_total_minus_load() -> None:
    s = ollama.JsonScanner()
    s.feed(b'{"model":"m","embeddings":[[0.1]],"total_duration":500,"load_duration":200,')
    s.feed(b'"prompt_eval_count":4}')
    s.finish()
    assert s.usage.reported_compute_ns == 300
    assert (s.usage.tokens_input, s.usage.tokens_output) == (4, 0)


# --- SSE scanning ------------------------------------------------------------------------------
def sse(*objs: object) -> bytes:
    out = b""
    for o in objs:
        out += b"data: " + (o if isinstance(o, bytes) else json.dumps(o).encode()) + b"\n\n"
    return out


CHAT_STREAM = sse(
    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
    {"choices": [{"index": 0, "delta": {"content": "Hel"}}]},
    {"choices": [{"index": 0, "delta": {"content": "lo"}}]},
    {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}},
    b"[DONE]",
)


@pytest.mark.parametrize("split", [1, 5, 33, 100_000])
def test_sse_strips_only_the_injected_usage_chunk(split: int) -> None:
    s = openai.SseScanner(strip_usage=True)
    data = CHAT_STREAM
    out = b"".join(s.feed(data[i : i + split]) for i in range(0, len(data), split)) + s.finish()
    assert b'"usage"' not in out
    assert out.endswith(b"data: [DONE]\n\n")
    assert out.count(b"data: ") == 5
    assert (s.usage.tokens_input, s.usage.tokens_output) == (12, 2)
    assert s.usage.complete


def test_sse_stripping_forwards_each_crlf_event_as_it_arrives() -> None:
    """Servers that end events with CRLF CRLF are streamed event by event too, not held until
    an LF LF shows up (which for them never does)."""
    events = [e.replace(b"\n", b"\r\n") for e in CHAT_STREAM.split(b"\n\n")[:-1]]
    s = openai.SseScanner(strip_usage=True)
    out = []
    for e in events:
        out.append(s.feed(e + b"\r\n\r\n"))
    assert out[0] == events[0] + b"\r\n\r\n"  # the first event leaves when it arrives
    assert out[4] == b""  # the injected usage chunk is hidden
    assert out[5] == b"data: [DONE]\r\n\r\n"
    assert s.finish() == b""
    assert (s.usage.tokens_input, s.usage.tokens_output) == (12, 2)


def test_sse_without_stripping_forwards_every_byte() -> None:
    s = openai.SseScanner(strip_usage=False)
    out = b"".join(s.feed(CHAT_STREAM[i : i + 9]) for i in range(0, len(CHAT_STREAM), 9))
    assert out + s.finish() == CHAT_STREAM
    assert s.usage.tokens_output == 2


def test_sse_keeps_the_last_usage_and_reads_llamacpp_timings() -> None:
    # Ollama /v1/completions: zero-filled usage on every chunk, the real one last
    data = sse(
        {"choices": [{"text": "a"}], "usage": {"prompt_tokens": 0, "completion_tokens": 0}},
        {
            "choices": [{"text": "", "finish_reason": "length"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1},
            "timings": {"prompt_ms": 12.5, "predicted_ms": 30.25},
        },
        b"[DONE]",
    )
    s = openai.SseScanner()
    s.feed(data)
    assert (s.usage.tokens_input, s.usage.tokens_output) == (5, 1)
    assert s.usage.reported_compute_ns == 42_750_000
    assert s.usage.finish_reason == "length"


def test_responses_api_usage_in_completed_event() -> None:
    data = (
        b"event: response.output_text.delta\n"
        b'data: {"type":"response.output_text.delta","delta":"x"}\n\n'
        b'event: response.completed\ndata: {"type":"response.completed","response":'
        b'{"usage":{"input_tokens":7,"output_tokens":3,"total_tokens":10}}}\n\n'
    )
    s = openai.SseScanner()
    s.feed(data)
    assert (s.usage.tokens_input, s.usage.tokens_output) == (7, 3)
    assert s.usage.complete


def test_openai_json_and_embeddings_usage() -> None:
    s = openai.OpenAIJsonScanner()
    s.feed(b'{"object":"list","data":[],"usage":{"prompt_tokens":8,"total_tokens":8}}')
    s.finish()
    assert (s.usage.tokens_input, s.usage.tokens_output) == (8, 0)
