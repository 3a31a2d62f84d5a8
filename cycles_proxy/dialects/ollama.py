"""Ollama's native dialect (``/api/*``): request parsing, NDJSON/JSON usage scanning, errors.

Pure functions and small state machines; see ``ollama-api.md`` §3-4 and §7.
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

#: endpoint name -> does it stream when "stream" is absent?
STREAM_DEFAULT = {"generate": True, "chat": True, "embed": False, "embeddings": False}

#: bytes of a non-streaming JSON body kept for metering (larger bodies are billed by wall time)
JSON_SCAN_LIMIT = 16 * 1024 * 1024


def parse_request(endpoint: str, raw: bytes) -> ParsedRequest:
    body = load_json_object(raw)
    model = require_model(body)
    default_stream = STREAM_DEFAULT[endpoint]
    # embeddings never stream, whatever the body says
    stream = optional_bool(body, "stream", default_stream) if default_stream else False
    options = body.get("options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest('"options" must be a JSON object')
    max_out = optional_count(options, "num_predict", "options.") if options else None
    if endpoint == "chat":
        messages = body.get("messages", [])
        if not isinstance(messages, list):
            raise BadRequest('"messages" must be a list')
        size = text_size(messages)
    elif endpoint == "generate":
        prompt = body.get("prompt", "")
        if not isinstance(prompt, str):
            raise BadRequest('"prompt" must be a string')
        size = len(prompt) + text_size(body.get("system"))
    elif endpoint == "embed":
        inp = body.get("input")
        if not isinstance(inp, str | list):
            raise BadRequest('"input" is required and must be a string or a list of strings')
        size = text_size(inp)
        max_out = 0
    else:  # legacy embeddings
        size = text_size(body.get("prompt"))
        max_out = 0
    return ParsedRequest(model, stream, max_out, size, body)


def set_output_cap(parsed: ParsedRequest, max_tokens: int) -> None:
    """Cap generation length (used when the budget only affords a shorter answer)."""
    options = parsed.body.get("options")
    if not isinstance(options, dict):  # absent, or "options": null
        options = parsed.body["options"] = {}
    current = parsed.max_output_tokens
    options["num_predict"] = max_tokens if current is None else min(current, max_tokens)


def error_body(message: str, code: str | None = None) -> dict[str, Any]:
    return {"error": message}


def usage_from_final(obj: dict[str, Any], usage: Usage) -> None:
    """Read Ollama's final metrics (all durations in nanoseconds; absent means unknown)."""
    usage.tokens_input = as_count(obj.get("prompt_eval_count"))
    usage.tokens_output = as_count(obj.get("eval_count"))
    prompt_ns = as_count(obj.get("prompt_eval_duration"))
    eval_ns = as_count(obj.get("eval_duration"))
    total_ns = as_count(obj.get("total_duration"))
    load_ns = as_count(obj.get("load_duration"))
    usage.reported_load_ns = load_ns
    usage.reported_prompt_ns, usage.reported_eval_ns = prompt_ns, eval_ns
    if prompt_ns is not None or eval_ns is not None:
        usage.reported_compute_ns = (prompt_ns or 0) + (eval_ns or 0)
    elif total_ns is not None:
        # /api/embed reports only total and load: compute is what is left
        usage.reported_compute_ns = max(0, total_ns - (load_ns or 0))
    reason = obj.get("done_reason")
    usage.finish_reason = reason if isinstance(reason, str) else None
    model = obj.get("model")
    usage.model_version = model if isinstance(model, str) else None


class NdjsonScanner:
    """Watches an ``application/x-ndjson`` stream. Bytes pass unchanged; lines are framed on a
    copy only where a chunk splits one, and only the rare interesting lines are decoded."""

    __slots__ = ("_partial", "usage")

    def __init__(self) -> None:
        self.usage = Usage()
        self._partial = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._partial + chunk if self._partial else chunk
        end = data.rfind(b"\n")
        if end < 0:
            self._partial = data
            return chunk
        self._partial = data[end + 1 :]
        for line in data[:end].split(b"\n"):
            self._line(line)
        return chunk

    def finish(self) -> bytes:
        if self._partial:
            self._line(self._partial)
            self._partial = b""
        return b""

    def _line(self, line: bytes) -> None:
        if not line.strip():
            return
        # fast path: an ordinary token chunk (Go writes compact JSON)
        if b'"done":false' in line and b'"error"' not in line:
            self.usage.chunks += 1
            return
        try:
            obj = loads_response(line)
        except (ValueError, RecursionError):
            return
        if not isinstance(obj, dict):
            return
        if obj.get("error"):
            self.usage.error = str(obj["error"])
            return
        if obj.get("done") is True:
            usage_from_final(obj, self.usage)
            self.usage.complete = True
        else:
            self.usage.chunks += 1


class JsonScanner:
    """Watches a one-object ``application/json`` body (``stream: false``, embeddings)."""

    __slots__ = ("_buf", "_size", "_too_big", "usage")

    def __init__(self) -> None:
        self.usage = Usage()
        self._buf: list[bytes] = []
        self._size = 0
        self._too_big = False

    def feed(self, chunk: bytes) -> bytes:
        if not self._too_big:
            self._size += len(chunk)
            if self._size > JSON_SCAN_LIMIT:
                self._too_big = True
                self._buf.clear()
            else:
                self._buf.append(chunk)
        return chunk

    def finish(self) -> bytes:
        if self._too_big or not self._buf:
            return b""
        try:
            obj = loads_response(b"".join(self._buf))
        except (ValueError, RecursionError):
            return b""
        self._buf.clear()
        if not isinstance(obj, dict):
            return b""
        if obj.get("error"):
            self.usage.error = str(obj["error"])
            return b""
        usage_from_final(obj, self.usage)
        if self.usage.tokens_output is None and ("embedding" in obj or "embeddings" in obj):
            self.usage.tokens_output = 0
        self.usage.complete = True
        return b""
