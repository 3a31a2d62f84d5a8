"""The one request path (design §2): accept -> identify -> classify -> parse -> estimate ->
reserve -> forward and stream -> settle exactly once -> record.

Read :meth:`Proxy.handle` and :meth:`Proxy.metered` top to bottom; everything they call is
either pure (dialects, pricing, routes) or an edge (authority, upstream, observer).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any

import aiohttp
from aiohttp import web

from cycles_proxy.authority.base import (
    DENIAL_CODES,
    Action,
    Amount,
    Authority,
    AuthorityUnavailable,
    CyclesError,
    ErrorCode,
    Metrics,
    Reservation,
    ReserveRequest,
    SettlementDeferred,
    once_key,
)
from cycles_proxy.dialects import ollama as ollama_dialect
from cycles_proxy.dialects import openai as openai_dialect
from cycles_proxy.dialects.common import BadRequest, ParsedRequest, Scanner, Usage, dumps_body
from cycles_proxy.estimator import Estimate, Estimator
from cycles_proxy.money import format_amount
from cycles_proxy.observability import Observer, RequestRecord
from cycles_proxy.pricing import CHARS_PER_TOKEN, Pricing
from cycles_proxy.routes import Dialect, Kind, Route, classify
from cycles_proxy.settings import FailurePolicy, Settings
from cycles_proxy.tenants import KeyStore, Tenant, extract_key
from cycles_proxy.upstream import Upstream, cut_transfer, origin_form, relay_passthrough

log = logging.getLogger("cycles_proxy")

_UPSTREAM_BROKE = (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError)


class Reply(Exception):
    """An early answer in the caller's dialect (auth, parse, denial errors)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str,
        outcome: str,
        headers: dict[str, str] | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.outcome = outcome
        self.headers = headers or {}
        #: for budget denials: why (the Cycles error code, lower-cased), for metrics
        self.reason = reason


@dataclass(slots=True)
class Exchange:
    """What happened upstream, gathered while the response streams."""

    sent_ns: int = 0
    first_byte_ns: int | None = None
    ended_ns: int = 0
    status: int | None = None
    #: the upstream began working on the request (it answered with a non-refusal status)
    worked: bool = False
    usage: Usage = field(default_factory=Usage)
    broke: str | None = None
    client_gone: bool = False
    #: no other metered request was in flight when this one was sent upstream
    alone: bool = True


@dataclass(slots=True)
class Metered:
    """One metered request in flight: who pays, what was reserved, what happened."""

    tenant: Tenant
    action: Action
    parsed: ParsedRequest
    reservation: Reservation | None
    rec: RequestRecord
    strip_usage: bool
    ex: Exchange = field(default_factory=Exchange)
    settling: asyncio.Task[None] | None = None

    @property
    def settled(self) -> bool:
        return self.settling is not None


def buffered(up: aiohttp.ClientResponse) -> bool:
    """Is this a one-object JSON answer small enough to hold until it is settled?"""
    if up.content_type in ("text/event-stream", "application/x-ndjson"):
        return False
    length = up.content_length
    return length is not None and length <= ollama_dialect.JSON_SCAN_LIMIT


