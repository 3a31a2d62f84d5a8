"""Operating the proxy: the admin listener (/metrics, /healthz, /readyz, /version), metrics that
match the ledger after a mixed workload, the access log, response headers, and keys that never
leak into logs, metrics or error messages."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cycles_proxy.app import METRICS_KEY
from cycles_proxy.authority.base import (
    Authority,
    AuthorityUnavailable,
    CyclesError,
    ErrorCode,
    Reservation,
    ReserveRequest,
    Subject,
)
from cycles_proxy.authority.embedded import EmbeddedAuthority
from cycles_proxy.metrics import (
    MAX_LABEL_LEN,
    MAX_MODELS,
    OTHER,
    InstrumentedAuthority,
    ProxyMetrics,
    denial_reason,
    metric_names,
)
from cycles_proxy.observability import RequestRecord
from cycles_proxy.settings import Settings
from tests.conftest import Harness, StartProxy
from tests.fakes.fake_ollama import RunningFake, serve_fake_ollama

PRICE = 1_000_000  # per GPU-second
MSG = [{"role": "user", "content": "hello"}]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
class Scrape:
    """A parsed /metrics page."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: list[tuple[str, dict[str, str], float]] = [
            (s.name, s.labels, s.value)
            for family in text_string_to_metric_families(text)
            for s in family.samples
        ]

    def total(self, name: str, **labels: str) -> float:
        return sum(
            v
            for n, lab, v in self.samples
            if n == name and all(lab.get(k) == want for k, want in labels.items())
        )

    def series(self, name: str) -> list[dict[str, str]]:
        return [lab for n, lab, _ in self.samples if n == name]


