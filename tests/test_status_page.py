"""The status page of the admin listener, rendered by a real browser (headless Chromium from
Debian's ``chromium`` package; scripts/test.sh installs it). The screenshot is checked pixel by
pixel: each tenant's budget bar shows spent / reserved / remaining in the ledger's proportions."""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import uuid
import zlib
from pathlib import Path

import aiohttp
import pytest

from cycles_proxy.admin import (
    REMAINING_COLOR,
    RESERVED_COLOR,
    SPENT_COLOR,
    BudgetRow,
    ModelSpend,
    StatusPage,
    TenantView,
    render_status,
)
from cycles_proxy.authority.base import Action, Amount, Balance, ReserveRequest, Subject, Unit
from cycles_proxy.money import format_amount
from tests.conftest import Harness, StartProxy
from tests.fakes.fake_ollama import serve_fake_ollama

CHROMIUM = "/usr/bin/chromium"
USD = 100_000_000  # USD_MICROCENTS per dollar
ALLOCATED = 100 * USD


# --------------------------------------------------------------------------------------------
# a browser and a PNG reader
# --------------------------------------------------------------------------------------------
def chromium() -> str:
    path = CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")
    if not path:
        pytest.skip(
            "headless Chromium is not installed (/usr/bin/chromium): "
            "apt-get install -y chromium, or run scripts/test.sh which installs it"
        )
    return path


