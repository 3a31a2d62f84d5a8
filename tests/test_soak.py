"""A bounded soak (issue 6, item 8): a few thousand mixed requests from several tenants, with
upstream faults and callers hanging up, through one proxy. Memory and open file descriptors
stay flat after warm-up, nothing is left in flight, and the ledger balances to the unit."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from cycles_proxy.authority.base import OveragePolicy
from cycles_proxy.observability import RequestRecord
from tests.chaos import audit
from tests.conftest import StartProxy, eventually
from tests.fakes.fake_ollama import serve_fake_ollama
from tests.test_hardening import body_for

TOTAL = 3000
CHECKPOINTS = (1000, 2000, 3000)  # memory and descriptors are sampled after these many
CONCURRENCY = 24
PRICE = 1_000_000
PATHS = ["/api/chat", "/api/generate", "/api/embed", "/v1/chat/completions", "/v1/completions"]
FAULTS = [
    ("error_after_chunks=1", 3),
    ("reset_after_chunks=1", 3),
    ("close_after_chunks=2", 2),
    ("truncate_after_chunks=1", 2),
    ("truncate", 2),
    ("status=500", 2),
    ("status=503", 2),
    ("stall_after_chunks=1", 1),
]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_soak_thousands_of_mixed_requests_stay_flat_and_balance(
    start_proxy: StartProxy, tmp_path: Path
) -> None:
    rng = random.Random(20261204)
    async with serve_fake_ollama(record_limit=50) as fake:
        h = await start_proxy(
            fake.url,
            access_log=False,
            default_price_per_gpu_second=PRICE,
            default_estimate_seconds=0.01,
            learn_estimates=False,
            overage_policy=OveragePolicy.REJECT,
            max_inflight_per_tenant=8,
            upstream_read_timeout_s=1.0,
            upstream_first_byte_timeout_s=1.0,
        )
        tenants = {f"t{i}": h.key(f"t{i}") for i in range(4)}
        # two rich tenants, one that runs dry part-way, one that never had enough
        budgets = {"t0": 10**12, "t1": 10**12, "t2": 400 * 10_000, "t3": 5_000}
        for name, amount in budgets.items():
            h.budget(name, amount)
        records: list[RequestRecord] = []
        h.proxy.observer.listeners.append(records.append)
        faults = [f for f, w in FAULTS for _ in range(w)] + [None] * 83
        statuses: Counter[int] = Counter()
        samples: list[tuple[int, int]] = []

        async def one(s: aiohttp.ClientSession, i: int) -> None:
            tenant = rng.choice(list(tenants))
            path = rng.choice(PATHS)
            fault = rng.choice(faults)
            hang_up = rng.random() < 0.05
            headers = {"Authorization": f"Bearer {tenants[tenant]}"}
            if fault:
                headers["x-fake-fault"] = fault
            body = body_for(path, rng.random() < 0.6, rng.randint(1, 8))
            with contextlib.suppress(aiohttp.ClientError):
                async with s.post(h.url + path, json=body, headers=headers) as r:
                    statuses[r.status] += 1
                    if hang_up:
                        await r.content.readany()
                        r.close()
                    else:
                        await r.read()

        gate = asyncio.Semaphore(CONCURRENCY)

        async def gated(s: aiohttp.ClientSession, i: int) -> None:
            async with gate:
                await one(s, i)

        connector = aiohttp.TCPConnector(limit=CONCURRENCY)
        async with aiohttp.ClientSession(connector=connector) as s:
            done = 0
            for mark in CHECKPOINTS:
                await asyncio.gather(*(gated(s, i) for i in range(done, mark)))
                done = mark
                await eventually(lambda n=mark: len(records) == n, timeout_s=30)
                await h.proxy.drain()
                gc.collect()
                samples.append((rss_bytes(), open_fds()))

        # nothing is left in flight or pending
        assert h.proxy._tenant_inflight == {} and h.proxy.inflight == 0
        assert not h.proxy._background
        # flat: from the first checkpoint to the last, 2000 more requests
        (rss0, fds0), *_, (rss1, fds1) = samples
        assert fds1 - fds0 <= 8, samples
        assert rss1 - rss0 < 24 * 1024 * 1024, samples  # < ~12 KB per request: no leak

    # the mix really was mixed
    assert statuses[200] > TOTAL // 3 and statuses[429] > 0
    assert {r.outcome for r in records} >= {"allowed", "denied", "upstream_refused"}
    # the ledger balances to the unit
    books = audit(h.settings.db, settled=True, reject=True)
    charged = sum(r.charged or 0 for r in records if r.settlement == "committed")
    assert charged == sum(c["amount"] for c in books.charges)
    for name, amount in budgets.items():
        b = books.budgets[f"tenant:{name}|{h.settings.unit}"]
        assert b["allocated"] == amount and b["reserved"] == 0
        assert b["spent"] == sum(r.charged or 0 for r in records if r.tenant == name)
    settlements: Counter[Any] = Counter(r.settlement for r in records if r.reservation_id)
    assert set(settlements) <= {"committed", "released"}, settlements
