"""Builds the aiohttp application from settings, and runs it."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

from aiohttp import web

from cycles_proxy.authority.base import Authority
from cycles_proxy.lifecycle import Proxy
from cycles_proxy.observability import Observer, configure_logging
from cycles_proxy.settings import Settings
from cycles_proxy.tenants import KeyStore
from cycles_proxy.upstream import Upstream

log = logging.getLogger("cycles_proxy")

PROXY_KEY = web.AppKey("proxy", Proxy)


def build_authority(settings: Settings) -> Authority:
    if settings.remote:
        from cycles_proxy.authority.remote import RemoteAuthority

        journal_dir = settings.journal_dir or settings.db.parent / "journal"
        return RemoteAuthority.from_settings(settings, journal_dir=journal_dir)
    from cycles_proxy.authority.embedded import EmbeddedAuthority

    settings.db.parent.mkdir(parents=True, exist_ok=True)
    return EmbeddedAuthority(settings.db, synchronous=settings.db_synchronous)


def create_app(settings: Settings, *, authority: Authority | None = None) -> web.Application:
    """The proxy application. ``authority`` may be injected (tests, benchmarks)."""
    keys = KeyStore(settings.db, app=settings.app_scope)
    proxy = Proxy(
        settings,
        authority or build_authority(settings),
        keys,
        Upstream(settings),
        Observer(access_log=settings.access_log),
    )
    # client_max_size bounds request.read() (metered bodies); pass-through bodies stream
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[PROXY_KEY] = proxy

    async def startup(_: web.Application) -> None:
        await proxy.upstream.start()
        await proxy.authority.start()

    async def cleanup(_: web.Application) -> None:
        await proxy.drain()
        await proxy.authority.close()
        await proxy.upstream.close()
        keys.close()

    app.on_startup.append(startup)
    app.on_cleanup.append(cleanup)
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    return app


@dataclass
class Running:
    runner: web.AppRunner
    url: str


async def start(settings: Settings, *, authority: Authority | None = None) -> Running:
    """Start the proxy on ``settings.host:port`` (port 0 = any free port)."""
    app = create_app(settings, authority=authority)
    # handler_cancellation: a client that hangs up cancels its handler, which closes the
    # upstream request (that is how Ollama stops generating) and settles what was used
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, backlog=1024)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    host = settings.host if ":" not in settings.host else f"[{settings.host}]"
    return Running(runner, f"http://{host}:{port}")


async def serve(settings: Settings) -> None:
    configure_logging(settings.log_level)
    running = await start(settings)
    mode = (
        f"remote Cycles server {settings.cycles_base_url}"
        if settings.remote
        else (f"embedded ledger {settings.db}")
    )
    log.info("cycles-proxy listening on %s", running.url)
    log.info("  upstream:  %s", settings.upstream)
    log.info("  authority: %s (failure policy %s)", mode, settings.failure_policy)
    if settings.anonymous_tenant:
        log.info("  requests without a key are billed to tenant '%s'", settings.anonymous_tenant)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: finishing in-flight requests")
    await running.runner.cleanup()
