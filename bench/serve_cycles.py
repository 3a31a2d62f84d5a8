"""Runs cycles-proxy for the benchmark, the way ``cycles-proxy serve`` does.

Same ``Settings``, same ``app.start``, same logging setup and event loop as the CLI
(``cli.run_event_loop`` where the tree has it, else plain asyncio; ``--loop`` forces one).
With ``--cycles-url`` the settings name a remote Cycles server (``cycles_base_url``,
``cycles_api_key``), as ``CYCLES_BASE_URL``/``CYCLES_API_KEY`` would. The one benchmark tenant
drives every connection, so ``max_inflight_per_tenant`` is lifted (0).

Run: ``python -m bench.serve_cycles --port 18010 --upstream http://127.0.0.1:18000 --db X.db``
(prints ``listening <url>``; SIGTERM stops it cleanly).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import uuid
from pathlib import Path
from typing import Any

from cycles_proxy.app import start
from cycles_proxy.authority.base import (
    Amount,
    Authority,
    CommitResult,
    Decision,
    ReleaseResult,
    Reservation,
    ReserveRequest,
    Unit,
)
from cycles_proxy.authority.embedded import Ledger
from cycles_proxy.authority.remote import RemoteAuthority
from cycles_proxy.observability import configure_logging
from cycles_proxy.settings import Settings
from cycles_proxy.tenants import KeyStore

TENANT = "bench"
BUDGET = 10**15  # USD microcents: ten million dollars, never the limit


class NullAuthority:
    """An authority that allows everything at once and stores nothing (profiling only): what
    the request path costs without its ledger."""

    name = "null"

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def reserve(self, req: ReserveRequest) -> Reservation:
        return Reservation(
            decision=Decision.ALLOW,
            affected_scopes=("tenant:" + req.subject.tenant,),
            reservation_id=uuid.uuid4().hex,
            reserved=req.estimate,
            expires_at_ms=0,
            remaining_ttl_ms=req.ttl_ms,
        )

    async def commit(self, reservation_id: str, **kw: Any) -> CommitResult:
        return CommitResult(charged=kw["actual"])

    async def release(self, reservation_id: str, **kw: Any) -> ReleaseResult:
        return ReleaseResult(released=Amount(Unit.USD_MICROCENTS, 0))

    async def extend(self, reservation_id: str, **kw: Any) -> Any:
        raise NotImplementedError

    async def event(self, **kw: Any) -> Any:
        raise NotImplementedError

    async def balances(self, subject: Any) -> list[Any]:
        return []


def bootstrap(settings: Settings, key_file: Path, *, budget: bool) -> None:
    """A fresh ledger with the benchmark tenant's key (written to ``key_file``) and budget,
    made by this same source tree so that its schema is the one the proxy expects."""
    for suffix in ("", "-wal", "-shm"):
        Path(str(settings.db) + suffix).unlink(missing_ok=True)
    store = KeyStore(settings.db)
    key, _ = store.create(TENANT, label="bench")
    store.close()
    if budget:
        ledger = Ledger(settings.db)
        ledger.set_budget(f"tenant:{TENANT}", Unit.USD_MICROCENTS, BUDGET)
        ledger.close()
    key_file.write_text(key)


async def serve(args: argparse.Namespace) -> None:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": args.port,
        "upstream": args.upstream,
        "db": Path(args.db),
        "admin_port": 0,  # the admin listener runs, as by default (on a free port)
        "access_log": args.access_log,
        "log_level": "INFO",
    }
    if args.cycles_url:
        values["cycles_base_url"] = args.cycles_url
        values["cycles_api_key"] = args.cycles_key
        values["journal_dir"] = Path(args.db).parent / "journal"
    if "max_inflight_per_tenant" in Settings.model_fields:
        # one benchmark tenant drives every connection: lift the per-tenant concurrency cap
        values["max_inflight_per_tenant"] = 0
    for item in args.set:
        key, _, raw = item.partition("=")
        values[key] = json.loads(raw) if raw[:1] in "[{0123456789tfn-" else raw
    settings = Settings(**values)
    configure_logging(settings.log_level)
    if args.bootstrap:
        bootstrap(settings, Path(args.bootstrap), budget=not args.cycles_url)
    authority: Authority | None = None
    if args.cycles_url and not hasattr(RemoteAuthority, "from_settings"):
        # older trees: app.build_authority cannot build the remote authority yet
        journal = Path(args.db).parent / "journal"
        journal.mkdir(parents=True, exist_ok=True)
        authority = RemoteAuthority(
            args.cycles_url, default_api_key=args.cycles_key, journal=str(journal)
        )
    if args.authority == "null":
        authority = NullAuthority()
    running = await start(settings, authority=authority)
    print(f"listening {running.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await running.runner.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--db", required=True)
    p.add_argument("--cycles-url", help="remote authority (a Cycles server) instead of the ledger")
    p.add_argument("--cycles-key", default="bench-cycles-key")
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--authority",
        choices=("settings", "null"),
        default="settings",
        help="null: allow everything without a ledger (profiling experiments only)",
    )
    p.add_argument("--bootstrap", metavar="KEYFILE", help="fresh ledger; write the key here")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a setting")
    p.add_argument(
        "--loop",
        choices=("cli", "asyncio", "uvloop"),
        default="cli",
        help="event loop: as `cycles-proxy serve` picks it (default), or forced",
    )
    p.add_argument("--uvloop", action="store_true", help="same as --loop uvloop")
    args = p.parse_args()
    loop = "uvloop" if args.uvloop else args.loop
    if loop == "uvloop":
        import uvloop

        uvloop.run(serve(args))
        return
    if loop == "cli":
        try:
            from cycles_proxy.cli import run_event_loop  # the CLI's own choice (uvloop if any)
        except ImportError:  # older trees: the CLI ran plain asyncio
            pass
        else:
            run_event_loop(serve(args))
            return
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
