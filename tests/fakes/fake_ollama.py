"""A fake Ollama server (native ``/api/*`` and OpenAI-compatible ``/v1/*``) for cycles-proxy tests.

Written from ``/work/shared/docs/ollama-api.md`` (the spec); there is no real Ollama on our
machines. Everything is deterministic except timings, and every reported duration is real time
spent (nanoseconds), so billing tests can compare what the proxy charged with what the fake
reported.

Quick use::

    app = make_fake_ollama(token_delay_s=0.01, parallel=1)
    server = await aiohttp_server(app)              # pytest-aiohttp; or serve_fake_ollama()
    fake = app[FAKE_KEY]                            # FakeOllama: records and counters
    ...
    await fake.wait_until(lambda: fake.cancelled_generations == 1)

Output model: a request produces ``N`` tokens taken cyclically from :data:`TOKEN_WORDS`
(``fake_text(N)`` is the full text), where ``N`` is ``options.num_predict`` / ``max_tokens`` /
``max_completion_tokens`` / ``max_output_tokens`` when given (``done_reason``/``finish_reason``
``length``) and ``FakeOptions.default_num_predict`` otherwise (``stop``). Prompt tokens are
``prompt_tokens_for(path, body)``: whitespace-separated words plus
:data:`PROMPT_TEMPLATE_TOKENS` (generation) or :data:`EMBED_INPUT_OVERHEAD_TOKENS` per input
(embeddings).

Timing model (mirrors Ollama's ``checkpointStart``/``checkpointLoaded``): ``load_duration`` is the
time from handler entry until a slot was acquired (``parallel``) and the model loaded
(``load_delay_s`` when the model is cold), so queueing shows up there; ``prompt_eval_duration`` is
``prompt_tokens * prompt_token_delay_s`` and ``eval_duration`` is ``eval_count * token_delay_s``
as measured; ``total_duration`` is handler entry until the final object. ``chunk_delay_s`` and
``slow_first_byte_s`` are wire delays that show up in ``total_duration`` only.

Per-request faults: header ``x-fake-fault`` with comma- or semicolon-separated ``key=value``
items, e.g. ``x-fake-fault: error_after_chunks=2, chunk_delay_s=0.05``. Keys: every field of
:data:`OVERRIDABLE_OPTIONS`; a bare ``truncate`` means ``truncate=true``; a bare ``none`` clears
the app-level fault settings for this request; ``omit_metrics`` takes ``|``-separated names. An
unknown key or bad value gets 400 ``{"error": "bad x-fake-fault header: ..."}``.

Standalone: ``python -m tests.fakes.fake_ollama --port 11435 -o token_delay_s=0.01``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import ipaddress
import itertools
import json
import math
import re
import signal
import socket
import struct
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Final

from aiohttp import web
from multidict import CIMultiDict

__all__ = [
    "BUSY_MESSAGE",
    "DEFAULT_ERROR_MESSAGE",
    "DEFAULT_MODELS",
    "EMBED_INPUT_OVERHEAD_TOKENS",
    "FAKE_KEY",
    "FAULT_HEADER",
    "OVERRIDABLE_OPTIONS",
    "PROMPT_TEMPLATE_TOKENS",
    "TOKEN_WORDS",
    "FakeOllama",
    "FakeOptions",
    "FaultHeaderError",
    "Generation",
    "ModelEntry",
    "RecordedRequest",
    "RunningFake",
    "canonical_model",
    "fake_embedding",
    "fake_text",
    "fake_tokens",
    "host_allowed",
    "make_fake_ollama",
    "origin_allowed",
    "parse_fault_header",
    "prompt_tokens_for",
    "serve_fake_ollama",
]

FAULT_HEADER: Final = "x-fake-fault"
DEFAULT_MODELS: Final[tuple[str, ...]] = ("llama3.2", "qwen2.5:0.5b", "nomic-embed-text")
DEFAULT_EMBEDDING_MODELS: Final[tuple[str, ...]] = ("nomic-embed-text",)
FAKE_VERSION: Final = "0.33.0"
BUSY_MESSAGE: Final = "server busy, please try again.  maximum pending requests exceeded"
DEFAULT_ERROR_MESSAGE: Final = "an error was encountered while running the model: unexpected EOF"
NOT_FOUND_BODY: Final = b"404 page not found"
PROMPT_TEMPLATE_TOKENS: Final = 5
EMBED_INPUT_OVERHEAD_TOKENS: Final = 2
TOKEN_WORDS: Final[tuple[str, ...]] = (
    "The",
    " quick",
    " brown",
    " fox",
    " jumps",
    " over",
    " the",
    " lazy",
    " dog",
    ".",
)
METRIC_FIELDS: Final[tuple[str, ...]] = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)

_JSON_CT: Final = "application/json; charset=utf-8"  # gin's c.JSON
_OPENAI_JSON_CT: Final = "application/json"  # Ollama's OpenAI middleware
_NDJSON_CT: Final = "application/x-ndjson"
_SSE_CT: Final = "text/event-stream"
_DIGEST_RE: Final = re.compile(r"sha256[:-][0-9a-fA-F]{64}")
_DURATION_RE: Final = re.compile(r"[+-]?(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)?")
_PRIVATE_NETS: Final = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)
_DEFAULT_ORIGINS: Final[tuple[str, ...]] = (
    *(
        f"{scheme}://{host}{port}"
        for host in ("localhost", "127.0.0.1", "0.0.0.0")
        for scheme in ("http", "https")
        for port in ("", ":*")
    ),
    "app://*",
    "file://*",
    "tauri://*",
    "vscode-webview://*",
    "vscode-file://*",
)
_EXTENSION_ORIGINS: Final = (
    "chrome-extension://",
    "safari-extension://",
    "moz-extension://",
    "ms-browser-extension://",
)
# Paths whose handlers apply ``slow_first_byte_s`` themselves (just before their first byte).
_ENGINE_PATHS: Final = frozenset(
    {
        "/api/generate",
        "/api/chat",
        "/api/embed",
        "/api/embeddings",
        "/api/pull",
        "/api/push",
        "/api/create",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
    }
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# --------------------------------------------------------------------------------------------
# Deterministic content
# --------------------------------------------------------------------------------------------


def fake_tokens(n: int) -> list[str]:
    """The ``n`` tokens every generation produces (one streamed chunk each)."""
    return [TOKEN_WORDS[i % len(TOKEN_WORDS)] for i in range(n)]


def fake_text(n: int) -> str:
    """The full text of an ``n``-token generation."""
    return "".join(fake_tokens(n))


def count_words(text: str) -> int:
    return len(text.split())


def _text_of(content: Any) -> str:
    """Text of a message ``content``: a string or a list of parts with ``text``."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def _messages_words(messages: Any) -> int:
    if isinstance(messages, str):
        return count_words(messages)
    if not isinstance(messages, list):
        return 0
    return sum(count_words(_text_of(m.get("content"))) for m in messages if isinstance(m, dict))


