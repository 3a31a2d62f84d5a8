"""The streaming forwarder: one shared aiohttp client, header edits, byte-exact relaying.

The documented edits (design §3.5) live here and only here: Host rewritten to the upstream,
hop-by-hop headers dropped, the tenant's key removed (an upstream key added if configured).
Bodies are never decompressed or re-chunked; they pass as the bytes that arrived.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Iterable
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from cycles_proxy.settings import Settings

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
#: request headers never forwarded: hop-by-hop, the tenant's credentials, and Host (rewritten)
_DROP_REQUEST = HOP_BY_HOP | {"host", "authorization", "x-api-key", "content-length"}
_DROP_RESPONSE = HOP_BY_HOP | {"content-length"}
#: request Content-Encodings that aiohttp's server decodes before the handler reads the body
#: (it refuses, with a 400, those it cannot decode)
SERVER_DECODES = frozenset({"gzip", "deflate", "br", "zstd"})


def _connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    tokens: set[str] = set()
    for value in headers.getall("Connection", ()):
        tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


class Upstream:
    def __init__(self, settings: Settings) -> None:
        self.base = URL(settings.upstream)
        self._prefix = self.base.raw_path.rstrip("/")
        self._origin = str(self.base.origin())
        self._api_key = settings.upstream_api_key
        # metered requests time their reads themselves (first byte vs between chunks);
        # pass-through requests get the longer of the two per read
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=settings.upstream_connect_timeout_s, sock_read=None
        )
        self.passthrough_timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=settings.upstream_connect_timeout_s,
            sock_read=max(settings.upstream_first_byte_timeout_s, settings.upstream_read_timeout_s),
        )
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,  # relay Content-Encoding and bytes as they are
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url(self, raw_path_qs: str) -> URL:
        # the client's raw path and query, byte for byte (no re-encoding)
        return URL(self._origin + self._prefix + raw_path_qs, encoded=True)

    def request_headers(
        self,
        incoming: CIMultiDictProxy[str],
        *,
        content_length: int | None,
        identity: bool = False,
        decoded_body: bool = False,
    ) -> CIMultiDict[str]:
        """Headers for the upstream request. ``identity`` asks for an uncompressed response
        (metered responses are scanned for usage on their way through). ``decoded_body``: the
        body sent is the one aiohttp already decompressed, so its Content-Encoding must go."""
        drop = _DROP_REQUEST | _connection_tokens(incoming)
        if decoded_body:
            drop = drop | {"content-encoding"}
        out: CIMultiDict[str] = CIMultiDict()
        for name, value in incoming.items():
            if name.lower() not in drop:
                out.add(name, value)
        if content_length is not None:
            out["Content-Length"] = str(content_length)
        # without a length, aiohttp re-chunks the streamed body (Transfer-Encoding is hop-by-hop)
        if self._api_key:
            out["Authorization"] = f"Bearer {self._api_key}"
        if identity:
            out["Accept-Encoding"] = "identity"
        return out

    @staticmethod
    def response_headers(
        upstream: aiohttp.ClientResponse, *, keep_length: bool
    ) -> CIMultiDict[str]:
        drop = _DROP_RESPONSE | _connection_tokens(upstream.headers)
        out: CIMultiDict[str] = CIMultiDict()
        for name, value in upstream.headers.items():
            if name.lower() not in drop:
                out.add(name, value)
        if keep_length and "Content-Length" in upstream.headers:
            out["Content-Length"] = upstream.headers["Content-Length"]
        return out

    def open(
        self,
        method: str,
        raw_path_qs: str,
        headers: CIMultiDict[str],
        data: bytes | AsyncIterable[bytes] | Iterable[bytes] | None,
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> Any:
        """An ``aiohttp`` request context manager (use ``async with``)."""
        assert self._session is not None, "Upstream.start() was not awaited"
        return self._session.request(
            method,
            self.url(raw_path_qs),
            headers=headers,
            data=data,
            allow_redirects=False,
            compress=None,
            timeout=timeout or self._timeout,
        )


def origin_form(request: web.Request) -> str:
    """The target to forward: the client's raw path and query, byte for byte. An absolute-form
    target (``POST http://any.host/api/chat``) is reduced to its path and query: the upstream
    is always ours, whatever host the client named."""
    raw = request.raw_path
    return raw if raw.startswith("/") else request.rel_url.raw_path_qs


def cut_transfer(request: web.Request) -> None:
    """End a response that already began without its terminator (no final chunk), so the
    caller sees a broken transfer instead of a complete-looking truncated body."""
    if request.transport is not None:
        request.transport.close()


async def relay_passthrough(request: web.Request, upstream: Upstream) -> web.StreamResponse:
    """Forward any unmetered request both ways, streaming, with only the documented edits.
    Upstream failures before the response began propagate (the caller answers 502/504)."""
    # a compressed body arrives decoded: forward it as what it now is (no encoding, and no
    # longer the length the client declared: chunked)
    decoded = request.headers.get("Content-Encoding", "").lower() in SERVER_DECODES
    length = None if decoded else request.content_length
    body: Any = None
    if request.body_exists:
        body = request.content
    headers = upstream.request_headers(request.headers, content_length=length, decoded_body=decoded)
    async with upstream.open(
        request.method, origin_form(request), headers, body, upstream.passthrough_timeout
    ) as up:
        resp = web.StreamResponse(status=up.status, reason=up.reason)
        resp.headers.extend(Upstream.response_headers(up, keep_length=True))
        await resp.prepare(request)
        if request.method != "HEAD":
            try:
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError):
                if request.transport is None or request.transport.is_closing():
                    raise  # the caller left: not the upstream's fault
                cut_transfer(request)  # the upstream broke off mid-response
                return resp
        await resp.write_eof()
        return resp