class ReadWatchdog:
    """Cancels the reading task when no data moved for ``gap`` seconds. One timer per stream,
    re-armed lazily: per chunk the reader only stores ``loop.time()`` (a per-chunk
    ``asyncio.timeout`` costs a timer handle and a cancellation each time)."""

    __slots__ = ("_gap", "_handle", "_task", "fired", "last", "loop")

    def __init__(self, gap: float) -> None:
        self.loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._gap = gap
        self.last = self.loop.time()
        self.fired = False
        self._handle: asyncio.TimerHandle | None = self.loop.call_at(self.last + gap, self._check)

    def _check(self) -> None:
        deadline = self.last + self._gap
        if self.loop.time() >= deadline:
            self.fired = True
            self._handle = None
            self._task.cancel()
        else:
            self._handle = self.loop.call_at(deadline, self._check)

    def absorb(self) -> None:
        """The cancellation was ours: take it back so the task can go on (to settle)."""
        self._task.uncancel()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class Proxy:
    def __init__(
        self,
        settings: Settings,
        authority: Authority,
        keys: KeyStore,
        upstream: Upstream,
        observer: Observer,
    ) -> None:
        self.settings = settings
        self.authority = authority
        self.keys = keys
        self.upstream = upstream
        self.observer = observer
        self.pricing = Pricing(settings)
        self.estimator = Estimator(
            self.pricing,
            default_seconds=settings.default_estimate_seconds,
            max_seconds=settings.max_estimate_seconds,
            safety_factor=settings.estimate_safety_factor,
            learn=settings.learn_estimates,
            db=settings.db,
        )
        self.unit = settings.unit
        self._background: set[asyncio.Task[Any]] = set()
        self._tenant_inflight: dict[str, int] = {}
        self.passthrough_keys = settings.remote and settings.cycles_key_passthrough
        self.inflight = 0

    # ---------------------------------------------------------------------------------------
    # entry point: every request of the proxy port
    # ---------------------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        route = classify(request.path)
        rec = RequestRecord(request.method, request.path, route.endpoint or str(route.kind))
        t0 = time.perf_counter_ns()
        try:
            if route.kind is Kind.PUBLIC:
                rec.outcome = "passthrough"
                return await self._passthrough(request, rec)
            tenant = await self.identify(request, route)
            rec.tenant, rec.key_id = tenant.name, tenant.key_id
            if route.kind is Kind.ADMIN_ONLY and not tenant.is_admin:
                raise Reply(
                    403,
                    f"{route_label(request.path)} manages models and needs an admin key; "
                    f"tenant '{tenant.name}' has a user key",
                    code="forbidden",
                    outcome="forbidden",
                )
            if route.kind is not Kind.METERED or request.method == "OPTIONS":
                rec.outcome = "passthrough"
                return await self._passthrough(request, rec)
            return await self.metered(request, route, tenant, rec)
        except Reply as r:
            rec.status, rec.outcome = r.status, r.outcome
            rec.error, rec.denial_reason = r.message, r.reason
            return error_response(route.dialect, r.status, r.message, r.code, r.headers)
        finally:
            rec.duration_ms = (time.perf_counter_ns() - t0) / 1e6
            self.observer.record(rec)

    async def identify(self, request: web.Request, route: Route) -> Tenant:
        key = extract_key(request.headers)
        if key is None:
            anon = self.settings.anonymous_tenant
            if anon:
                return self.keys.tenant(anon)
            if route.kind is Kind.PASS and not self.settings.require_key_for_passthrough:
                return self.keys.tenant("anonymous")
            raise Reply(
                401,
                "missing API key: send 'Authorization: Bearer <key>' "
                "(set OLLAMA_API_KEY for the ollama client, api_key= for the OpenAI SDK)",
                code="missing_api_key",
                outcome="unauthorized",
            )
        tenant = self.keys.lookup(key)
        if tenant is None and self.passthrough_keys:
            tenant = await self._cycles_tenant(key)
        if tenant is None:
            raise Reply(
                401,
                "invalid API key: it is unknown or was revoked",
                code="invalid_api_key",
                outcome="unauthorized",
            )
        return tenant

    async def _cycles_tenant(self, key: str) -> Tenant | None:
        """Pass-through tenancy: the caller's key is a Cycles API key; the server says whose."""
        try:
            name = await self.authority.resolve_tenant(key)  # type: ignore[attr-defined]
        except AuthorityUnavailable:
            raise authority_unreachable("the API key cannot be checked") from None
        if name is None:
            return None
        return replace(self.keys.tenant(name), cycles_key=key)

    def auth(self, tenant: Tenant) -> Authority:
        """The authority to act for ``tenant`` (a view sending its own key in pass-through)."""
        if tenant.cycles_key is not None:
            view: Authority = self.authority.with_api_key(tenant.cycles_key)  # type: ignore[attr-defined]
            return view
        return self.authority

    def keep_alive(self, tenant: Tenant, reservation: Reservation) -> Callable[[], None]:
        """Extend the reservation while a long stream runs (a crash still frees it by TTL);
        returns the function that stops it."""
        auth = self.auth(tenant)
        ttl = self.settings.reservation_ttl_ms
        heartbeat = getattr(auth, "heartbeat", None)
        if heartbeat is not None:  # the remote authority follows the spec's algorithm
            beat: asyncio.Future[Any] = asyncio.ensure_future(heartbeat(reservation, ttl))

            def stop_heartbeat() -> None:
                beat.cancel()

            return stop_heartbeat
        # embedded: most requests end long before half their lease, so only a timer is armed
        # per request; the extending task exists only for the long ones
        started: list[asyncio.Task[None]] = []

        def due() -> None:
            started.append(asyncio.ensure_future(self._extend_every(auth, reservation, ttl)))

        timer = asyncio.get_running_loop().call_later(ttl / 2000, due)

        def stop() -> None:
            timer.cancel()
            for task in started:
                task.cancel()

        return stop

    async def _extend_every(self, auth: Authority, reservation: Reservation, ttl: int) -> None:
        assert reservation.reservation_id is not None
        while True:  # extending by half the lease every half lease cannot drift
            try:
                await auth.extend(
                    reservation.reservation_id,
                    idempotency_key=once_key(),
                    extend_by_ms=ttl // 2,
                )
            except (CyclesError, AuthorityUnavailable) as exc:
                log.warning("extending %s failed: %s", reservation.reservation_id, exc)
                return
            await asyncio.sleep(ttl / 2000)

    async def _passthrough(self, request: web.Request, rec: RequestRecord) -> web.StreamResponse:
        try:
            resp = await relay_passthrough(request, self.upstream)
        except (aiohttp.ClientError, TimeoutError) as exc:  # before the response began
            if isinstance(exc.__cause__, web.RequestPayloadError):  # the caller's body, not us
                raise unreadable_body(exc.__cause__, request) from None
            raise upstream_failed(exc, self.settings) from None
        rec.status = resp.status
        return resp

    # ---------------------------------------------------------------------------------------
    # the metered path
    # ---------------------------------------------------------------------------------------
    async def metered(
        self, request: web.Request, route: Route, tenant: Tenant, rec: RequestRecord
    ) -> web.StreamResponse:
        dialect = ollama_dialect if route.dialect is Dialect.OLLAMA else openai_dialect
        if request.method != "POST":
            raise Reply(
                405,
                f"{request.path} accepts POST only",
                code="method_not_allowed",
                outcome="bad_request",
                headers={"Allow": "POST"},
            )
        # 1. accept: the body, bounded
        raw = await self.read_body(request)
        # 4. parse what matters for cost
        try:
            parsed = dialect.parse_request(route.endpoint, raw)
        except BadRequest as exc:
            raise Reply(
                exc.status, exc.message, code="invalid_request", outcome="bad_request"
            ) from None
        rec.model = parsed.model
        # fair share: one tenant may not fill the upstream's queue on its own
        limit = self.settings.max_inflight_per_tenant
        running = self._tenant_inflight.get(tenant.name, 0)
        if limit and running >= limit:
            raise Reply(
                429,
                f"tenant '{tenant.name}' already has {running} requests running "
                f"(limit {limit}, setting max_inflight_per_tenant); retry when one finishes",
                code="too_many_concurrent_requests",
                outcome="concurrency_limited",
                headers={"Retry-After": "1"},
            )
        self._tenant_inflight[tenant.name] = running + 1
        try:
            return await self._metered(request, route, tenant, rec, dialect, raw, parsed)
        finally:
            left = self._tenant_inflight[tenant.name] - 1
            if left:
                self._tenant_inflight[tenant.name] = left
            else:
                del self._tenant_inflight[tenant.name]

    async def _metered(
        self,
        request: web.Request,
        route: Route,
        tenant: Tenant,
        rec: RequestRecord,
        dialect: ModuleType,
        raw: bytes,
        parsed: ParsedRequest,
    ) -> web.StreamResponse:
        edited = strip_usage = False
        if dialect is openai_dialect and openai_dialect.needs_usage_injection(
            route.endpoint, parsed
        ):
            openai_dialect.inject_usage(parsed)
            edited = strip_usage = True
        # 5. estimate
        est = self.estimator.estimate(parsed.model, parsed.input_chars, parsed.max_output_tokens)
        rec.estimate, rec.unit = est.amount, str(self.unit)
        # 6. reserve (a denial answers here: the upstream never sees the request)
        action = Action(route.action_kind, f"ollama:{parsed.model}")
        reservation, cap = await self.reserve(tenant, action, est, parsed, rec)
        if reservation is not None:
            rec.reservation_id = reservation.reservation_id
            if reservation.reserved is not None:
                rec.estimate = reservation.reserved.amount
            if reservation.caps is not None and reservation.caps.max_tokens is not None:
                cap = min(cap or reservation.caps.max_tokens, reservation.caps.max_tokens)
        if cap is not None:
            cap_output(dialect, route, parsed, cap)
            rec.extra["output_capped_at"] = cap
            edited = True
        body = dumps_body(parsed.body) if edited else raw
        # 7. forward and stream, 8. settle exactly once (even if the caller hangs up)
        m = Metered(tenant, action, parsed, reservation, rec, strip_usage)
        stop_beat = None
        if reservation is not None and reservation.reservation_id:
            stop_beat = self.keep_alive(tenant, reservation)
        self.inflight += 1
        try:
            return await self.forward(request, route, body, m)
        finally:
            self.inflight -= 1
            if stop_beat is not None:
                stop_beat()
            await self.settle_once(m)

    async def read_body(self, request: web.Request) -> bytes:
        limit = self.settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise body_too_large(limit)
        try:
            async with asyncio.timeout(self.settings.client_body_timeout_s):
                return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise body_too_large(limit) from None
        except web.RequestPayloadError as exc:  # e.g. not the gzip its Content-Encoding says
            raise unreadable_body(exc, request) from None
        except TimeoutError:
            raise Reply(
                408,
                f"the request body did not arrive within {self.settings.client_body_timeout_s:g} s",
                code="request_timeout",
                outcome="bad_request",
            ) from None

    async def reserve(
        self,
        tenant: Tenant,
        action: Action,
        est: Estimate,
        parsed: ParsedRequest,
        rec: RequestRecord,
    ) -> tuple[Reservation | None, int | None]:
        """Reserve the estimate, or (degrade-to-fit) what is left with a capped answer length.
        Returns the reservation (None: run without one, under fail_open or shadow) and the
        output cap to apply (None: no cap)."""
        policy = self.settings.failure_policy
        try:
            res = await self._reserve_amount(tenant, action, est.amount)
        except CyclesError as exc:
            if policy is FailurePolicy.SHADOW:
                rec.extra["shadow_denial"] = str(exc.code)
                log.warning("shadow mode: tenant %s would be denied: %s", tenant.name, exc.code)
                return None, None
            if exc.code is ErrorCode.BUDGET_EXCEEDED and self._may_degrade(parsed, est):
                fitted = await self._degrade(tenant, action, est, rec)
                if fitted is not None:
                    return fitted
            raise denial(exc, tenant, est.amount, self.unit) from None
        except AuthorityUnavailable as exc:
            if policy is FailurePolicy.FAIL_CLOSED:
                raise authority_unreachable("the request was not run") from exc
            rec.extra["unreserved"] = f"{policy}: {exc}"
            log.warning("authority unavailable (%s); running unreserved under %s", exc, policy)
            return None, None
        if policy is FailurePolicy.SHADOW:
            if res.decision == "DENY":
                rec.extra["shadow_denial"] = res.reason_code
                log.warning(
                    "shadow mode: tenant %s would be denied: %s", tenant.name, res.reason_code
                )
            return None, None
        return res, None

    async def _reserve_amount(self, tenant: Tenant, action: Action, amount: int) -> Reservation:
        req = ReserveRequest(
            idempotency_key=once_key(),
            subject=tenant.subject,
            action=action,
            estimate=Amount(self.unit, amount),
            ttl_ms=self.settings.reservation_ttl_ms,
            grace_period_ms=self.settings.grace_period_ms,
            overage_policy=self.settings.overage_policy,
            dry_run=self.settings.failure_policy is FailurePolicy.SHADOW,
        )
        task = asyncio.ensure_future(self.auth(tenant).reserve(req))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # the caller left while we reserved: give back whatever was granted (tracked, so
            # that shutdown waits for the grant and its release before closing the ledger)
            task.add_done_callback(self._release_orphan)
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            raise

    def _may_degrade(self, parsed: ParsedRequest, est: Estimate) -> bool:
        return (
            self.settings.degrade_to_fit
            and parsed.max_output_tokens != 0  # embeddings have no answer length to cap
            and est.per_token > 0
        )

    async def _degrade(
        self, tenant: Tenant, action: Action, est: Estimate, rec: RequestRecord
    ) -> tuple[Reservation, int] | None:
        """Reserve what the tenant has left if it pays for a useful answer; None if not."""
        try:
            balances = await self.auth(tenant).balances(tenant.subject)
        except (CyclesError, AuthorityUnavailable):
            return None
        scopes = set(tenant.subject.scopes())
        left = [b.remaining for b in balances if b.unit == self.unit and b.scope in scopes]
        if not left or min(left) <= 0:
            return None
        remaining = min(left)
        tokens = min(self.estimator.affordable_tokens(est, remaining), est.tokens_out)
        if tokens < self.settings.degrade_min_tokens:
            return None
        amount = min(remaining, max(1, math.ceil(est.base + est.per_token * tokens)))
        try:
            res = await self._reserve_amount(tenant, action, amount)
        except CyclesError:
            return None  # someone else took it meanwhile: the original denial stands
        rec.extra["degraded"] = True
        return res, tokens

    def _release_orphan(self, task: asyncio.Task[Reservation]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        res = task.result()
        if res.reservation_id:
            self._spawn(
                self.authority.release(
                    res.reservation_id, idempotency_key=once_key(), reason="client_gone"
                )
            )

    def _spawn(self, coro: Any) -> None:
        t = asyncio.ensure_future(coro)
        self._background.add(t)
        t.add_done_callback(self._background.discard)

    async def forward(
        self, request: web.Request, route: Route, body: bytes, m: Metered
    ) -> web.StreamResponse:
        ex, rec = m.ex, m.rec
        headers = self.upstream.request_headers(
            request.headers, content_length=len(body), identity=True, decoded_body=True
        )
        ex.sent_ns = time.monotonic_ns()
        ex.alone = self.inflight <= 1
        cm = self.upstream.open("POST", origin_form(request), headers, body)
        try:
            async with asyncio.timeout(self.settings.upstream_first_byte_timeout_s):
                up = await cm.__aenter__()
        except aiohttp.ClientError as exc:  # refused, reset, connect timeout, not HTTP
            raise upstream_failed(exc, self.settings) from None
        except TimeoutError:
            raise Reply(
                504,
                "the model server did not begin answering within "
                f"{self.settings.upstream_first_byte_timeout_s:g} s "
                "(setting upstream_first_byte_timeout_s); nothing was charged",
                code="upstream_timeout",
                outcome="upstream_timeout",
            ) from None
        completed = cut = False
        ex.first_byte_ns = time.monotonic_ns()
        ex.status = rec.status = up.status
        # an answer other than 2xx (a refusal, an error, a redirect) carries no output: nothing
        # the caller can use was produced, so the reservation is released
        ex.worked = 200 <= up.status < 300
        scanner = make_scanner(route.dialect, up.content_type, m.strip_usage and ex.worked)
        resp = web.StreamResponse(status=up.status, reason=up.reason)
        try:
            resp.headers.extend(Upstream.response_headers(up, keep_length=not m.strip_usage))
            if m.reservation is not None and m.reservation.reservation_id:
                resp.headers["x-cycles-reservation-id"] = m.reservation.reservation_id
            resp.headers["x-cycles-estimate"] = str(rec.estimate)
            try:
                if buffered(up):
                    # one JSON object: read it whole, settle, then answer with the charge in
                    # the headers; the caller waits for the whole body anyway
                    try:
                        async with asyncio.timeout(self.settings.upstream_read_timeout_s):
                            data = await up.content.read()
                    except _UPSTREAM_BROKE as exc:
                        ex.broke = f"{type(exc).__name__}: {exc}".rstrip(": ")
                        raise answer_broke(exc, self.settings) from None
                    scanner.feed(data)
                    scanner.finish()
                    ex.usage = scanner.usage
                    if ex.worked and not (scanner.usage.complete or scanner.usage.error):
                        # not the JSON object the API promises: whatever answered was not a
                        # model server, or not a well one; nothing usable, nothing billed
                        ex.worked = False
                        raise Reply(
                            502,
                            f"the model server's answer is not JSON ({up.content_type}, "
                            f"{len(data)} bytes); nothing was charged",
                            code="upstream_invalid_response",
                            outcome="upstream_error",
                        )
                    await self.settle_once(m)
                    self.charge_headers(resp, m)
                    completed = True
                    # headers and body leave together, in one send
                    resp.headers.popall("Content-Length", None)
                    return web.Response(
                        status=up.status, reason=up.reason, headers=resp.headers, body=data
                    )
                else:
                    await resp.prepare(request)
                    dog = ReadWatchdog(self.settings.upstream_read_timeout_s)
                    try:
                        first = True
                        content, loop = up.content, dog.loop
                        while True:
                            chunk = await content.readany()
                            dog.last = loop.time()
                            if not chunk:
                                break
                            if first:
                                ex.first_byte_ns, first = time.monotonic_ns(), False
                            out = scanner.feed(chunk)
                            if (scanner.usage.complete or scanner.usage.error) and not m.settled:
                                # settle before the final bytes leave: a caller that has seen
                                # the end of its answer also sees its charge in the ledger
                                ex.usage = scanner.usage
                                await self.settle_once(m)
                            if out:
                                await resp.write(out)
                                dog.last = loop.time()  # a slow caller is not a stalled upstream
                        dog.stop()
                        tail = scanner.finish()
                        if tail:
                            await resp.write(tail)
                        completed = True
                        if ex.worked and not (scanner.usage.complete or scanner.usage.error):
                            # a clean end without the final object / [DONE]: say so
                            await resp.write(
                                stream_error_chunk(route.dialect, up.content_type, ENDED_EARLY)
                            )
                    except asyncio.CancelledError:
                        if not dog.fired:
                            raise  # the caller hung up
                        dog.absorb()  # our own watchdog: the upstream went silent
                        ex.broke = "TimeoutError: no data within upstream_read_timeout_s"
                        cut = await self._broke_notice(resp, route, up, scanner)
                    except _UPSTREAM_BROKE as exc:
                        ex.broke = f"{type(exc).__name__}: {exc}".rstrip(": ")
                        cut = await self._broke_notice(resp, route, up, scanner)
                    finally:
                        dog.stop()
                ex.usage = scanner.usage
                await self.settle_once(m)
                if cut:
                    cut_transfer(request)
                    return resp
                await resp.write_eof()
            except (ConnectionResetError, aiohttp.ClientConnectionResetError):
                ex.client_gone = True
            return resp
        except asyncio.CancelledError:
            ex.client_gone = True
            raise
        finally:
            ex.usage = scanner.usage
            if completed:
                await cm.__aexit__(None, None, None)
            else:
                up.close()  # closing the connection is how Ollama and llama.cpp stop generating

    @staticmethod
    async def _broke_notice(
        resp: web.StreamResponse, route: Route, up: aiohttp.ClientResponse, scanner: Scanner
    ) -> bool:
        """Tell the caller the upstream broke mid-answer; True if the transfer must be cut
        instead (a JSON body cannot carry an error line)."""
        scanner.finish()
        notice = stream_error_chunk(route.dialect, up.content_type)
        if notice:
            await resp.write(notice)
            return False
        return True

    async def settle_once(self, m: Metered) -> None:
        """Settle ``m`` exactly once, shielded: a caller that hangs up cannot cancel it."""
        if m.settling is None:
            m.ex.ended_ns = time.monotonic_ns()
            m.settling = asyncio.ensure_future(self.settle(m))
            self._background.add(m.settling)
            m.settling.add_done_callback(self._background.discard)
        await asyncio.shield(m.settling)

    def charge_headers(self, resp: web.StreamResponse, m: Metered) -> None:
        if m.rec.charged is not None:
            resp.headers["x-cycles-charged"] = str(m.rec.charged)
        remaining = m.rec.extra.get("remaining")
        if remaining is not None:
            resp.headers["x-cycles-remaining"] = str(remaining)

    async def settle(self, m: Metered) -> None:
        """Commit what was used, or release when no work happened. Runs exactly once."""
        tenant, action, parsed, reservation, ex, rec = (
            m.tenant,
            m.action,
            m.parsed,
            m.reservation,
            m.ex,
            m.rec,
        )
        usage = ex.usage
        wall_ns = max(0, ex.ended_ns - ex.sent_ns) if ex.sent_ns else 0
        gpu_ns = self.gpu_ns(usage, wall_ns, ex.alone)
        tokens_in = usage.tokens_input
        tokens_out = (
            usage.tokens_output
            if usage.tokens_output is not None
            else (usage.chunks if ex.worked else None)
        )
        if ex.client_gone:
            rec.outcome = rec.outcome or "client_disconnected"
        if ex.broke:
            rec.error = f"upstream failed mid-stream: {ex.broke}"
        if usage.error:
            rec.error = f"upstream error: {usage.error}"
        rec.outcome = rec.outcome or ("allowed" if ex.worked else "upstream_refused")
        rec.gpu_seconds = round(gpu_ns / 1e9, 6)
        rec.tokens_input, rec.tokens_output = tokens_in, tokens_out
        if ex.first_byte_ns and ex.sent_ns:
            rec.ttfb_ms = (ex.first_byte_ns - ex.sent_ns) / 1e6
        rec.upstream_ms = wall_ns / 1e6
        if not ex.worked:
            if reservation is not None and reservation.reservation_id:
                await self._release(reservation, "no_upstream_work", rec)
            else:
                rec.settlement = "none"
            return
        # precedence: upstream-reported > counted from the stream > estimated from the prompt
        est_in = -(-parsed.input_chars // CHARS_PER_TOKEN)
        actual = self.pricing.actual(
            parsed.model, gpu_ns, tokens_in if tokens_in is not None else est_in, tokens_out
        )
        metrics = Metrics(
            tokens_input=tokens_in,
            tokens_output=tokens_out,
            latency_ms=wall_ns // 1_000_000,
            model_version=usage.model_version or parsed.model,
            custom={"gpu_seconds": round(gpu_ns / 1e9, 6)},
        )
        if usage.tokens_output is None and tokens_out is not None:
            metrics.custom["tokens_output_source"] = "counted"
        if tokens_in is None:
            metrics.custom["tokens_input_estimate"] = est_in
        if usage.reported_load_ns is not None:
            # Ollama's load_duration: a real load when alone, else mostly queue wait
            key = "load_ms" if ex.alone else "queue_ms"
            metrics.custom[key] = usage.reported_load_ns // 1_000_000
        if ex.first_byte_ns and ex.sent_ns:
            metrics.custom["ttfb_ms"] = (ex.first_byte_ns - ex.sent_ns) // 1_000_000
        if ex.client_gone or ex.broke or not usage.complete:
            metrics.custom["partial"] = True
        rec.charged = actual
        if rec.estimate and actual:
            metrics.custom["estimate_ratio"] = rec.extra["estimate_ratio"] = round(
                rec.estimate / actual, 3
            )
        if usage.complete and not (ex.client_gone or ex.broke or usage.error):
            self.estimator.observe(
                parsed.model,
                tokens_in=usage.tokens_input,
                tokens_out=usage.tokens_output,
                prompt_ns=usage.reported_prompt_ns,
                eval_ns=usage.reported_eval_ns,
                billed_ns=gpu_ns,
            )
        if reservation is None or not reservation.reservation_id:
            await self._event(tenant, action, actual, metrics, rec)
            return
        await self._commit(tenant, action, reservation, actual, metrics, rec)

    def gpu_ns(self, usage: Usage, wall_ns: int, alone: bool) -> int:
        """GPU time to bill. Reported compute time excludes queueing by construction; Ollama's
        load time is billed only when no other request was in flight (otherwise it is mostly
        the wait behind another tenant, which is not this request's GPU use)."""
        mode = self.settings.gpu_time
        if mode == "wall":
            return wall_ns
        if usage.reported_compute_ns is not None:
            load = usage.reported_load_ns if alone and usage.reported_load_ns else 0
            return usage.reported_compute_ns + load
        return wall_ns if mode == "auto" else 0

    async def _commit(
        self,
        tenant: Tenant,
        action: Action,
        reservation: Reservation,
        actual: int,
        metrics: Metrics,
        rec: RequestRecord,
    ) -> None:
        assert reservation.reservation_id is not None
        key = once_key()
        try:
            result = await self.authority.commit(
                reservation.reservation_id,
                idempotency_key=key,
                actual=Amount(self.unit, actual),
                metrics=metrics,
            )
            rec.charged, rec.settlement = result.charged.amount, "committed"
            if result.balances:
                rec.extra["remaining"] = min(b.remaining for b in result.balances)
        except CyclesError as exc:
            if exc.code is ErrorCode.BUDGET_EXCEEDED and reservation.reserved is not None:
                # REJECT policy: the commit may not exceed what was reserved. Charge all of the
                # reservation (the budget's hard limit) and report what went unbilled.
                capped = reservation.reserved.amount
                result = await self.authority.commit(
                    reservation.reservation_id,
                    idempotency_key=key + ":capped",
                    actual=Amount(self.unit, capped),
                    metrics=metrics,
                )
                rec.charged, rec.settlement = result.charged.amount, "committed"
                rec.extra["unbilled"] = actual - capped
                log.warning(
                    "tenant %s used %s more than its budget allowed (REJECT policy); unbilled",
                    tenant.name,
                    format_amount(actual - capped, str(self.unit)),
                )
            elif exc.code is ErrorCode.RESERVATION_EXPIRED:
                # the lease ran out (e.g. a very long stream): post the spend as an event
                await self._event(tenant, action, actual, metrics, rec, key=key)
            else:
                rec.settlement = f"failed: {exc.code}"
                log.error("commit of %s failed: %s", reservation.reservation_id, exc)
        except AuthorityUnavailable as exc:
            # the remote authority journals undeliverable commits and replays them itself
            rec.settlement = "journaled" if isinstance(exc, SettlementDeferred) else "deferred"
            log.error("commit of %s deferred: %s", reservation.reservation_id, exc)

    async def _release(self, reservation: Reservation, reason: str, rec: RequestRecord) -> None:
        assert reservation.reservation_id is not None
        try:
            await self.authority.release(
                reservation.reservation_id, idempotency_key=once_key(), reason=reason
            )
            rec.settlement, rec.charged = "released", 0
        except (CyclesError, AuthorityUnavailable) as exc:
            # the reservation expires by TTL and its amount returns then
            rec.settlement = f"release failed: {exc}"
            log.warning("release of %s failed: %s", reservation.reservation_id, exc)

    async def _event(
        self,
        tenant: Tenant,
        action: Action,
        actual: int,
        metrics: Metrics,
        rec: RequestRecord,
        key: str | None = None,
    ) -> None:
        try:
            result = await self.auth(tenant).event(
                idempotency_key=key or once_key(),
                subject=tenant.subject,
                action=action,
                actual=Amount(self.unit, actual),
                metrics=metrics,
            )
            rec.settlement = "evented"
            if result.charged is not None:
                rec.charged = result.charged.amount
        except SettlementDeferred as exc:  # in the journal: delivered when the authority is back
            rec.settlement = "journaled"
            log.warning("spend of tenant %s journaled: %s", tenant.name, exc)
        except (CyclesError, AuthorityUnavailable) as exc:
            rec.settlement = f"unsettled: {exc}"
            log.error(
                "spend of tenant %s (%s) could not be recorded: %s",
                tenant.name,
                format_amount(actual, str(self.unit)),
                exc,
            )

    async def drain(self) -> None:
        """Wait for settlements still running (shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)


# -------------------------------------------------------------------------------------------
# pure helpers: scanners, edits and error bodies
# -------------------------------------------------------------------------------------------
def make_scanner(dialect: Dialect, content_type: str, strip_usage: bool) -> Scanner:
    if content_type == "text/event-stream":
        return openai_dialect.SseScanner(strip_usage)
    if content_type == "application/x-ndjson":
        return ollama_dialect.NdjsonScanner()
    if dialect is Dialect.OPENAI:
        return openai_dialect.OpenAIJsonScanner()
    return ollama_dialect.JsonScanner()


def cap_output(dialect: ModuleType, route: Route, parsed: ParsedRequest, max_tokens: int) -> None:
    if dialect is ollama_dialect:
        ollama_dialect.set_output_cap(parsed, max_tokens)
    else:
        openai_dialect.set_output_cap(route.endpoint, parsed, max_tokens)


def error_response(
    dialect: Dialect, status: int, message: str, code: str, headers: dict[str, str] | None = None
) -> web.Response:
    if dialect is Dialect.OPENAI:
        etype = {
            401: "authentication_error",
            403: "permission_error",
            429: "budget_exceeded",
            404: "not_found_error",
            413: "invalid_request_error",
            503: "service_unavailable",
        }.get(status, "invalid_request_error")
        if status >= 500 and status != 503:
            etype = "api_error"
        body: dict[str, Any] = openai_dialect.error_body(message, code, etype)
    else:
        body = ollama_dialect.error_body(message)
    return web.json_response(body, status=status, headers=headers)


BROKE_OFF = "upstream connection failed mid-response; the output is incomplete"
ENDED_EARLY = (
    "the model server ended the response before its final message; the output is incomplete"
)


def stream_error_chunk(dialect: Dialect, content_type: str, msg: str = BROKE_OFF) -> bytes:
    """The error a client sees when the upstream breaks after the response began (appended
    to NDJSON and SSE streams; other bodies cannot carry one: b"")."""
    if content_type == "text/event-stream":
        return (
            b"data: "
            + json.dumps(openai_dialect.error_body(msg, "upstream_error", "api_error")).encode()
            + b"\n\n"
        )
    if content_type == "application/x-ndjson":
        return json.dumps({"error": msg}).encode() + b"\n"
    return b""


def denial(exc: CyclesError, tenant: Tenant, estimate: int, unit: Any) -> Reply:
    if exc.code in DENIAL_CODES:
        reasons = {
            ErrorCode.BUDGET_EXCEEDED: "its remaining budget cannot cover this request",
            ErrorCode.OVERDRAFT_LIMIT_EXCEEDED: "its budget is over its limit",
            ErrorCode.DEBT_OUTSTANDING: "its budget has outstanding debt",
            ErrorCode.BUDGET_FROZEN: "its budget is frozen",
            ErrorCode.BUDGET_CLOSED: "its budget is closed",
            ErrorCode.TENANT_CLOSED: "the tenant is closed",
        }
        headers = {"x-should-retry": "false"}
        msg = (
            f"budget exceeded for tenant '{tenant.name}': {reasons[exc.code]} "
            f"(estimated cost {format_amount(estimate, str(unit))})"
        )
        if exc.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, exc.retry_after_s))
            msg += f"; the budget refills in {exc.retry_after_s} s"
        return Reply(
            429,
            msg,
            code="budget_exceeded",
            outcome="denied",
            headers=headers,
            reason=str(exc.code).lower(),
        )
    if exc.code is ErrorCode.NOT_FOUND:
        return Reply(
            403,
            f"tenant '{tenant.name}' has no budget; an operator can create one with "
            f"`cycles-proxy budgets set {tenant.name} <amount>`",
            code="no_budget",
            outcome="denied",
            headers={"x-should-retry": "false"},
            reason="no_budget",
        )
    if exc.code is ErrorCode.UNIT_MISMATCH:
        return Reply(
            403,
            f"tenant '{tenant.name}' has a budget in another unit than the proxy's prices "
            f"({unit}); an operator must align them",
            code="unit_mismatch",
            outcome="denied",
            headers={"x-should-retry": "false"},
            reason="unit_mismatch",
        )
    return Reply(
        503 if exc.http_status >= 500 else 403,
        f"the budget authority refused the request: {exc.message}",
        code=str(exc.code).lower(),
        outcome="denied",
        headers={"x-should-retry": "false"},
        reason=str(exc.code).lower(),
    )


def authority_unreachable(consequence: str) -> Reply:
    return Reply(
        503,
        f"the budget authority is unreachable, so {consequence}; retry shortly",
        code="budget_authority_unavailable",
        outcome="authority_unavailable",
        headers={"Retry-After": "5", "x-should-retry": "false"},
    )


def body_too_large(limit: int) -> Reply:
    return Reply(
        413,
        f"request body is larger than the proxy's limit of {limit} bytes (setting max_body_bytes)",
        code="request_too_large",
        outcome="bad_request",
    )


def unreadable_body(exc: BaseException, request: web.Request) -> Reply:
    cause = exc.__cause__ or exc
    detail = getattr(cause, "message", "") or str(cause) or type(cause).__name__
    encoding = request.headers.get("Content-Encoding")
    return Reply(
        400,
        "the request body could not be read"
        + (f" (Content-Encoding: {encoding})" if encoding else "")
        + f": {detail}",
        code="invalid_request",
        outcome="bad_request",
    )


def upstream_failed(exc: BaseException, settings: Settings) -> Reply:
    """The upstream gave no answer at all (nothing reached the caller yet)."""
    name = type(exc).__name__
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return Reply(
            504,
            "the model server did not accept a connection within "
            f"{settings.upstream_connect_timeout_s:g} s (setting upstream_connect_timeout_s); "
            "nothing was charged",
            code="upstream_timeout",
            outcome="upstream_timeout",
        )
    if isinstance(exc, TimeoutError):
        return Reply(
            504,
            f"the model server did not answer in time ({name}); nothing was charged",
            code="upstream_timeout",
            outcome="upstream_timeout",
        )
    if isinstance(exc, aiohttp.ClientConnectionError):
        return Reply(
            502,
            f"the model server is unreachable ({name}); nothing was charged",
            code="upstream_unreachable",
            outcome="upstream_unreachable",
        )
    return Reply(
        502,
        f"the model server sent an invalid HTTP response ({name}); nothing was charged",
        code="upstream_invalid_response",
        outcome="upstream_error",
    )


def answer_broke(exc: BaseException, settings: Settings) -> Reply:
    """A one-object answer broke off after the upstream began sending it (the work is billed)."""
    if isinstance(exc, TimeoutError):
        why = (
            f"stopped sending its answer for {settings.upstream_read_timeout_s:g} s "
            "(setting upstream_read_timeout_s)"
        )
    else:
        why = f"broke off its answer ({type(exc).__name__})"
    return Reply(
        502,
        f"the model server {why}; the time it worked was billed",
        code="upstream_error",
        outcome="upstream_error",
    )


def route_label(path: str) -> str:
    return path if len(path) <= 64 else path[:61] + "..."
