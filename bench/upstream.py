"""The benchmark's fake model server: instant answers and paced token streams.

Speaks the two dialects cycles-proxy meters, as real servers write them:

* Ollama native ``POST /api/chat`` and ``/api/generate``: one JSON object (``"stream": false``)
  or an ``application/x-ndjson`` stream ending with the ``done: true`` object and its metrics;
* OpenAI ``POST /v1/chat/completions``: one JSON object, or a ``text/event-stream`` of
  ``chat.completion.chunk`` events, the finish chunk, a usage chunk when
  ``stream_options.include_usage`` is set, and ``data: [DONE]``.

Paths are matched by suffix, so ``/anything/v1/chat/completions`` is served too (the benchmark
uses such a path for cycles-proxy's unmetered pass-through route).

The shape of a stream travels in the model name, so that it survives any gateway (LiteLLM
rewrites bodies but keeps the model): ``bench-n64-i5000`` streams 64 tokens, one every 5,000 µs;
``i0`` streams as fast as the reader takes them. Every streamed token's text is
``@<CLOCK_MONOTONIC ns at write>@ ``: the load generator (another process on the same machine,
same clock) subtracts it from the arrival time to get each token's delivery delay.

Run: ``python -m bench.upstream --port 18000`` (prints ``listening <url>``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import time
from typing import Any, ClassVar, cast

from bench.httpwire import BodyReader, Head, chunk, install_uvloop, parse_head

_MODEL_N = re.compile(r"-n(\d+)")
_MODEL_I = re.compile(r"-i(\d+)")
DEFAULT_TOKENS = 16
PROMPT_TOKENS = 12
CREATED_AT = "2025-01-01T00:00:00.000000Z"
WORDS = ("The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ".")


def stream_shape(model: str) -> tuple[int, int]:
    """(tokens, interval in ns) from a model name such as ``bench-n64-i5000``."""
    n = _MODEL_N.search(model)
    i = _MODEL_I.search(model)
    return (int(n.group(1)) if n else DEFAULT_TOKENS, int(i.group(1)) * 1000 if i else 0)


def _text(n: int) -> str:
    return "".join(WORDS[k % len(WORDS)] for k in range(n))


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _ollama_metrics(n: int, elapsed_ns: int) -> dict[str, Any]:
    eval_ns = max(1, elapsed_ns)
    return {
        "done": True,
        "done_reason": "stop",
        "total_duration": eval_ns + 2_000_000,
        "load_duration": 1_000_000,
        "prompt_eval_count": PROMPT_TOKENS,
        "prompt_eval_duration": 1_000_000,
        "eval_count": n,
        "eval_duration": eval_ns,
    }


def _usage(n: int) -> dict[str, int]:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": n,
        "total_tokens": PROMPT_TOKENS + n,
    }


class Dialect:
    """How one endpoint writes answers and streams."""

    content_type = b"application/json"
    stream_type = b"application/x-ndjson"

    def __init__(self, model: str, include_usage: bool) -> None:
        self.model = model
        self.include_usage = include_usage

    def whole(self, n: int) -> bytes:
        raise NotImplementedError

    def token_parts(self) -> tuple[bytes, bytes]:
        """Bytes before and after the timestamp of one streamed token."""
        raise NotImplementedError

    def opening(self) -> bytes:
        return b""

    def closing(self, n: int, elapsed_ns: int) -> bytes:
        raise NotImplementedError


class OllamaChat(Dialect):
    field = "message"

    def whole(self, n: int) -> bytes:
        obj = {"model": self.model, "created_at": CREATED_AT, **self._content(_text(n))}
        obj.update(_ollama_metrics(n, n * 1_000_000))
        return _dumps(obj)

    def _content(self, text: str) -> dict[str, Any]:
        return {"message": {"role": "assistant", "content": text}}

    def token_parts(self) -> tuple[bytes, bytes]:
        head = _dumps({"model": self.model, "created_at": CREATED_AT, **self._content("\x00")})
        before, after = head.split(b"\\u0000")
        return before + b"@", b"@ " + after[:-1] + b',"done":false}\n'

    def closing(self, n: int, elapsed_ns: int) -> bytes:
        obj = {"model": self.model, "created_at": CREATED_AT, **self._content("")}
        obj.update(_ollama_metrics(n, elapsed_ns))
        return _dumps(obj) + b"\n"


class OllamaGenerate(OllamaChat):
    def _content(self, text: str) -> dict[str, Any]:
        return {"response": text}


class OpenAIChat(Dialect):
    stream_type = b"text/event-stream"
    ident = "chatcmpl-bench"

    def whole(self, n: int) -> bytes:
        return _dumps(
            {
                "id": self.ident,
                "object": "chat.completion",
                "created": 1_735_689_600,
                "model": self.model,
                "system_fingerprint": "fp_bench",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": _text(n)},
                        "finish_reason": "stop",
                    }
                ],
                "usage": _usage(n),
            }
        )

    def _chunk(self, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {
            "id": self.ident,
            "object": "chat.completion.chunk",
            "created": 1_735_689_600,
            "model": self.model,
            "system_fingerprint": "fp_bench",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    def token_parts(self) -> tuple[bytes, bytes]:
        event = _dumps(self._chunk({"role": "assistant", "content": "\x00"}, None))
        before, after = event.split(b"\\u0000")
        return b"data: " + before + b"@", b"@ " + after + b"\n\n"

    def closing(self, n: int, elapsed_ns: int) -> bytes:
        out = b"data: " + _dumps(self._chunk({}, "stop")) + b"\n\n"
        if self.include_usage:
            usage = self._chunk({}, None)
            usage["choices"] = []
            usage["usage"] = _usage(n)
            out += b"data: " + _dumps(usage) + b"\n\n"
        return out + b"data: [DONE]\n\n"


ROUTES: dict[str, type[Dialect]] = {
    "/api/chat": OllamaChat,
    "/api/generate": OllamaGenerate,
    "/v1/chat/completions": OpenAIChat,
}


def route_for(path: str) -> type[Dialect] | None:
    path = path.split("?", 1)[0].rstrip("/")
    for suffix, cls in ROUTES.items():
        if path.endswith(suffix):
            return cls
    return None


def _response(status: str, content_type: bytes, body: bytes, close: bool) -> bytes:
    conn = b"Connection: close\r\n" if close else b""
    return b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n%s" % (
        status.encode(),
        content_type,
        len(body),
        conn,
        body,
    )


class Stream:
    """One paced token stream on one connection."""

    __slots__ = ("_after", "_before", "conn", "dialect", "interval", "n", "sent", "start", "timer")

    def __init__(self, conn: UpstreamConnection, dialect: Dialect, n: int, interval: int) -> None:
        self.conn = conn
        self.dialect = dialect
        self.n = n
        self.interval = interval
        self.sent = 0
        self.start = time.monotonic_ns()
        self.timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self._before, self._after = dialect.token_parts()

    def begin(self) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nTransfer-Encoding: chunked\r\n\r\n" % (
            self.dialect.stream_type
        )
        opening = self.dialect.opening()
        self.conn.write(head + (chunk(opening) if opening else b""))
        self.step()

    def step(self) -> None:
        self.timer = None
        conn = self.conn
        if conn.closed:
            return
        if self.sent >= self.n:
            tail = self.dialect.closing(self.n, time.monotonic_ns() - self.start)
            conn.write(chunk(tail) + b"0\r\n\r\n")
            conn.stream_done()
            return
        ts = b"%d" % time.monotonic_ns()
        conn.write(chunk(self._before + ts + self._after))
        self.sent += 1
        loop = conn.loop
        if self.interval:
            due = self.start + self.sent * self.interval
            delay = max(0.0, (due - time.monotonic_ns()) / 1e9)
            self.timer = loop.call_later(delay, self.step)
        elif conn.paused:
            conn.on_resume = self.step
        else:
            self.timer = loop.call_soon(self.step)

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class UpstreamConnection(asyncio.Protocol):
    stats: ClassVar[dict[str, int]] = {
        "connections": 0,
        "requests": 0,
        "streams": 0,
        "aborted_streams": 0,
    }

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.head: Head | None = None
        self.reader: BodyReader | None = None
        self.body = bytearray()
        self.stream: Stream | None = None
        self.closed = False
        self.paused = False
        self.on_resume: Any = None
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.stats["connections"] += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.stream is not None:
            self.stats["aborted_streams"] += 1
            self.stream.cancel()
            self.stream = None

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        cb, self.on_resume = self.on_resume, None
        if cb is not None:
            cb()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.stream is None:
            self._process()

    def _process(self) -> None:
        while self.stream is None and not self.closed:
            if self.head is None:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                self.head = parse_head(bytes(self.buf[:end]))
                del self.buf[: end + 4]
                self.reader = BodyReader(self.head)
                self.body.clear()
            assert self.reader is not None
            if not self.reader.done:
                out, used = self.reader.feed(self.buf)
                self.body += out
                del self.buf[:used]
                if not self.reader.done:
                    return
            head, self.head = self.head, None
            self._handle(head, bytes(self.body))

    def stream_done(self) -> None:
        self.stream = None
        if self.close_after:
            self._close()
        elif self.buf:
            self._process()

    def _close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _handle(self, head: Head, body: bytes) -> None:
        self.stats["requests"] += 1
        method, path = head.first_line[0], head.first_line[1]
        version = head.first_line[2] if len(head.first_line) > 2 else "HTTP/1.1"
        close = not head.keep_alive(version)
        cls = route_for(path)
        if method == "GET" or cls is None or method != "POST":
            self._simple(method, path, close)
            return
        try:
            req = json.loads(body) if body else {}
        except ValueError:
            req = None
        if not isinstance(req, dict) or not isinstance(req.get("model"), str):
            err = _dumps({"error": "bad request body"})
            self.write(_response("400 Bad Request", b"application/json", err, close))
            if close:
                self._close()
            return
        model = req["model"]
        native = cls is not OpenAIChat
        stream = req.get("stream", native) is not False if native else req.get("stream") is True
        opts = req.get("stream_options")
        include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        dialect = cls(model, include_usage)
        n, interval = stream_shape(model)
        if not stream:
            self.write(_response("200 OK", dialect.content_type, dialect.whole(n), close))
            if close:
                self._close()
            return
        self.stats["streams"] += 1
        self.close_after = close
        self.stream = Stream(self, dialect, n, interval)
        self.stream.begin()

    def _simple(self, method: str, path: str, close: bool) -> None:
        p = path.split("?", 1)[0]
        if p.endswith("/api/tags"):
            body = _dumps({"models": [{"name": "bench", "model": "bench"}]})
        elif p.endswith("/v1/models"):
            body = _dumps({"object": "list", "data": [{"id": "bench", "object": "model"}]})
        elif p.endswith("/api/version"):
            body = _dumps({"version": "0.0.0-bench"})
        elif p.rstrip("/") == "" or p == "/":
            self.write(
                _response("200 OK", b"text/plain; charset=utf-8", b"Ollama is running", close)
            )
            if close:
                self._close()
            return
        else:
            err = _dumps({"error": f"{method} {p} not found"})
            self.write(_response("404 Not Found", b"application/json", err, close))
            if close:
                self._close()
            return
        self.write(_response("200 OK", b"application/json", body, close))
        if close:
            self._close()


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(UpstreamConnection, host, port, backlog=4096)
    bound = server.sockets[0].getsockname()[1]
    print(f"listening http://{host}:{bound}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    print(f"stats {json.dumps(UpstreamConnection.stats)}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=18000)
    args = p.parse_args()
    install_uvloop()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
