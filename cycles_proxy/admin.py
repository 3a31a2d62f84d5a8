"""The admin listener: ``/metrics``, ``/healthz``, ``/readyz``, ``/version`` and ``/status``.

It runs on its own address (``admin_host:admin_port``, loopback by default) so that no upstream
path can collide with it and it is not exposed with the proxy port. It has no authentication:
keep it on loopback or a private network (the status page shows every tenant's spend).

Nothing here runs on the request path. Budget gauges and the status page read the ledger through
a separate read connection on a worker thread (embedded authority) or ask the remote authority
for the balances of the tenants this replica knows (seen, configured, or holding a proxy key),
when they are scraped or viewed.
"""

from __future__ import annotations

import asyncio
import html
import logging
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from yarl import URL

from cycles_proxy import __version__
from cycles_proxy.authority.base import (
    Authority,
    AuthorityUnavailable,
    Balance,
    CyclesError,
    Subject,
)
from cycles_proxy.lifecycle import Proxy
from cycles_proxy.metrics import MAX_TENANTS, NONE, OTHER, ProxyMetrics, scope_tenant
from cycles_proxy.money import format_amount
from cycles_proxy.settings import FailurePolicy, Settings

log = logging.getLogger("cycles_proxy")

T = TypeVar("T")

#: how long a readiness probe may take before it counts as a failure
PROBE_TIMEOUT_S = 2.0
#: spend shown for tenants whose budget has no period
DEFAULT_WINDOW_DAYS = 30
DAY_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class Probe:
    ok: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "detail": self.detail}


@dataclass(frozen=True, slots=True)
class BudgetRow:
    balance: Balance
    period: str | None = None
    status: str = "ACTIVE"


@dataclass(slots=True)
class ModelSpend:
    model: str
    unit: str
    requests_today: int = 0
    cost_today: int = 0
    requests_period: int = 0
    cost_period: int = 0
    gpu_seconds_period: float = 0.0
    tokens_input_period: int = 0
    tokens_output_period: int = 0


@dataclass(slots=True)
class TenantView:
    name: str
    budgets: list[BudgetRow] = field(default_factory=list)
    models: list[ModelSpend] = field(default_factory=list)
    period_label: str = f"last {DEFAULT_WINDOW_DAYS} days"
    denials: dict[str, int] = field(default_factory=dict)
    has_keys: bool = False


@dataclass(slots=True)
class StatusPage:
    generated_ms: int
    upstream: str
    authority: str
    unit: str
    inflight: int
    tenants: list[TenantView]
    #: where the per-model spend comes from
    spend_source: str
    notes: list[str] = field(default_factory=list)