async def scrape(h: Harness) -> Scrape:
    assert h.running.admin_url is not None
    async with aiohttp.ClientSession() as s, s.get(f"{h.running.admin_url}/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return Scrape(await r.text())


async def get_json(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.json()


async def eventually(cond: Callable[[], bool], *, tries: int = 500) -> None:
    """Wait (by polling, not by a wall-clock assertion) until ``cond()`` holds."""
    for _ in range(tries):
        if cond():
            return
        await asyncio.sleep(0.01)
    assert cond()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def fake() -> AsyncIterator[RunningFake]:
    async with serve_fake_ollama(token_delay_s=0.002) as running:
        yield running


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """Everything the proxy logs (access log included), at every level."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setLevel(logging.DEBUG)
    logger = logging.getLogger("cycles_proxy")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield buf
    logger.removeHandler(handler)
    logger.setLevel(old)


# --------------------------------------------------------------------------------------------
# the mixed workload
# --------------------------------------------------------------------------------------------
async def mixed_workload(h: Harness, fake: RunningFake) -> dict[str, str]:
    """Allowed (native and OpenAI, streaming or not), denied (short budget, no budget),
    upstream-refused (unknown model), disconnected mid-stream, unauthorized and pass-through.
    Returns the keys it created."""
    keys = {"acme": h.key("acme"), "poor": h.key("poor"), "nobudget": h.key("nobudget")}
    h.budget("acme", 1000 * PRICE, period="daily")
    h.budget("poor", 5)
    async with aiohttp.ClientSession() as s:
        acme = auth(keys["acme"])
        for stream in (False, True):
            async with s.post(
                f"{h.url}/api/generate",
                json={"model": "llama3.2", "prompt": "hi there", "stream": stream},
                headers=acme,
            ) as r:
                assert r.status == 200
                await r.read()
        async with s.post(
            f"{h.url}/api/chat",
            json={"model": "qwen2.5:0.5b", "messages": [{"role": "user", "content": "yo"}]},
            headers=acme,
        ) as r:
            assert r.status == 200
            await r.read()
        sdk = openai.AsyncOpenAI(base_url=f"{h.url}/v1", api_key=keys["acme"], max_retries=0)
        await sdk.chat.completions.create(
            model="llama3.2", messages=[{"role": "user", "content": "a"}], max_tokens=3
        )
        stream = await sdk.chat.completions.create(
            model="llama3.2", messages=[{"role": "user", "content": "b"}], stream=True
        )
        async for _ in stream:
            pass
        # upstream refuses (unknown model): released, nothing charged
        async with s.post(
            f"{h.url}/api/generate", json={"model": "no-such-model", "prompt": "x"}, headers=acme
        ) as r:
            assert r.status == 404
        # disconnected mid-stream: the partial work is committed
        r = await s.post(
            f"{h.url}/api/generate",
            json={"model": "llama3.2", "prompt": "x", "options": {"num_predict": 500}},
            headers={**acme, "x-fake-fault": "token_delay_s=0.02"},
        )
        for _ in range(3):
            await r.content.readline()
        r.close()
        await fake.fake.wait_until(lambda: fake.fake.cancelled_generations == 1, timeout_s=5)
        # denied: short budget (twice), no budget at all
        for _ in range(2):
            async with s.post(
                f"{h.url}/api/generate",
                json={"model": "llama3.2", "prompt": "x"},
                headers=auth(keys["poor"]),
            ) as r:
                assert r.status == 429
        async with s.post(
            f"{h.url}/v1/chat/completions",
            json={"model": "llama3.2", "messages": []},
            headers=auth(keys["nobudget"]),
        ) as r:
            assert r.status == 403
        # unauthorized, and pass-through
        async with s.post(
            f"{h.url}/api/generate", json={"model": "llama3.2"}, headers=auth("cyp_wrong")
        ) as r:
            assert r.status == 401
        async with s.get(f"{h.url}/api/tags", headers=acme) as r:
            assert r.status == 200
    return keys


WORKLOAD_RECORDS = 12
UNKNOWN_KEY = "cyp_q9VtJ2kz0example0unknown0key0Xw"


async def test_metrics_after_a_mixed_workload_match_the_ledger(
    start_proxy: StartProxy, fake: RunningFake
) -> None:
    h = await start_proxy(fake.url, default_price_per_gpu_second=PRICE, admin_port=0)
    seen: list[RequestRecord] = []
    h.proxy.observer.listeners.append(seen.append)
    await mixed_workload(h, fake)
    await eventually(lambda: len(seen) == WORKLOAD_RECORDS)
    await eventually(lambda: all(r["status"] != "ACTIVE" for r in h.reservations()))
    m = await scrape(h)

    # money, GPU time and tokens: exactly the ledger's
    charges = h.charges()
    acme = h.balance("acme")
    assert acme.spent == sum(c["amount"] for c in charges) > 0
    assert m.total("cycles_proxy_cost_total", tenant="acme", unit="USD_MICROCENTS") == acme.spent
    assert m.total("cycles_proxy_cost_total") == acme.spent
    for row in h.ledger.usage(tenant="acme"):
        model = row.model.removeprefix("ollama:")
        assert m.total("cycles_proxy_cost_total", tenant="acme", model=model) == row.cost
        assert m.total("cycles_proxy_tokens_total", model=model, direction="input") == (
            row.tokens_input
        )
        assert m.total("cycles_proxy_tokens_total", model=model, direction="output") == (
            row.tokens_output
        )
        assert m.total("cycles_proxy_gpu_seconds_total", model=model) == pytest.approx(
            row.gpu_seconds, abs=1e-5
        )
    assert {lab["model"] for lab in m.series("cycles_proxy_cost_total")} == {
        "llama3.2",
        "qwen2.5:0.5b",
    }

    # request counts by outcome, denials by reason, settlements
    def requests(**labels: str) -> float:
        return m.total("cycles_proxy_requests_total", **labels)

    assert requests() == WORKLOAD_RECORDS
    assert requests(tenant="acme", outcome="allowed") == 5
    assert requests(tenant="acme", outcome="upstream_refused", model=OTHER) == 1
    assert requests(tenant="acme", outcome="client_disconnected") == 1
    assert requests(tenant="acme", outcome="passthrough", route="pass") == 1
    assert requests(tenant="none", outcome="unauthorized") == 1
    assert requests(outcome="denied") == 3
    assert m.total("cycles_proxy_denials_total", tenant="poor", reason="budget_exceeded") == 2
    assert m.total("cycles_proxy_denials_total", tenant="nobudget", reason="no_budget") == 1
    assert m.total("cycles_proxy_denials_total") == 3
    assert m.total("cycles_proxy_settlements_total", result="committed") == len(charges) == 6
    assert m.total("cycles_proxy_settlements_total", result="released") == 1

    # authority latency: one reserve per metered request that got past authentication
    assert (
        m.total("cycles_proxy_authority_request_duration_seconds_count", operation="reserve") == 10
    )
    assert m.total("cycles_proxy_authority_request_duration_seconds_count", operation="commit") == 6
    assert (
        m.total("cycles_proxy_authority_request_duration_seconds_count", operation="release") == 1
    )
    assert m.total("cycles_proxy_authority_errors_total") == 0
    # upstream timing: every metered request that reached the upstream
    assert m.total("cycles_proxy_upstream_ttfb_seconds_count") == 7
    assert m.total("cycles_proxy_upstream_duration_seconds_count") == 7
    assert m.total("cycles_proxy_inflight_requests") == 0

    # remaining budget per tenant and scope, as the ledger says
    poor = h.balance("poor")
    for tenant, bal in (("acme", acme), ("poor", poor)):
        scope = f"tenant:{tenant}"
        assert m.total("cycles_proxy_budget_remaining", tenant=tenant, scope=scope) == (
            bal.remaining
        )
        assert m.total("cycles_proxy_budget_spent", scope=scope) == bal.spent
        assert m.total("cycles_proxy_budget_allocated", scope=scope) == bal.allocated
        assert m.total("cycles_proxy_budget_reserved", scope=scope) == 0
    assert m.total("cycles_proxy_authority_up") == 1
    assert m.total("cycles_proxy_upstream_up") == 1

    # every series scraped is one metric_names() announces (dashboards are checked against it)
    registry = h.running.runner.app[METRICS_KEY].registry
    assert {name for name, _, _ in m.samples} <= set(metric_names(registry))

    # keys are never labels, and no label value is a key
    for key in [k for k in (h.keys.list()) if k]:
        assert key.key_id not in m.text


async def test_budget_gauges_follow_the_ledger_between_scrapes(
    start_proxy: StartProxy, fake: RunningFake
) -> None:
    h = await start_proxy(fake.url, default_price_per_gpu_second=PRICE, admin_port=0)
    h.budget("acme", 10 * PRICE)
    m = await scrape(h)
    assert m.total("cycles_proxy_budget_remaining", scope="tenant:acme") == 10 * PRICE
    h.budget("acme", 3 * PRICE)  # the operator changes it with the CLI
    m = await scrape(h)
    assert m.total("cycles_proxy_budget_remaining", scope="tenant:acme") == 3 * PRICE


# --------------------------------------------------------------------------------------------
# the access log and secrecy of keys
# --------------------------------------------------------------------------------------------
ACCESS_FIELDS = {
    "tenant",
    "model",
    "route",
    "status",
    "outcome",
    "reservation_id",
    "estimate",
    "charged",
    "unit",
    "gpu_seconds",
    "tokens_input",
    "tokens_output",
    "ttfb_ms",
    "duration_ms",
}


async def test_access_log_has_one_json_line_per_request_with_the_billing_fields(
    start_proxy: StartProxy, fake: RunningFake, log_lines: io.StringIO
) -> None:
    h = await start_proxy(fake.url, default_price_per_gpu_second=PRICE, admin_port=0)
    key = h.key("acme")
    h.budget("acme", 100 * PRICE)
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{h.url}/api/generate",
            json={"model": "llama3.2", "prompt": "hi", "stream": False},
            headers=auth(key),
        ) as r:
            assert r.status == 200
            rid = r.headers["x-cycles-reservation-id"]
        async with s.get(f"{h.url}/api/tags", headers=auth(key)) as r:
            assert r.status == 200
    lines = [json.loads(x) for x in log_lines.getvalue().splitlines() if x.startswith("{")]
    assert len(lines) == 2
    metered, passthrough = lines
    assert set(metered) >= ACCESS_FIELDS
    [charge] = h.charges()
    assert metered["reservation_id"] == rid == charge["reservation_id"]
    assert metered["charged"] == charge["amount"]
    assert metered["tokens_output"] == charge["tokens_output"]
    assert metered["tenant"] == "acme" and metered["model"] == "llama3.2"
    assert metered["unit"] == "USD_MICROCENTS" and metered["outcome"] == "allowed"
    assert passthrough["route"] == "pass" and passthrough["status"] == 200


async def test_keys_never_appear_in_logs_metrics_status_or_error_messages(
    start_proxy: StartProxy, fake: RunningFake, log_lines: io.StringIO
) -> None:
    h = await start_proxy(fake.url, default_price_per_gpu_second=PRICE, admin_port=0)
    keys = await mixed_workload(h, fake)
    secrets = [*keys.values(), "cyp_wrong", UNKNOWN_KEY]
    bodies: list[str] = []
    async with aiohttp.ClientSession() as s:
        # a key in x-api-key with an upstream error, an unknown key, a bad request
        async with s.post(
            f"{h.url}/api/generate",
            json={"model": "llama3.2", "prompt": "x", "stream": False},
            headers={"x-api-key": keys["acme"], "x-fake-fault": "status=500"},
        ) as r:
            bodies.append(await r.text())
        async with s.post(
            f"{h.url}/api/chat", json={"model": "llama3.2"}, headers=auth(UNKNOWN_KEY)
        ) as r:
            assert r.status == 401
            bodies.append(await r.text())
        async with s.post(
            f"{h.url}/v1/chat/completions",
            json={"model": "m", "messages": [], "stream": "nope"},
            headers=auth(keys["acme"]),
        ) as r:
            assert r.status == 400
            bodies.append(await r.text())
        admin = h.running.admin_url
        for path in ("/metrics", "/status", "/readyz", "/version", "/healthz"):
            async with s.get(f"{admin}{path}") as r:
                bodies.append(await r.text())
    everything = log_lines.getvalue() + "\n".join(bodies)
    assert '"tenant":"acme"' in everything  # the log was captured
    for secret in secrets:
        assert secret not in everything
        assert secret[4:20] not in everything  # nor a recognisable part of one


# --------------------------------------------------------------------------------------------
# response headers
# --------------------------------------------------------------------------------------------
async def test_metered_responses_carry_the_reservation_and_the_charge(
    start_proxy: StartProxy, fake: RunningFake
) -> None:
    h = await start_proxy(fake.url, default_price_per_gpu_second=PRICE)
    key = h.key("acme")
    h.budget("acme", 100 * PRICE)
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{h.url}/api/chat",
            json={"model": "llama3.2", "messages": [], "stream": False},
            headers=auth(key),
        ) as r:
            await r.read()
            [charge] = h.charges()
            assert r.headers["x-cycles-reservation-id"] == charge["reservation_id"]
            assert int(r.headers["x-cycles-estimate"]) > 0
            assert r.headers["x-cycles-charged"] == str(charge["amount"])
            assert r.headers["x-cycles-remaining"] == str(h.balance("acme").remaining)
        async with s.post(
            f"{h.url}/api/chat", json={"model": "llama3.2", "messages": MSG}, headers=auth(key)
        ) as r:
            assert r.content_type == "application/x-ndjson"
            await r.read()
            rid = r.headers["x-cycles-reservation-id"]
            assert rid in {c["reservation_id"] for c in h.charges()}
            assert int(r.headers["x-cycles-estimate"]) > 0
            # a stream's charge is not known when its headers leave
            assert "x-cycles-charged" not in r.headers


# --------------------------------------------------------------------------------------------
# health, readiness, version
# --------------------------------------------------------------------------------------------
async def test_admin_listener_is_separate_and_answers_health_and_version(
    start_proxy: StartProxy, fake: RunningFake
) -> None:
    h = await start_proxy(fake.url, admin_port=0)
    admin = h.running.admin_url
    assert admin is not None and admin != h.url
    assert await get_json(f"{admin}/healthz") == (200, {"status": "ok"})
    status, version = await get_json(f"{admin}/version")
    assert status == 200
    assert version["name"] == "cycles-proxy" and version["authority"] == "embedded"
    # the proxy port does not serve the admin routes: they go upstream (needing a key)
    async with aiohttp.ClientSession() as s, s.get(f"{h.url}/metrics") as r:
        assert r.status == 401


async def test_admin_listener_is_off_unless_asked(
    start_proxy: StartProxy, fake: RunningFake
) -> None:
    h = await start_proxy(fake.url)
    assert h.running.admin_url is None


async def test_readyz_turns_503_when_the_upstream_is_down(start_proxy: StartProxy) -> None:
    cm = serve_fake_ollama()
    fake = await cm.__aenter__()
    try:
        h = await start_proxy(fake.url, admin_port=0)
        status, body = await get_json(f"{h.running.admin_url}/readyz")
        assert (status, body["ready"], body["upstream"]["ok"]) == (200, True, True)
    finally:
        await cm.__aexit__(None, None, None)
    status, body = await get_json(f"{h.running.admin_url}/readyz")
    assert status == 503
    assert body["ready"] is False and body["upstream"]["ok"] is False
    assert body["authority"]["ok"] is True
    assert "unreachable" in body["upstream"]["detail"]
    m = await scrape(h)
    assert m.total("cycles_proxy_upstream_up") == 0


class FlakyAuthority:
    """The embedded authority, except that it can be switched off (AuthorityUnavailable)."""

    def __init__(self, inner: EmbeddedAuthority) -> None:
        self.inner = inner
        self.name = "flaky"
        self.down = False

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr) or name in ("start", "close"):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise AuthorityUnavailable("connection refused (test)")
            return await attr(*args, **kwargs)

        return call


@pytest.mark.parametrize(
    ("policy", "ready_when_down"), [("fail_closed", False), ("fail_open", True)]
)
async def test_readyz_and_metrics_when_the_authority_is_down(
    start_proxy: StartProxy,
    fake: RunningFake,
    tmp_path: Any,
    policy: str,
    ready_when_down: bool,
) -> None:
    flaky = FlakyAuthority(EmbeddedAuthority(tmp_path / "a.db"))
    h = await start_proxy(
        fake.url,
        authority=flaky,  # type: ignore[arg-type]
        admin_port=0,
        failure_policy=policy,
        db=tmp_path / "a.db",
    )
    key = h.key("acme")
    h.budget("acme", 100 * PRICE)
    status, _ = await get_json(f"{h.running.admin_url}/readyz")
    assert status == 200
    flaky.down = True
    status, body = await get_json(f"{h.running.admin_url}/readyz")
    assert status == (200 if ready_when_down else 503)
    assert body["authority"]["ok"] is False
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{h.url}/api/generate",
            json={"model": "llama3.2", "prompt": "x", "stream": False},
            headers=auth(key),
        ) as r,
    ):
        assert r.status == (200 if ready_when_down else 503)
    m = await scrape(h)
    assert m.total("cycles_proxy_authority_up") == 0
    assert (
        m.total("cycles_proxy_authority_errors_total", operation="reserve", error="unavailable")
        == 1
    )
    if not ready_when_down:
        assert m.total("cycles_proxy_requests_total", outcome="authority_unavailable") == 1
    flaky.down = False
    status, _ = await get_json(f"{h.running.admin_url}/readyz")
    assert status == 200


async def test_readyz_probes_a_remote_cycles_server(
    start_proxy: StartProxy, fake: RunningFake, tmp_path: Any
) -> None:
    from tests.fakes.fake_cycles import FakeCycles, FakeCyclesServer

    state = FakeCycles(keys={"k": "acme"})
    server = FakeCyclesServer(state)
    await server.up()
    try:
        h = await start_proxy(
            fake.url,
            authority=EmbeddedAuthority(tmp_path / "r.db"),
            admin_port=0,
            cycles_base_url=server.url,
            cycles_api_key="k",
        )
        status, body = await get_json(f"{h.running.admin_url}/readyz")
        assert status == 200 and "Cycles server" in body["authority"]["detail"]
        assert state.requests_for("list") and not state.violations
        state.keys.clear()  # the key is no longer valid
        status, body = await get_json(f"{h.running.admin_url}/readyz")
        assert status == 503 and "rejects the configured API key" in body["authority"]["detail"]
        await server.down()
        status, body = await get_json(f"{h.running.admin_url}/readyz")
        assert status == 503 and body["authority"]["ok"] is False
        assert body["upstream"]["ok"] is True
    finally:
        await server.down()
        state.close()


async def test_shutdown_stops_the_admin_listener(
    start_proxy: StartProxy, fake: RunningFake
) -> None:
    h = await start_proxy(fake.url, admin_port=0)
    admin = h.running.admin_url
    await h.running.runner.cleanup()
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientConnectionError):
            await s.get(f"{admin}/healthz")


async def test_admin_port_in_use_is_a_clear_error(
    start_proxy: StartProxy, fake: RunningFake
) -> None:
    first = await start_proxy(fake.url, admin_port=0)
    assert first.running.admin_url is not None
    taken = int(first.running.admin_url.rsplit(":", 1)[1])
    with pytest.raises(OSError, match="admin listener"):
        await start_proxy(fake.url, admin_port=taken)


# --------------------------------------------------------------------------------------------
# units: bounded labels, the instrumented authority, denial reasons
# --------------------------------------------------------------------------------------------
def _settings(**kw: Any) -> Settings:
    return Settings(upstream="http://127.0.0.1:9", admin_port=None, **kw)


def _rec(
    model: str, outcome: str = "allowed", settlement: str | None = "committed"
) -> RequestRecord:
    return RequestRecord(
        "POST",
        "/api/generate",
        "generate",
        tenant="acme",
        model=model,
        status=200,
        outcome=outcome,
        settlement=settlement,
        charged=10,
        gpu_seconds=0.5,
        tokens_input=3,
        tokens_output=4,
        ttfb_ms=5.0,
        duration_ms=20.0,
    )


def test_model_labels_are_bounded_and_admitted_only_once_served() -> None:
    m = ProxyMetrics(_settings(prices=[{"model": "priced", "per_gpu_second": 1}]))
    for i in range(MAX_MODELS + 50):
        m.observe(_rec(f"model-{i}"))
    for i in range(20):  # never served: denied and refused requests for made-up names
        m.observe(_rec(f"junk-{i}", outcome="denied", settlement=None))
        m.observe(_rec(f"junk2-{i}", outcome="upstream_refused", settlement="released"))
    m.observe(_rec("priced", outcome="denied", settlement=None))
    models = {
        s.labels["model"]
        for family in m.requests.collect()
        for s in family.samples
        if s.name.endswith("_total")
    }
    assert len(models) == MAX_MODELS + 1  # the cap (the priced model counts) + "other"
    assert OTHER in models and "priced" in models
    assert not any(x.startswith("junk") for x in models)
    assert "model-0" in models and f"model-{MAX_MODELS + 49}" not in models
    cost = sum(s.value for f in m.cost.collect() for s in f.samples if s.name.endswith("_total"))
    assert cost == 10 * (MAX_MODELS + 50)  # nothing lost to the folding


def test_denial_reasons_are_bounded_codes() -> None:
    def rec(**kw: Any) -> RequestRecord:
        return RequestRecord("POST", "/api/chat", "chat", outcome="denied", **kw)

    assert denial_reason(rec(denial_reason="budget_frozen")) == "budget_frozen"
    assert denial_reason(rec(denial_reason="x" * 500)) == "x" * MAX_LABEL_LEN
    assert denial_reason(rec(error="budget exceeded for tenant 'a'")) == OTHER


class ScriptedAuthority:
    name = "scripted"

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.extra = "delegated"

    async def reserve(self, req: ReserveRequest) -> Reservation:
        raise self.error

    async def balances(self, subject: Subject) -> list[Any]:
        return []

    def with_api_key(self, key: str) -> ScriptedAuthority:
        view = ScriptedAuthority(self.error)
        view.extra = f"view for {len(key)}-char key"
        return view


@pytest.mark.parametrize(
    ("error", "counted", "up"),
    [
        (AuthorityUnavailable("refused"), ("reserve", "unavailable"), 0),
        (CyclesError(ErrorCode.INTERNAL_ERROR, "boom"), ("reserve", "internal_error"), 1),
        (CyclesError(ErrorCode.BUDGET_EXCEEDED, "short"), None, 1),
        (CyclesError(ErrorCode.NOT_FOUND, "no budget"), None, 1),
    ],
)
async def test_instrumented_authority_times_calls_and_counts_only_real_errors(
    error: Exception, counted: tuple[str, str] | None, up: int
) -> None:
    m = ProxyMetrics(_settings())
    a = InstrumentedAuthority(ScriptedAuthority(error), m)  # type: ignore[arg-type]
    assert isinstance(a, Authority)
    assert a.extra == "delegated"  # backend extras pass through
    req = ReserveRequest("k", Subject("acme"), None, None)  # type: ignore[arg-type]
    with pytest.raises(type(error)):
        await a.reserve(req)
    reg = m.registry
    assert (
        reg.get_sample_value(
            "cycles_proxy_authority_request_duration_seconds_count", {"operation": "reserve"}
        )
        == 1
    )
    errors = {
        (s.labels["operation"], s.labels["error"]): s.value
        for f in m.authority_errors.collect()
        for s in f.samples
        if s.name.endswith("_total")
    }
    assert errors == ({counted: 1.0} if counted else {})
    assert reg.get_sample_value("cycles_proxy_authority_up") == up
    # a pass-through view (remote authority) is instrumented into the same series
    view = a.with_api_key("ck_caller")
    assert isinstance(view, InstrumentedAuthority) and view.extra == "view for 9-char key"
    with pytest.raises(type(error)):
        await view.reserve(req)
    assert (
        reg.get_sample_value(
            "cycles_proxy_authority_request_duration_seconds_count", {"operation": "reserve"}
        )
        == 2
    )
