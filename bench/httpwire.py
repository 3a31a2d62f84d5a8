"""Just enough HTTP/1.1 for the benchmark's fake upstream and load generator.

Both sides of the benchmark are written on bare asyncio protocols (uvloop when installed) so that
they cost as little CPU as possible on the 2-core machines the proxies under test share with
them. Only what the targets send is handled: request/response heads, ``Content-Length`` and
``chunked`` bodies, keep-alive. Nothing here is used by the proxy itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field


def install_uvloop() -> str:
    """Use uvloop's event loop when it is installed; returns the loop's name."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - the bench installs it
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return f"uvloop {uvloop.__version__}"


@dataclass(slots=True)
class Head:
    """A parsed request or response head (header names lower-cased)."""

    first_line: list[str]
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def chunked(self) -> bool:
        return "chunked" in self.headers.get("transfer-encoding", "").lower()

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("content-length")
        return int(value) if value is not None else None

    def keep_alive(self, version: str) -> bool:
        conn = self.headers.get("connection", "").lower()
        if version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn


def parse_head(raw: bytes) -> Head:
    lines = raw.decode("latin-1").split("\r\n")
    head = Head(lines[0].split(" ", 2))
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            head.headers[name.strip().lower()] = value.strip()
    return head


class BodyReader:
    """Incremental decoder of one message body (``Content-Length``, ``chunked`` or until EOF).

    ``feed`` returns the decoded bytes of this call and how many input bytes it consumed;
    :attr:`done` turns true at the end of the body (leftover input is the next message)."""

    __slots__ = ("_chunk_left", "_left", "_mode", "_state", "done")

    def __init__(self, head: Head, *, eof_body: bool = False) -> None:
        self.done = False
        self._chunk_left = 0
        self._state = "size"  # chunked: size | data | crlf | trailer
        if head.chunked:
            self._mode = "chunked"
            self._left = 0
        elif head.content_length is not None:
            self._mode = "length"
            self._left = head.content_length
            self.done = self._left == 0
        elif eof_body:
            self._mode = "eof"
            self._left = 0
        else:
            self._mode = "length"
            self._left = 0
            self.done = True

    def feed(self, data: bytes | bytearray, start: int = 0) -> tuple[bytes, int]:
        """Decode from ``data[start:]``; returns (decoded bytes, index after the consumed part)."""
        if self._mode == "length":
            take = min(self._left, len(data) - start)
            out = bytes(data[start : start + take])
            self._left -= take
            self.done = self._left == 0
            return out, start + take
        if self._mode == "eof":
            return bytes(data[start:]), len(data)
        parts: list[bytes] = []
        pos = start
        n = len(data)
        while pos < n and not self.done:
            if self._state == "size":
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    break
                size_field = bytes(data[pos:eol]).split(b";", 1)[0].strip()
                self._chunk_left = int(size_field, 16)
                pos = eol + 2
                self._state = "data" if self._chunk_left else "trailer"
            elif self._state == "data":
                take = min(self._chunk_left, n - pos)
                parts.append(bytes(data[pos : pos + take]))
                pos += take
                self._chunk_left -= take
                if self._chunk_left == 0:
                    self._state = "crlf"
            elif self._state == "crlf":
                if n - pos < 2:
                    break
                pos += 2
                self._state = "size"
            else:  # trailer: lines until an empty one
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    break
                empty = eol == pos
                pos = eol + 2
                if empty:
                    self.done = True
        return b"".join(parts), pos


def chunk(data: bytes) -> bytes:
    """One chunk of a ``Transfer-Encoding: chunked`` body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


def close_quietly(transport: asyncio.BaseTransport | None) -> None:
    if transport is not None:
        with contextlib.suppress(Exception):
            transport.close()
