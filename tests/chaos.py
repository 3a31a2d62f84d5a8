"""Fault injection and ledger audits shared by the hardening, fuzz and soak tests.

- :class:`RawUpstream`: a TCP server that misbehaves below HTTP (resets, garbage, truncated
  bodies) in ways an aiohttp fake cannot.
- :func:`blackhole`: a port whose accept queue is full, so connecting hangs (connect timeout).
- :class:`FaultyAuthority`: an :class:`Authority` around the embedded ledger that can be made
  slow or unreachable per operation.
- :func:`audit`: the ledger's books, checked to the unit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sqlite3
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cycles_proxy.authority.base import (
    Action,
    Amount,
    Authority,
    AuthorityUnavailable,
    Balance,
    CommitResult,
    EventResult,
    ExtendResult,
    Metrics,
    OveragePolicy,
    ReleaseResult,
    Reservation,
    ReserveRequest,
    Subject,
)

Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


# -------------------------------------------------------------------------------------------
# upstreams that break below HTTP
# -------------------------------------------------------------------------------------------
async def read_request(reader: asyncio.StreamReader) -> bytes:
    """Read one HTTP/1.1 request (headers and a Content-Length body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    body = await reader.readexactly(length) if length else b""
    return head + body


def rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (the peer sees ECONNRESET)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def reset_before_response(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    rst(writer)


async def close_before_response(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.close()


async def not_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(b"SSH-2.0-OpenSSH_9.2\r\nthis is not an HTTP server\r\n\r\n")
    await writer.drain()
    writer.close()


def respond(
    status: int, content_type: str, body: bytes, *, declared: int | None = None
) -> Behaviour:
    """Answer with ``body``; ``declared`` > len(body) sends a truncated body, then FIN."""

    async def behave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        length = len(body) if declared is None else declared
        writer.write(
            f"HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    return behave


def chunked_then(
    content_type: str, chunks: list[bytes], end: str, *, pause_s: float = 0.0
) -> Behaviour:
    """A chunked 200 response of ``chunks``, then ``end``: "rst", "fin" (no last chunk) or
    "stall" (hold the connection open)."""

    async def behave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        for c in chunks:
            writer.write(f"{len(c):x}\r\n".encode() + c + b"\r\n")
            await writer.drain()
            if pause_s:
                await asyncio.sleep(pause_s)
        await asyncio.sleep(0.05)
        if end == "rst":
            rst(writer)
        elif end == "fin":
            writer.close()
        else:
            with contextlib.suppress(Exception):
                await reader.read()  # until the proxy hangs up
            writer.close()

    return behave


@dataclass
class RawUpstream:
    behaviour: Behaviour
    port: int = 0
    connections: int = 0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.behaviour(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            writer.transport.abort()


@contextlib.asynccontextmanager
async def raw_upstream(behaviour: Behaviour) -> AsyncIterator[RawUpstream]:
    up = RawUpstream(behaviour)
    server = await asyncio.start_server(up._on_connect, "127.0.0.1", 0)
    up.port = server.sockets[0].getsockname()[1]
    try:
        yield up
    finally:
        server.close()
        for t in list(up._tasks):
            t.cancel()
        await server.wait_closed()


@contextlib.contextmanager
def blackhole() -> Iterator[str]:
    """A URL whose port never completes a TCP handshake: its accept queue is full."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(0)
    port = s.getsockname()[1]
    fillers = []
    for _ in range(8):
        c = socket.socket()
        c.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            c.connect(("127.0.0.1", port))
        fillers.append(c)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for c in fillers:
            c.close()
        s.close()


# -------------------------------------------------------------------------------------------
# an authority that is slow or down on demand
# -------------------------------------------------------------------------------------------
class FaultyAuthority:
    """Delegates to ``inner``; ``down`` names the operations that raise AuthorityUnavailable,
    ``delay_s`` the ones that are slow to start (seconds), ``reply_delay_s`` the ones whose
    answer is slow to come back (the operation is done, the caller does not know yet)."""

    name = "faulty"

    def __init__(self, inner: Authority) -> None:
        self.inner = inner
        self.down: set[str] = set()
        self.delay_s: dict[str, float] = {}
        self.reply_delay_s: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    async def _reply(self, op: str) -> None:
        delay = self.reply_delay_s.get(op)
        if delay:
            await asyncio.sleep(delay)

    async def _gate(self, op: str) -> None:
        self.calls[op] = self.calls.get(op, 0) + 1
        delay = self.delay_s.get(op)
        if delay:
            await asyncio.sleep(delay)
        if op in self.down:
            raise AuthorityUnavailable(f"injected: the authority is down ({op})")

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def reserve(self, req: ReserveRequest) -> Reservation:
        await self._gate("reserve")
        res = await self.inner.reserve(req)
        await self._reply("reserve")
        return res

    async def commit(
        self,
        reservation_id: str,
        *,
        idempotency_key: str,
        actual: Amount,
        metrics: Metrics | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> CommitResult:
        await self._gate("commit")
        res = await self.inner.commit(
            reservation_id,
            idempotency_key=idempotency_key,
            actual=actual,
            metrics=metrics,
            metadata=metadata,
        )
        await self._reply("commit")
        return res

    async def release(
        self, reservation_id: str, *, idempotency_key: str, reason: str | None = None
    ) -> ReleaseResult:
        await self._gate("release")
        return await self.inner.release(
            reservation_id, idempotency_key=idempotency_key, reason=reason
        )

    async def extend(
        self, reservation_id: str, *, idempotency_key: str, extend_by_ms: int
    ) -> ExtendResult:
        await self._gate("extend")
        return await self.inner.extend(
            reservation_id, idempotency_key=idempotency_key, extend_by_ms=extend_by_ms
        )

    async def event(
        self,
        *,
        idempotency_key: str,
        subject: Subject,
        action: Action,
        actual: Amount,
        overage_policy: OveragePolicy = OveragePolicy.ALLOW_IF_AVAILABLE,
        metrics: Metrics | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> EventResult:
        await self._gate("event")
        return await self.inner.event(
            idempotency_key=idempotency_key,
            subject=subject,
            action=action,
            actual=actual,
            overage_policy=overage_policy,
            metrics=metrics,
            metadata=metadata,
        )

    async def balances(self, subject: Subject) -> list[Balance]:
        await self._gate("balances")
        return await self.inner.balances(subject)


# -------------------------------------------------------------------------------------------
# the books
# -------------------------------------------------------------------------------------------
@dataclass
class Books:
    budgets: dict[str, dict[str, Any]]
    reservations: list[dict[str, Any]]
    charges: list[dict[str, Any]]

    def statuses(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.reservations:
            out[r["status"]] = out.get(r["status"], 0) + 1
        return out


def audit(db: Path, *, settled: bool = True, reject: bool = False) -> Books:
    """Check the ledger's books to the unit and return them.

    On every scope: ``spent`` is the sum of its charges, ``reserved`` the sum of its ACTIVE
    reservations, ``remaining = allocated - spent - reserved - debt`` (and, under REJECT, never
    below zero with no debt). Every COMMITTED reservation has exactly one charge of its
    ``charged`` amount, RELEASED and EXPIRED ones none. ``settled``: no reservation is ACTIVE."""
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        budgets = {
            f"{r['scope']}|{r['unit']}": dict(r)
            for r in conn.execute("SELECT * FROM budgets").fetchall()
        }
        reservations = [dict(r) for r in conn.execute("SELECT * FROM reservations").fetchall()]
        charges = [dict(r) for r in conn.execute("SELECT * FROM charges").fetchall()]
    finally:
        conn.close()
    by_res: dict[str, list[dict[str, Any]]] = {}
    for c in charges:
        if c["reservation_id"] is not None:
            by_res.setdefault(c["reservation_id"], []).append(c)
    for r in reservations:
        rows = by_res.pop(r["id"], [])
        if r["status"] == "COMMITTED":
            assert [c["amount"] for c in rows] == [r["charged"]], (r, rows)
        else:
            assert rows == [], (r, rows)
        assert r["status"] in ("ACTIVE", "COMMITTED", "RELEASED", "EXPIRED"), r
        if settled:
            assert r["status"] != "ACTIVE", f"reservation left unsettled: {r}"
    assert by_res == {}, f"charges for unknown reservations: {by_res}"
    for key, b in budgets.items():
        scope, unit = key.split("|")
        spent = sum(c["amount"] for c in charges if c["scope_path"] == scope and c["unit"] == unit)
        active = sum(
            r["reserved"]
            for r in reservations
            if r["status"] == "ACTIVE"
            and r["unit"] == unit
            and scope in json.loads(r["budgeted_scopes"])
        )
        assert b["spent"] == spent, (scope, b, spent)
        assert b["reserved"] == active, (scope, b, active)
        remaining = b["allocated"] - b["spent"] - b["reserved"] - b["debt"]
        if reject:
            assert b["debt"] == 0, b
            assert b["spent"] <= b["allocated"], b
            assert remaining >= 0, b
    return Books(budgets, reservations, charges)
