"""``cycles-proxy check`` finds each misconfiguration it claims to, and says how to fix it."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from cycles_proxy.authority.base import Unit
from cycles_proxy.authority.embedded import Ledger
from cycles_proxy.check import cmd_check
from cycles_proxy.cli import build_parser
from cycles_proxy.tenants import KeyStore
from tests.fakes.fake_cycles import FakeCycles, FakeCyclesServer
from tests.fakes.fake_ollama import RunningFake, serve_fake_ollama


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for k in list(os.environ):
        if k.startswith("CYCLES_"):
            monkeypatch.delenv(k)
    yield


@pytest.fixture
async def fake() -> AsyncIterator[RunningFake]:
    async with serve_fake_ollama() as running:
        yield running


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Result:
    def __init__(self, rc: int, findings: list[dict[str, Any]]) -> None:
        self.rc = rc
        self.findings = findings

    def has(self, level: str, topic: str, fragment: str) -> dict[str, Any]:
        for f in self.findings:
            if f["level"] == level and f["topic"] == topic and fragment in f["message"]:
                return f
        raise AssertionError(f"no {level} {topic} finding with {fragment!r} in {self.findings}")

    def levels(self, level: str) -> list[dict[str, Any]]:
        return [f for f in self.findings if f["level"] == level]


async def check(*argv: str, db: Path | None = None, upstream: str | None = None) -> Result:
    """Run ``cycles-proxy check --json`` in a thread (the fakes run on this event loop)."""
    args = ["check", "--json", "--port", str(free_port()), "--admin-port", str(free_port())]
    if db is not None:
        args += ["--db", str(db)]
    if upstream is not None:
        args += ["--upstream", upstream]
    parsed = build_parser().parse_args([*args, *argv])
    out = io.StringIO()
    rc = await asyncio.to_thread(cmd_check, parsed, out)
    return Result(rc, json.loads(out.getvalue()))


def ledger_with(db: Path, tenants: dict[str, Unit | None]) -> None:
    """A ledger where each tenant has a key and (unless None) a budget in the given unit."""
    keys = KeyStore(db)
    ledger = Ledger(db)
    try:
        for tenant, unit in tenants.items():
            keys.create(tenant)
            if unit is not None:
                ledger.set_budget(f"tenant:{tenant}", unit, 5 * 10**8)
    finally:
        keys.close()
        ledger.close()


# --------------------------------------------------------------------------------------------
async def test_a_good_setup_passes(tmp_path: Path, fake: RunningFake) -> None:
    db = tmp_path / "ledger.db"
    ledger_with(db, {"acme": Unit.USD_MICROCENTS})
    r = await check(db=db, upstream=fake.url)
    assert r.rc == 0, r.findings
    assert not r.levels("fail") and not r.levels("warn"), r.findings
    r.has("ok", "upstream", "(Ollama 0.")
    r.has("ok", "ledger", "(1 budgets)")
    r.has("ok", "budgets", "1 budgets in USD_MICROCENTS")


async def test_the_text_output_says_what_is_wrong_and_how_to_fix_it(tmp_path: Path) -> None:
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "cycles_proxy", "check", "--db", str(tmp_path / "l.db")],
        env={**os.environ, "CYCLES_PROXY_UPSTREAM": "localhost:11435"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "FAIL  settings: upstream = 'localhost:11435'" in proc.stdout
    assert "fix: write it as a URL, e.g. http://localhost:11435" in proc.stdout
    assert "1 problem, 0 warnings" in proc.stdout


async def test_a_bad_upstream_url() -> None:
    r = await check(upstream="ftp://models:21")
    assert r.rc == 1
    f = r.has("fail", "settings", "upstream = 'ftp://models:21'")
    assert "http://" in f["fix"] and "CYCLES_PROXY_UPSTREAM" in f["fix"]


async def test_an_unreachable_upstream(tmp_path: Path) -> None:
    r = await check(db=tmp_path / "l.db", upstream=f"http://127.0.0.1:{free_port()}")
    assert r.rc == 1
    f = r.has("fail", "upstream", "connection refused")
    assert "OLLAMA_HOST=127.0.0.1:11435" in f["fix"]


async def test_an_upstream_that_is_the_proxy_itself(tmp_path: Path) -> None:
    port = free_port()
    r = await check("--port", str(port), db=tmp_path / "l.db", upstream=f"http://localhost:{port}")
    assert r.rc == 1
    r.has("fail", "upstream", "is the proxy's own address")


async def test_an_upstream_that_is_not_a_model_server(tmp_path: Path) -> None:
    runner = web.AppRunner(web.Application())  # 404 everywhere
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        r = await check(db=tmp_path / "l.db", upstream=f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()
    r.has("warn", "upstream", "neither /api/version (Ollama) nor /v1/models")


async def test_an_upstream_failing_with_5xx(tmp_path: Path) -> None:
    async with serve_fake_ollama(status=503) as broken:
        r = await check(db=tmp_path / "l.db", upstream=broken.url)
    r.has("warn", "upstream", "answers HTTP 503")


async def test_a_db_directory_that_cannot_be_created(tmp_path: Path, fake: RunningFake) -> None:
    (tmp_path / "afile").write_text("x")
    r = await check(db=tmp_path / "afile" / "sub" / "ledger.db", upstream=fake.url)
    assert r.rc == 1
    f = r.has("fail", "ledger", "cannot create the directory")
    assert "CYCLES_PROXY_DB" in f["fix"]


async def test_a_db_directory_that_cannot_be_written(tmp_path: Path, fake: RunningFake) -> None:
    if os.geteuid() == 0:
        directory = Path("/sys")  # even root cannot create files there
    else:
        directory = tmp_path / "ro"
        directory.mkdir()
        directory.chmod(0o500)
    r = await check(db=directory / "ledger.db", upstream=fake.url)
    assert r.rc == 1
    f = r.has("fail", "ledger", f"cannot write in {directory}")
    assert "write access" in f["fix"]


async def test_a_file_that_is_not_a_ledger(tmp_path: Path, fake: RunningFake) -> None:
    db = tmp_path / "ledger.db"
    db.write_bytes(b"this is not a database" * 100)
    r = await check(db=db, upstream=fake.url)
    assert r.rc == 1
    r.has("fail", "ledger", "cannot open")


async def test_a_budget_in_another_unit_than_the_prices(tmp_path: Path, fake: RunningFake) -> None:
    db = tmp_path / "ledger.db"
    ledger_with(db, {"acme": Unit.USD_MICROCENTS, "tok": Unit.TOKENS})
    r = await check(db=db, upstream=fake.url)
    assert r.rc == 1
    f = r.has("fail", "budgets", "tenant:tok is a TOKENS budget but the proxy prices")
    assert "tenant 'tok' will be refused" in f["message"]
    assert "CYCLES_PROXY_UNIT=TOKENS" in f["fix"] and "--unit USD_MICROCENTS" in f["fix"]
    assert len(r.levels("fail")) == 1  # acme is fine


async def test_tenants_without_budgets_and_a_ledger_without_keys(
    tmp_path: Path, fake: RunningFake
) -> None:
    db = tmp_path / "ledger.db"
    ledger_with(db, {"acme": Unit.USD_MICROCENTS, "broke": None})
    r = await check(db=db, upstream=fake.url)
    assert r.rc == 0  # warnings only
    f = r.has("warn", "budgets", "tenant 'broke' has API keys but no USD_MICROCENTS budget")
    assert f["fix"] == "cycles-proxy budgets set broke 5usd"
    empty = tmp_path / "empty.db"
    Ledger(empty).close()
    r = await check(db=empty, upstream=fake.url)
    r.has("warn", "keys", "no API keys exist")


async def test_an_unreachable_cycles_server(
    tmp_path: Path, fake: RunningFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CYCLES_BASE_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("CYCLES_API_KEY", "ck_example")
    r = await check(db=tmp_path / "l.db", upstream=fake.url)
    assert r.rc == 1
    f = r.has("fail", "authority", "cannot connect to the Cycles server")
    assert "CYCLES_BASE_URL" in f["fix"]


async def test_cycles_keys_missing_rejected_and_accepted(
    tmp_path: Path, fake: RunningFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = FakeCycles(keys={"ck_acme": "acme", "ck_beta": "beta"})
    server = FakeCyclesServer(state)
    await server.up()
    try:
        monkeypatch.setenv("CYCLES_BASE_URL", server.url)
        r = await check(db=tmp_path / "l.db", upstream=fake.url)
        r.has("fail", "authority", "no Cycles API key is configured")
        monkeypatch.setenv("CYCLES_API_KEY", "ck_wrong")
        r = await check(db=tmp_path / "l.db", upstream=fake.url)
        r.has("fail", "authority", "rejects the API key of CYCLES_API_KEY")
        monkeypatch.setenv("CYCLES_API_KEY", "ck_acme")
        monkeypatch.setenv("CYCLES_PROXY_CYCLES_TENANT_KEYS", '{"beta": "ck_acme"}')
        r = await check(db=tmp_path / "l.db", upstream=fake.url)
        r.has("ok", "authority", "accepts CYCLES_API_KEY")
        r.has("fail", "authority", "configured for tenant 'beta' belongs to another tenant")
        r.has("ok", "journal", "journaled in")
        monkeypatch.setenv("CYCLES_PROXY_CYCLES_TENANT_KEYS", '{"beta": "ck_beta"}')
        r = await check(db=tmp_path / "l.db", upstream=fake.url)
        assert r.rc == 0, r.findings
        r.has("ok", "authority", "accepts tenant 'beta'")
    finally:
        await server.down()
        state.close()
    assert not state.violations  # what check sent follows the Cycles spec


async def test_listeners_that_collide(tmp_path: Path, fake: RunningFake) -> None:
    port = free_port()
    r = await check("--admin-port", str(port), "--port", str(port), db=tmp_path / "l.db")
    assert r.rc == 1
    r.has("fail", "listen", f"both want port {port}")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        r = await check("--port", str(taken), db=tmp_path / "l.db", upstream=fake.url)
    r.has("warn", "listen", f"127.0.0.1:{taken} (proxy) is already in use")


async def test_prices_that_do_not_fit_the_unit_and_policies(
    tmp_path: Path, fake: RunningFake
) -> None:
    config = tmp_path / "c.toml"
    config.write_text('unit = "TOKENS"\n[[prices]]\nmodel = "llama3*"\nper_gpu_second = "1usd/h"\n')
    r = await check("--config", str(config), db=tmp_path / "l.db", upstream=fake.url)
    r.has("warn", "prices", "charges 27,778 tokens per GPU-second")
    config.write_text(
        'default_price_per_gpu_second = 0\nfailure_policy = "shadow"\nadmin_host = "0.0.0.0"\n'
    )
    r = await check("--config", str(config), db=tmp_path / "l.db", upstream=fake.url)
    r.has("warn", "prices", "every price is zero")
    r.has("warn", "policy", "shadow mode")
    r.has("warn", "admin", "reachable beyond this machine")


async def test_a_missing_or_broken_config_file(tmp_path: Path) -> None:
    r = await check("--config", str(tmp_path / "nope.toml"))
    assert r.rc == 1
    r.has("fail", "settings", "config file not found")
    broken = tmp_path / "broken.toml"
    broken.write_text("unit = [oops\n")
    r = await check("--config", str(broken))
    assert r.rc == 1
    r.has("fail", "settings", "cannot read the configuration")
