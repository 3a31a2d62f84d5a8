"""The OpenAI-compatible dialect (``/v1/*``): request parsing, SSE/JSON usage scanning, errors.

Pure; see ``ollama-api.md`` §5-6 and ``test-peers.md`` §2.4 for what servers really send.
"""

from __future__ import annotations

from typing import Any

from cycles_proxy.dialects.common import (
    BadRequest,
    ParsedRequest,
    Usage,
    as_count,
    load_json_object,
    loads_response,
    optional_bool,
    optional_count,
    require_model,
    text_size,
)
from cycles_proxy.dialects.ollama import JSON_SCAN_LIMIT

#: endpoints whose streams carry usage only when stream_options.include_usage is set
USAGE_OPT_IN = frozenset({"chat_completions", "completions"})

#: where each endpoint keeps the caller's output cap, in order of precedence
CAP_FIELDS = {
    "chat_completions": ("max_completion_tokens", "max_tokens"),
    "completions": ("max_tokens",),
    "responses": ("max_output_tokens",),
    "v1_embeddings": (),
}


def parse_request(endpoint: str, raw: bytes) -> ParsedRequest:
    body = load_json_object(raw)
    model = require_model(body)
    stream = optional_bool(body, "stream", False) if endpoint != "v1_embeddings" else False
    max_out: int | None = None
    for key in CAP_FIELDS[endpoint]:
        max_out = optional_count(body, key)
        if max_out is not None:
            break
    if endpoint == "chat_completions":
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise BadRequest('"messages" is required and must be a list')
        size = text_size(messages)
    elif endpoint == "completions":
        size = text_size(body.get("prompt"))
    elif endpoint == "responses":
        size = text_size(body.get("input")) + text_size(body.get("instructions"))
    else:
        if "input" not in body:
            raise BadRequest('"input" is required')
        size = text_size(body.get("input"))
        max_out = 0
    wants_usage = False
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise BadRequest('"stream_options" must be a JSON object')
        wants_usage = opts.get("include_usage") is True
    return ParsedRequest(model, stream, max_out, size, body, wants_usage)


def needs_usage_injection(endpoint: str, parsed: ParsedRequest) -> bool:
    return parsed.stream and endpoint in USAGE_OPT_IN and not parsed.wants_usage


def inject_usage(parsed: ParsedRequest) -> None:
    opts = parsed.body.get("stream_options")
    if not isinstance(opts, dict):
        opts = parsed.body["stream_options"] = {}
    opts["include_usage"] = True


def set_output_cap(endpoint: str, parsed: ParsedRequest, max_tokens: int) -> None:
    fields = CAP_FIELDS[endpoint]
    if not fields:
        return
    key = next((k for k in fields if k in parsed.body), fields[-1])
    current = parsed.max_output_tokens
    parsed.body[key] = max_tokens if current is None else min(current, max_tokens)


def error_body(
    message: str, code: str | None = None, etype: str = "invalid_request_error"
) -> dict[str, Any]:
    return {"error": {"message": message, "type": etype, "param": None, "code": code}}


def _read_usage(obj: dict[str, Any], usage: Usage) -> None:
    u = obj.get("usage")
    if isinstance(u, dict):
        tin = as_count(u.get("prompt_tokens", u.get("input_tokens")))
        tout = as_count(u.get("completion_tokens", u.get("output_tokens")))
        # keep the last usage seen, but never let a later partial object erase known counts
        if tin is not None:
            usage.tokens_input = tin
        if tout is not None:
            usage.tokens_output = tout
        elif tin is not None and "total_tokens" in u and "completion_tokens" not in u:
            usage.tokens_output = 0  # embeddings: prompt_tokens and total_tokens only
    t = obj.get("timings")
    if isinstance(t, dict):
        # llama.cpp's own compute time, in milliseconds (float)
        prompt_ns, eval_ns = _ms_to_ns(t.get("prompt_ms")), _ms_to_ns(t.get("predicted_ms"))
        if prompt_ns is not None or eval_ns is not None:
            usage.reported_prompt_ns, usage.reported_eval_ns = prompt_ns, eval_ns
            usage.reported_compute_ns = (prompt_ns or 0) + (eval_ns or 0)
    model = obj.get("model")
    if isinstance(model, str):
        usage.model_version = model
    choices = obj.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        reason = choices[0].get("finish_reason")
        if isinstance(reason, str):
            usage.finish_reason = reason


def _ms_to_ns(v: Any) -> int | None:
    if isinstance(v, int | float) and not isinstance(v, bool) and v >= 0:
        return round(v * 1_000_000)
    return None