def _string_list(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def _native_embed_inputs(value: Any) -> list[str] | None:
    """``/api/embed`` inputs: an empty string means no input (a load); None if malformed."""
    if value is None or value == "":
        return []
    return _string_list(value)


def prompt_tokens_for(path: str, body: Mapping[str, Any]) -> int:
    """The ``prompt_eval_count`` the fake reports for a request body sent to ``path``."""
    if path in ("/api/generate", "/v1/completions"):
        words = sum(
            count_words(v)
            for k in ("system", "prompt", "suffix")
            if isinstance(v := body.get(k), str)
        )
        context = body.get("context")
        return PROMPT_TEMPLATE_TOKENS + words + (len(context) if isinstance(context, list) else 0)
    if path in ("/api/chat", "/v1/chat/completions"):
        return PROMPT_TEMPLATE_TOKENS + _messages_words(body.get("messages"))
    if path == "/v1/responses":
        instructions = body.get("instructions")
        words = count_words(instructions) if isinstance(instructions, str) else 0
        return PROMPT_TEMPLATE_TOKENS + words + _messages_words(body.get("input"))
    if path in ("/api/embed", "/v1/embeddings"):
        raw = body.get("input")
        inputs = (_native_embed_inputs(raw) if path == "/api/embed" else _string_list(raw)) or []
        return sum(count_words(s) + EMBED_INPUT_OVERHEAD_TOKENS for s in inputs)
    if path == "/api/embeddings":
        prompt = body.get("prompt")
        if isinstance(prompt, str) and prompt:
            return count_words(prompt) + EMBED_INPUT_OVERHEAD_TOKENS
    return 0


def fake_embedding(text: str, dim: int) -> list[float]:
    """A deterministic, L2-normalised embedding of ``text``."""
    raw = hashlib.shake_256(text.encode()).digest(2 * dim)
    values = [int.from_bytes(raw[2 * i : 2 * i + 2], "little") / 32767.5 - 1.0 for i in range(dim)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [round(v / norm, 6) for v in values]


def _floats_base64(values: Sequence[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()


def canonical_model(name: str) -> str:
    """``llama3.2`` -> ``llama3.2:latest`` (case-insensitive, like Ollama's name matching)."""
    name = name.strip().lower()
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def _rfc3339(epoch_ns: int | None = None) -> str:
    """Go's ``time.RFC3339Nano`` in UTC."""
    secs, nanos = divmod(time.time_ns() if epoch_ns is None else epoch_ns, 1_000_000_000)
    frac = f".{nanos:09d}".rstrip("0").rstrip(".")
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + frac + "Z"


def _keep_alive_is_zero(value: Any) -> bool:
    if value is None or isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return value == 0
    if isinstance(value, str):
        match = _DURATION_RE.fullmatch(value.strip())
        return match is not None and float(match.group(1)) == 0
    return False


def _token_budget(limit: Any, default: int) -> tuple[int, bool]:
    """(tokens to generate, whether the caller's limit cut the output -> ``length``)."""
    if isinstance(limit, bool) or not isinstance(limit, int | float) or limit < 0:
        return default, False  # absent, -1 (infinite) or -2 (fill context): natural stop
    return int(limit), True


# --------------------------------------------------------------------------------------------
# Host / Origin checks (ollama server/routes.go allowedHostsMiddleware + gin-contrib/cors)
# --------------------------------------------------------------------------------------------


def _hostname_of(host: str) -> str:
    host = host.strip()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end != -1 else host[1:]
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


def host_allowed(host_header: str | None) -> bool:
    """Whether Ollama (listening on loopback) accepts this ``Host`` header."""
    hostname = _hostname_of(host_header or "").lower()
    if hostname in ("", "localhost"):
        return True
    try:
        ip = ipaddress.ip_address(hostname)
    except ValueError:
        ip = None
    if ip is not None:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return (
            ip.is_loopback
            or ip.is_unspecified
            or any(ip.version == net.version and ip in net for net in _PRIVATE_NETS)
        )
    if hostname == socket.gethostname().lower():
        return True
    return hostname.endswith((".localhost", ".local", ".internal"))


def origin_allowed(origin: str, host: str = "", extra: Sequence[str] = ()) -> bool:
    """Whether Ollama's CORS config accepts ``Origin`` (``extra`` plays ``OLLAMA_ORIGINS``)."""
    if origin in (f"http://{host}", f"https://{host}") or origin.startswith(_EXTENSION_ORIGINS):
        return True
    for pattern in (*extra, *_DEFAULT_ORIGINS):
        if pattern == "*":
            return True
        if "*" in pattern:
            prefix, _, suffix = pattern.partition("*")
            if (
                origin.startswith(prefix)
                and origin.endswith(suffix)
                and len(origin) >= len(prefix) + len(suffix)
            ):
                return True
        elif origin == pattern:
            return True
    return False


# --------------------------------------------------------------------------------------------
# Options and the fault header
# --------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class FakeOptions:
    """Behaviour of one fake. Mutable: tests may change ``app[FAKE_KEY].options`` between requests
    (``parallel`` is read once, at construction)."""

    # models and content
    models: Sequence[str] = DEFAULT_MODELS
    embedding_models: Sequence[str] = DEFAULT_EMBEDDING_MODELS  # refuse generate/chat
    version: str = FAKE_VERSION
    default_num_predict: int = 8
    embedding_dim: int = 16
    # timing (seconds); reported durations measure the real sleeps
    token_delay_s: float = 0.0  # per generated token -> eval_duration
    prompt_token_delay_s: float = 0.0  # per prompt token -> prompt_eval_duration
    load_delay_s: float = 0.0  # cold model load -> load_duration
    chunk_delay_s: float = 0.0  # pause after each streamed chunk; not in eval_duration
    slow_first_byte_s: float = 0.0  # extra pause before the response starts
    # scheduling (OLLAMA_NUM_PARALLEL / OLLAMA_MAX_QUEUE); None = unlimited
    parallel: int | None = None
    max_queue: int | None = None
    # security middleware
    check_host: bool = True
    check_origin: bool = True
    allowed_origins: Sequence[str] = ()  # like OLLAMA_ORIGINS, '*' wildcards allowed
    # faults (see module docstring); *_after_chunks count content chunks (tokens / progress lines)
    status: int | None = None  # answer every request with this status before any byte
    error_after_chunks: int | None = None
    stall_after_chunks: int | None = None
    reset_after_chunks: int | None = None  # TCP RST (client: ECONNRESET)
    close_after_chunks: int | None = None  # TCP FIN mid-response (client: disconnected)
    truncate_after_chunks: int | None = None
    truncate: bool = False  # = truncate after all content chunks (no done object)
    error_message: str = DEFAULT_ERROR_MESSAGE
    omit_metrics: Sequence[str] = ()  # metric fields to leave out of final objects
    # misc
    pull_progress_chunks: int = 3
    record_limit: int | None = None  # keep only the last N requests/generations
    disconnect_poll_s: float = 0.005


OVERRIDABLE_OPTIONS: Final[dict[str, type[Any]]] = {
    "status": int,
    "error_after_chunks": int,
    "stall_after_chunks": int,
    "reset_after_chunks": int,
    "close_after_chunks": int,
    "truncate_after_chunks": int,
    "truncate": bool,
    "slow_first_byte_s": float,
    "chunk_delay_s": float,
    "token_delay_s": float,
    "prompt_token_delay_s": float,
    "load_delay_s": float,
    "default_num_predict": int,
    "error_message": str,
    "omit_metrics": tuple,
}
_FAULT_DEFAULTS: Final[dict[str, Any]] = {
    "status": None,
    "error_after_chunks": None,
    "stall_after_chunks": None,
    "reset_after_chunks": None,
    "close_after_chunks": None,
    "truncate_after_chunks": None,
    "truncate": False,
    "slow_first_byte_s": 0.0,
    "chunk_delay_s": 0.0,
}
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


class FaultHeaderError(ValueError):
    """A malformed ``x-fake-fault`` header."""


def parse_fault_header(value: str) -> dict[str, Any]:
    """Parse ``x-fake-fault`` into :class:`FakeOptions` overrides."""
    overrides: dict[str, Any] = {}
    clear = False
    for item in re.split(r"[;,]", value):
        item = item.strip()
        if not item:
            continue
        key, sep, raw = item.partition("=")
        key, raw = key.strip().lower().replace("-", "_"), raw.strip()
        if key == "none" and not sep:
            clear = True
            continue
        kind = OVERRIDABLE_OPTIONS.get(key)
        if kind is None:
            raise FaultHeaderError(f"unknown key {key!r}")
        try:
            if kind is bool:
                if sep and raw.lower() not in _TRUE | _FALSE:
                    raise ValueError(raw)
                overrides[key] = not sep or raw.lower() in _TRUE
            elif not sep:
                raise ValueError("missing '='")
            elif kind is tuple:
                overrides[key] = tuple(x.strip() for x in raw.split("|") if x.strip())
            else:
                overrides[key] = kind(raw)
        except ValueError as exc:
            raise FaultHeaderError(f"bad value for {key!r}: {exc}") from None
    return {**_FAULT_DEFAULTS, **overrides} if clear else overrides


def _pick_fault(opts: FakeOptions, n_chunks: int) -> tuple[str, int] | None:
    """The first stream fault to fire: (kind, number of content chunks sent before it)."""
    best: tuple[str, int] | None = None
    for kind, value in (
        ("error", opts.error_after_chunks),
        ("reset", opts.reset_after_chunks),
        ("close", opts.close_after_chunks),
        ("stall", opts.stall_after_chunks),
        ("truncate", opts.truncate_after_chunks),
    ):
        if value is not None:
            at = max(0, min(int(value), n_chunks))
            if best is None or at < best[1]:
                best = (kind, at)
    if opts.truncate and (best is None or n_chunks < best[1]):
        best = ("truncate", n_chunks)
    return best


def _status_message(status: int) -> str:
    if status == 503:
        return BUSY_MESSAGE
    if status == 499:
        return "request canceled"
    try:
        return HTTPStatus(status).phrase.lower()
    except ValueError:
        return f"status {status}"


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Generation:
    """One metered request (generate/chat/embed/OpenAI) as the fake executed it.

    ``state``: ``queued`` -> ``running`` (-> ``stalled``) -> one of ``done``, ``cancelled``
    (client went away), ``error`` / ``reset`` / ``close`` / ``truncated`` (injected),
    ``rejected`` (queue full). ``reported`` holds the native metric fields exactly as sent
    (OpenAI ``usage`` is derived from them). ``*_ns`` are the real times spent; ``compute_ns``
    is the GPU-time figure (``prompt_eval_duration + eval_duration``)."""

    request_index: int
    path: str
    kind: str  # generate | chat | embed | load
    model: str
    stream: bool
    prompt_tokens: int
    planned_tokens: int
    state: str = "queued"
    fault: str | None = None  # error | reset | close | stall | truncate
    tokens_generated: int = 0
    chunks_sent: int = 0
    done_reason: str | None = None
    reported: dict[str, int] = field(default_factory=dict)
    queue_wait_ns: int = 0
    load_ns: int = 0
    prompt_eval_ns: int = 0
    eval_ns: int = 0
    started_at: float = field(default_factory=time.monotonic)
    ended_at: float | None = None

    @property
    def cancelled(self) -> bool:
        return self.state == "cancelled"

    @property
    def active(self) -> bool:
        return self.ended_at is None

    @property
    def compute_ns(self) -> int:
        return self.prompt_eval_ns + self.eval_ns


@dataclass(eq=False)
class RecordedRequest:
    """One HTTP request as received (``body`` is empty for streamed blob uploads; their size is
    in ``body_size``). ``status`` is what was sent (499 = the client was gone)."""

    index: int
    method: str
    path: str
    query_string: str
    headers: CIMultiDict[str]
    body: bytes = b""
    body_size: int = 0
    body_json: Any = None
    received_at: float = field(default_factory=time.monotonic)
    status: int | None = None
    generation: Generation | None = None

    @property
    def fault_header(self) -> str | None:
        return self.headers.get(FAULT_HEADER)


@dataclass(eq=False)
class ModelEntry:
    name: str  # canonical, e.g. "llama3.2:latest"
    embedding: bool = False
    modified_ns: int = field(default_factory=time.time_ns)

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.name.encode()).hexdigest()

    @property
    def size(self) -> int:
        return 100_000_000 + int(self.digest[:8], 16) % 4_000_000_000

    @property
    def family(self) -> str:
        match = re.match(r"[a-z]+", self.name)
        return match.group(0) if match else "llama"

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": "137M" if self.embedding else "3.2B",
            "quantization_level": "F16" if self.embedding else "Q4_K_M",
        }

    def tags_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.name,
            "modified_at": _rfc3339(self.modified_ns),
            "size": self.size,
            "digest": self.digest,
            "details": self.details(),
        }


# --------------------------------------------------------------------------------------------
# Wire helpers and dialects
# --------------------------------------------------------------------------------------------


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _line(obj: Any) -> bytes:
    return _dumps(obj) + b"\n"


def _sse(obj: Any) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


def _bytes_response(body: bytes, content_type: str, status: int = 200) -> web.Response:
    return web.Response(status=status, body=body, headers={"Content-Type": content_type})


def _json_response(obj: Any, status: int = 200) -> web.Response:
    return _bytes_response(_dumps(obj), _JSON_CT, status)


def _openai_error_type(status: int) -> str:
    return {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")


def _openai_error_obj(status: int, message: str) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": _openai_error_type(status),
            "param": None,
            "code": None,
        }
    }


