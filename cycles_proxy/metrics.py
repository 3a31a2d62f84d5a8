"""Prometheus metrics: a request listener, an instrumented authority and budget gauges.

Everything lives in one private :class:`~prometheus_client.CollectorRegistry` per application
(tests start many proxies in one process), exported by the admin listener (``admin.py``).

Cost on the request path is a handful of dict look-ups and counter increments per finished
request: label children are bound once and cached, and label values are bounded:

* ``tenant`` is the tenant *name* (operators create tenants; a safety cap folds the excess into
  ``other``). Keys and key ids are never labels.
* ``model`` comes from callers, so it is admitted only once the upstream actually served that
  model (or a price rule names it exactly), up to :data:`MAX_MODELS` names; anything else is
  ``other``. Requests without a model (pass-through) are ``none``.
* ``route`` and ``outcome`` come from the route table and the lifecycle: fixed sets.

Units are base units: seconds, tokens, and budget amounts in the ledger's own integer unit
(label ``unit``; ``USD_MICROCENTS``: 1 USD = 100,000,000), so sums equal the ledger's exactly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from cycles_proxy import __version__
from cycles_proxy.authority.base import (
    DENIAL_CODES,
    Action,
    Amount,
    Authority,
    AuthorityUnavailable,
    Balance,
    CommitResult,
    CyclesError,
    ErrorCode,
    EventResult,
    ExtendResult,
    Metrics,
    OveragePolicy,
    ReleaseResult,
    Reservation,
    ReserveRequest,
    Subject,
)
from cycles_proxy.observability import RequestRecord
from cycles_proxy.settings import Settings

T = TypeVar("T")

OTHER = "other"
NONE = "none"
#: distinct model label values before new models fold into ``other``
MAX_MODELS = 100
#: distinct tenant label values before new tenants fold into ``other`` (a safety net only)
MAX_TENANTS = 1000
MAX_LABEL_LEN = 128

AUTHORITY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
TTFB_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

#: settlement results whose amount is (or, when deferred, will be) in the ledger
BILLED = frozenset({"committed", "evented", "deferred", "journaled"})
_SETTLEMENTS = BILLED | {"released", "none", "failed", "release_failed", "unsettled"}
#: authority refusals that are budget decisions (counted as denials), not authority errors
_DECISIONS = DENIAL_CODES | {ErrorCode.NOT_FOUND, ErrorCode.UNIT_MISMATCH}


def denial_reason(rec: RequestRecord) -> str:
    """A bounded reason for a denied request (the lifecycle sets it on every denial)."""
    return (rec.denial_reason or OTHER)[:MAX_LABEL_LEN]


def settlement_kind(settlement: str | None) -> str:
    if settlement is None:
        return NONE
    kind = settlement.split(":", 1)[0].strip().replace(" ", "_")
    return kind if kind in _SETTLEMENTS else OTHER


def scope_tenant(scope: str) -> str:
    """``tenant:acme/app:bot`` -> ``acme``."""
    first = scope.split("/", 1)[0]
    level, _, value = first.partition(":")
    return value if level == "tenant" and value else OTHER


class BoundedLabels:
    """Label values admitted up to ``limit``; later newcomers map to ``other``."""

    def __init__(self, limit: int, preset: Iterable[str] = ()) -> None:
        self.limit = limit
        self.known: set[str] = {v for v in preset if v and len(v) <= MAX_LABEL_LEN}

    def admit(self, value: str | None) -> str:
        if not value:
            return NONE
        if value in self.known:
            return value
        if len(self.known) < self.limit and len(value) <= MAX_LABEL_LEN:
            self.known.add(value)
            return value
        return OTHER

    def get(self, value: str | None) -> str:
        if not value:
            return NONE
        return value if value in self.known else OTHER


class BudgetCollector(Collector):
    """Budget gauges from the last snapshot of balances (refreshed by the admin listener at
    scrape time, off the request path)."""

    FAMILIES = (
        ("remaining", "Budget left to reserve: allocated - spent - reserved - debt."),
        ("allocated", "Budget allocated for the current period."),
        ("spent", "Budget spent (committed) in the current period."),
        ("reserved", "Budget held by reservations in flight."),
        ("debt", "Overdraft debt of the budget."),
    )

    def __init__(self) -> None:
        self.snapshot: Sequence[Balance] = ()

    def update(self, balances: Sequence[Balance]) -> None:
        self.snapshot = tuple(balances)

    def describe(self) -> Iterable[Metric]:
        return [
            GaugeMetricFamily(f"cycles_proxy_budget_{n}", h, labels=["tenant", "scope", "unit"])
            for n, h in self.FAMILIES
        ]

    def collect(self) -> Iterable[Metric]:
        families = {
            n: GaugeMetricFamily(
                f"cycles_proxy_budget_{n}",
                h + " In the budget's unit.",
                labels=["tenant", "scope", "unit"],
            )
            for n, h in self.FAMILIES
        }
        for b in self.snapshot:
            labels = [scope_tenant(b.scope), b.scope, str(b.unit)]
            families["remaining"].add_metric(labels, b.remaining)
            families["allocated"].add_metric(labels, b.allocated)
            families["spent"].add_metric(labels, b.spent)
            families["reserved"].add_metric(labels, b.reserved)
            families["debt"].add_metric(labels, b.debt)
        return families.values()


class ProxyMetrics:
    """Every metric of one proxy. Register :meth:`observe` as an Observer listener."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry(auto_describe=True)
        self.unit = str(settings.unit)
        self.tenants = BoundedLabels(MAX_TENANTS)
        exact_models = [p.model for p in settings.prices if not any(c in p.model for c in "*?[")]
        self.models = BoundedLabels(MAX_MODELS, exact_models)

        self.requests = Counter(
            "cycles_proxy_requests",
            "Requests finished, by tenant, model, route and outcome.",
            ["tenant", "model", "route", "outcome"],
            registry=r,
        )
        self.cost = Counter(
            "cycles_proxy_cost",
            "Amount charged to budgets, in the ledger's integer unit (label unit).",
            ["tenant", "model", "unit"],
            registry=r,
        )
        self.gpu_seconds = Counter(
            "cycles_proxy_gpu_seconds",
            "GPU seconds billed (reported by the upstream, else measured wall time).",
            ["tenant", "model"],
            registry=r,
        )
        self.tokens = Counter(
            "cycles_proxy_tokens",
            "Tokens billed, by direction (input = prompt, output = generated).",
            ["tenant", "model", "direction"],
            registry=r,
        )
        self.denials = Counter(
            "cycles_proxy_denials",
            "Requests refused by a budget decision, by reason (the model never ran).",
            ["tenant", "reason"],
            registry=r,
        )
        self.shadow_denials = Counter(
            "cycles_proxy_shadow_denials",
            "Requests that would have been denied (shadow mode: they ran).",
            ["tenant", "reason"],
            registry=r,
        )
        self.settlements = Counter(
            "cycles_proxy_settlements",
            "How metered requests were settled (committed, released, evented, deferred, ...).",
            ["result"],
            registry=r,
        )
        self.unbilled = Counter(
            "cycles_proxy_unbilled_cost",
            "Cost of work that ran beyond a hard (REJECT) budget limit and was not charged.",
            ["tenant", "unit"],
            registry=r,
        )
        self.inflight = Gauge(
            "cycles_proxy_inflight_requests",
            "Metered requests currently reserved and running upstream.",
            registry=r,
        )
        self.authority_seconds = Histogram(
            "cycles_proxy_authority_request_duration_seconds",
            "Latency of budget-authority calls (reserve, commit, release, event, ...).",
            ["operation"],
            buckets=AUTHORITY_BUCKETS,
            registry=r,
        )
        self.authority_errors = Counter(
            "cycles_proxy_authority_errors",
            "Failed authority calls: error=unavailable (unreachable, 5xx, timeout) or the "
            "protocol error code; budget decisions are counted as denials instead.",
            ["operation", "error"],
            registry=r,
        )
        self.authority_up = Gauge(
            "cycles_proxy_authority_up",
            "1 if the last contact with the budget authority succeeded, else 0.",
            registry=r,
        )
        self.upstream_up = Gauge(
            "cycles_proxy_upstream_up",
            "1 if the last probe of the upstream model server got an answer, else 0.",
            registry=r,
        )
        self.journal_backlog = Gauge(
            "cycles_proxy_journal_backlog",
            "Settlements journaled because the remote authority was unreachable, not yet "
            "delivered.",
            registry=r,
        )
        self.ttfb = Histogram(
            "cycles_proxy_upstream_ttfb_seconds",
            "Time from sending a metered request upstream to its first response byte.",
            ["model"],
            buckets=TTFB_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "cycles_proxy_upstream_duration_seconds",
            "Duration of metered requests that reached the upstream.",
            ["model"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.build_info = Gauge(
            "cycles_proxy_build_info",
            "Always 1; labels say the version, authority and unit.",
            ["version", "authority", "unit"],
            registry=r,
        )
        self.build_info.labels(
            __version__, "remote" if settings.remote else "embedded", self.unit
        ).set(1)
        self.budgets = BudgetCollector()
        r.register(self.budgets)
        ProcessCollector(registry=r)

        # children bound once, then looked up by a tuple key
        self._requests: dict[tuple[str, str, str, str], Any] = {}
        self._billing: dict[tuple[str, str], tuple[Any, Any, Any, Any]] = {}
        self._denials: dict[tuple[str, str], Any] = {}
        self._settled: dict[str, Any] = {s: self.settlements.labels(s) for s in _SETTLEMENTS}
        self._settled[OTHER] = self.settlements.labels(OTHER)
        self._settled[NONE] = self.settlements.labels(NONE)
        self._timing: dict[str, tuple[Any, Any]] = {}

    # -- wiring ---------------------------------------------------------------------------------
    def track_inflight(self, read: Callable[[], int]) -> None:
        self.inflight.set_function(lambda: float(read()))

    def track_journal(self, read: Callable[[], int]) -> None:
        self.journal_backlog.set_function(lambda: float(read()))

    # -- the listener -----------------------------------------------------------------------------
    def observe(self, rec: RequestRecord) -> None:
        """Account one finished request (an Observer listener; runs on the event loop)."""
        tenant = self.tenants.admit(rec.tenant)
        settled = settlement_kind(rec.settlement) if rec.settlement is not None else None
        billed = settled in BILLED
        model = (
            self.models.admit(rec.model)
            if billed or rec.outcome == "allowed"
            else self.models.get(rec.model)
        )
        key = (tenant, model, rec.route, rec.outcome)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.requests.labels(*key)
        child.inc()
        if rec.outcome == "denied":
            dkey = (tenant, denial_reason(rec))
            d = self._denials.get(dkey)
            if d is None:
                d = self._denials[dkey] = self.denials.labels(*dkey)
            d.inc()
        if settled is not None:
            self._settled[settled].inc()
        if billed:
            bkey = (tenant, model)
            children = self._billing.get(bkey)
            if children is None:
                children = self._billing[bkey] = (
                    self.cost.labels(tenant, model, self.unit),
                    self.gpu_seconds.labels(tenant, model),
                    self.tokens.labels(tenant, model, "input"),
                    self.tokens.labels(tenant, model, "output"),
                )
            cost, gpu, tok_in, tok_out = children
            if rec.charged:
                cost.inc(rec.charged)
            if rec.gpu_seconds:
                gpu.inc(rec.gpu_seconds)
            if rec.tokens_input:
                tok_in.inc(rec.tokens_input)
            if rec.tokens_output:
                tok_out.inc(rec.tokens_output)
        if rec.ttfb_ms is not None:
            timing = self._timing.get(model)
            if timing is None:
                timing = self._timing[model] = (
                    self.ttfb.labels(model),
                    self.upstream_duration.labels(model),
                )
            timing[0].observe(rec.ttfb_ms / 1000)
            upstream_ms = rec.upstream_ms if rec.upstream_ms is not None else rec.duration_ms
            timing[1].observe(upstream_ms / 1000)
        if rec.extra:
            shadow = rec.extra.get("shadow_denial")
            if shadow:
                self.shadow_denials.labels(tenant, str(shadow).lower()[:MAX_LABEL_LEN]).inc()
            unbilled = rec.extra.get("unbilled")
            if isinstance(unbilled, int) and unbilled > 0:
                self.unbilled.labels(tenant, self.unit).inc(unbilled)

    # -- reading back (status page) ---------------------------------------------------------------
    def denial_counts(self) -> dict[str, dict[str, int]]:
        """tenant -> reason -> denials since the process started."""
        out: dict[str, dict[str, int]] = {}
        for family in self.denials.collect():
            for s in family.samples:
                if s.name.endswith("_total"):
                    out.setdefault(s.labels["tenant"], {})[s.labels["reason"]] = int(s.value)
        return out

    def spend_by_model(self) -> dict[str, dict[str, dict[str, float]]]:
        """tenant -> model -> {requests, cost, gpu_seconds, tokens_input, tokens_output}, since
        the process started (used when the authority is remote and there is no local ledger)."""
        out: dict[str, dict[str, dict[str, float]]] = {}

        def cell(tenant: str, model: str) -> dict[str, float]:
            return out.setdefault(tenant, {}).setdefault(
                model,
                {
                    "requests": 0,
                    "cost": 0,
                    "gpu_seconds": 0.0,
                    "tokens_input": 0,
                    "tokens_output": 0,
                },
            )

        for metric, field in ((self.cost, "cost"), (self.gpu_seconds, "gpu_seconds")):
            for family in metric.collect():
                for s in family.samples:
                    if s.name.endswith("_total"):
                        cell(s.labels["tenant"], s.labels["model"])[field] += s.value
        for family in self.tokens.collect():
            for s in family.samples:
                if s.name.endswith("_total"):
                    c = cell(s.labels["tenant"], s.labels["model"])
                    c["tokens_" + s.labels["direction"]] += s.value
        for family in self.requests.collect():
            for s in family.samples:
                if s.name.endswith("_total") and s.labels["model"] != NONE:
                    cell(s.labels["tenant"], s.labels["model"])["requests"] += s.value
        return out


class InstrumentedAuthority:
    """An :class:`Authority` that times every call and counts failures, then delegates.

    Attributes it does not define (``ledger``, ``pending``, ``heartbeat``...) are the inner
    authority's, so callers that use backend-specific extras keep working."""

    def __init__(self, inner: Authority, metrics: ProxyMetrics) -> None:
        self.inner = inner
        self.name = inner.name
        self._m = metrics
        self._ops: dict[str, Any] = {
            op: metrics.authority_seconds.labels(op)
            for op in ("reserve", "commit", "release", "extend", "event", "balances")
        }
        self._errors: dict[tuple[str, str], Any] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def with_api_key(self, api_key: str) -> InstrumentedAuthority:
        """The remote authority's per-caller view (pass-through keys), instrumented too; it
        shares this wrapper's bound metric children."""
        view = InstrumentedAuthority.__new__(InstrumentedAuthority)
        view.inner = self.inner.with_api_key(api_key)  # type: ignore[attr-defined]
        view.name = self.name
        view._m, view._ops, view._errors = self._m, self._ops, self._errors
        return view

    def _failed(self, op: str, exc: BaseException) -> None:
        if isinstance(exc, AuthorityUnavailable):
            self._m.authority_up.set(0)
            error = "unavailable"
        elif isinstance(exc, CyclesError):
            self._m.authority_up.set(1)  # it answered
            if exc.code in _DECISIONS:
                return
            error = str(exc.code).lower()
        else:
            error = "internal"
        key = (op, error)
        child = self._errors.get(key)
        if child is None:
            child = self._errors[key] = self._m.authority_errors.labels(op, error)
        child.inc()

    def _timed(self, op: str, t0: float) -> None:
        self._ops[op].observe(time.perf_counter() - t0)

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def _call(self, op: str, call: Coroutine[Any, Any, T]) -> T:
        """Await ``call`` (one authority operation), timing it and counting its failure."""
        t0 = time.perf_counter()
        try:
            res = await call
        except Exception as exc:
            self._failed(op, exc)
            raise
        finally:
            self._timed(op, t0)
        self._m.authority_up.set(1)
        return res

    def reserve(self, req: ReserveRequest) -> Coroutine[Any, Any, Reservation]:
        return self._call("reserve", self.inner.reserve(req))

    def commit(
        self,
        reservation_id: str,
        *,
        idempotency_key: str,
        actual: Amount,
        metrics: Metrics | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Coroutine[Any, Any, CommitResult]:
        return self._call(
            "commit",
            self.inner.commit(
                reservation_id,
                idempotency_key=idempotency_key,
                actual=actual,
                metrics=metrics,
                metadata=metadata,
            ),
        )

    def release(
        self, reservation_id: str, *, idempotency_key: str, reason: str | None = None
    ) -> Coroutine[Any, Any, ReleaseResult]:
        return self._call(
            "release",
            self.inner.release(reservation_id, idempotency_key=idempotency_key, reason=reason),
        )

    def extend(
        self, reservation_id: str, *, idempotency_key: str, extend_by_ms: int
    ) -> Coroutine[Any, Any, ExtendResult]:
        return self._call(
            "extend",
            self.inner.extend(
                reservation_id, idempotency_key=idempotency_key, extend_by_ms=extend_by_ms
            ),
        )

    def event(
        self,
        *,
        idempotency_key: str,
        subject: Subject,
        action: Action,
        actual: Amount,
        overage_policy: OveragePolicy = OveragePolicy.ALLOW_IF_AVAILABLE,
        metrics: Metrics | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Coroutine[Any, Any, EventResult]:
        return self._call(
            "event",
            self.inner.event(
                idempotency_key=idempotency_key,
                subject=subject,
                action=action,
                actual=actual,
                overage_policy=overage_policy,
                metrics=metrics,
                metadata=metadata,
            ),
        )

    def balances(self, subject: Subject) -> Coroutine[Any, Any, list[Balance]]:
        return self._call("balances", self.inner.balances(subject))


_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}


def metric_names(registry: CollectorRegistry) -> Iterator[str]:
    """Every series name the registry can expose, labelled children or not (for checking that
    dashboards and alert rules only use metrics that exist)."""
    for family in registry.collect():
        for suffix in _SUFFIXES.get(family.type, ("",)):
            yield family.name + suffix