async def browse(url: str, tmp: Path, *args: str) -> bytes:
    """Run headless Chromium on ``url`` and return its stdout."""
    proc = await asyncio.create_subprocess_exec(
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={tmp / 'chromium-profile'}",
        *args,
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out


def read_png(path: Path) -> tuple[int, int, list[list[tuple[int, int, int]]]]:
    """Decode an 8-bit RGB/RGBA non-interlaced PNG (what Chromium writes) into rows of pixels."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height, channels = 8, b"", 0, 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
    raw = zlib.decompress(idat)
    stride = width * channels
    rows: list[list[tuple[int, int, int]]] = []
    prev = bytearray(stride)
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b = prev[i]
            c = prev[i - channels] if i >= channels else 0
            if f == 1:
                line[i] = (line[i] + a) & 0xFF
            elif f == 2:
                line[i] = (line[i] + b) & 0xFF
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[i] = (line[i] + pred) & 0xFF
        rows.append([(line[x], line[x + 1], line[x + 2]) for x in range(0, stride, channels)])
        prev = line
    return width, height, rows


def rgb(color: str) -> tuple[int, int, int]:
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)


def near(p: tuple[int, int, int], q: tuple[int, int, int]) -> bool:
    return all(abs(a - b) <= 4 for a, b in zip(p, q, strict=True))


def bars(rows: list[list[tuple[int, int, int]]]) -> list[dict[str, int]]:
    """Pixel counts of each segment colour in the middle row of each budget bar, top to
    bottom (a bar is a run of rows with many pixels of the segment colours)."""
    colors = {
        "spent": rgb(SPENT_COLOR),
        "reserved": rgb(RESERVED_COLOR),
        "remaining": rgb(REMAINING_COLOR),
    }

    def count(row: list[tuple[int, int, int]]) -> dict[str, int]:
        return {name: sum(near(p, c) for p in row) for name, c in colors.items()}

    found: list[dict[str, int]] = []
    run: list[int] = []
    for y, row in enumerate([*rows, []]):
        if row and sum(count(row).values()) > 200:
            run.append(y)
        elif run:
            found.append(count(rows[run[len(run) // 2]]))
            run = []
    return found


# --------------------------------------------------------------------------------------------
# the page in a browser
# --------------------------------------------------------------------------------------------
def spend(h: Harness, tenant: str, amount: int) -> None:
    h.ledger.event(
        idempotency_key=str(uuid.uuid4()),
        subject=Subject(tenant),
        action=Action("llm.completion", "ollama:llama3.2"),
        actual=Amount(Unit.USD_MICROCENTS, amount),
    )


def hold(h: Harness, tenant: str, amount: int) -> None:
    h.ledger.reserve(
        ReserveRequest(
            str(uuid.uuid4()),
            Subject(tenant),
            Action("llm.completion", "ollama:llama3.2"),
            Amount(Unit.USD_MICROCENTS, amount),
            ttl_ms=3_600_000,
        )
    )


async def test_status_page_renders_the_budgets_in_chromium(
    start_proxy: StartProxy, tmp_path: Path
) -> None:
    chromium()
    async with serve_fake_ollama() as fake:
        h = await start_proxy(fake.url, admin_port=0)
        keys = {t: h.key(t) for t in ("acme", "beta", "nobudget")}
        h.budget("acme", ALLOCATED, period="daily")
        h.budget("beta", ALLOCATED)
        h.budget("poor", 5)
        spend(h, "acme", 40 * USD)
        hold(h, "acme", 10 * USD)
        spend(h, "beta", 75 * USD)
        async with aiohttp.ClientSession() as s:
            async with s.post(
                f"{h.url}/api/generate",
                json={"model": "llama3.2", "prompt": "hi", "stream": False},
                headers={"Authorization": f"Bearer {keys['acme']}"},
            ) as r:
                assert r.status == 200
            async with s.post(
                f"{h.url}/api/generate",
                json={"model": "llama3.2", "prompt": "hi"},
                headers={"Authorization": f"Bearer {h.key('poor')}"},
            ) as r:
                assert r.status == 429
        url = f"{h.running.admin_url}/status"
        shot = tmp_path / "status.png"
        await browse(url, tmp_path, f"--screenshot={shot}", "--window-size=1280,1300")
        print(f"status page screenshot: {shot}")
        dom = (await browse(url, tmp_path, "--dump-dom")).decode()

    # what the browser shows
    for text in ("acme", "beta", "nobudget", "poor", "llama3.2", "budget_exceeded 1"):
        assert text in dom, text
    assert "no budget: its requests are refused" in dom  # nobudget
    acme_bal = h.balance("acme")
    assert f"remaining {format_amount(acme_bal.remaining, 'USD_MICROCENTS')} of $100.00" in dom
    width, height, rows = read_png(shot)
    assert (width, height) == (1280, 1300)
    found = bars(rows)
    assert len(found) == 3, found  # acme, beta, poor (nobudget has none)
    acme, beta, poor = found
    total = sum(acme.values())
    assert acme["spent"] / total == pytest.approx(0.40, abs=0.01)
    assert acme["reserved"] / total == pytest.approx(0.10, abs=0.01)
    assert acme["remaining"] / total == pytest.approx(0.50, abs=0.01)
    assert beta["spent"] / sum(beta.values()) == pytest.approx(0.75, abs=0.01)
    assert beta["reserved"] == 0
    assert poor["spent"] == poor["reserved"] == 0 and poor["remaining"] > 0
    # all bars are drawn at the same full width
    assert sum(beta.values()) == pytest.approx(total, abs=3)


# --------------------------------------------------------------------------------------------
# the renderer alone
# --------------------------------------------------------------------------------------------
def test_status_page_escapes_whatever_callers_put_in_names() -> None:
    evil = '<script>alert("x")</script>'
    page = StatusPage(
        generated_ms=0,
        upstream="http://127.0.0.1:11435",
        authority="embedded ledger /tmp/l.db",
        unit="USD_MICROCENTS",
        inflight=0,
        tenants=[
            TenantView(
                "acme",
                budgets=[
                    BudgetRow(
                        Balance("tenant:acme", Unit.USD_MICROCENTS, 100, 150, 0, 50),
                        period="daily",
                    )
                ],
                models=[ModelSpend(evil, "USD_MICROCENTS", requests_today=1, cost_today=5)],
                denials={evil: 2},
                has_keys=True,
            )
        ],
        spend_source="ledger",
    )
    out = render_status(page)
    assert "<script>" not in out
    assert "&lt;script&gt;" in out
    # overdraft: spent beyond the allocation still fits the bar; nothing is negative
    assert 'class="spent" style="width:75.00%"' in out
    assert 'class="debt" style="width:25.00%"' in out
    assert "width:-" not in out