class LedgerReader:
    """Read-only use of the embedded ledger file from a worker thread, on its own connection
    (SQLite WAL: readers never block the proxy's writer)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._ledger: Any = None
        self._lock = threading.Lock()

    def _run(self, fn: Callable[[Any], T]) -> T:
        with self._lock:
            if self._ledger is None:
                from cycles_proxy.authority.embedded import Ledger

                self._ledger = Ledger(self.path, check_same_thread=False)
            return fn(self._ledger)

    async def call(self, fn: Callable[[Any], T]) -> T:
        return await asyncio.to_thread(self._run, fn)

    def close(self) -> None:
        with self._lock:
            if self._ledger is not None:
                self._ledger.close()
                self._ledger = None


class Admin:
    """The admin application of one proxy."""

    def __init__(self, settings: Settings, proxy: Proxy, metrics: ProxyMetrics) -> None:
        self.settings = settings
        self.proxy = proxy
        self.metrics = metrics
        inner = getattr(proxy.authority, "inner", proxy.authority)
        self.authority: Authority = inner
        ledger = getattr(inner, "ledger", None)
        path = getattr(ledger, "path", None)
        self.reader: LedgerReader | None = LedgerReader(path) if isinstance(path, str) else None
        self.draining = False
        self._session: aiohttp.ClientSession | None = None

    # -- application ----------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self.index)
        app.router.add_get("/metrics", self.handle_metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/version", self.version)
        app.router.add_get("/status", self.status)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _cleanup(self, _: web.Application) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self.reader is not None:
            await asyncio.to_thread(self.reader.close)

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    # -- probes ---------------------------------------------------------------------------------
    async def probe_upstream(self) -> Probe:
        url = self.settings.upstream + "/"
        try:
            async with self.session().get(url, allow_redirects=False) as resp:
                ok = resp.status < 500
                probe = Probe(ok, f"HTTP {resp.status} from {self.settings.upstream}")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            probe = Probe(False, f"{self.settings.upstream} unreachable: {_describe(exc)}")
        self.metrics.upstream_up.set(1 if probe.ok else 0)
        return probe

    async def probe_authority(self) -> Probe:
        if self.settings.remote:
            probe = await self._probe_remote()
        else:
            probe = await self._probe_local()
        self.metrics.authority_up.set(1 if probe.ok else 0)
        return probe

    async def _probe_remote(self) -> Probe:
        s = self.settings
        base = s.cycles_base_url
        assert base is not None
        # a cheap authenticated read (what the Cycles spec allows), with the first key we have
        params = {"limit": "1"}
        key = s.cycles_api_key
        if key is None and s.cycles_tenant_keys:
            tenant, key = next(iter(sorted(s.cycles_tenant_keys.items())))
            params["tenant"] = tenant
        try:
            if key is None:  # callers bring their own keys: can we connect at all?
                url = URL(base)
                async with asyncio.timeout(PROBE_TIMEOUT_S):
                    _, writer = await asyncio.open_connection(url.host, url.port)
                writer.close()
                return Probe(True, f"Cycles server {base} accepts connections")
            async with self.session().get(
                f"{base}/v1/reservations", params=params, headers={"X-Cycles-API-Key": key}
            ) as resp:
                if resp.status >= 500:
                    return Probe(False, f"Cycles server {base} answered HTTP {resp.status}")
                if resp.status == 401:
                    return Probe(False, f"Cycles server {base} rejects the configured API key")
                return Probe(True, f"Cycles server {base} answers")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return Probe(False, f"Cycles server {base} unreachable: {_describe(exc)}")

    async def _probe_local(self) -> Probe:
        name = self.authority.name
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                await self.authority.balances(Subject(tenant="readyz-probe"))
        except CyclesError:
            pass  # it answered
        except TimeoutError:
            return Probe(False, f"{name} authority did not answer within {PROBE_TIMEOUT_S:g} s")
        except AuthorityUnavailable as exc:
            return Probe(False, f"{name} authority unavailable: {exc}")
        except Exception as exc:
            return Probe(False, f"{name} authority failed: {_describe(exc)}")
        return Probe(True, f"{name} authority answers")

    # -- data -----------------------------------------------------------------------------------
    def known_tenants(self) -> set[str]:
        names = set(self.metrics.tenants.known) | set(self.settings.cycles_tenant_keys)
        if self.settings.anonymous_tenant:
            names.add(self.settings.anonymous_tenant)
        return {n for n in names if n not in (OTHER, NONE)}

    async def key_tenants(self) -> set[str]:
        """Tenants holding a proxy key (not revoked), whether or not they sent a request yet."""
        keys = getattr(self.proxy, "keys", None)
        if keys is None:
            return set()
        infos = await asyncio.to_thread(keys.list)
        return {k.tenant.lower() for k in infos if k.revoked_ms is None}

    async def remote_tenants(self) -> list[str]:
        """Whose balances to ask a remote authority for: the tenants this replica has seen or
        is configured for, then those with keys, at most MAX_TENANTS (one call each)."""
        known = sorted(self.known_tenants())
        extra = sorted(await self.key_tenants() - set(known))
        return (known + extra)[:MAX_TENANTS]

    async def budgets(self) -> list[BudgetRow]:
        """Every budget with its balance as of now."""
        if self.reader is not None:
            records = await self.reader.call(lambda ledger: ledger.list_budgets())
            return [BudgetRow(r.balance, r.period, r.status) for r in records]
        rows: list[BudgetRow] = []
        seen: set[tuple[str, str]] = set()

        async def one(tenant: str) -> list[Balance]:
            try:
                async with asyncio.timeout(PROBE_TIMEOUT_S):
                    return await self.authority.balances(Subject(tenant=tenant))
            except (CyclesError, AuthorityUnavailable, TimeoutError) as exc:
                log.debug("balances of tenant %s unavailable: %s", tenant, exc)
                return []

        for balances in await asyncio.gather(*(one(t) for t in await self.remote_tenants())):
            for b in balances:
                if (b.scope, str(b.unit)) not in seen:
                    seen.add((b.scope, str(b.unit)))
                    rows.append(BudgetRow(b))
        return rows

    async def refresh_budget_gauges(self) -> None:
        try:
            rows = await self.budgets()
        except Exception as exc:  # a scrape must still answer
            log.warning("budget gauges not refreshed: %s", _describe(exc))
            self.metrics.budgets.update(())
            return
        self.metrics.budgets.update([r.balance for r in rows])

    async def status_page(self) -> StatusPage:
        now_ms = int(time.time() * 1000)
        rows = await self.budgets()
        key_tenants = await self.key_tenants()
        tenants: dict[str, TenantView] = {}

        def view(name: str) -> TenantView:
            name = name.lower()
            if name not in tenants:
                tenants[name] = TenantView(name)
            return tenants[name]

        for r in rows:
            view(scope_tenant(r.balance.scope)).budgets.append(r)
        for name in key_tenants:
            view(name).has_keys = True
        for name in self.known_tenants():
            view(name)
        for name, reasons in self.metrics.denial_counts().items():
            if name not in (OTHER, NONE):
                view(name).denials = dict(sorted(reasons.items()))

        # each tenant's spend window: its tenant-level budget's period, else 30 days
        windows: dict[str, int] = {}
        default_start = now_ms - DEFAULT_WINDOW_DAYS * DAY_MS
        for name, t in tenants.items():
            start = default_start
            for r in t.budgets:
                if r.balance.scope == f"tenant:{name}" and r.period:
                    start = _period_start(r.period, now_ms)
                    t.period_label = (
                        "today"
                        if r.period == "daily"
                        else f"this {_PERIOD_NOUN[r.period]} (since {_day(start)})"
                    )
                    break
            windows[name] = start
        notes: list[str] = []
        if self.reader is not None:
            since = min(windows.values(), default=default_start)
            usage = await self.reader.call(lambda ledger: ledger.usage(since_ms=since))
            today = _day(now_ms)
            spend: dict[tuple[str, str, str], ModelSpend] = {}
            for u in usage:
                name = u.tenant.lower()
                if name not in tenants:
                    view(name)
                    windows[name] = default_start
                model = u.model.removeprefix("ollama:")
                key = (name, model, str(u.unit))
                ms = spend.get(key)
                if ms is None:
                    ms = spend[key] = ModelSpend(model, str(u.unit))
                if u.day == today:
                    ms.requests_today += u.requests
                    ms.cost_today += u.cost
                if u.day >= _day(windows[name]):
                    ms.requests_period += u.requests
                    ms.cost_period += u.cost
                    ms.gpu_seconds_period += u.gpu_seconds
                    ms.tokens_input_period += u.tokens_input
                    ms.tokens_output_period += u.tokens_output
            for (name, _, _), ms in sorted(spend.items()):
                tenants[name].models.append(ms)
            source = "ledger"
        else:
            for name, models in self.metrics.spend_by_model().items():
                if name in (OTHER, NONE):
                    continue
                t = view(name)
                t.period_label = "since this proxy started"
                for model, v in sorted(models.items()):
                    t.models.append(
                        ModelSpend(
                            model,
                            str(self.settings.unit),
                            requests_period=int(v["requests"]),
                            cost_period=int(v["cost"]),
                            gpu_seconds_period=v["gpu_seconds"],
                            tokens_input_period=int(v["tokens_input"]),
                            tokens_output_period=int(v["tokens_output"]),
                        )
                    )
            source = "this replica's counters since it started"
            notes.append(
                "The budget authority is a remote Cycles server: balances are the server's, "
                "spend per model is what this replica saw since it started."
            )
        return StatusPage(
            generated_ms=now_ms,
            upstream=self.settings.upstream,
            authority=(
                f"remote Cycles server {self.settings.cycles_base_url}"
                if self.settings.remote
                else f"embedded ledger {self.reader.path if self.reader else self.settings.db}"
            ),
            unit=str(self.settings.unit),
            inflight=self.proxy.inflight,
            tenants=[tenants[k] for k in sorted(tenants)],
            spend_source=source,
            notes=notes,
        )

    # -- handlers -------------------------------------------------------------------------------
    async def index(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/status")

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        upstream, authority = await asyncio.gather(self.probe_upstream(), self.probe_authority())
        enforcing = self.settings.failure_policy is FailurePolicy.FAIL_CLOSED
        ready = upstream.ok and (authority.ok or not enforcing) and not self.draining
        body: dict[str, Any] = {
            "ready": ready,
            "upstream": upstream.to_dict(),
            "authority": authority.to_dict(),
        }
        if not authority.ok and not enforcing:
            body["authority"]["detail"] += (
                f" (failure policy {self.settings.failure_policy}: requests still run)"
            )
        if self.draining:
            body["draining"] = True
        return web.json_response(body, status=200 if ready else 503)

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "name": "cycles-proxy",
                "version": __version__,
                "python": platform.python_version(),
                "authority": "remote" if self.settings.remote else "embedded",
                "unit": str(self.settings.unit),
            }
        )

    async def handle_metrics(self, request: web.Request) -> web.Response:
        await asyncio.gather(
            self.refresh_budget_gauges(), self.probe_authority(), self.probe_upstream()
        )
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status(self, request: web.Request) -> web.Response:
        page = await self.status_page()
        return web.Response(
            text=render_status(page),
            content_type="text/html",
            charset="utf-8",
            headers={"Cache-Control": "no-store"},
        )


# --------------------------------------------------------------------------------------------
# the status page: plain server-rendered HTML, no scripts
# --------------------------------------------------------------------------------------------
SPENT_COLOR = "#c0392b"
RESERVED_COLOR = "#e67e22"
REMAINING_COLOR = "#27ae60"
DEBT_COLOR = "#6c3483"

_PERIOD_NOUN = {"weekly": "week", "monthly": "month"}

_CSS = f"""
body {{ font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px;
  color: #222; background: #fafafa; }}
h1 {{ font-size: 20px; margin: 0 0 4px; }}
header p {{ margin: 0 0 16px; color: #555; }}
section.tenant {{ background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 12px 16px;
  margin: 0 0 16px; max-width: 900px; }}
h2 {{ font-size: 16px; margin: 0 0 8px; }}
.scope {{ font-weight: 600; }}
.scope small {{ font-weight: normal; color: #666; }}
.bar {{ display: flex; width: 640px; max-width: 100%; height: 18px; background: #eee;
  border-radius: 3px; overflow: hidden; margin: 4px 0; }}
.bar span {{ display: block; height: 100%; }}
.bar .spent {{ background: {SPENT_COLOR}; }}
.bar .reserved {{ background: {RESERVED_COLOR}; }}
.bar .remaining {{ background: {REMAINING_COLOR}; }}
.bar .debt {{ background: {DEBT_COLOR}; }}
.legend {{ color: #444; margin-bottom: 8px; }}
.swatch {{ display: inline-block; width: 10px; height: 10px; margin-right: 3px; }}
table {{ border-collapse: collapse; margin: 8px 0; }}
th, td {{ text-align: right; padding: 2px 10px; border-bottom: 1px solid #eee; }}
th[colspan] {{ text-align: center; color: #555; font-weight: normal; }}
th:first-child, td:first-child {{ text-align: left; }}
.warn {{ color: #a94442; }}
.muted {{ color: #777; }}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _pct(part: int, whole: int) -> str:
    return f"{(100.0 * part / whole) if whole > 0 else 0.0:.2f}%"


def _day(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d")


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _period_start(period: str, now_ms: int) -> int:
    if period == "daily":
        return now_ms - now_ms % DAY_MS
    if period == "weekly":
        day = now_ms // DAY_MS
        return (day - (day + 3) % 7) * DAY_MS  # Monday-based; 1970-01-01 was a Thursday
    dt = datetime.fromtimestamp(now_ms // 1000, UTC)
    return int(datetime(dt.year, dt.month, 1, tzinfo=UTC).timestamp()) * 1000


def _budget_html(row: BudgetRow) -> str:
    b = row.balance
    unit = str(b.unit)
    spent, reserved, debt = max(0, b.spent), max(0, b.reserved), max(0, b.debt)
    remaining = max(0, b.remaining)
    whole = max(b.allocated, spent + reserved + debt + remaining)
    segments = "".join(
        f'<span class="{cls}" style="width:{_pct(v, whole)}"></span>'
        for cls, v in (
            ("spent", spent),
            ("debt", debt),
            ("reserved", reserved),
            ("remaining", remaining),
        )
        if v > 0
    )

    def f(v: int) -> str:
        return _e(format_amount(v, unit))

    legend = (
        f'<span class="swatch" style="background:{SPENT_COLOR}"></span>spent {f(spent)} · '
        f'<span class="swatch" style="background:{RESERVED_COLOR}"></span>reserved {f(reserved)} · '
        f'<span class="swatch" style="background:{REMAINING_COLOR}"></span>'
        f"remaining {f(b.remaining)} of {f(b.allocated)}"
    )
    if debt:
        legend += f' · <span class="swatch" style="background:{DEBT_COLOR}"></span>debt {f(debt)}'
    extra = []
    if row.period:
        extra.append(row.period)
        if b.period_ends_at_ms:
            extra.append(f"refills {_when(b.period_ends_at_ms)}")
    if row.status != "ACTIVE":
        extra.append(row.status.lower())
    if b.is_over_limit:
        extra.append("over limit")
    if b.allocated > 0:
        extra.insert(0, f"{max(0, b.remaining) * 100 // b.allocated}% left")
    small = f" <small>({_e(', '.join(extra))})</small>" if extra else ""
    label = (
        f"{b.scope}: spent {format_amount(spent, unit)}, reserved "
        f"{format_amount(reserved, unit)}, remaining {format_amount(b.remaining, unit)} of "
        f"{format_amount(b.allocated, unit)}"
    )
    return (
        f'<div class="budget" data-scope="{_e(b.scope)}">'
        f'<div class="scope">{_e(b.scope)}{small}</div>'
        f'<div class="bar" role="img" aria-label="{_e(label)}">{segments}</div>'
        f'<div class="legend">{legend}</div></div>'
    )


def _models_html(t: TenantView) -> str:
    if not t.models:
        return '<p class="muted">no spend in this window</p>'
    # a daily budget's period is today: one group of columns says it all
    today = t.period_label != "today"
    groups = (
        '<th colspan="2">today</th>' if today else ""
    ) + f'<th colspan="4">{_e(t.period_label)}</th>'
    cols = ("<th>requests</th><th>spent</th>" if today else "") + (
        "<th>requests</th><th>spent</th><th>GPU seconds</th><th>tokens in / out</th>"
    )
    head = f"<tr><th></th>{groups}</tr><tr><th>model</th>{cols}</tr>"
    body = "".join(
        f"<tr><td>{_e(m.model)}</td>"
        + (
            f"<td>{m.requests_today:,}</td><td>{_e(format_amount(m.cost_today, m.unit))}</td>"
            if today
            else ""
        )
        + f"<td>{m.requests_period:,}</td><td>{_e(format_amount(m.cost_period, m.unit))}</td>"
        f"<td>{m.gpu_seconds_period:,.2f}</td>"
        f"<td>{m.tokens_input_period:,} / {m.tokens_output_period:,}</td></tr>"
        for m in t.models
    )
    return f'<table class="models">{head}{body}</table>'


def _tenant_html(t: TenantView) -> str:
    parts = [f'<section class="tenant" id="tenant-{_e(t.name)}"><h2>{_e(t.name)}</h2>']
    if t.budgets:
        parts.extend(_budget_html(r) for r in t.budgets)
    else:
        parts.append(
            '<p class="warn">no budget: its requests are refused; create one with '
            f"<code>cycles-proxy budgets set {_e(t.name)} &lt;amount&gt;</code></p>"
        )
    if not t.has_keys:
        parts.append('<p class="muted">no active API key</p>')
    parts.append(_models_html(t))
    if t.denials:
        listed = ", ".join(f"{_e(r)} {n:,}" for r, n in t.denials.items())
        parts.append(f'<p class="denials">denials since the proxy started: {listed}</p>')
    else:
        parts.append('<p class="denials muted">no denials since the proxy started</p>')
    parts.append("</section>")
    return "".join(parts)


def render_status(page: StatusPage) -> str:
    tenants = (
        "".join(_tenant_html(t) for t in page.tenants)
        or '<p class="muted">no tenants yet: create a key with '
        "<code>cycles-proxy keys create TENANT</code></p>"
    )
    notes = "".join(f'<p class="muted">{_e(n)}</p>' for n in page.notes)
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta http-equiv="refresh" content="30">'
        f"<title>cycles-proxy status</title><style>{_CSS}</style></head><body>"
        f"<header><h1>cycles-proxy {_e(__version__)}</h1>"
        f"<p>upstream {_e(page.upstream)} · {_e(page.authority)} · unit {_e(page.unit)} · "
        f"{page.inflight} in flight · {_e(_when(page.generated_ms))}</p></header>"
        f"{notes}{tenants}"
        f'<p class="muted">spend per model from the {_e(page.spend_source)}; '
        'metrics at <a href="/metrics">/metrics</a></p>'
        "</body></html>"
    )


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