def _is_injected_usage_chunk(obj: dict[str, Any]) -> bool:
    return obj.get("choices") == [] and isinstance(obj.get("usage"), dict)


class SseScanner:
    """Watches a ``text/event-stream`` body. With ``strip_usage`` it hides the usage-only chunk
    the proxy asked for on the caller's behalf; then (and only then) bytes are forwarded per whole
    event, which costs no latency because servers write one event per chunk."""

    __slots__ = ("_partial", "_strip", "usage")

    def __init__(self, strip_usage: bool = False) -> None:
        self.usage = Usage()
        self._partial = b""
        self._strip = strip_usage

    def feed(self, chunk: bytes) -> bytes:
        # Events are consumed left to right from everything not yet consumed, so where TCP
        # happens to cut the stream never changes which bytes form an event (a right-to-left
        # split of a run of blank lines did, and dropped a newline).
        data = self._partial + chunk if self._partial else chunk
        kept: list[bytes] = []
        pos = 0
        # A blank line ends an event: LF LF, or CRLF CRLF from servers that write CRLF. The next
        # CRLF CRLF is remembered so a chunk of many events is scanned once, not once per event.
        crlf = data.find(b"\r\n\r\n")
        while True:
            lf = data.find(b"\n\n", pos)
            if 0 <= crlf < pos:
                crlf = data.find(b"\r\n\r\n", pos)
            if crlf >= 0 and (lf < 0 or crlf < lf):
                end, nxt = crlf, crlf + 4
            elif lf >= 0:
                end, nxt = lf, lf + 2
            else:
                break
            if self._event(data[pos:end]) and self._strip:
                kept.append(data[pos:nxt])
            pos = nxt
        self._partial = data[pos:]
        if not self._strip:
            return chunk
        return b"".join(kept)

    def finish(self) -> bytes:
        rest, self._partial = self._partial, b""
        if rest.strip():
            keep = self._event(rest)
            return rest if (self._strip and keep) else b""
        return rest if self._strip else b""

    def _event(self, event: bytes) -> bool:
        """Scan one event; return False if it must be hidden from the client."""
        data = _event_data(event)
        if data is None:
            return True
        if data == b"[DONE]":
            self.usage.complete = True
            return True
        interesting = (
            b'"usage"' in data
            or b'"timings"' in data
            or b'"error"' in data
            or b'"finish_reason":"' in data
            or b"response.completed" in data
        )
        if not interesting:
            self.usage.chunks += 1
            return True
        try:
            obj = loads_response(data)
        except (ValueError, RecursionError):
            return True
        if not isinstance(obj, dict):
            return True
        err = obj.get("error")
        if err:
            self.usage.error = str(err.get("message", err)) if isinstance(err, dict) else str(err)
            return True
        if obj.get("type") == "response.completed" and isinstance(obj.get("response"), dict):
            _read_usage(obj["response"], self.usage)
            self.usage.complete = True
            return True
        _read_usage(obj, self.usage)
        if _is_injected_usage_chunk(obj):
            return not self._strip
        self.usage.chunks += 1
        return True


def _event_data(event: bytes) -> bytes | None:
    """The payload of an SSE event's ``data:`` line(s), or None for comments/other fields."""
    if event.startswith(b"data:") and b"\n" not in event.strip(b"\r\n"):
        return event[5:].strip()
    parts = [
        line[5:].strip()
        for line in event.replace(b"\r\n", b"\n").split(b"\n")
        if line.startswith(b"data:")
    ]
    return b"\n".join(parts) if parts else None


class OpenAIJsonScanner:
    """Watches a non-streaming OpenAI-style JSON response (always carries ``usage``)."""

    __slots__ = ("_buf", "_size", "usage")

    def __init__(self) -> None:
        self.usage = Usage()
        self._buf: list[bytes] | None = []
        self._size = 0

    def feed(self, chunk: bytes) -> bytes:
        if self._buf is not None:
            self._size += len(chunk)
            if self._size > JSON_SCAN_LIMIT:
                self._buf = None
            else:
                self._buf.append(chunk)
        return chunk

    def finish(self) -> bytes:
        if not self._buf:
            return b""
        try:
            obj = loads_response(b"".join(self._buf))
        except (ValueError, RecursionError):
            return b""
        self._buf = None
        if not isinstance(obj, dict):
            return b""
        if obj.get("error"):
            err = obj["error"]
            self.usage.error = str(err.get("message", err)) if isinstance(err, dict) else str(err)
            return b""
        target = obj.get("response") if isinstance(obj.get("response"), dict) else obj
        assert isinstance(target, dict)
        _read_usage(target, self.usage)
        self.usage.complete = True
        return b""
