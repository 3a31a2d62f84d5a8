"""Runs cycles-proxy for the benchmark, the way ``cycles-proxy serve`` does.

Same ``Settings``, same ``app.start``, same logging setup and event loop as the CLI (plain
asyncio unless ``--uvloop``). The only difference: with ``--cycles-url`` the remote authority is
built here (``RemoteAuthority(base_url, default_api_key=..., journal=...)``) and injected, because
``app.build_authority`` calls a ``RemoteAuthority.from_settings`` that does not exist yet.

Run: ``python -m bench.serve_cycles --port 18010 --upstream http://127.0.0.1:18000 --db X.db``
(prints ``listening <url>``; SIGTERM stops it cleanly).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from cycles_proxy.app import start
from cycles_proxy.authority.base import Authority
from cycles_proxy.observability import configure_logging
from cycles_proxy.settings import Settings


async def serve(args: argparse.Namespace) -> None:
    settings = Settings(
        host="127.0.0.1",
        port=args.port,
        upstream=args.upstream,
        db=Path(args.db),
        admin_port=None,
        access_log=args.access_log,
        log_level="INFO",
    )
    configure_logging(settings.log_level)
    authority: Authority | None = None
    if args.cycles_url:
        from cycles_proxy.authority.remote import RemoteAuthority

        journal = Path(args.db).parent / "journal"
        journal.mkdir(parents=True, exist_ok=True)
        authority = RemoteAuthority(
            args.cycles_url, default_api_key=args.cycles_key, journal=str(journal)
        )
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
    p.add_argument("--uvloop", action="store_true", help="run on uvloop (experiment)")
    args = p.parse_args()
    if args.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