def error_response(openai: bool, status: int, message: str) -> web.Response:
    """Ollama's error body: ``{"error": msg}`` natively, the OpenAI shape on ``/v1/*``."""
    if openai:
        return _bytes_response(
            _dumps(_openai_error_obj(status, message)) + b"\n", _OPENAI_JSON_CT, status
        )
    return _json_response({"error": message}, status)


@dataclass
class _Result:
    model: str
    text: str
    done_reason: str
    metrics: dict[str, int]
    context: list[int]

    @property
    def prompt_tokens(self) -> int:
        return self.metrics.get("prompt_eval_count", 0)

    @property
    def eval_count(self) -> int:
        return self.metrics.get("eval_count", 0)


def _usage(r: _Result) -> dict[str, int]:
    return {
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.eval_count,
        "total_tokens": r.prompt_tokens + r.eval_count,
    }


class _Dialect:
    """How one route frames a generation on the wire."""

    openai = False
    stream_content_type = _NDJSON_CT

    def opening(self) -> bytes:
        return b""

    def token(self, text: str) -> bytes:
        raise NotImplementedError

    def closing(self, r: _Result) -> bytes:
        raise NotImplementedError

    def error_frame(self, message: str) -> bytes:
        return _line({"error": message})

    def whole(self, r: _Result) -> tuple[bytes, str]:
        raise NotImplementedError

    def load_body(self, reason: str) -> dict[str, Any]:
        raise NotImplementedError


class _NativeGenerate(_Dialect):
    def __init__(self, model: str) -> None:
        self.model = model

    def token(self, text: str) -> bytes:
        return _line(
            {"model": self.model, "created_at": _rfc3339(), "response": text, "done": False}
        )

    def _final(self, r: _Result, text: str) -> dict[str, Any]:
        return {
            "model": self.model,
            "created_at": _rfc3339(),
            "response": text,
            "done": True,
            "done_reason": r.done_reason,
            "context": r.context,
            **r.metrics,
        }

    def closing(self, r: _Result) -> bytes:
        return _line(self._final(r, ""))

    def whole(self, r: _Result) -> tuple[bytes, str]:
        return _dumps(self._final(r, r.text)), _JSON_CT

    def load_body(self, reason: str) -> dict[str, Any]:
        return {
            "model": self.model,
            "created_at": _rfc3339(),
            "response": "",
            "done": True,
            "done_reason": reason,
        }


class _NativeChat(_Dialect):
    def __init__(self, model: str) -> None:
        self.model = model

    def token(self, text: str) -> bytes:
        return _line(
            {
                "model": self.model,
                "created_at": _rfc3339(),
                "message": {"role": "assistant", "content": text},
                "done": False,
            }
        )

    def _final(self, r: _Result, text: str) -> dict[str, Any]:
        return {
            "model": self.model,
            "created_at": _rfc3339(),
            "message": {"role": "assistant", "content": text},
            "done_reason": r.done_reason,
            "done": True,
            **r.metrics,
        }

    def closing(self, r: _Result) -> bytes:
        return _line(self._final(r, ""))

    def whole(self, r: _Result) -> tuple[bytes, str]:
        return _dumps(self._final(r, r.text)), _JSON_CT

    def load_body(self, reason: str) -> dict[str, Any]:
        return {
            "model": self.model,
            "created_at": _rfc3339(),
            "message": {"role": "assistant", "content": ""},
            "done_reason": reason,
            "done": True,
        }


class _OpenAIChat(_Dialect):
    openai = True
    stream_content_type = _SSE_CT

    def __init__(self, model: str, ident: str, include_usage: bool) -> None:
        self.model, self.ident, self.include_usage = model, ident, include_usage
        self.created = int(time.time())

    def _chunk(self, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {
            "id": self.ident,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_ollama",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    def opening(self) -> bytes:
        return _sse(self._chunk({"role": "assistant", "content": ""}, None))

    def token(self, text: str) -> bytes:
        return _sse(self._chunk({"content": text}, None))

    def closing(self, r: _Result) -> bytes:
        out = _sse(self._chunk({}, r.done_reason))
        if self.include_usage:
            out += _sse({**self._chunk({}, None), "choices": [], "usage": _usage(r)})
        return out + b"data: [DONE]\n\n"

    def error_frame(self, message: str) -> bytes:
        return _sse(_openai_error_obj(500, message))

    def whole(self, r: _Result) -> tuple[bytes, str]:
        body = {
            "id": self.ident,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_ollama",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": r.text},
                    "finish_reason": r.done_reason,
                }
            ],
            "usage": _usage(r),
        }
        return _dumps(body) + b"\n", _OPENAI_JSON_CT


