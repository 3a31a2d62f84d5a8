"""The remote budget authority for the benchmark: the project's fake Cycles server, lean.

``tests/fakes/fake_cycles.py`` is a test double: it validates every request and response
against the Cycles v0 JSON schemas (jsonschema), sweeps expired reservations on every call and
keeps every request in memory. Those costs belong to the test double, not to the proxy, so by
default this runner turns them off (``--validate`` keeps the schema checks) and trims the
recordings; the protocol, the HTTP round trips and the SQLite ledger behind them stay.

Run: ``python -m bench.cycles_server --port 18100 --key KEY --tenant bench --budget 10**15``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from cycles_proxy.authority.base import Unit
from tests.fakes.fake_cycles import FakeCycles, make_fake_cycles


class NoValidation:
    """Stands in for the fake's spec validator: accepts everything."""

    def schema_errors(self, name: str, instance: object) -> list[str]:
        return []

    def ref_errors(self, ref: str, instance: object) -> list[str]:
        return []

    def query_errors(self, path: str, method: str, query: Mapping[str, str]) -> list[str]:
        return []


async def serve(args: argparse.Namespace) -> None:
    fake = FakeCycles(keys={args.key: args.tenant}, db_path=args.db, auto_sweep=False)
    if not args.validate:
        validator: Any = NoValidation()
        fake.validator = validator
    fake.ledger.set_budget(f"tenant:{args.tenant}", Unit.USD_MICROCENTS, args.budget)
    runner = web.AppRunner(make_fake_cycles(state=fake), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port, backlog=1024)
    await site.start()
    print(f"listening http://127.0.0.1:{args.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def housekeeping() -> None:
        while True:
            await asyncio.sleep(1.0)
            del fake.requests[:-100]
            del fake.violations[:-100]
            if len(fake._index) > 10_000:
                del fake._index[:-1000]
            fake.ledger.sweep_expired()

    task = asyncio.create_task(housekeeping())
    await stop.wait()
    task.cancel()
    await runner.cleanup()
    fake.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--db", required=True)
    p.add_argument("--key", default="bench-cycles-key")
    p.add_argument("--tenant", default="bench")
    p.add_argument("--budget", type=int, default=10**15)
    p.add_argument("--validate", action="store_true", help="keep the JSON-schema checks")
    args = p.parse_args()
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
