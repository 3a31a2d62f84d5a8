"""What both dialects share: the parsed request, the usage found in a response, body limits.

Everything in ``dialects/`` is pure: bytes in, values out, no I/O. The request lifecycle feeds
the passing upstream bytes to a scanner and reads :class:`Usage` when the response ends.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson


class BadRequest(ValueError):
    """The caller's request cannot be metered; the message says what to fix."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(slots=True)
class ParsedRequest:
    """What the proxy needs to know about a metered request before it runs."""

    model: str
    stream: bool
    #: the caller's output cap (num_predict / max_tokens / ...), None when absent
    max_output_tokens: int | None
    #: a rough size of the input in characters (messages, prompt, input), for estimates
    input_chars: int
    #: the decoded JSON body, kept so edits need no second parse
    body: dict[str, Any]
    #: for /v1 streams: did the caller ask for stream_options.include_usage itself?
    wants_usage: bool = False


@dataclass(slots=True)
class Usage:
    """Usage read from a response as it passed. ``None`` always means unknown, never zero."""

    tokens_input: int | None = None
    tokens_output: int | None = None
    #: compute time the upstream reported itself (Ollama durations, llama.cpp timings), ns
    reported_compute_ns: int | None = None
    #: the same split into prompt evaluation (prefill) and generation (decode), ns
    reported_prompt_ns: int | None = None
    reported_eval_ns: int | None = None
    #: model load (and, on Ollama, queue wait) time the upstream reported, ns
    reported_load_ns: int | None = None
    #: the final object / usage event was seen: the response completed normally
    complete: bool = False
    #: output units seen in a stream (NDJSON lines / SSE content events): a token count proxy
    chunks: int = 0
    #: an error the upstream reported inside a 200 stream
    error: str | None = None
    model_version: str | None = None
    finish_reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Scanner(Protocol):
    """Watches a response body pass. ``feed`` returns the bytes to forward to the client
    (the input itself unless the proxy must hide something it added upstream)."""

    usage: Usage

    def feed(self, chunk: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


def load_json_object(raw: bytes) -> dict[str, Any]:
    """Decode a request body that must be a JSON object, with errors that say what to fix."""
    if not raw.strip():
        raise BadRequest("request body is empty; send a JSON object")
    try:
        text = raw.decode("utf-8")  # JSON on the wire is UTF-8 (RFC 8259); no guessing
    except UnicodeDecodeError as exc:
        raise BadRequest(f"request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequest(
            f"request body is not valid JSON: {exc.msg} at position {exc.pos}"
        ) from None
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None
    except ValueError as exc:  # an integer with thousands of digits (int_max_str_digits)
        raise BadRequest(f"request body has a number too large to read: {exc}") from None
    if not isinstance(obj, dict):
        raise BadRequest(f"request body must be a JSON object, not {type(obj).__name__}")
    return obj


def loads_response(data: bytes) -> Any:
    """Decode JSON the upstream sent, fast (orjson: ~7x the stdlib on big answers, which are
    parsed on the event loop). Raises ValueError like ``json.loads``."""
    return orjson.loads(data)


def dumps_body(body: dict[str, Any]) -> bytes:
    """Re-encode an edited request body. orjson refuses integers beyond 64 bits, which the
    stdlib accepts: fall back so an odd body is forwarded rather than refused here."""
    try:
        return orjson.dumps(body)
    except TypeError:
        return json.dumps(body).encode()


def require_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise BadRequest('"model" is required and must be a non-empty string')
    try:
        model.encode("utf-8")
    except UnicodeEncodeError:  # "\ud800": legal JSON, but no text; it cannot be stored
        raise BadRequest('"model" contains an unpaired UTF-16 surrogate escape') from None
    return model


def optional_bool(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(f'"{key}" must be true or false')
    return value


#: the largest output length the proxy reckons with (a larger cap is passed on unchanged)
MAX_COUNT = 2**31 - 1


def optional_count(container: dict[str, Any], key: str, where: str = "") -> int | None:
    value = container.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f'"{where}{key}" must be an integer')
    # Ollama treats num_predict < 0 as "no limit"; no model writes more than MAX_COUNT tokens,
    # so a larger cap is the same as that one (and keeps estimates within int64)
    return min(value, MAX_COUNT) if value >= 0 else None


def text_size(value: Any, _depth: int = 0) -> int:
    """Characters of text in a prompt-like value (strings, lists, message dicts)."""
    if _depth > 32:
        return 0
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(text_size(v, _depth + 1) for v in value)
    if isinstance(value, dict):
        return sum(text_size(v, _depth + 1) for k, v in value.items() if k != "images")
    return 0


def as_count(value: Any) -> int | None:
    """A non-negative integer from a usage field, or None (absent, null, wrong type)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value