class _OpenAICompletion(_Dialect):
    openai = True
    stream_content_type = _SSE_CT

    def __init__(self, model: str, ident: str, include_usage: bool) -> None:
        self.model, self.ident, self.include_usage = model, ident, include_usage
        self.created = int(time.time())

    def _chunk(self, text: str, finish: str | None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.ident,
            "object": "text_completion",
            "created": self.created,
            "choices": [{"text": text, "index": 0, "finish_reason": finish}],
            "model": self.model,
            "system_fingerprint": "fp_ollama",
        }
        if self.include_usage:  # Ollama's quirk: zero-filled usage on every chunk
            chunk["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        return chunk

    def token(self, text: str) -> bytes:
        return _sse(self._chunk(text, None))

    def closing(self, r: _Result) -> bytes:
        out = _sse(self._chunk("", r.done_reason))
        if self.include_usage:
            out += _sse({**self._chunk("", None), "choices": [], "usage": _usage(r)})
        return out + b"data: [DONE]\n\n"

    def error_frame(self, message: str) -> bytes:
        return _sse(_openai_error_obj(500, message))

    def whole(self, r: _Result) -> tuple[bytes, str]:
        body = {
            "id": self.ident,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_ollama",
            "choices": [{"text": r.text, "index": 0, "finish_reason": r.done_reason}],
            "usage": _usage(r),
        }
        return _dumps(body) + b"\n", _OPENAI_JSON_CT


class _OpenAIResponses(_Dialect):
    openai = True
    stream_content_type = _SSE_CT

    def __init__(self, model: str, resp_id: str, item_id: str) -> None:
        self.model, self.resp_id, self.item_id = model, resp_id, item_id
        self.created = int(time.time())
        self.seq = 0
        self.text = ""

    def _event(self, name: str, data: dict[str, Any]) -> bytes:
        payload = {"type": name, "sequence_number": self.seq, **data}
        self.seq += 1
        return f"event: {name}\n".encode() + _sse(payload)

    def _response(self, status: str, output: list[Any], usage: Any = None) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "id": self.resp_id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.model,
            "output": output,
        }
        if usage is not None:
            obj["usage"] = usage
        return obj

    def _message(self, status: str, text: str | None) -> dict[str, Any]:
        content = [] if text is None else [{"type": "output_text", "text": text, "annotations": []}]
        return {
            "id": self.item_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        }

    @staticmethod
    def _usage(r: _Result) -> dict[str, int]:
        return {
            "input_tokens": r.prompt_tokens,
            "output_tokens": r.eval_count,
            "total_tokens": r.prompt_tokens + r.eval_count,
        }

    def opening(self) -> bytes:
        part = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        return (
            self._event("response.created", {"response": self._response("in_progress", [])})
            + self._event("response.in_progress", {"response": self._response("in_progress", [])})
            + self._event(
                "response.output_item.added",
                {"output_index": 0, "item": self._message("in_progress", None)},
            )
            + self._event(
                "response.content_part.added",
                {**part, "part": {"type": "output_text", "text": "", "annotations": []}},
            )
        )

    def token(self, text: str) -> bytes:
        self.text += text
        return self._event(
            "response.output_text.delta",
            {"item_id": self.item_id, "output_index": 0, "content_index": 0, "delta": text},
        )

    def closing(self, r: _Result) -> bytes:
        part = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        done = self._message("completed", self.text)
        return (
            self._event("response.output_text.done", {**part, "text": self.text})
            + self._event(
                "response.content_part.done",
                {**part, "part": {"type": "output_text", "text": self.text, "annotations": []}},
            )
            + self._event("response.output_item.done", {"output_index": 0, "item": done})
            + self._event(
                "response.completed",
                {"response": self._response("completed", [done], self._usage(r))},
            )
        )

    def error_frame(self, message: str) -> bytes:
        return self._event("error", {"code": None, "message": message, "param": None})

    def whole(self, r: _Result) -> tuple[bytes, str]:
        body = self._response("completed", [self._message("completed", r.text)], self._usage(r))
        body["completed_at"] = int(time.time())
        return _dumps(body) + b"\n", _OPENAI_JSON_CT


class _Status(_Dialect):
    """NDJSON ``{"status": ...}`` progress of pull/push/create."""


# --------------------------------------------------------------------------------------------
# Per-request machinery
# --------------------------------------------------------------------------------------------


class _ClientGone(Exception):
    """The client closed the connection (a write failed)."""


class _QueueFull(Exception):
    """More than ``max_queue`` requests are waiting for a slot."""


@dataclass
class _Job:
    kind: str  # generate | chat | embed | load
    model: str
    stream: bool
    prompt_tokens: int
    n_tokens: int = 0
    length_limited: bool = False
    keep_alive_zero: bool = False


_REC_KEY: Final = web.RequestKey("fake_ollama.record", RecordedRequest)
_OPTS_KEY: Final = web.RequestKey("fake_ollama.options", FakeOptions)


def _asks_for_usage(body: dict[str, Any]) -> bool:
    """``stream_options.include_usage`` is true (OpenAI streams then end with a usage chunk)."""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


class _Call:
    """State of one request being handled: its response, timing origin and disconnect watchdog."""

    def __init__(self, fake: FakeOllama, request: web.Request) -> None:
        self.fake = fake
        self.request = request
        self.rec: RecordedRequest = request[_REC_KEY]
        self.opts: FakeOptions = request[_OPTS_KEY]
        self.openai = request.path.startswith("/v1/")
        self.t0 = time.perf_counter_ns()  # Ollama's checkpointStart
        self.resp: web.StreamResponse | None = None
        self.watchdog_fired = False
        self._task = asyncio.current_task()
        self._watchdog: asyncio.Task[None] | None = None

    def error(self, status: int, message: str) -> web.Response:
        return error_response(self.openai, status, message)

    # The watchdog cancels the handler as soon as the client's transport closes, so generation
    # stops even when the server runs without handler_cancellation and nothing is being written
    # (queued, stalled, or between slow tokens).
    def start_watchdog(self) -> None:
        if self._task is not None and self._watchdog is None:
            self._watchdog = asyncio.create_task(self._watch())

    def stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    async def _watch(self) -> None:
        poll = max(self.opts.disconnect_poll_s, 0.001)
        while not self.watchdog_fired:
            await asyncio.sleep(poll)
            transport = self.request.transport
            if transport is None or transport.is_closing() or self.fake.closing:
                self.watchdog_fired = True
                if self._task is not None:
                    self._task.cancel()

    async def pause(self, seconds: float) -> int:
        """Sleep and return the nanoseconds that really passed."""
        start = time.perf_counter_ns()
        await asyncio.sleep(max(seconds, 0.0))
        return time.perf_counter_ns() - start

    async def open_stream(self, content_type: str) -> None:
        if self.resp is not None:
            return
        if self.opts.slow_first_byte_s > 0:
            await asyncio.sleep(self.opts.slow_first_byte_s)
        resp = web.StreamResponse(status=200, headers={"Content-Type": content_type})
        self.resp = resp
        try:
            await resp.prepare(self.request)
        except ConnectionError as exc:
            raise _ClientGone from exc
        self.rec.status = 200

    async def write(self, data: bytes) -> None:
        assert self.resp is not None
        try:
            await self.resp.write(data)
        except ConnectionError as exc:
            raise _ClientGone from exc

    async def finish(self) -> web.StreamResponse:
        assert self.resp is not None
        try:
            await self.resp.write_eof()
        except ConnectionError as exc:
            raise _ClientGone from exc
        return self.resp

    def drop_connection(self, *, rst: bool) -> None:
        """Close the TCP connection now: with a RST (``rst``) or a FIN after what was sent."""
        transport = self.request.transport
        if transport is None:
            return
        if not rst:
            transport.close()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()


# --------------------------------------------------------------------------------------------
# The fake
# --------------------------------------------------------------------------------------------


