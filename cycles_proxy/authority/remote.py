"""Remote budget authority: the Cycles v0 HTTP API (``spec/cycles-protocol-v0.yaml``).

One :class:`RemoteAuthority` owns ONE ``httpx.AsyncClient`` (keep-alive pool sized for hundreds of
concurrent requests, explicit connect/read/write/pool timeouts) shared by every call and by every
pass-through view (:meth:`RemoteAuthority.with_api_key`).

Wire rules: ``X-Cycles-API-Key`` on every call; every POST body carries ``idempotency_key`` and the
same value goes in ``X-Idempotency-Key``; only fields the spec defines are sent and ``None`` is
omitted (the reference server rejects unknown fields).

Recovery (cycles-protocol.md §6 and §5.6):

* transport errors, timeouts, 5xx, 429 and schema-invalid 2xx are retried with the SAME body and
  idempotency key, honouring ``Retry-After`` on 429, until a total per-call deadline;
* afterwards the outcome is unknown -> :class:`~.base.AuthorityUnavailable` (a 429 that cannot be
  waited out within the deadline -> ``CyclesError(LIMIT_EXCEEDED, retry_after_s=...)``);
* a commit answered 410 ``RESERVATION_EXPIRED`` is posted as ``POST /v1/events`` with the same
  idempotency key, the reservation's subject/action/overage policy, and
  ``metadata.recovered_reservation_id``;
* 409 ``RESERVATION_FINALIZED`` on a commit whose earlier attempt had an unknown outcome means that
  attempt landed: a :class:`~.base.CommitResult` is built from what we know;
* a commit or event that still cannot be delivered is written to the :class:`~.journal.Journal`
  (if configured) and :class:`SettlementDeferred` is raised; the journal is replayed by
  :meth:`RemoteAuthority.start` and by a background task;
* the authority never releases on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpcore
import httpx

from .base import (
    Action,
    Amount,
    AuthorityUnavailable,
    Balance,
    Caps,
    CommitResult,
    CyclesError,
    Decision,
    ErrorCode,
    EventResult,
    ExtendResult,
    Metrics,
    OveragePolicy,
    ReleaseResult,
    Reservation,
    ReserveRequest,
    SettlementDeferred,
    Subject,
    Unit,
)
from .journal import EVENTS_ENDPOINT, Journal, JournalRecord, ReplayReport, key_hash, record_id_for

log = logging.getLogger(__name__)

__all__ = [
    "HeartbeatResult",
    "HeartbeatStop",
    "RemoteAuthority",
    "SettlementDeferred",
]

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

#: extend outcomes after which the reservation can never be extended again (spec HEARTBEAT GUIDANCE)
PERMANENT_EXTEND_CODES = frozenset(
    {
        ErrorCode.RESERVATION_EXPIRED,
        ErrorCode.RESERVATION_FINALIZED,
        ErrorCode.MAX_EXTENSIONS_EXCEEDED,
        ErrorCode.TENANT_CLOSED,
        ErrorCode.NOT_FOUND,
    }
)

_STATUS_CODES: dict[int, ErrorCode] = {
    400: ErrorCode.INVALID_REQUEST,
    401: ErrorCode.UNAUTHORIZED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    410: ErrorCode.RESERVATION_EXPIRED,
    429: ErrorCode.LIMIT_EXCEEDED,
}
_OK_200 = frozenset({200})
_OK_EVENT = frozenset({200, 201})
_DECISIONS = frozenset(d.value for d in Decision)
_UNITS = frozenset(u.value for u in Unit)


class HeartbeatStop:
    """Why :meth:`RemoteAuthority.heartbeat` returned (string constants)."""

    PERMANENT = "permanent"  # EXPIRED/FINALIZED/MAX_EXTENSIONS/TENANT_CLOSED/NOT_FOUND (code set)
    REJECTED = "rejected"  # another 4xx: surfaced, never retried with a rotated key
    LEASE_TOO_SHORT = "lease_too_short"  # two consecutive successes with next_delay = 0
    RETRY_WINDOW_EXHAUSTED = "retry_window_exhausted"  # no complete retry + margin fits any more
    THROTTLED = "throttled"  # 429 whose Retry-After is missing/invalid/does not fit the window
    NO_PROGRESS = "no_progress"  # zero-time recovery loop guard
    NOT_LIVE = "not_live"  # the reservation has no id (dry run / DENY)


@dataclass(frozen=True, slots=True)
class HeartbeatResult:
    reason: str
    extensions: int
    code: ErrorCode | None = None
    error: str | None = None


@dataclass(slots=True)
class _ResInfo:
    """What the authority remembers about a live reservation it created."""

    api_key: str
    tenant: str | None
    key_hash: str
    subject: Subject
    action: Action
    overage_policy: OveragePolicy
    reserved: Amount | None
    expires_at_ms: int | None
    remaining_ttl_ms: int | None
    #: monotonic time the schema-valid create response was received (None: timing unknown),
    #: and that attempt's rtt
    received_at: float | None
    rtt_ms: int
    lease_ms: int
    created_at: float


@dataclass(slots=True)
class _Attempts:
    count: int = 0
    #: an earlier attempt's outcome is unknown (it may have been applied)
    ambiguous: bool = False
    rtt_ms: int = 0
    received_at: float | None = None


@dataclass(slots=True)
class _Reply:
    status: int
    data: dict[str, Any]
    headers: httpx.Headers


@dataclass(slots=True)
class _Shared:
    """State shared by a RemoteAuthority and all its pass-through views."""

    client: httpx.AsyncClient
    owns_client: bool
    tenant_keys: dict[str, str]
    default_api_key: str | None
    deadline_s: float
    settle_deadline_s: float
    timeout: httpx.Timeout
    heartbeat_attempt_timeout_s: float
    journal: Journal | None
    replay_interval_s: float
    replay_deadline_s: float
    tenant_cache_ttl_s: float
    tenant_negative_ttl_s: float
    clock: Clock
    sleep: Sleep
    reservations: dict[str, _ResInfo] = field(default_factory=dict)
    #: key hash -> raw pass-through key (memory only; lets journal replay find the key again)
    passthrough_keys: dict[str, str] = field(default_factory=dict)
    #: reservation id -> key of recently settled reservations (so a late duplicate settle gets
    #: the protocol's answer, e.g. RESERVATION_FINALIZED, with the right credentials)
    settled_keys: dict[str, str] = field(default_factory=dict)
    tenant_cache: dict[str, tuple[str | None, float]] = field(default_factory=dict)
    tenant_inflight: dict[str, asyncio.Future[str | None]] = field(default_factory=dict)
    replay_task: asyncio.Task[None] | None = None
    reserves_since_prune: int = 0


_MAX_CACHE = 10_000
_MAX_SETTLED = 4_096
_FORGET_AFTER_S = 3600.0  # keep reservation info this long past its lease (410 -> event needs it)


def _ceil_ms(seconds: float) -> int:
    return math.ceil(seconds * 1000)


def _floor_ms(seconds: float) -> int:
    return math.floor(seconds * 1000)


def _retry_after_s(headers: httpx.Headers) -> int | None:
    """Delta-seconds only (the HTTP-date form is invalid in this protocol)."""
    raw = headers.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    if not raw.isdigit():
        return None
    value = int(raw)
    return value if value < 10**9 else None


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _valid_amount(v: object) -> bool:
    return isinstance(v, dict) and v.get("unit") in _UNITS and _is_int(v.get("amount"))


def _amount(v: Mapping[str, Any]) -> Amount:
    return Amount(Unit(v["unit"]), int(v["amount"]))


def _opt_amount(v: object) -> Amount | None:
    return _amount(v) if _valid_amount(v) else None  # type: ignore[arg-type]


def _balances(raw: object) -> tuple[Balance, ...]:
    if not isinstance(raw, list):
        return ()
    out: list[Balance] = []
    for b in raw:
        if not isinstance(b, dict) or not isinstance(b.get("scope"), str):
            continue
        rem = b.get("remaining")
        if not (isinstance(rem, dict) and rem.get("unit") in _UNITS and _is_int(rem.get("amount"))):
            continue

        def part(name: str, bal: dict[str, Any] = b) -> int:
            v = bal.get(name)
            return int(v["amount"]) if isinstance(v, dict) and _valid_amount(v) else 0

        spent, reserved, debt = part("spent"), part("reserved"), part("debt")
        if _valid_amount(b.get("allocated")):
            allocated = part("allocated")
        else:  # remaining is authoritative: keep Balance.remaining equal to it
            allocated = int(rem["amount"]) + spent + reserved + debt
        out.append(
            Balance(
                scope=b["scope"],
                unit=Unit(rem["unit"]),
                allocated=allocated,
                spent=spent,
                reserved=reserved,
                debt=debt,
                overdraft_limit=part("overdraft_limit"),
                is_over_limit=bool(b.get("is_over_limit", False)),
            )
        )
    return tuple(out)


def _check_reserve(d: dict[str, Any]) -> bool:
    if d.get("decision") not in _DECISIONS or not isinstance(d.get("affected_scopes"), list):
        return False
    if "reservation_id" in d:
        return (
            isinstance(d["reservation_id"], str)
            and _is_int(d.get("expires_at_ms"))
            and ("reserved" not in d or _valid_amount(d["reserved"]))
            and ("remaining_ttl_ms" not in d or _is_int(d["remaining_ttl_ms"]))
        )
    return True


def _check_commit(d: dict[str, Any]) -> bool:
    return d.get("status") == "COMMITTED" and _valid_amount(d.get("charged"))


def _check_release(d: dict[str, Any]) -> bool:
    return d.get("status") == "RELEASED" and _valid_amount(d.get("released"))


def _check_extend(d: dict[str, Any]) -> bool:
    return (
        d.get("status") == "ACTIVE"
        and _is_int(d.get("expires_at_ms"))
        and ("remaining_ttl_ms" not in d or _is_int(d["remaining_ttl_ms"]))
    )


def _check_event(d: dict[str, Any]) -> bool:
    return (
        d.get("status") == "APPLIED"
        and isinstance(d.get("event_id"), str)
        and ("charged" not in d or _valid_amount(d["charged"]))
    )


def _check_balances(d: dict[str, Any]) -> bool:
    return isinstance(d.get("balances"), list)


def _check_list(d: dict[str, Any]) -> bool:
    return isinstance(d.get("reservations"), list)


def _error_from(resp: httpx.Response, data: object) -> CyclesError | AuthorityUnavailable:
    """Map an error response to CyclesError (ErrorResponse body or a recognisable status)."""
    status = resp.status_code
    retry_after = _retry_after_s(resp.headers) if status == 429 else None
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        try:
            code = ErrorCode(data["error"])
        except ValueError:
            code = _STATUS_CODES.get(status, ErrorCode.INVALID_REQUEST)
        details = data.get("details")
        return CyclesError(
            code,
            str(data.get("message", "")),
            retry_after_s=retry_after,
            details=details if isinstance(details, dict) else None,
        )
    if status in _STATUS_CODES:
        return CyclesError(
            _STATUS_CODES[status], f"HTTP {status} from Cycles", retry_after_s=retry_after
        )
    return AuthorityUnavailable(f"unexpected HTTP {status} from Cycles")


_SOCKET_OPTIONS = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)

_HTTPCORE_ERRORS: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.ProxyError, httpx.ProxyError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.ProtocolError, httpx.ProtocolError),
    (httpcore.ConnectionNotAvailable, httpx.RemoteProtocolError),
)


def _httpx_error(exc: Exception, request: httpx.Request) -> Exception:
    for core, mapped in _HTTPCORE_ERRORS:
        if isinstance(exc, core):
            return mapped(str(exc) or type(exc).__name__, request=request)
    return exc


class _PooledBody(httpx.AsyncByteStream):
    """Response body that hands its connection back to the pool when closed (exactly once)."""

    def __init__(
        self,
        pool: _ConnectionPool,
        origin: httpcore.Origin,
        conn: httpcore.AsyncHTTPConnection,
        resp: httpcore.Response,
        request: httpx.Request,
    ) -> None:
        self._pool = pool
        self._origin = origin
        self._conn = conn
        self._resp = resp
        self._request = request
        self._done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._resp.aiter_stream():
                yield chunk
        except Exception as exc:
            raise _httpx_error(exc, self._request) from exc

    async def aclose(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            await self._resp.aclose()
        finally:
            await self._pool.release(self._origin, self._conn)


class _ConnectionPool(httpx.AsyncBaseTransport):
    """An O(1) HTTP/1.1 keep-alive pool for the shared ``httpx.AsyncClient``.

    httpcore 1.0's pool rescans every connection and every queued request on each request start
    and end (super-linear: 300 concurrent trivial requests took ~6 s here, against ~0.2 s for a
    plain keep-alive pool). This transport keeps httpcore's per-connection protocol code
    (``httpcore.AsyncHTTPConnection``) and replaces only the pool: a semaphore bounds open
    connections, idle ones wait in a LIFO stack and are reused when still healthy.
    """

    def __init__(
        self,
        *,
        max_connections: int,
        max_keepalive_connections: int,
        keepalive_expiry: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._slots = asyncio.Semaphore(max_connections)
        self._max_idle = max_keepalive_connections
        self._keepalive_expiry = keepalive_expiry
        self._ssl_context = ssl_context
        self._idle: dict[tuple[bytes, bytes, int], list[httpcore.AsyncHTTPConnection]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    @staticmethod
    def _key(origin: httpcore.Origin) -> tuple[bytes, bytes, int]:
        return (origin.scheme, origin.host, origin.port)

    def _checkout(self, origin: httpcore.Origin) -> httpcore.AsyncHTTPConnection | None:
        stack = self._idle.get(self._key(origin))
        while stack:
            conn = stack.pop()
            if conn.is_idle() and not conn.has_expired():
                return conn
            self._discard(conn)
        return None

    def _discard(self, conn: httpcore.AsyncHTTPConnection) -> None:
        task = asyncio.ensure_future(self._close_quietly(conn))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close_quietly(conn: httpcore.AsyncHTTPConnection) -> None:
        with contextlib.suppress(Exception):
            await conn.aclose()

    async def release(self, origin: httpcore.Origin, conn: httpcore.AsyncHTTPConnection) -> None:
        try:
            if self._closed or not conn.is_idle():
                await conn.aclose()
                return
            stack = self._idle.setdefault(self._key(origin), [])
            if len(stack) >= self._max_idle:
                await conn.aclose()
            else:
                stack.append(conn)
        finally:
            self._slots.release()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise httpx.ConnectError("connection pool is closed", request=request)
        timeouts = request.extensions.get("timeout", {})
        try:
            async with asyncio.timeout(timeouts.get("pool")):
                await self._slots.acquire()
        except TimeoutError:
            raise httpx.PoolTimeout("no free connection in time", request=request) from None
        url = request.url
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        origin = core_request.url.origin
        conn: httpcore.AsyncHTTPConnection | None = None
        try:
            conn = self._checkout(origin)
            if conn is None:
                conn = httpcore.AsyncHTTPConnection(
                    origin,
                    ssl_context=self._ssl_context if origin.scheme == b"https" else None,
                    keepalive_expiry=self._keepalive_expiry,
                    # small JSON requests: never wait for Nagle/delayed-ACK (~40 ms stalls)
                    socket_options=_SOCKET_OPTIONS,
                )
            resp = await conn.handle_async_request(core_request)
        except BaseException as exc:
            if conn is not None:
                self._discard(conn)
            self._slots.release()
            if isinstance(exc, Exception):
                raise _httpx_error(exc, request) from exc
            raise
        return httpx.Response(
            status_code=resp.status,
            headers=resp.headers,
            stream=_PooledBody(self, origin, conn, resp, request),
            extensions=resp.extensions,
        )

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, {}
        for stack in idle.values():
            for conn in stack:
                await self._close_quietly(conn)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


class RemoteAuthority:
    """:class:`~.base.Authority` over the Cycles v0 HTTP API.

    Args:
        base_url: Cycles server root, e.g. ``http://cycles:7878`` (paths ``/v1/...`` are appended).
        tenant_keys: tenant name -> Cycles API key (mode a). ``subject.tenant`` picks the key.
        default_api_key: key for tenants absent from ``tenant_keys`` (e.g. ``CYCLES_API_KEY``).
        deadline_s: total time budget of one reserve/release/extend/balances call, retries included.
        settle_deadline_s: same for commit and event (settlement), before journaling.
        connect_timeout_s, read_timeout_s, write_timeout_s, pool_timeout_s: per-attempt httpx
            timeouts (each also capped by what is left of the deadline).
        max_connections, max_keepalive_connections, keepalive_expiry_s: the shared keep-alive
            pool (:class:`_ConnectionPool`, O(1) per request; requests beyond
            ``max_connections`` wait up to ``pool_timeout_s`` for a connection).
        heartbeat_attempt_timeout_s: the enforced bound of ONE extend attempt
            (``request_timeout_budget`` of the heartbeat algorithm).
        journal: a :class:`~.journal.Journal` (or a directory path for one) for undeliverable
            settlements; None disables journaling.
        replay_interval_s: how often the background task started by :meth:`start` replays it.
        replay_deadline_s: retry budget of one journaled delivery during a replay round (a
            round stops at the first unreachable delivery, so :meth:`start` waits at most
            about this long when Cycles is down).
        tenant_cache_ttl_s, tenant_negative_ttl_s: cache lifetime of :meth:`resolve_tenant`.
        ssl_context: TLS settings for an ``https`` base URL (default: httpx's, certifi CAs).
        transport: replaces the pool with any httpx transport (e.g. ``httpx.AsyncHTTPTransport``
            or ``httpx.MockTransport``); the limits above then do not apply.
        clock, sleep: monotonic clock (seconds) and sleep; injectable for virtual-time tests.
    """

    name: str = "remote"

    def __init__(
        self,
        base_url: str,
        *,
        tenant_keys: Mapping[str, str] | None = None,
        default_api_key: str | None = None,
        deadline_s: float = 5.0,
        settle_deadline_s: float = 15.0,
        connect_timeout_s: float = 2.0,
        read_timeout_s: float = 5.0,
        write_timeout_s: float = 5.0,
        pool_timeout_s: float = 5.0,
        max_connections: int = 256,
        max_keepalive_connections: int = 128,
        keepalive_expiry_s: float = 30.0,
        heartbeat_attempt_timeout_s: float = 3.0,
        journal: Journal | str | os.PathLike[str] | None = None,
        replay_interval_s: float = 30.0,
        replay_deadline_s: float = 2.0,
        tenant_cache_ttl_s: float = 300.0,
        tenant_negative_ttl_s: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        timeout = httpx.Timeout(
            connect=connect_timeout_s,
            read=read_timeout_s,
            write=write_timeout_s,
            pool=pool_timeout_s,
        )
        if transport is None:
            if ssl_context is None and base_url.startswith("https:"):
                ssl_context = httpx.create_ssl_context()
            transport = _ConnectionPool(
                max_connections=max_connections,
                max_keepalive_connections=max_keepalive_connections,
                keepalive_expiry=keepalive_expiry_s,
                ssl_context=ssl_context,
            )
        client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            timeout=timeout,
            headers={"Accept": "application/json", "User-Agent": "cycles-proxy"},
            transport=transport,
            trust_env=False,
        )
        self._s = _Shared(
            client=client,
            owns_client=True,
            tenant_keys=dict(tenant_keys or {}),
            default_api_key=default_api_key,
            deadline_s=deadline_s,
            settle_deadline_s=settle_deadline_s,
            timeout=timeout,
            heartbeat_attempt_timeout_s=heartbeat_attempt_timeout_s,
            journal=journal
            if journal is None or isinstance(journal, Journal)
            else Journal(journal),
            replay_interval_s=replay_interval_s,
            replay_deadline_s=replay_deadline_s,
            tenant_cache_ttl_s=tenant_cache_ttl_s,
            tenant_negative_ttl_s=tenant_negative_ttl_s,
            clock=clock,
            sleep=sleep,
        )
        self._api_key: str | None = None
        self._is_view = False

    @classmethod
    def from_settings(
        cls,
        settings: Any,
        *,
        journal_dir: str | os.PathLike[str] | None = None,
        **overrides: Any,
    ) -> RemoteAuthority:
        """Build from ``cycles_proxy.settings.Settings``: ``cycles_base_url``,
        ``cycles_api_key`` (default key), ``cycles_tenant_keys``; optional tuning attributes
        ``cycles_deadline_s``, ``cycles_settle_deadline_s``, ``cycles_connect_timeout_s``,
        ``cycles_read_timeout_s``, ``cycles_max_connections``, ``cycles_replay_interval_s``
        and ``cycles_heartbeat_attempt_timeout_s`` are used when present. ``journal_dir``
        enables the journal; ``overrides`` are passed to the constructor as is."""
        base_url = getattr(settings, "cycles_base_url", None)
        if not base_url:
            raise ValueError("cycles_base_url is not set")
        kwargs: dict[str, Any] = {
            "tenant_keys": dict(getattr(settings, "cycles_tenant_keys", None) or {}),
            "default_api_key": getattr(settings, "cycles_api_key", None) or None,
        }
        for attr, arg in (
            ("cycles_deadline_s", "deadline_s"),
            ("cycles_settle_deadline_s", "settle_deadline_s"),
            ("cycles_connect_timeout_s", "connect_timeout_s"),
            ("cycles_read_timeout_s", "read_timeout_s"),
            ("cycles_max_connections", "max_connections"),
            ("cycles_replay_interval_s", "replay_interval_s"),
            ("cycles_heartbeat_attempt_timeout_s", "heartbeat_attempt_timeout_s"),
        ):
            value = getattr(settings, attr, None)
            if value is not None:
                kwargs[arg] = value
        if journal_dir is not None:
            kwargs["journal"] = Journal(journal_dir)
        kwargs.update(overrides)
        return cls(str(base_url), **kwargs)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Replay what an earlier process left in the journal, then replay periodically."""
        if self._is_view:
            return
        s = self._s
        if s.journal is not None:
            try:
                await self.replay_journal()
            except Exception:  # never block startup on replay
                log.exception("journal replay at startup failed")
            if s.replay_task is None:
                s.replay_task = asyncio.create_task(self._replay_loop(), name="cycles-journal")

    async def close(self) -> None:
        if self._is_view:
            return
        s = self._s
        task, s.replay_task = s.replay_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if s.owns_client:
            await s.client.aclose()

    async def _replay_loop(self) -> None:
        s = self._s
        while True:
            await asyncio.sleep(s.replay_interval_s)
            if s.journal is None or s.journal.pending() == 0:
                continue
            try:
                await self.replay_journal()
            except Exception:
                log.exception("journal replay failed")

    # -- tenancy ---------------------------------------------------------------------------

    def with_api_key(self, api_key: str) -> RemoteAuthority:
        """A light view sharing this authority's client, journal and reservation memory that
        sends ``api_key`` (a caller's own Cycles key, pass-through mode) on every call.
        Its ``start``/``close`` are no-ops; the parent owns the client. Cheap enough to create
        per request. The raw key is kept in memory only (never on disk) once it reserved or
        resolved successfully, so that a journaled settlement can be replayed with it."""
        view = RemoteAuthority.__new__(RemoteAuthority)
        view._s = self._s
        view._api_key = api_key
        view._is_view = True
        return view

    async def resolve_tenant(self, api_key: str) -> str | None:
        """The effective tenant of a Cycles API key (pass-through mode), or None if the server
        refuses the key (401/403). Learned from ``X-Cycles-Tenant`` of a cheap
        ``GET /v1/reservations?limit=1``; cached per key hash. Raises AuthorityUnavailable when
        the server cannot be asked."""
        s = self._s
        h = key_hash(api_key)
        cached = s.tenant_cache.get(h)
        if cached is not None and cached[1] > s.clock():
            return cached[0]
        inflight = s.tenant_inflight.get(h)
        if inflight is not None:
            try:
                return await asyncio.shield(inflight)
            except asyncio.CancelledError:
                if not inflight.cancelled():
                    raise  # we were cancelled ourselves
                # the caller doing the lookup was cancelled: look it up ourselves
        fut: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        s.tenant_inflight[h] = fut
        try:
            tenant = await self._lookup_tenant(api_key, h)
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved
            raise
        else:
            fut.set_result(tenant)
            return tenant
        finally:
            s.tenant_inflight.pop(h, None)

    async def _lookup_tenant(self, api_key: str, h: str) -> str | None:
        s = self._s
        try:
            reply = await self._request(
                "GET",
                "/v1/reservations",
                api_key=api_key,
                params={"limit": "1"},
                ok=_OK_200,
                check=_check_list,
                deadline_s=s.deadline_s,
            )
        except CyclesError as exc:
            if exc.code in (ErrorCode.UNAUTHORIZED, ErrorCode.FORBIDDEN):
                self._cache_tenant(h, None, s.tenant_negative_ttl_s)
                return None
            raise
        tenant = reply.headers.get("x-cycles-tenant") or None
        if tenant is None:
            rows = reply.data["reservations"]
            if rows and isinstance(rows[0], dict) and isinstance(rows[0].get("subject"), dict):
                t = rows[0]["subject"].get("tenant")
                tenant = t if isinstance(t, str) and t else None
        if tenant is None:
            log.warning("Cycles server did not reveal the tenant of a key (no X-Cycles-Tenant)")
            return None
        self._remember_passthrough(api_key)
        self._cache_tenant(h, tenant, s.tenant_cache_ttl_s)
        return tenant

    def _cache_tenant(self, h: str, tenant: str | None, ttl_s: float) -> None:
        cache = self._s.tenant_cache
        cache.pop(h, None)
        if len(cache) >= _MAX_CACHE:
            cache.pop(next(iter(cache)))
        cache[h] = (tenant, self._s.clock() + ttl_s)

    def _remember_passthrough(self, api_key: str) -> str:
        keys = self._s.passthrough_keys
        h = key_hash(api_key)
        if h not in keys:
            if len(keys) >= _MAX_CACHE:
                keys.pop(next(iter(keys)))
            keys[h] = api_key
        return h

    def _key_for_tenant(self, tenant: str | None) -> str:
        if self._api_key is not None:
            return self._api_key
        s = self._s
        key = s.tenant_keys.get(tenant) if tenant else None
        key = key or s.default_api_key
        if key is None:
            raise CyclesError(
                ErrorCode.UNAUTHORIZED, f"no Cycles API key configured for tenant {tenant!r}"
            )
        return key

    def _key_for_reservation(self, info: _ResInfo | None) -> str:
        """The key a reservation was created with; for one this process does not know (created
        elsewhere, or forgotten): the default key, else the only configured tenant key."""
        if self._api_key is not None:
            return self._api_key
        if info is not None:
            return info.api_key
        s = self._s
        if s.default_api_key is not None:
            return s.default_api_key
        if len(s.tenant_keys) == 1:
            return next(iter(s.tenant_keys.values()))
        raise CyclesError(
            ErrorCode.UNAUTHORIZED, "reservation unknown to this proxy and no default Cycles key"
        )

    def _key_for_rid(self, reservation_id: str) -> str:
        s = self._s
        if self._api_key is None and reservation_id not in s.reservations:
            settled = s.settled_keys.get(reservation_id)
            if settled is not None:
                return settled
        return self._key_for_reservation(s.reservations.get(reservation_id))

    def _forget(self, reservation_id: str) -> None:
        s = self._s
        info = s.reservations.pop(reservation_id, None)
        if info is None:
            return
        settled = s.settled_keys
        if len(settled) >= _MAX_SETTLED:
            settled.pop(next(iter(settled)))
        settled[reservation_id] = info.api_key

    # -- journal (SettlementSender) ----------------------------------------------------------

    def pending(self) -> int:
        """Number of journaled settlements not yet delivered."""
        j = self._s.journal
        return j.pending() if j is not None else 0

    async def replay_journal(self) -> ReplayReport:
        j = self._s.journal
        if j is None:
            return ReplayReport()
        return await j.replay(self)

    def journal_api_key(self, tenant: str | None, key_hash: str | None) -> str | None:
        s = self._s
        if key_hash is not None and key_hash in s.passthrough_keys:
            return s.passthrough_keys[key_hash]
        if tenant is not None and tenant in s.tenant_keys:
            return s.tenant_keys[tenant]
        return s.default_api_key

    async def deliver_settlement(
        self, endpoint: str, body: Mapping[str, Any], api_key: str
    ) -> Mapping[str, Any]:
        is_event = endpoint == EVENTS_ENDPOINT
        reply = await self._request(
            "POST",
            endpoint,
            api_key=api_key,
            body=dict(body),
            ok=_OK_EVENT if is_event else _OK_200,
            check=_check_event if is_event else _check_commit,
            deadline_s=self._s.replay_deadline_s,
        )
        return reply.data

    def settlement_delivered(self, record: JournalRecord) -> None:
        if record.reservation_id is not None:
            self._forget(record.reservation_id)

    async def _journal(
        self,
        *,
        mode: str,
        endpoint: str,
        body: dict[str, Any],
        idempotency_key: str,
        reservation_id: str | None,
        api_key: str,
        tenant: str | None,
        fallback_body: dict[str, Any] | None,
        cause: BaseException,
    ) -> BaseException:
        """Persist an undeliverable settlement; returns the exception the caller should raise."""
        s = self._s
        if s.journal is None:
            log.error("settlement %s undeliverable and no journal configured", idempotency_key)
            return cause
        h = key_hash(api_key)
        if self._api_key is not None or h in s.passthrough_keys:
            self._remember_passthrough(api_key)
        not_before: int | None = None
        if isinstance(cause, CyclesError) and cause.retry_after_s is not None:
            not_before = time.time_ns() // 1_000_000 + cause.retry_after_s * 1000
        record = JournalRecord(
            record_id=record_id_for(reservation_id, idempotency_key),
            mode="event" if mode == "event" else "commit",
            endpoint=endpoint,
            body=body,
            idempotency_key=idempotency_key,
            tenant=tenant,
            key_hash=h,
            reservation_id=reservation_id,
            fallback_body=fallback_body,
            not_before_ms=not_before,
            last_error=str(cause),
            attempts=1,
        )
        try:
            await s.journal.add(record)
        except OSError as exc:
            log.error("could not journal settlement %s: %s", idempotency_key, exc)
            return AuthorityUnavailable(f"settlement undeliverable and journal failed: {exc}")
        if reservation_id is not None:
            self._forget(reservation_id)
        log.warning("settlement %s journaled for replay: %s", record.record_id, cause)
        return SettlementDeferred(
            f"settlement journaled for replay ({cause})", record_id=record.record_id
        )

    # -- HTTP core -------------------------------------------------------------------------

    def _attempt_timeout(self, remaining: float) -> httpx.Timeout:
        t = self._s.timeout
        return httpx.Timeout(
            connect=min(t.connect or remaining, remaining),
            read=min(t.read or remaining, remaining),
            write=min(t.write or remaining, remaining),
            pool=min(t.pool or remaining, remaining),
        )

    async def _request(
        self,
        method: str,
        path: str,
        *,
        api_key: str,
        ok: frozenset[int],
        check: Callable[[dict[str, Any]], bool],
        deadline_s: float,
        body: dict[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
        attempts: _Attempts | None = None,
    ) -> _Reply:
        """Send with retries (same body, same idempotency key) until ``deadline_s``."""
        s = self._s
        ctx = attempts if attempts is not None else _Attempts()
        headers = {"X-Cycles-API-Key": api_key}
        content: bytes | None = None
        if body is not None:
            content = json.dumps(body, separators=(",", ":"), default=str).encode()
            headers["Content-Type"] = "application/json"
            idem = body.get("idempotency_key")
            if isinstance(idem, str):
                headers["X-Idempotency-Key"] = idem
        mutating = method != "GET"
        deadline = s.clock() + deadline_s
        backoff = 0.05
        last_error = "deadline exhausted before the first attempt"
        while True:
            remaining = deadline - s.clock()
            if remaining <= 0:
                break
            ctx.count += 1
            sent = s.clock()
            try:
                async with asyncio.timeout(remaining):
                    resp = await s.client.request(
                        method,
                        path,
                        content=content,
                        params=params,
                        headers=headers,
                        timeout=self._attempt_timeout(remaining),
                    )
            except (httpx.TransportError, TimeoutError) as exc:
                last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                ctx.ambiguous = ctx.ambiguous or mutating
            else:
                received = s.clock()
                status = resp.status_code
                try:
                    data: object = resp.json() if resp.content else None
                except ValueError:
                    data = None
                if 200 <= status < 300:
                    if status in ok and isinstance(data, dict) and check(data):
                        ctx.rtt_ms = max(0, _ceil_ms(received - sent))
                        ctx.received_at = received
                        return _Reply(status, data, resp.headers)
                    # CR-CORE-004: a protocol-invalid 2xx proves nothing; retry with the same key
                    last_error = f"schema-invalid HTTP {status} response"
                    ctx.ambiguous = ctx.ambiguous or mutating
                elif status == 429:
                    err = _error_from(resp, data)
                    ra = err.retry_after_s if isinstance(err, CyclesError) else None
                    delay = float(ra) if ra is not None else backoff
                    if s.clock() + delay >= deadline:
                        if isinstance(err, CyclesError) and err.retry_after_s is None:
                            err.retry_after_s = max(1, math.ceil(delay))
                        raise err
                    last_error = "HTTP 429"
                    backoff = min(backoff * 2, 1.0)
                    await s.sleep(delay)
                    continue
                elif status >= 500 or status == 408:
                    last_error = f"HTTP {status}"
                    ctx.ambiguous = ctx.ambiguous or mutating
                else:
                    raise _error_from(resp, data)
            delay = min(backoff * (0.5 + random.random() / 2), max(0.0, deadline - s.clock()))
            backoff = min(backoff * 2, 1.0)
            if delay > 0:
                await s.sleep(delay)
        raise AuthorityUnavailable(
            f"Cycles {method} {path} failed after {ctx.count} attempt(s): {last_error}"
        )

    # -- Authority operations --------------------------------------------------------------

    async def reserve(self, req: ReserveRequest) -> Reservation:
        s = self._s
        api_key = self._key_for_tenant(req.subject.tenant)
        body: dict[str, Any] = {
            "idempotency_key": req.idempotency_key,
            "subject": req.subject.to_dict(),
            "action": req.action.to_dict(),
            "estimate": req.estimate.to_dict(),
            "ttl_ms": req.ttl_ms,
            "grace_period_ms": req.grace_period_ms,
            "overage_policy": str(req.overage_policy),
        }
        if req.dry_run:
            body["dry_run"] = True
        if req.metadata:
            body["metadata"] = req.metadata
        ctx = _Attempts()
        reply = await self._request(
            "POST",
            "/v1/reservations",
            api_key=api_key,
            body=body,
            ok=_OK_200,
            check=_check_reserve,
            deadline_s=s.deadline_s,
            attempts=ctx,
        )
        d = reply.data
        caps_raw = d.get("caps")
        caps = None
        if isinstance(caps_raw, dict):
            mt = caps_raw.get("max_tokens")
            caps = Caps(max_tokens=mt if _is_int(mt) else None)
        retry_after = d.get("retry_after_ms")
        res = Reservation(
            decision=Decision(d["decision"]),
            affected_scopes=tuple(str(x) for x in d["affected_scopes"]),
            reservation_id=d.get("reservation_id"),
            reserved=_opt_amount(d.get("reserved")),
            expires_at_ms=d.get("expires_at_ms"),
            remaining_ttl_ms=d.get("remaining_ttl_ms"),
            scope_path=d.get("scope_path") if isinstance(d.get("scope_path"), str) else None,
            caps=caps,
            balances=_balances(d.get("balances")),
            reason_code=d.get("reason_code") if isinstance(d.get("reason_code"), str) else None,
            retry_after_ms=retry_after if _is_int(retry_after) else None,
        )
        if res.reservation_id is not None:
            self._remember(res, req, api_key, ctx)
        return res

    def _remember(
        self, res: Reservation, req: ReserveRequest, api_key: str, ctx: _Attempts
    ) -> None:
        s = self._s
        assert res.reservation_id is not None
        s.reserves_since_prune += 1
        if s.reserves_since_prune >= 1024:
            s.reserves_since_prune = 0
            self._prune()
        h = key_hash(api_key)
        if self._api_key is not None:
            self._remember_passthrough(api_key)
        s.reservations[res.reservation_id] = _ResInfo(
            api_key=api_key,
            tenant=req.subject.tenant,
            key_hash=h,
            subject=req.subject,
            action=req.action,
            overage_policy=req.overage_policy,
            reserved=res.reserved,
            expires_at_ms=res.expires_at_ms,
            remaining_ttl_ms=res.remaining_ttl_ms,
            received_at=ctx.received_at,
            rtt_ms=ctx.rtt_ms,
            lease_ms=req.ttl_ms + req.grace_period_ms,
            created_at=s.clock(),
        )

    def _prune(self) -> None:
        """Forget reservations long past their lease that were never settled here."""
        s = self._s
        now = s.clock()
        stale = [
            rid
            for rid, info in s.reservations.items()
            if now - info.created_at > info.lease_ms / 1000 + _FORGET_AFTER_S
        ]
        for rid in stale:
            del s.reservations[rid]

    async def commit(
        self,
        reservation_id: str,
        *,
        idempotency_key: str,
        actual: Amount,
        metrics: Metrics | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> CommitResult:
        s = self._s
        info = s.reservations.get(reservation_id)
        api_key = self._key_for_rid(reservation_id)
        body: dict[str, Any] = {"idempotency_key": idempotency_key, "actual": actual.to_dict()}
        m = metrics.to_dict() if metrics is not None else None
        if m:
            body["metrics"] = m
        if metadata:
            body["metadata"] = metadata
        endpoint = f"/v1/reservations/{quote(reservation_id, safe='')}/commit"
        fallback = self._event_fallback(reservation_id, info, body)
        tenant = info.tenant if info is not None else None
        ctx = _Attempts()
        try:
            reply = await self._request(
                "POST",
                endpoint,
                api_key=api_key,
                body=body,
                ok=_OK_200,
                check=_check_commit,
                deadline_s=s.settle_deadline_s,
                attempts=ctx,
            )
        except CyclesError as exc:
            if exc.code is ErrorCode.RESERVATION_EXPIRED and fallback is not None:
                log.info("commit of %s expired; posting it as an event", reservation_id)
                return await self._commit_as_event(reservation_id, fallback, api_key, tenant)
            if exc.code is ErrorCode.RESERVATION_FINALIZED and ctx.ambiguous:
                # an earlier attempt with this key landed; its response was lost
                self._forget(reservation_id)
                released = None
                if info is not None and info.reserved is not None:
                    rest = info.reserved.amount - actual.amount
                    released = Amount(actual.unit, rest) if rest > 0 else None
                return CommitResult(charged=actual, released=released)
            if exc.code is ErrorCode.LIMIT_EXCEEDED:
                raise await self._journal(
                    mode="commit",
                    endpoint=endpoint,
                    body=body,
                    idempotency_key=idempotency_key,
                    reservation_id=reservation_id,
                    api_key=api_key,
                    tenant=tenant,
                    fallback_body=fallback,
                    cause=exc,
                ) from exc
            raise
        except AuthorityUnavailable as exc:
            raise await self._journal(
                mode="commit",
                endpoint=endpoint,
                body=body,
                idempotency_key=idempotency_key,
                reservation_id=reservation_id,
                api_key=api_key,
                tenant=tenant,
                fallback_body=fallback,
                cause=exc,
            ) from exc
        self._forget(reservation_id)
        d = reply.data
        return CommitResult(
            charged=_amount(d["charged"]),
            released=_opt_amount(d.get("released")),
            balances=_balances(d.get("balances")),
        )

    @staticmethod
    def _event_fallback(
        reservation_id: str, info: _ResInfo | None, commit_body: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """The ``POST /v1/events`` body recovering this commit if the reservation expired."""
        if info is None:
            return None
        meta = dict(commit_body.get("metadata") or {})
        meta["recovered_reservation_id"] = reservation_id
        ev: dict[str, Any] = {
            "idempotency_key": commit_body["idempotency_key"],
            "subject": info.subject.to_dict(),
            "action": info.action.to_dict(),
            "actual": commit_body["actual"],
            "overage_policy": str(info.overage_policy),
        }
        if "metrics" in commit_body:
            ev["metrics"] = commit_body["metrics"]
        ev["metadata"] = meta
        return ev

    async def _commit_as_event(
        self, reservation_id: str, ev_body: dict[str, Any], api_key: str, tenant: str | None
    ) -> CommitResult:
        d = await self._post_event(ev_body, api_key, tenant, reservation_id=reservation_id)
        self._forget(reservation_id)
        charged = _opt_amount(d.get("charged")) or _amount(ev_body["actual"])
        return CommitResult(charged=charged, balances=_balances(d.get("balances")))

    async def _post_event(
        self,
        body: dict[str, Any],
        api_key: str,
        tenant: str | None,
        *,
        reservation_id: str | None = None,
    ) -> dict[str, Any]:
        """POST an event; spend it could not deliver (server down, or over its limit) goes to
        the journal and the journal's error is raised."""
        try:
            reply = await self._request(
                "POST",
                EVENTS_ENDPOINT,
                api_key=api_key,
                body=body,
                ok=_OK_EVENT,
                check=_check_event,
                deadline_s=self._s.settle_deadline_s,
            )
        except CyclesError as exc:
            if exc.code is not ErrorCode.LIMIT_EXCEEDED:
                raise
            cause: BaseException = exc
        except AuthorityUnavailable as exc:
            cause = exc
        else:
            return reply.data
        raise await self._journal(
            mode="event",
            endpoint=EVENTS_ENDPOINT,
            body=body,
            idempotency_key=body["idempotency_key"],
            reservation_id=reservation_id,
            api_key=api_key,
            tenant=tenant,
            fallback_body=None,
            cause=cause,
        ) from cause

    async def release(
        self, reservation_id: str, *, idempotency_key: str, reason: str | None = None
    ) -> ReleaseResult:
        s = self._s
        body: dict[str, Any] = {"idempotency_key": idempotency_key}
        if reason:
            body["reason"] = reason[:256]
        reply = await self._request(
            "POST",
            f"/v1/reservations/{quote(reservation_id, safe='')}/release",
            api_key=self._key_for_rid(reservation_id),
            body=body,
            ok=_OK_200,
            check=_check_release,
            deadline_s=s.deadline_s,
        )
        self._forget(reservation_id)
        d = reply.data
        return ReleaseResult(released=_amount(d["released"]), balances=_balances(d.get("balances")))

    async def extend(
        self, reservation_id: str, *, idempotency_key: str, extend_by_ms: int
    ) -> ExtendResult:
        s = self._s
        info = s.reservations.get(reservation_id)
        reply = await self._request(
            "POST",
            f"/v1/reservations/{quote(reservation_id, safe='')}/extend",
            api_key=self._key_for_rid(reservation_id),
            body={"idempotency_key": idempotency_key, "extend_by_ms": extend_by_ms},
            ok=_OK_200,
            check=_check_extend,
            deadline_s=s.deadline_s,
        )
        d = reply.data
        if info is not None:
            info.expires_at_ms = d["expires_at_ms"]
        return ExtendResult(
            expires_at_ms=d["expires_at_ms"],
            remaining_ttl_ms=d.get("remaining_ttl_ms"),
            balances=_balances(d.get("balances")),
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
        api_key = self._key_for_tenant(subject.tenant)
        body: dict[str, Any] = {
            "idempotency_key": idempotency_key,
            "subject": subject.to_dict(),
            "action": action.to_dict(),
            "actual": actual.to_dict(),
            "overage_policy": str(overage_policy),
        }
        m = metrics.to_dict() if metrics is not None else None
        if m:
            body["metrics"] = m
        if metadata:
            body["metadata"] = metadata
        d = await self._post_event(body, api_key, subject.tenant)
        return EventResult(
            event_id=d["event_id"],
            charged=_opt_amount(d.get("charged")),
            balances=_balances(d.get("balances")),
        )

    async def balances(self, subject: Subject) -> list[Balance]:
        s = self._s
        api_key = self._key_for_tenant(subject.tenant)
        params: dict[str, str] = dict(subject.to_dict())
        params["limit"] = "200"
        out: list[Balance] = []
        for _ in range(100):  # pages; bounded
            reply = await self._request(
                "GET",
                "/v1/balances",
                api_key=api_key,
                params=params,
                ok=_OK_200,
                check=_check_balances,
                deadline_s=s.deadline_s,
            )
            out.extend(_balances(reply.data["balances"]))
            cursor = reply.data.get("next_cursor")
            if not (reply.data.get("has_more") and isinstance(cursor, str) and cursor):
                break
            params["cursor"] = cursor
        return out

    # -- heartbeat -------------------------------------------------------------------------

    async def heartbeat(self, reservation: Reservation, ttl_ms: int) -> HeartbeatResult:
        """Keep ``reservation`` alive while a stream runs; run it as a task and cancel it when
        the stream ends. Scheduling follows the spec's primary algorithm (HEARTBEAT GUIDANCE,
        cycles-protocol.md §5.5) whenever responses carry ``remaining_ttl_ms``; the measured-grant
        fallback otherwise. Each extension asks for ``ttl_ms``. Failures are logged, never raised
        (non-fatal, CR-CORE-003); the returned :class:`HeartbeatResult` says why it stopped."""
        rid = reservation.reservation_id
        if rid is None:
            return HeartbeatResult(HeartbeatStop.NOT_LIVE, 0)
        return await _Heartbeat(self, rid, reservation, ttl_ms).run()

    async def _extend_once(
        self, reservation_id: str, api_key: str, idempotency_key: str, ttl_ms: int, timeout_s: float
    ) -> tuple[httpx.Response, object]:
        body = {"idempotency_key": idempotency_key, "extend_by_ms": ttl_ms}
        async with asyncio.timeout(timeout_s):
            resp = await self._s.client.post(
                f"/v1/reservations/{quote(reservation_id, safe='')}/extend",
                content=json.dumps(body, separators=(",", ":")).encode(),
                headers={
                    "X-Cycles-API-Key": api_key,
                    "X-Idempotency-Key": idempotency_key,
                    "Content-Type": "application/json",
                },
                timeout=self._attempt_timeout(timeout_s),
            )
        try:
            data: object = resp.json() if resp.content else None
        except ValueError:
            data = None
        return resp, data


class _Heartbeat:
    """One reservation's heartbeat (spec HEARTBEAT GUIDANCE; all arithmetic in integer ms)."""

    def __init__(
        self, auth: RemoteAuthority, rid: str, reservation: Reservation, ttl_ms: int
    ) -> None:
        s = auth._s
        self.auth = auth
        self.s = s
        self.rid = rid
        self.ttl_ms = ttl_ms
        info = s.reservations.get(rid)
        self.info = info
        self.api_key = auth._key_for_rid(rid)
        self.timeout_budget_ms = _ceil_ms(s.heartbeat_attempt_timeout_s)
        self.max_rtt_ms = 0
        self.extensions = 0
        now = s.clock()
        if reservation.remaining_ttl_ms is not None:
            self.primary = True
            if info is not None and info.received_at is not None and info.rtt_ms >= 0:
                self.lead_floor_ms = max(0, reservation.remaining_ttl_ms - info.rtt_ms)
                self.received_at = info.received_at
                self.max_rtt_ms = info.rtt_ms
            else:  # attempt timing unknown -> lead_floor = 0 (never "zero elapsed time")
                self.lead_floor_ms = 0
                self.received_at = now
        else:
            self.primary = False
            self.lead_floor_ms = 0
            self.received_at = now if info is None or info.received_at is None else info.received_at
        # fallback (measured-grant) state
        self.reserve_received_at = self.received_at
        self.last_expires_ms = reservation.expires_at_ms
        self.sum_grants_ms = 0
        self.last_grant_ms = 0
        self.prev_ext_at = self.received_at
        self.cadence_ms = 0  # 0 = first extension fires immediately

    # spec quantities
    def attempt_budget_ms(self) -> int:
        return max(self.timeout_budget_ms, 1000, 2 * self.max_rtt_ms)

    def safety_margin_ms(self) -> int:
        return max(1000, 2 * self.max_rtt_ms)

    def next_delay_ms(self) -> int:
        retry_reserve = 2 * self.attempt_budget_ms() + self.safety_margin_ms()
        return max(0, self.lead_floor_ms - retry_reserve)

    def lead_estimate_ms(self) -> int:
        """current_lead_estimate (primary) / lead_min (fallback), from the last valid response."""
        if self.primary:
            elapsed = _ceil_ms(self.s.clock() - self.received_at)
            return max(0, self.lead_floor_ms - elapsed)
        elapsed = _ceil_ms(self.s.clock() - self.reserve_received_at)
        return max(0, self.sum_grants_ms - elapsed)

    async def _sleep_until(self, t: float) -> None:
        wait = t - self.s.clock()
        if wait > 0:
            await self.s.sleep(wait)

    def _stop(
        self, reason: str, code: ErrorCode | None = None, error: str | None = None
    ) -> HeartbeatResult:
        if reason != HeartbeatStop.PERMANENT or code is not ErrorCode.RESERVATION_FINALIZED:
            log.warning(
                "heartbeat for %s stopped: %s%s%s",
                self.rid,
                reason,
                f" ({code})" if code else "",
                f": {error}" if error else "",
            )
        return HeartbeatResult(reason, self.extensions, code, error)

    async def run(self) -> HeartbeatResult:
        prev_success_zero = False
        while True:
            if self.primary:
                delay_ms = self.next_delay_ms()
                if delay_ms == 0:
                    if prev_success_zero:
                        return self._stop(HeartbeatStop.LEASE_TOO_SHORT)
                    prev_success_zero = True
                else:
                    prev_success_zero = False
                await self._sleep_until(self.received_at + delay_ms / 1000)
            else:
                prev_success_zero = False
                await self._sleep_until(self.received_at + self.cadence_ms / 1000)
                # skip a beat while the measured lower bound is comfortably large
                while (
                    not self.primary
                    and self.last_grant_ms > 0
                    and self.lead_estimate_ms() >= 1.5 * self.last_grant_ms
                ):
                    await self.s.sleep(max(self.cadence_ms, 1000) / 1000)
            result = await self._beat()
            if result is not None:
                return result

    async def _beat(self) -> HeartbeatResult | None:
        """One extension with a fresh key, recovered with the SAME key; None = success."""
        key = f"hb-{uuid.uuid4().hex}"
        prev_elapsed: int | None = None
        prev_window: int | None = None
        zero_window_used = False
        s = self.s
        while True:
            sent = s.clock()
            status: int | None = None
            data: object = None
            headers: httpx.Headers | None = None
            failure: str
            try:
                resp, data = await self.auth._extend_once(
                    self.rid, self.api_key, key, self.ttl_ms, self.timeout_budget_ms / 1000
                )
                status, headers = resp.status_code, resp.headers
            except (httpx.TransportError, TimeoutError) as exc:
                failure = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                if status == 200 and isinstance(data, dict) and _check_extend(data):
                    received = s.clock()
                    rtt = _ceil_ms(received - sent)
                    self._on_success(data, rtt, received)
                    return None
                if status == 200 or (status is not None and 200 <= status < 300):
                    failure = f"ambiguous HTTP {status} response"
                elif status == 429 or status >= 500:
                    failure = f"HTTP {status}"
                else:
                    assert headers is not None
                    err = _error_from(resp, data)
                    if isinstance(err, CyclesError):
                        if err.code in PERMANENT_EXTEND_CODES:
                            return self._stop(HeartbeatStop.PERMANENT, err.code, err.message)
                        return self._stop(HeartbeatStop.REJECTED, err.code, err.message)
                    return self._stop(HeartbeatStop.REJECTED, None, str(err))
            # transient failure: timeout, connection error, 5xx, 429, ambiguous 2xx
            log.warning("heartbeat extend for %s failed (%s)", self.rid, failure)
            now = s.clock()
            base = self.received_at if self.primary else self.reserve_received_at
            elapsed = _floor_ms(now - base)
            current_lead = self.lead_estimate_ms()
            window = current_lead - self.attempt_budget_ms() - self.safety_margin_ms()
            if window < 0 or (window == 0 and zero_window_used):
                return self._stop(HeartbeatStop.RETRY_WINDOW_EXHAUSTED, None, failure)
            if (
                prev_elapsed is not None
                and prev_window is not None
                and not (elapsed > prev_elapsed or window < prev_window)
            ):
                return self._stop(HeartbeatStop.NO_PROGRESS, None, failure)
            if window == 0:
                zero_window_used = True  # one immediate retry; a second failure stops
            if status == 429:
                assert headers is not None
                ra = _retry_after_s(headers)
                if ra is None or ra * 1000 > window:
                    return self._stop(HeartbeatStop.THROTTLED, ErrorCode.LIMIT_EXCEEDED, failure)
                delay_ms = ra * 1000
            else:
                delay_ms = min(30_000, current_lead // 4, window)
            prev_elapsed, prev_window = elapsed, window
            if delay_ms > 0:
                await s.sleep(delay_ms / 1000)

    def _on_success(self, data: dict[str, Any], rtt_ms: int, received: float) -> None:
        self.extensions += 1
        self.max_rtt_ms = max(self.max_rtt_ms, rtt_ms)
        expires = int(data["expires_at_ms"])
        if self.info is not None:
            self.info.expires_at_ms = expires
        remaining = data.get("remaining_ttl_ms")
        if _is_int(remaining):
            self.primary = True
            assert isinstance(remaining, int)
            self.lead_floor_ms = max(0, remaining - rtt_ms)
            self.received_at = received
            return
        # fallback: measured grants (differences of successive expires_at_ms, same server frame)
        self.primary = False
        grant = expires - self.last_expires_ms if self.last_expires_ms is not None else 0
        self.last_expires_ms = expires
        self.sum_grants_ms += max(0, grant)
        self.last_grant_ms = grant
        since_prev = _floor_ms(received - self.prev_ext_at)
        self.prev_ext_at = received
        self.received_at = received
        held = min(self.ttl_ms // 2, 30_000)
        if grant >= 0.9 * self.ttl_ms:
            self.cadence_ms = max(1000, grant // 2)
        elif grant <= 0 or 0.75 * since_prev <= grant <= 1.25 * since_prev:
            self.cadence_ms = max(1000, held)  # maximum-lead clamping: bounded fixed cadence
        else:
            self.cadence_ms = max(1000, grant // 2)
