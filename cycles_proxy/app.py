"""Builds the aiohttp application from settings, and runs it."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

from aiohttp import web

from cycles_proxy.authority.base import Authority
from cycles_proxy.lifecycle import Proxy
from cycles_proxy.metrics import InstrumentedAuthority, ProxyMetrics
from cycles_proxy.observability import Observer, configure_logging
from cycles_proxy.settings import Settings
from cycles_proxy.tenants import KeyStore
from cycles_proxy.upstream import Upstream

log = logging.getLogger("cycles_proxy")

PROXY_KEY = web.AppKey("proxy", Proxy)
TASKS_KEY = web.AppKey("background_tasks", list[asyncio.Task[None]])
METRICS_KEY = web.AppKey("metrics", ProxyMetrics)


def build_authority(settings: Settings) -> Authority:
    if settings.remote:
        from cycles_proxy.authority.remote import RemoteAuthority

        journal_dir = settings.journal_dir or settings.db.parent / "journal"
        return RemoteAuthority.from_settings(settings, journal_dir=journal_dir)
    from cycles_proxy.authority.embedded import EmbeddedAuthority

    settings.db.parent.mkdir(parents=True, exist_ok=True)
    return EmbeddedAuthority(
        settings.db,
        synchronous=settings.db_synchronous,
        max_extensions=settings.max_reservation_extensions,
    )


def create_app(settings: Settings, *, authority: Authority | None = None) -> web.Application:
    """The proxy application. ``authority`` may be injected (tests, benchmarks)."""
    keys = KeyStore(settings.db, app=settings.app_scope)
    metrics = ProxyMetrics(settings)
    inner = authority or build_authority(settings)
    observer = Observer(access_log=settings.access_log)
    observer.listeners.append(metrics.observe)
    proxy = Proxy(
        settings, InstrumentedAuthority(inner, metrics), keys, Upstream(settings), observer
    )
    metrics.track_inflight(lambda: proxy.inflight)
    pending = getattr(inner, "pending", None)
    if callable(pending):  # the remote authority's journal of undelivered settlements
        metrics.track_journal(pending)
    # client_max_size bounds request.read() (metered bodies); pass-through bodies stream
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[PROXY_KEY] = proxy
    app[METRICS_KEY] = metrics

    async def persist_rates() -> None:
        # learned estimates are written off the event loop, every 30 s and at shutdown
        while True:
            await asyncio.sleep(30)
            await asyncio.to_thread(proxy.estimator.flush)

    async def startup(_: web.Application) -> None:
        await proxy.upstream.start()
        await proxy.authority.start()
        app[TASKS_KEY] = [asyncio.create_task(persist_rates())]

    async def cleanup(_: web.Application) -> None:
        for task in app[TASKS_KEY]:
            task.cancel()
        await proxy.drain()
        await asyncio.to_thread(proxy.estimator.flush)
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
    #: the admin listener (metrics, health, status page); None when ``admin_port`` is unset.
    #: ``runner.cleanup()`` stops it too.
    admin_url: str | None = None


def _url(host: str, site: web.TCPSite) -> str:
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return f"http://{host if ':' not in host else f'[{host}]'}:{port}"


async def start(settings: Settings, *, authority: Authority | None = None) -> Running:
    """Start the proxy on ``settings.host:port`` and, unless ``admin_port`` is None, the admin
    listener on ``admin_host:admin_port`` (port 0 = any free port)."""
    from cycles_proxy.admin import Admin

    app = create_app(settings, authority=authority)
    admin_runner: web.AppRunner | None = None
    if settings.admin_port is not None:
        admin = Admin(settings, app[PROXY_KEY], app[METRICS_KEY])
        admin_runner = web.AppRunner(admin.app(), access_log=None)

        async def admin_draining(_: web.Application) -> None:
            admin.draining = True

        async def admin_stop(_: web.Application) -> None:
            assert admin_runner is not None
            await admin_runner.cleanup()

        app.on_shutdown.append(admin_draining)
        app.on_cleanup.insert(0, admin_stop)
    # handler_cancellation: a client that hangs up cancels its handler, which closes the
    # upstream request (that is how Ollama stops generating) and settles what was used
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        # on shutdown, in-flight requests get this long; then they are cancelled (and settled)
        shutdown_timeout=settings.drain_timeout_s,
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, backlog=1024)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    running = Running(runner, _url(settings.host, site))
    if admin_runner is not None:
        await admin_runner.setup()
        admin_site = web.TCPSite(admin_runner, settings.admin_host, settings.admin_port)
        try:
            await admin_site.start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(
                exc.errno,
                f"{exc.strerror} (admin listener {settings.admin_host}:{settings.admin_port}; "
                "choose another with --admin-port or CYCLES_PROXY_ADMIN_PORT)",
            ) from exc
        running.admin_url = _url(settings.admin_host, admin_site)
    return running


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
    if running.admin_url:
        log.info(
            "  admin:     %s (/status, /metrics, /healthz, /readyz, /version)", running.admin_url
        )
    else:
        log.info("  admin:     disabled (set admin_port to enable metrics and the status page)")
    if settings.anonymous_tenant:
        log.info("  requests without a key are billed to tenant '%s'", settings.anonymous_tenant)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: finishing in-flight requests")
    await running.runner.cleanup()