class FakeOllama:
    """State of one fake server: options, request records, generation counters, models."""

    def __init__(self, options: FakeOptions | None = None) -> None:
        self.options = options if options is not None else FakeOptions()
        limit = self.options.record_limit
        self.requests: deque[RecordedRequest] = deque(maxlen=limit)
        self.generations: deque[Generation] = deque(maxlen=limit)
        self.request_count = 0
        self.started_generations = 0
        self.completed_generations = 0
        self.cancelled_generations = 0
        self.failed_generations = 0  # injected error / reset / close / truncate
        self.rejected_generations = 0  # queue full
        self.active_generations = 0  # queued or running
        self.queued_generations = 0
        self.running_generations = 0
        self.peak_running_generations = 0
        self.models: dict[str, ModelEntry] = {}
        for name in self.options.models:
            self.add_model(name)
        self.loaded_models: dict[str, float] = {}  # canonical name -> time.time() loaded
        self.blobs: dict[str, int] = {}  # "sha256:<hex>" -> size
        self.blob_bytes_received = 0
        self.closing = False
        parallel = self.options.parallel
        self._slots = asyncio.Semaphore(parallel) if parallel else None
        self._load_locks: dict[str, asyncio.Lock] = {}
        self._ids = itertools.count(1)

    # ---- public helpers -------------------------------------------------------------------

    def add_model(self, name: str, *, embedding: bool | None = None) -> ModelEntry:
        key = canonical_model(name)
        if embedding is None:
            embedding = key in {canonical_model(m) for m in self.options.embedding_models}
        entry = ModelEntry(name=key, embedding=embedding)
        self.models[key] = entry
        return entry

    def find_model(self, name: str) -> ModelEntry | None:
        return self.models.get(canonical_model(name))

    def requests_to(self, path: str, method: str | None = None) -> list[RecordedRequest]:
        return [
            r for r in self.requests if r.path == path and (method is None or r.method == method)
        ]

    def last_request(self, path: str | None = None) -> RecordedRequest:
        matching = [r for r in self.requests if path is None or r.path == path]
        if not matching:
            raise LookupError(f"no request recorded for {path or 'any path'}")
        return matching[-1]

    @property
    def last_generation(self) -> Generation:
        if not self.generations:
            raise LookupError("no generation recorded")
        return self.generations[-1]

    def reset(self) -> None:
        """Forget recorded requests/generations and zero the finished-generation counters."""
        self.requests.clear()
        self.generations.clear()
        self.started_generations = self.completed_generations = 0
        self.cancelled_generations = self.failed_generations = self.rejected_generations = 0
        self.peak_running_generations = self.running_generations

    async def wait_until(
        self,
        predicate: Callable[[], bool],
        timeout_s: float = 2.0,
        interval_s: float = 0.005,
    ) -> None:
        """Poll ``predicate`` until true; TimeoutError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() >= deadline:
                raise TimeoutError(f"condition not met within {timeout_s}s")
            await asyncio.sleep(interval_s)

    # ---- generation bookkeeping -----------------------------------------------------------

    def _begin(self, call: _Call, job: _Job) -> Generation:
        gen = Generation(
            request_index=call.rec.index,
            path=call.request.path,
            kind=job.kind,
            model=job.model,
            stream=job.stream,
            prompt_tokens=job.prompt_tokens,
            planned_tokens=job.n_tokens,
        )
        call.rec.generation = gen
        self.generations.append(gen)
        self.started_generations += 1
        self.active_generations += 1
        return gen

    def _end(self, gen: Generation | None, state: str) -> None:
        if gen is None or gen.ended_at is not None:
            return
        gen.state = state
        gen.ended_at = time.monotonic()
        self.active_generations -= 1
        if state == "done":
            self.completed_generations += 1
        elif state == "cancelled":
            self.cancelled_generations += 1
        elif state == "rejected":
            self.rejected_generations += 1
        else:
            self.failed_generations += 1

    @contextlib.asynccontextmanager
    async def _slot(self, call: _Call, gen: Generation) -> AsyncIterator[None]:
        """A generation slot (OLLAMA_NUM_PARALLEL); the wait is part of load_duration."""
        start = time.perf_counter_ns()
        if self._slots is not None:
            max_queue = call.opts.max_queue
            if (
                max_queue is not None
                and self._slots.locked()
                and self.queued_generations >= max_queue
            ):
                raise _QueueFull
            self.queued_generations += 1
            try:
                await self._slots.acquire()
            finally:
                self.queued_generations -= 1
        gen.queue_wait_ns = time.perf_counter_ns() - start
        gen.state = "running"
        self.running_generations += 1
        self.peak_running_generations = max(self.peak_running_generations, self.running_generations)
        try:
            yield
        finally:
            self.running_generations -= 1
            if self._slots is not None:
                self._slots.release()

    async def _ensure_loaded(self, call: _Call, model: str, gen: Generation) -> None:
        key = canonical_model(model)
        if key not in self.loaded_models:
            async with self._load_locks.setdefault(key, asyncio.Lock()):
                if key not in self.loaded_models:
                    gen.load_ns = await call.pause(call.opts.load_delay_s)
                    self.loaded_models[key] = time.time()

    async def _guarded(
        self, call: _Call, gen: Generation | None, work: Callable[[], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Run ``work`` and turn a vanished client into a recorded cancellation."""
        call.start_watchdog()
        try:
            return await work()
        except _QueueFull:
            self._end(gen, "rejected")
            return call.error(503, BUSY_MESSAGE)
        except (_ClientGone, asyncio.CancelledError) as exc:
            self._end(gen, "cancelled")
            if call.resp is None:
                call.rec.status = 499  # nginx's "client closed request": nothing was sent
            task = asyncio.current_task()
            if isinstance(exc, asyncio.CancelledError) and not call.watchdog_fired:
                raise  # aiohttp's handler_cancellation: let it unwind
            if call.watchdog_fired and task is not None and task.uncancel() > 0:
                raise
            return call.resp or web.Response(status=499)  # never reaches the client
        finally:
            call.stop_watchdog()
            self._end(gen, "error")  # no-op unless work() raised something unexpected

    async def _inject(
        self,
        call: _Call,
        gen: Generation | None,
        dialect: _Dialect,
        kind: str,
        stream: bool,
        whole: Callable[[], tuple[bytes, str]],
    ) -> web.StreamResponse:
        """Fire a stream fault (``stream``) or its non-streaming equivalent."""
        if gen is not None:
            gen.fault = kind
        if kind == "stall":  # hold the connection open, send nothing more
            if gen is not None:
                gen.state = "stalled"
            await asyncio.Event().wait()  # ends when the watchdog cancels us
        if kind in ("reset", "close"):
            await asyncio.sleep(0.02)  # let the peer read what was already sent
            call.stop_watchdog()
            call.drop_connection(rst=kind == "reset")
            call.rec.status = call.rec.status or 0  # 0: no response at all
            self._end(gen, kind)
            return call.resp or web.Response(status=499)
        if kind == "error":
            if not stream:
                self._end(gen, "error")
                return call.error(500, call.opts.error_message)
            await self._ensure_open(call, dialect)
            await call.write(dialect.error_frame(call.opts.error_message))
            resp = await call.finish()
            self._end(gen, "error")
            return resp
        # truncate: a clean end of a stream without its done object / half a JSON body
        if stream:
            await self._ensure_open(call, dialect)
            resp = await call.finish()
            self._end(gen, "truncated")
            return resp
        body, content_type = whole()
        resp = web.StreamResponse(
            status=200, headers={"Content-Type": content_type, "Content-Length": str(len(body))}
        )
        call.resp = resp
        await resp.prepare(call.request)
        call.rec.status = 200
        await call.write(body[: len(body) // 2])
        await asyncio.sleep(0.02)
        call.stop_watchdog()
        call.drop_connection(rst=False)
        self._end(gen, "truncated")
        return resp

    @staticmethod
    async def _ensure_open(call: _Call, dialect: _Dialect) -> None:
        if call.resp is None:
            await call.open_stream(dialect.stream_content_type)
            opening = dialect.opening()
            if opening:
                await call.write(opening)

    # ---- the generation engine ------------------------------------------------------------

    async def _run_generation(
        self, call: _Call, job: _Job, dialect: _Dialect
    ) -> web.StreamResponse:
        gen = self._begin(call, job)
        return await self._guarded(call, gen, lambda: self._generate(call, gen, job, dialect))

    async def _generate(
        self, call: _Call, gen: Generation, job: _Job, dialect: _Dialect
    ) -> web.StreamResponse:
        opts = call.opts
        async with self._slot(call, gen):
            await self._ensure_loaded(call, job.model, gen)
            load_ns = time.perf_counter_ns() - call.t0  # Ollama: checkpointLoaded - start
            if job.kind == "load":
                gen.done_reason = "load"
                self._end(gen, "done")
                return _json_response(dialect.load_body("load"))
            if job.prompt_tokens and opts.prompt_token_delay_s > 0:
                gen.prompt_eval_ns = await call.pause(job.prompt_tokens * opts.prompt_token_delay_s)
            else:
                gen.prompt_eval_ns = await call.pause(0)
            fault = _pick_fault(opts, job.n_tokens)
            pieces: list[str] = []

            def result() -> _Result:
                return self._result(call, gen, job, load_ns, "".join(pieces))

            for i in range(job.n_tokens + 1):
                if fault is not None and i == fault[1]:
                    return await self._inject(
                        call, gen, dialect, fault[0], job.stream, _whole(dialect, result)
                    )
                if i == job.n_tokens:
                    break
                gen.eval_ns += await call.pause(opts.token_delay_s)
                piece = TOKEN_WORDS[i % len(TOKEN_WORDS)]
                pieces.append(piece)
                gen.tokens_generated = i + 1
                if job.stream:
                    await self._ensure_open(call, dialect)
                    await call.write(dialect.token(piece))
                    gen.chunks_sent += 1
                    if opts.chunk_delay_s > 0:
                        await asyncio.sleep(opts.chunk_delay_s)
            final = result()
            if job.keep_alive_zero:
                self.loaded_models.pop(canonical_model(job.model), None)
            if job.stream:
                await self._ensure_open(call, dialect)
                await call.write(dialect.closing(final))
                resp: web.StreamResponse = await call.finish()
            else:
                if opts.slow_first_byte_s > 0:
                    await asyncio.sleep(opts.slow_first_byte_s)
                resp = _bytes_response(*dialect.whole(final))
            self._end(gen, "done")
            return resp

    def _result(self, call: _Call, gen: Generation, job: _Job, load_ns: int, text: str) -> _Result:
        metrics = {
            "total_duration": time.perf_counter_ns() - call.t0,
            "load_duration": load_ns,
            "prompt_eval_count": job.prompt_tokens,
            "prompt_eval_duration": gen.prompt_eval_ns,
            "eval_count": gen.tokens_generated,
            "eval_duration": gen.eval_ns,
        }
        # Go's omitempty drops zero metrics; omit_metrics drops more on purpose
        metrics = {k: v for k, v in metrics.items() if v and k not in call.opts.omit_metrics}
        gen.reported = dict(metrics)
        gen.done_reason = "length" if job.length_limited else "stop"
        context = list(range(1, job.prompt_tokens + gen.tokens_generated + 1))
        return _Result(job.model, text, gen.done_reason, metrics, context)

    async def _run_embedding(
        self,
        call: _Call,
        job: _Job,
        build: Callable[[dict[str, int]], tuple[bytes, str]],
    ) -> web.StreamResponse:
        gen = self._begin(call, job)

        async def work() -> web.StreamResponse:
            opts = call.opts
            async with self._slot(call, gen):
                await self._ensure_loaded(call, job.model, gen)
                load_ns = time.perf_counter_ns() - call.t0
                gen.prompt_eval_ns = await call.pause(job.prompt_tokens * opts.prompt_token_delay_s)

                def body() -> tuple[bytes, str]:
                    metrics = {
                        "total_duration": time.perf_counter_ns() - call.t0,
                        "load_duration": load_ns,
                        "prompt_eval_count": job.prompt_tokens,
                    }
                    metrics = {k: v for k, v in metrics.items() if v and k not in opts.omit_metrics}
                    gen.reported = dict(metrics)
                    return build(metrics)

                fault = _pick_fault(opts, 0)
                if fault is not None:
                    return await self._inject(call, gen, _Dialect(), fault[0], False, body)
                payload = body()
                if opts.slow_first_byte_s > 0:
                    await asyncio.sleep(opts.slow_first_byte_s)
                self._end(gen, "done")
                return _bytes_response(*payload)

        return await self._guarded(call, gen, work)

    async def _run_status_stream(
        self, call: _Call, lines: list[dict[str, Any]], stream: bool, on_success: Callable[[], None]
    ) -> web.StreamResponse:
        """pull/push/create: NDJSON progress lines, the last one being ``success``."""
        dialect = _Status()
        *chunks, final = lines

        async def work() -> web.StreamResponse:
            opts = call.opts
            fault = _pick_fault(opts, len(chunks))
            for i in range(len(chunks) + 1):
                if fault is not None and i == fault[1]:
                    return await self._inject(
                        call, None, dialect, fault[0], stream, lambda: (_dumps(final), _JSON_CT)
                    )
                if i == len(chunks):
                    break
                if stream:
                    await self._ensure_open(call, dialect)
                    await call.write(_line(chunks[i]))
                if opts.chunk_delay_s > 0:
                    await asyncio.sleep(opts.chunk_delay_s)
            on_success()
            if not stream:
                if opts.slow_first_byte_s > 0:
                    await asyncio.sleep(opts.slow_first_byte_s)
                return _json_response(final)
            await self._ensure_open(call, dialect)
            await call.write(_line(final))
            return await call.finish()

        return await self._guarded(call, None, work)

    # ---- middleware -----------------------------------------------------------------------

    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Record the request, apply the Origin/Host checks and app/request faults, map unknown
        routes to Go's ``404 page not found``."""
        self.request_count += 1
        rec = RecordedRequest(
            index=self.request_count,
            method=request.method,
            path=request.path,
            query_string=request.query_string,
            headers=CIMultiDict(request.headers),
        )
        self.requests.append(rec)
        request[_REC_KEY] = rec
        if not (request.method == "POST" and request.path.startswith("/api/blobs/")):
            rec.body = await request.read()
            rec.body_size = len(rec.body)
            if rec.body:
                with contextlib.suppress(ValueError):
                    rec.body_json = json.loads(rec.body)
        resp = await self._dispatch(request, handler, rec)
        if rec.status is None:
            rec.status = resp.status
        return resp

    async def _dispatch(
        self, request: web.Request, handler: Handler, rec: RecordedRequest
    ) -> web.StreamResponse:
        opts = self.options
        origin = request.headers.get("Origin")
        host = request.headers.get("Host", "")
        if origin and opts.check_origin and not origin_allowed(origin, host, opts.allowed_origins):
            return web.Response(status=403)  # gin-contrib/cors: AbortWithStatus(403)
        if opts.check_host and not host_allowed(host):
            return web.Response(status=403)  # allowedHostsMiddleware: AbortWithStatus(403)
        header = request.headers.get(FAULT_HEADER)
        if header:
            try:
                opts = dataclasses.replace(opts, **parse_fault_header(header))
            except FaultHeaderError as exc:
                return _json_response({"error": f"bad {FAULT_HEADER} header: {exc}"}, 400)
        request[_OPTS_KEY] = opts
        cors = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"} if origin else {}
        if request.method == "OPTIONS":
            return web.Response(
                status=204,
                headers={
                    **cors,
                    "Access-Control-Allow-Methods": "GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS",
                    "Access-Control-Allow-Headers": "Authorization,Content-Type,User-Agent,"
                    "Accept,X-Requested-With,OpenAI-Beta,x-stainless-*",
                },
            )
        if opts.status is not None:
            return error_response(
                request.path.startswith("/v1/"), opts.status, _status_message(opts.status)
            )
        if opts.slow_first_byte_s > 0 and request.path not in _ENGINE_PATHS:
            await asyncio.sleep(opts.slow_first_byte_s)
        try:
            resp = await handler(request)
        except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
            return _bytes_response(NOT_FOUND_BODY, "text/plain", 404)
        if cors and not resp.prepared:
            resp.headers.update(cors)
        return resp

    # ---- request parsing helpers ----------------------------------------------------------

    @staticmethod
    def _body(call: _Call) -> dict[str, Any] | web.Response:
        raw = call.rec.body
        if not raw.strip():
            return call.error(400, "EOF" if call.openai else "missing request body")
        if isinstance(call.rec.body_json, dict):
            return call.rec.body_json
        try:
            json.loads(raw)
        except ValueError as exc:
            return call.error(400, f"invalid JSON: {exc}")
        return call.error(400, "json: cannot unmarshal non-object into Go value of request type")

    def _model(self, call: _Call, body: Mapping[str, Any], capability: str) -> str | web.Response:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return call.error(400, "model is required")
        entry = self.find_model(model)
        if entry is None:
            return call.error(404, f'model "{model}" not found, try pulling it first')
        if entry.embedding and capability in ("generate", "chat"):
            return call.error(400, f'"{model}" does not support {capability}')
        return model

    def _unload(self, model: str) -> None:
        self.loaded_models.pop(canonical_model(model), None)

    # ---- native generation routes ---------------------------------------------------------

    async def handle_generate(self, request: web.Request) -> web.StreamResponse:
        return await self._native_generation(request, "generate", "prompt", str, _NativeGenerate)

    async def handle_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._native_generation(request, "chat", "messages", list, _NativeChat)

    async def _native_generation(
        self,
        request: web.Request,
        kind: str,
        field: str,
        field_type: type[Any],
        dialect_cls: type[_NativeGenerate] | type[_NativeChat],
    ) -> web.StreamResponse:
        """/api/generate and /api/chat: an empty prompt / message list with keep_alive 0
        unloads the model, an empty one otherwise only loads it."""
        call = _Call(self, request)
        body = self._body(call)
        if isinstance(body, web.Response):
            return body
        model = self._model(call, body, kind)
        if isinstance(model, web.Response):
            return model
        value = body.get(field) or field_type()
        options = body.get("options")
        if not isinstance(value, field_type) or not isinstance(options, dict | None):
            return call.error(400, f"json: cannot unmarshal request: bad {field} or options")
        keep_alive_zero = _keep_alive_is_zero(body.get("keep_alive"))
        dialect = dialect_cls(model)
        if not value and keep_alive_zero:
            self._unload(model)
            return _json_response(dialect.load_body("unload"))
        n, limited = _token_budget(
            (options or {}).get("num_predict"), call.opts.default_num_predict
        )
        job = _Job(
            kind=kind if value else "load",
            model=model,
            stream=body.get("stream") is not False,
            prompt_tokens=prompt_tokens_for(f"/api/{kind}", body),
            n_tokens=n,
            length_limited=limited,
            keep_alive_zero=keep_alive_zero,
        )
        return await self._run_generation(call, job, dialect)

    async def handle_embed(self, request: web.Request) -> web.StreamResponse:
        call = _Call(self, request)
        body = self._body(call)
        if isinstance(body, web.Response):
            return body
        model = self._model(call, body, "embed")
        if isinstance(model, web.Response):
            return model
        inputs = _native_embed_inputs(body.get("input"))
        if inputs is None:
            return call.error(400, "invalid input type")
        dims = body.get("dimensions")
        dim = call.opts.embedding_dim
        if isinstance(dims, int) and not isinstance(dims, bool) and 0 < dims < dim:
            dim = dims
        job = _Job(
            kind="embed" if inputs else "load",
            model=model,
            stream=False,
            prompt_tokens=prompt_tokens_for("/api/embed", body),
        )

        def build(metrics: dict[str, int]) -> tuple[bytes, str]:
            vectors = [fake_embedding(s, dim) for s in inputs]
            return _dumps({"model": model, "embeddings": vectors, **metrics}), _JSON_CT

        return await self._run_embedding(call, job, build)

    async def handle_embeddings(self, request: web.Request) -> web.StreamResponse:
        call = _Call(self, request)
        body = self._body(call)
        if isinstance(body, web.Response):
            return body
        model = self._model(call, body, "embed")
        if isinstance(model, web.Response):
            return model
        prompt = body.get("prompt") or ""
        if not isinstance(prompt, str):
            return call.error(400, "json: cannot unmarshal prompt: expected a string")
        job = _Job(
            kind="embed" if prompt else "load",
            model=model,
            stream=False,
            prompt_tokens=prompt_tokens_for("/api/embeddings", body),
        )
        dim = call.opts.embedding_dim

        def build(_metrics: dict[str, int]) -> tuple[bytes, str]:  # legacy route: no metrics
            vector = fake_embedding(prompt, dim) if prompt else []
            return _dumps({"embedding": vector}), _JSON_CT

        return await self._run_embedding(call, job, build)

    # ---- OpenAI-compatible routes ---------------------------------------------------------

    async def handle_v1_chat(self, request: web.Request) -> web.StreamResponse:
        call = _Call(self, request)
        body = self._body(call)
        if isinstance(body, web.Response):
            return body
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return call.error(400, "[] is too short - 'messages'")
        model = self._model(call, body, "chat")
        if isinstance(model, web.Response):
            return model
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        n, limited = _token_budget(limit, call.opts.default_num_predict)
        stream = body.get("stream") is True
        include_usage = stream and _asks_for_usage(body)
        job = _Job(
            kind="chat",
            model=model,
            stream=stream,
            prompt_tokens=prompt_tokens_for("/v1/chat/completions", body),
            n_tokens=n,
            length_limited=limited,
        )
        dialect = _OpenAIChat(model, f"chatcmpl-{next(self._ids)}", include_usage)
        return await self._run_generation(call, job, dialect)

    async def handle_v1_completions(self, request: web.Request) -> web.StreamResponse:
        call = _Call(self, request)
        body = self._body(call)
        if isinstance(body, web.Response):
            return body
        if not isinstance(body.get("prompt", ""), str):
            return call.error(
                400,
                "json: cannot unmarshal array into Go struct field "
                "CompletionRequest.prompt of type string",
            )
        model = self._model(call, body, "generate")
        if isinstance(model, web.Response):
            return model
        n, limited = _token_budget(body.get("max_tokens"), call.opts.default_num_predict)
        stream = body.get("stream") is True
        include_usage = stream and _asks_for_usage(body)
        job = _Job(
            kind="generate",
            model=model,
            stream=stream,
            prompt_tokens=prompt_tokens_for("/v1/completions", body),
            n_tokens=n,
            length_limited=limited,
        )
        dialect = _OpenAICompletion(model, f"cmpl-{next(self._ids)}", include_usage)
        return await self._run_generation(call, job, dialect)

    async def handle_v1_responses(self, request: web.Request) -> web.StreamResponse:
        call = _Call(self, request)
        body = self._body(call)
        if isinstance(body, web.Response):
            return body
        model = self._model(call, body, "chat")
        if isinstance(model, web.Response):
            return model
        n, limited = _token_budget(body.get("max_output_tokens"), call.opts.default_num_predict)
        job = _Job(
            kind="chat",
            model=model,
            stream=body.get("stream") is True,
            prompt_tokens=prompt_tokens_for("/v1/responses", body),
            n_tokens=n,
            length_limited=limited,
        )
        ident = next(self._ids)
        dialect = _OpenAIResponses(model, f"resp_{ident}", f"msg_{ident}")
        return await self._run_generation(call, job, dialect)

    async def handle_v1_embeddings(self, request: web.Request) -> web.StreamResponse:
        call = _Call(self, request)
        body = self._body(call)
        if isinstance(body, web.Response):
            return body
        encoding = body.get("encoding_format") or "float"
        if not isinstance(encoding, str) or encoding.lower() not in ("float", "base64"):
            return call.error(
                400,
                f"Invalid value for 'encoding_format' = {encoding}. "
                "Supported values: ['float', 'base64'].",
            )
        inputs = _string_list(body.get("input"))
        if not inputs:
            return call.error(400, "invalid input")
        model = self._model(call, body, "embed")
        if isinstance(model, web.Response):
            return model
        dims = body.get("dimensions")
        dim = call.opts.embedding_dim
        if isinstance(dims, int) and not isinstance(dims, bool) and 0 < dims < dim:
            dim = dims
        job = _Job(
            kind="embed",
            model=model,
            stream=False,
            prompt_tokens=prompt_tokens_for("/v1/embeddings", body),
        )
        as_base64 = encoding.lower() == "base64"

        def build(metrics: dict[str, int]) -> tuple[bytes, str]:
            data = []
            for i, text in enumerate(inputs):
                vector = fake_embedding(text, dim)
                data.append(
                    {
                        "object": "embedding",
                        "embedding": _floats_base64(vector) if as_base64 else vector,
                        "index": i,
                    }
                )
            tokens = metrics.get("prompt_eval_count", 0)
            out = {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
            return _dumps(out) + b"\n", _OPENAI_JSON_CT

        return await self._run_embedding(call, job, build)

    async def handle_v1_models(self, request: web.Request) -> web.StreamResponse:
        data = [
            {
                "id": m.name,
                "object": "model",
                "created": m.modified_ns // 1_000_000_000,
                "owned_by": "library",
            }
            for m in self.models.values()
        ]
        return _bytes_response(_dumps({"object": "list", "data": data}) + b"\n", _OPENAI_JSON_CT)

    async def handle_v1_model(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["model"]
        entry = self.find_model(name)
        if entry is None:
            return error_response(True, 404, f"model '{name}' not found")
        out = {
            "id": name,
            "object": "model",
            "created": entry.modified_ns // 1_000_000_000,
            "owned_by": "library",
        }
        return _bytes_response(_dumps(out) + b"\n", _OPENAI_JSON_CT)

    # ---- pass-through / management routes -------------------------------------------------

    async def handle_root(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="Ollama is running")

    async def handle_version(self, request: web.Request) -> web.StreamResponse:
        return _json_response({"version": request[_OPTS_KEY].version})

    async def handle_tags(self, request: web.Request) -> web.StreamResponse:
        return _json_response({"models": [m.tags_json() for m in self.models.values()]})

    async def handle_ps(self, request: web.Request) -> web.StreamResponse:
        models = []
        for key, loaded_at in self.loaded_models.items():
            entry = self.models.get(key) or ModelEntry(name=key)
            models.append(
                {
                    "name": key,
                    "model": key,
                    "size": entry.size,
                    "digest": entry.digest,
                    "details": entry.details(),
                    "expires_at": _rfc3339(int((max(loaded_at, time.time()) + 300) * 1e9)),
                    "size_vram": entry.size,
                    "context_length": 4096,
                }
            )
        return _json_response({"models": models})

    async def handle_show(self, request: web.Request) -> web.StreamResponse:
        call = _Call(self, request)
        body = self._body(call)
        if isinstance(body, web.Response):
            return body
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            return call.error(400, "model is required")
        entry = self.find_model(name)
        if entry is None:
            return call.error(404, f"model '{name}' not found")
        arch = "bert" if entry.embedding else "llama"
        return _json_response(
            {
                "license": "fake license",
                "modelfile": f'# Modelfile generated by "ollama show"\nFROM {entry.name}\n',
                "parameters": 'stop "<|eot_id|>"',
                "template": "{{ .Prompt }}",
                "details": entry.details(),
                "model_info": {
                    "general.architecture": arch,
                    "general.parameter_count": entry.size // 2,
                    f"{arch}.context_length": 131072,
                    f"{arch}.embedding_length": call.opts.embedding_dim,
                },
                "capabilities": ["embedding"] if entry.embedding else ["completion"],
                "modified_at": _rfc3339(entry.modified_ns),
            }
        )

    def _progress(self, verb: str, name: str) -> list[dict[str, Any]]:
        entry = self.find_model(name) or ModelEntry(name=canonical_model(name))
        digest = f"sha256:{entry.digest}"
        total = entry.size
        k = max(self.options.pull_progress_chunks, 1)
        progress = [
            {
                "status": f"{verb} {entry.digest[:12]}",
                "digest": digest,
                "total": total,
                "completed": total * j // k,
            }
            for j in range(k + 1)
        ]
        if verb == "pulling":
            return [
                {"status": "pulling manifest"},
                *progress,
                {"status": "verifying sha256 digest"},
                {"status": "writing manifest"},
                {"status": "success"},
            ]
        return [
            {"status": "retrieving manifest"},
            *progress,
            {"status": "pushing manifest"},
            {"status": "success"},
        ]

    async def handle_pull(self, request: web.Request) -> web.StreamResponse:
        call = _Call(self, request)
        body = self._body(call)
        if isinstance(body, web.Response):
            return body
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            return call.error(400, "model is required")
        lines = self._progress("pulling", name)
        return await self._run_status_stream(
            call, lines, body.get("stream") is not False, lambda: self._add_if_missing(name)
        )

    def _add_if_missing(self, name: str) -> None:
        if self.find_model(name) is None:
            self.add_model(name)

    async def handle_push(self, request: web.Request) -> web.StreamResponse:
        call = _Call(self, request)
        body = self._body(call)
        if isinstance(body, web.Response):
            return body
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            return call.error(400, "model is required")
        if self.find_model(name) is None:
            return call.error(404, f"model '{name}' not found")
        lines = self._progress("pushing", name)
        return await self._run_status_stream(
            call, lines, body.get("stream") is not False, lambda: None
        )

    async def handle_create(self, request: web.Request) -> web.StreamResponse:
        call = _Call(self, request)
        body = self._body(call)
        if isinstance(body, web.Response):
            return body
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            return call.error(400, "model is required")
        files = body.get("files")
        layers = list(files.values()) if isinstance(files, dict) else []
        base = body.get("from")
        if isinstance(base, str) and (entry := self.find_model(base)) is not None:
            layers.append(f"sha256:{entry.digest}")
        lines: list[dict[str, Any]] = [{"status": "gathering model components"}]
        lines += [{"status": f"using existing layer {d}"} for d in layers]
        lines += [{"status": "writing manifest"}, {"status": "success"}]
        return await self._run_status_stream(
            call, lines, body.get("stream") is not False, lambda: self._add_if_missing(name)
        )

    async def handle_copy(self, request: web.Request) -> web.StreamResponse:
        call = _Call(self, request)
        body = self._body(call)
        if isinstance(body, web.Response):
            return body
        source, destination = body.get("source"), body.get("destination")
        if not isinstance(source, str) or not isinstance(destination, str) or not destination:
            return call.error(400, "source and destination are required")
        entry = self.find_model(source)
        if entry is None:
            return call.error(404, f'model "{source}" not found')
        self.add_model(destination, embedding=entry.embedding)
        return web.Response(status=200)

    async def handle_delete(self, request: web.Request) -> web.StreamResponse:
        call = _Call(self, request)
        body = self._body(call)
        if isinstance(body, web.Response):
            return body
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            return call.error(400, "model is required")
        if self.models.pop(canonical_model(name), None) is None:
            return call.error(404, f"model '{name}' not found")
        self._unload(name)
        return web.Response(status=200)

    async def handle_blob_head(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        if digest.replace("-", ":", 1) in self.blobs:
            return web.Response(status=200)
        return _json_response({"error": f'blob "{digest}" not found'}, 404)

    async def handle_blob_post(self, request: web.Request) -> web.StreamResponse:
        rec: RecordedRequest = request[_REC_KEY]
        digest = request.match_info["digest"]
        if not _DIGEST_RE.fullmatch(digest):
            return _json_response({"error": "invalid digest format"}, 400)
        expected = "sha256:" + digest[7:].lower()
        if expected in self.blobs:
            return web.Response(status=200)  # Ollama answers before reading the body
        hasher = hashlib.sha256()
        async for chunk in request.content.iter_chunked(1 << 16):
            hasher.update(chunk)
            rec.body_size += len(chunk)
            self.blob_bytes_received += len(chunk)
        got = f"sha256:{hasher.hexdigest()}"
        if got != expected:
            return _json_response(
                {"error": f'digest mismatch, expected "{digest}", got "{got}"'}, 400
            )
        self.blobs[got] = rec.body_size
        return web.Response(status=201)


def _whole(dialect: _Dialect, result: Callable[[], _Result]) -> Callable[[], tuple[bytes, str]]:
    return lambda: dialect.whole(result())


FAKE_KEY: Final = web.AppKey("fake_ollama", FakeOllama)


def make_fake_ollama(options: FakeOptions | None = None, /, **overrides: Any) -> web.Application:
    """Build the fake's ``web.Application``; its state is ``app[FAKE_KEY]``.

    ``overrides`` are :class:`FakeOptions` fields (unknown names raise TypeError). Serve it with
    ``handler_cancellation=True`` where possible (``TestServer`` does); cancellation is detected
    without it too."""
    opts = dataclasses.replace(options or FakeOptions(), **overrides)
    fake = FakeOllama(opts)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await fake.middleware(request, handler)

    app = web.Application(middlewares=[middleware], client_max_size=64 * 1024 * 1024)
    app[FAKE_KEY] = fake

    async def on_startup(_app: web.Application) -> None:
        fake.closing = False

    async def on_shutdown(_app: web.Application) -> None:
        fake.closing = True  # releases stalled/queued handlers so shutdown is quick

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    r = app.router
    r.add_get("/", fake.handle_root)  # also HEAD
    r.add_get("/api/version", fake.handle_version)
    r.add_get("/api/tags", fake.handle_tags)
    r.add_get("/api/ps", fake.handle_ps, allow_head=False)
    r.add_post("/api/show", fake.handle_show)
    r.add_post("/api/generate", fake.handle_generate)
    r.add_post("/api/chat", fake.handle_chat)
    r.add_post("/api/embed", fake.handle_embed)
    r.add_post("/api/embeddings", fake.handle_embeddings)
    r.add_post("/api/pull", fake.handle_pull)
    r.add_post("/api/push", fake.handle_push)
    r.add_post("/api/create", fake.handle_create)
    r.add_post("/api/copy", fake.handle_copy)
    r.add_delete("/api/delete", fake.handle_delete)
    r.add_head("/api/blobs/{digest}", fake.handle_blob_head)
    r.add_post("/api/blobs/{digest}", fake.handle_blob_post)
    r.add_post("/v1/chat/completions", fake.handle_v1_chat)
    r.add_post("/v1/completions", fake.handle_v1_completions)
    r.add_post("/v1/embeddings", fake.handle_v1_embeddings)
    r.add_post("/v1/responses", fake.handle_v1_responses)
    r.add_get("/v1/models", fake.handle_v1_models, allow_head=False)
    r.add_get("/v1/models/{model}", fake.handle_v1_model, allow_head=False)
    return app


@dataclass
class RunningFake:
    url: str  # e.g. "http://127.0.0.1:40123"
    host: str
    port: int
    app: web.Application
    fake: FakeOllama


@contextlib.asynccontextmanager
async def serve_fake_ollama(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    handler_cancellation: bool = True,
    **options: Any,
) -> AsyncIterator[RunningFake]:
    """Serve a fake on a real socket (port 0 = ephemeral) for the duration of the block."""
    app = make_fake_ollama(**options)
    runner = web.AppRunner(
        app, handler_cancellation=handler_cancellation, access_log=None, shutdown_timeout=5.0
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1]
        url_host = f"[{host}]" if ":" in host else host
        yield RunningFake(f"http://{url_host}:{bound}", host, bound, app, app[FAKE_KEY])
    finally:
        await runner.cleanup()


async def _serve_forever(host: str, port: int, options: dict[str, Any]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with serve_fake_ollama(host, port, **options) as running:
        print(f"fake-ollama listening on {running.url}", flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fakes.fake_ollama", description="Run the fake Ollama server."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11435, help="0 = ephemeral (printed)")
    parser.add_argument(
        "-o",
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a FakeOptions field; VALUE is parsed as JSON, else taken as a string "
        "(e.g. -o token_delay_s=0.01 -o parallel=1 -o check_host=false)",
    )
    parser.add_argument(
        "--record-limit", type=int, default=1000, help="requests/generations kept in memory"
    )
    args = parser.parse_args(argv)
    options: dict[str, Any] = {"record_limit": args.record_limit}
    for item in args.option:
        key, sep, raw = item.partition("=")
        if not sep:
            parser.error(f"--option needs KEY=VALUE, got {item!r}")
        try:
            options[key.strip()] = json.loads(raw)
        except ValueError:
            options[key.strip()] = raw
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_forever(args.host, args.port, options))


if __name__ == "__main__":
    main()
