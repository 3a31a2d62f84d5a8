"""``cycles-proxy check``: validate the configuration and reach the upstream and the authority.

Each check prints one line as it finishes (``ok``, ``warn`` or ``FAIL``), and every problem says
how to fix it. The exit status is 1 when anything failed, else 0; ``--json`` prints the findings
as a list for scripts instead.

What it finds:

* settings that do not validate (e.g. an upstream URL without ``http://``), a missing config file;
* an upstream that is unreachable, slow, broken (5xx), the proxy itself, or not a model server;
* an embedded ledger whose directory cannot be created or written, or a file that is not a ledger;
* a remote Cycles server that is unreachable, has no API key to use, or rejects the key;
* budgets in another unit than the proxy's prices (their tenants would be refused), tenants
  with keys but no budget, no keys at all, an anonymous tenant without budget, frozen budgets;
* prices that cannot be right for the unit (GPU-second prices in a TOKENS budget, all free);
* listen addresses that collide or are taken, and an admin listener open beyond loopback.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import socket
import sqlite3
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import httpx
from pydantic import ValidationError

from cycles_proxy.authority.base import Unit
from cycles_proxy.money import format_amount
from cycles_proxy.settings import Settings, load_settings

TIMEOUT_S = 3.0

#: environment variable of each setting whose name does not follow CYCLES_PROXY_<NAME>
_ENV_NAMES = {"cycles_base_url": "CYCLES_BASE_URL", "cycles_api_key": "CYCLES_API_KEY"}


@dataclass(frozen=True, slots=True)
class Finding:
    level: str  # ok | warn | fail
    topic: str
    message: str
    fix: str | None = None


class Report:
    """Collects findings and prints each as it comes (the person running it sees progress)."""

    def __init__(self, out: TextIO, *, quiet: bool = False) -> None:
        self.out = out
        self.quiet = quiet
        self.findings: list[Finding] = []

    def add(self, level: str, topic: str, message: str, fix: str | None = None) -> None:
        f = Finding(level, topic, message, fix)
        self.findings.append(f)
        if not self.quiet:
            tag = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}[level]
            print(f"  {tag}  {topic}: {message}", file=self.out)
            if fix:
                print(f"        fix: {fix}", file=self.out)
            self.out.flush()

    def step(self, text: str) -> None:
        if not self.quiet:
            print(f"... {text}", file=self.out, flush=True)

    @property
    def failed(self) -> bool:
        return any(f.level == "fail" for f in self.findings)


def env_name(field: str) -> str:
    return _ENV_NAMES.get(field, f"CYCLES_PROXY_{field.upper()}")


# --------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------
def load(report: Report, config: str | None, overrides: dict[str, Any]) -> Settings | None:
    try:
        settings = load_settings(config, **overrides)
    except FileNotFoundError as exc:
        report.add(
            "fail",
            "settings",
            str(exc),
            "pass an existing file with --config, or unset CYCLES_PROXY_CONFIG",
        )
        return None
    except ValidationError as exc:
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "settings"
            value = err.get("input")
            message = err["msg"].removeprefix("Value error, ")
            report.add(
                "fail",
                "settings",
                f"{field} = {value!r}: {message}",
                _settings_fix(field.split(".")[0], value),
            )
        return None
    except Exception as exc:  # a TOML syntax error, an unreadable file...
        report.add("fail", "settings", f"cannot read the configuration: {exc}", "correct the file")
        return None
    report.add("ok", "settings", "the configuration is valid")
    return settings


def _settings_fix(field: str, value: Any) -> str:
    where = f"the {field} setting ({env_name(field)} or {field} in the TOML file)"
    if field in ("upstream", "cycles_base_url") and isinstance(value, str) and value:
        if "://" not in value:
            return f"write it as a URL, e.g. http://{value.strip().rstrip('/')}, in {where}"
        return f"use an http:// or https:// URL in {where}"
    return f"correct {where}"


# --------------------------------------------------------------------------------------------
# listening
# --------------------------------------------------------------------------------------------
def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _is_any(host: str) -> bool:
    return host in ("0.0.0.0", "::", "[::]", "")


def _same_listener(host_a: str, host_b: str) -> bool:
    return (
        host_a == host_b
        or _is_any(host_a)
        or _is_any(host_b)
        or (_is_loopback(host_a) and _is_loopback(host_b))
    )


def _port_taken(host: str, port: int) -> bool:
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)
    except OSError:
        return False
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError:
            return True
    return False


def check_listen(report: Report, s: Settings) -> None:
    if (
        s.admin_port is not None
        and s.admin_port == s.port
        and s.port != 0
        and _same_listener(s.host, s.admin_host)
    ):
        report.add(
            "fail",
            "listen",
            f"the proxy and the admin listener both want port {s.port}",
            "give the admin listener its own port (CYCLES_PROXY_ADMIN_PORT, default 11439)",
        )
    for what, host, port in (
        ("proxy", s.host, s.port),
        ("admin listener", s.admin_host, s.admin_port),
    ):
        if port is None or port == 0:
            continue
        if _port_taken(host, port):
            report.add(
                "warn",
                "listen",
                f"{host}:{port} ({what}) is already in use",
                "stop what listens there (`ss -ltnp` shows it) or pick another port; "
                "if it is cycles-proxy itself, this is expected",
            )
    if s.admin_port is not None and not _is_loopback(s.admin_host):
        report.add(
            "warn",
            "admin",
            f"the admin listener ({s.admin_host}:{s.admin_port}) is reachable beyond this "
            "machine; it has no authentication and its status page shows every tenant's spend",
            "keep it on 127.0.0.1, or firewall it to your Prometheus (in a container, publish "
            "the port only on a private network)",
        )
    if s.admin_port is None:
        report.add(
            "warn",
            "admin",
            "the admin listener is disabled: no /metrics, /readyz or status page",
            "set admin_port (CYCLES_PROXY_ADMIN_PORT=11439) to enable it",
        )


# --------------------------------------------------------------------------------------------
# upstream
# --------------------------------------------------------------------------------------------
def check_upstream(report: Report, s: Settings) -> None:
    url = s.upstream
    parts = urlsplit(url)
    if not parts.hostname:
        report.add(
            "fail",
            "upstream",
            f"{url} has no host name",
            f"write it as http://HOST:PORT ({env_name('upstream')})",
        )
        return
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        report.add("fail", "upstream", f"{url} has an invalid port", "use a port in 1-65535")
        return
    if port == s.port and _same_listener(parts.hostname, s.host):
        report.add(
            "fail",
            "upstream",
            f"{url} is the proxy's own address ({s.host}:{s.port}): requests would loop",
            "move the model server to another port (Ollama: OLLAMA_HOST=127.0.0.1:11435 "
            "ollama serve) and set upstream to it",
        )
        return
    report.step(f"connecting to the upstream {url}")
    try:
        with httpx.Client(timeout=TIMEOUT_S, trust_env=False) as client:
            root = client.get(url + "/")
            if root.status_code >= 500:
                report.add(
                    "warn",
                    "upstream",
                    f"{url} answers HTTP {root.status_code} (still loading a model, or broken)",
                    "check the model server's logs",
                )
            kind = _identify(client, url)
    except httpx.ConnectError as exc:
        report.add(
            "fail",
            "upstream",
            f"cannot connect to {url} ({_reason(exc)})",
            "start the model server, or correct the upstream setting "
            f"({env_name('upstream')}); Ollama listens on 11434 by default, so when the proxy "
            "takes 11434 run Ollama with OLLAMA_HOST=127.0.0.1:11435",
        )
        return
    except httpx.TimeoutException:
        report.add(
            "fail",
            "upstream",
            f"{url} did not answer within {TIMEOUT_S:g} s",
            "check that the host and port are right and that no firewall drops the traffic",
        )
        return
    except httpx.HTTPError as exc:
        report.add("fail", "upstream", f"{url}: {_reason(exc)}", "check the upstream URL")
        return
    if kind is None:
        report.add(
            "warn",
            "upstream",
            f"{url} answers, but neither /api/version (Ollama) nor /v1/models "
            "(OpenAI-compatible) does",
            "check that upstream points at the model server itself (no path prefix missing)",
        )
    else:
        report.add("ok", "upstream", f"{url} answers ({kind})")


def _identify(client: httpx.Client, url: str) -> str | None:
    with contextlib.suppress(httpx.HTTPError, ValueError):
        r = client.get(url + "/api/version")
        if r.status_code == 200:
            version = r.json().get("version")
            return f"Ollama {version}" if version else "Ollama"
    with contextlib.suppress(httpx.HTTPError, ValueError):
        r = client.get(url + "/v1/models")
        if r.status_code in (200, 401):
            return "an OpenAI-compatible server"
    return None


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    for fragment, nicer in (
        ("Connection refused", "connection refused: nothing listens there"),
        ("Name or service not known", "the host name does not resolve"),
        ("nodename nor servname", "the host name does not resolve"),
        ("Temporary failure in name resolution", "the host name does not resolve"),
    ):
        if fragment in text:
            return nicer
    return text


# --------------------------------------------------------------------------------------------
# authority: embedded ledger
# --------------------------------------------------------------------------------------------
def check_directory(report: Report, topic: str, directory: Path, setting: str) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        report.add(
            "fail",
            topic,
            f"cannot create the directory {directory}: {exc.strerror or exc}",
            f"create it, or point {setting} somewhere writable",
        )
        return False
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".cycles-check-"):
            pass
    except OSError as exc:
        report.add(
            "fail",
            topic,
            f"cannot write in {directory}: {exc.strerror or exc}",
            f"give the proxy's user write access (chown/chmod), or point {setting} elsewhere",
        )
        return False
    return True


def check_embedded(report: Report, s: Settings) -> None:
    db = s.db
    report.step(f"opening the embedded ledger {db}")
    if not check_directory(report, "ledger", db.parent, f"db ({env_name('db')})"):
        return
    if not db.exists():
        report.add(
            "ok",
            "ledger",
            f"{db} does not exist yet; the proxy creates it on start",
        )
        if not s.anonymous_tenant:
            report.add(
                "warn",
                "keys",
                "no API keys exist yet and no anonymous tenant is set: every request gets 401",
                "create a key and a budget: cycles-proxy keys create TENANT && "
                "cycles-proxy budgets set TENANT 5usd",
            )
        return
    if not os.access(db, os.R_OK | os.W_OK):
        report.add(
            "fail",
            "ledger",
            f"{db} is not readable and writable",
            "give the proxy's user read/write access to it (and its -wal/-shm files)",
        )
        return
    from cycles_proxy.authority.embedded import Ledger

    try:
        ledger = Ledger(db, synchronous=s.db_synchronous)
    except (sqlite3.Error, RuntimeError) as exc:
        report.add(
            "fail",
            "ledger",
            f"cannot open {db} as a ledger: {exc}",
            "point db at the ledger file (or a new path); restore a backup if it is damaged",
        )
        return
    try:
        budgets = ledger.list_budgets()
    finally:
        ledger.close()
    report.add("ok", "ledger", f"{db} opens ({len(budgets)} budgets)")
    check_budgets(report, s, [(b.balance, b.status) for b in budgets])


def _tenants_with_keys(s: Settings) -> set[str]:
    from cycles_proxy.tenants import KeyStore

    try:
        store = KeyStore(s.db)
    except (sqlite3.Error, OSError):
        return set()
    try:
        return {k.tenant.lower() for k in store.list()}
    finally:
        store.close()


def check_budgets(report: Report, s: Settings, budgets: Sequence[tuple[Any, str]]) -> None:
    unit = str(s.unit)
    by_unit: dict[str, list[str]] = {}
    for b, status in budgets:
        if str(b.unit) != unit:
            tenant = b.scope.split("/")[0].removeprefix("tenant:")
            report.add(
                "fail",
                "budgets",
                f"{b.scope} is a {b.unit} budget but the proxy prices requests in {unit}: "
                f"requests of tenant '{tenant}' will be refused (unit mismatch)",
                f'either set unit = "{b.unit}" ({env_name("unit")}={b.unit}) or re-create '
                f"the budget in {unit}: cycles-proxy budgets set {tenant} AMOUNT --unit {unit}",
            )
            continue
        by_unit.setdefault(b.scope, []).append(status)
        if status != "ACTIVE":
            report.add(
                "warn",
                "budgets",
                f"{b.scope} is {status.lower()}: its requests are refused",
                "set it again with `cycles-proxy budgets set` to reactivate it, if intended",
            )
        elif b.remaining <= 0:
            report.add(
                "warn",
                "budgets",
                f"{b.scope} has nothing left ({format_amount(b.remaining, unit)} remaining)",
                "raise it with `cycles-proxy budgets set`, or wait for its period to refill",
            )
    with_budget = {
        scope.removeprefix("tenant:") for scope in by_unit if scope.startswith("tenant:")
    }
    with_budget = {t.split("/")[0] for t in with_budget}
    keyed = _tenants_with_keys(s)
    for tenant in sorted(keyed - with_budget):
        report.add(
            "warn",
            "budgets",
            f"tenant '{tenant}' has API keys but no {unit} budget: its requests are refused",
            f"cycles-proxy budgets set {tenant} 5usd"
            if unit == "USD_MICROCENTS"
            else f"cycles-proxy budgets set {tenant} AMOUNT",
        )
    anon = s.anonymous_tenant
    if anon and anon.lower() not in with_budget:
        report.add(
            "warn",
            "budgets",
            f"the anonymous tenant '{anon}' has no {unit} budget: key-less requests are refused",
            f"cycles-proxy budgets set {anon} AMOUNT",
        )
    if not keyed and not anon:
        report.add(
            "warn",
            "keys",
            "no API keys exist and no anonymous tenant is set: every request gets 401",
            "create a key with `cycles-proxy keys create TENANT`, or set anonymous_tenant",
        )
    elif budgets and not report.failed:
        report.add("ok", "budgets", f"{len(budgets)} budgets in {unit}")


# --------------------------------------------------------------------------------------------
# authority: remote Cycles server
# --------------------------------------------------------------------------------------------
def check_remote(report: Report, s: Settings) -> None:
    base = s.cycles_base_url
    assert base is not None
    keys: list[tuple[str | None, str]] = sorted(s.cycles_tenant_keys.items())
    if s.cycles_api_key:
        keys.insert(0, (None, s.cycles_api_key))
    if not keys and not s.cycles_key_passthrough:
        report.add(
            "fail",
            "authority",
            f"no Cycles API key is configured for {base}",
            "set CYCLES_API_KEY, or per-tenant keys in cycles_tenant_keys, or "
            "cycles_key_passthrough = true to use the callers' own keys",
        )
    report.step(f"connecting to the Cycles server {base}")
    try:
        with httpx.Client(base_url=base, timeout=TIMEOUT_S, trust_env=False) as client:
            if not keys:  # nothing to authenticate with: is anything listening at all?
                parts = urlsplit(base)
                port = parts.port or (443 if parts.scheme == "https" else 80)
                try:
                    socket.create_connection((parts.hostname or "", port), TIMEOUT_S).close()
                except OSError as exc:
                    raise httpx.ConnectError(str(exc)) from exc
                report.add("ok", "authority", f"the Cycles server {base} accepts connections")
            for tenant, key in keys[:20]:
                who = f"tenant '{tenant}'" if tenant else "CYCLES_API_KEY"
                params = {"limit": "1", **({"tenant": tenant} if tenant else {})}
                r = client.get("/v1/reservations", params=params, headers={"X-Cycles-API-Key": key})
                if r.status_code >= 500:
                    raise _ServerError(r.status_code)
                if r.status_code == 401:
                    report.add(
                        "fail",
                        "authority",
                        f"the Cycles server {base} rejects the API key of {who}",
                        "use a key the Cycles server issued (its admin API creates them)",
                    )
                elif r.status_code == 403 and tenant:
                    report.add(
                        "fail",
                        "authority",
                        f"the API key configured for {who} belongs to another tenant",
                        f"put tenant '{tenant}''s own key in cycles_tenant_keys",
                    )
                elif r.status_code == 200:
                    report.add("ok", "authority", f"the Cycles server {base} accepts {who}")
                else:
                    report.add(
                        "warn",
                        "authority",
                        f"the Cycles server {base} answered HTTP {r.status_code} for {who}",
                        "check the server's logs",
                    )
    except httpx.ConnectError as exc:
        report.add(
            "fail",
            "authority",
            f"cannot connect to the Cycles server {base} ({_reason(exc)})",
            "start it, or correct CYCLES_BASE_URL; unset CYCLES_BASE_URL to use the embedded "
            "ledger instead",
        )
    except httpx.TimeoutException:
        report.add(
            "fail",
            "authority",
            f"the Cycles server {base} did not answer within {TIMEOUT_S:g} s",
            "check the address and the network path to it",
        )
    except _ServerError as exc:
        report.add(
            "fail",
            "authority",
            f"the Cycles server {base} fails (HTTP {exc.status})",
            "check the Cycles server and its Redis",
        )
    except httpx.HTTPError as exc:
        report.add("fail", "authority", f"{base}: {_reason(exc)}", "check CYCLES_BASE_URL")
    journal = s.journal_dir or s.db.parent / "journal"
    if check_directory(report, "journal", journal, f"journal_dir ({env_name('journal_dir')})"):
        report.add("ok", "journal", f"undeliverable settlements are journaled in {journal}")


class _ServerError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


# --------------------------------------------------------------------------------------------
# prices and policies
# --------------------------------------------------------------------------------------------
def check_prices(report: Report, s: Settings) -> None:
    unit = s.unit
    if unit == Unit.TOKENS:
        for rule in s.prices:
            if rule.per_gpu_second:
                report.add(
                    "warn",
                    "prices",
                    f"the price rule for '{rule.model}' charges {rule.per_gpu_second:,} tokens "
                    "per GPU-second, but the budgets count tokens",
                    "in a TOKENS budget price per token (per_input_token / per_output_token); "
                    "for GPU-time prices use unit USD_MICROCENTS or CREDITS",
                )
        return
    free_default = s.default_price_per_gpu_second == 0
    if free_default and not any(
        r.per_gpu_second or r.per_input_token or r.per_output_token for r in s.prices
    ):
        report.add(
            "warn",
            "prices",
            "every price is zero: requests cost nothing and budgets never run out",
            'set default_price_per_gpu_second (e.g. "1usd/h") or price rules',
        )
    if s.failure_policy == "shadow":
        report.add(
            "warn",
            "policy",
            "shadow mode: budgets are checked but never enforced",
            'set failure_policy = "fail_closed" once the would-be denials look right',
        )
    elif s.failure_policy == "fail_open":
        report.add(
            "warn",
            "policy",
            "fail_open: when the authority is unreachable, requests run without a budget check",
            "use fail_closed if overspend is worse than downtime",
        )


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------
def run_checks(report: Report, s: Settings) -> None:
    check_listen(report, s)
    check_prices(report, s)
    check_upstream(report, s)
    if s.remote:
        check_remote(report, s)
    else:
        check_embedded(report, s)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    c: argparse.ArgumentParser = sub.add_parser(
        "check",
        help="validate the configuration, reach the upstream and the authority",
        description="Check the configuration and everything the proxy needs; "
        "exit status 1 if something is wrong.",
    )
    c.add_argument("--config", help="TOML settings file (also CYCLES_PROXY_CONFIG)")
    c.add_argument("--db", help="ledger file (also CYCLES_PROXY_DB)")
    c.add_argument("--upstream", help="model server URL")
    c.add_argument("--port", type=int, help="the proxy's port")
    c.add_argument("--admin-port", type=int, help="the admin listener's port")
    c.add_argument("--json", action="store_true", help="print the findings as JSON")
    return c


def cmd_check(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    report = Report(out, quiet=args.json)
    if not args.json:
        source = args.config or os.environ.get("CYCLES_PROXY_CONFIG")
        print(
            "cycles-proxy check: settings from "
            + (f"{source} + " if source else "")
            + "environment and defaults",
            file=out,
        )
    overrides = {
        "db": args.db,
        "upstream": args.upstream,
        "port": args.port,
        "admin_port": args.admin_port,
    }
    settings = load(report, args.config, overrides)
    if settings is not None:
        run_checks(report, settings)
    if args.json:
        print(json.dumps([asdict(f) for f in report.findings], indent=2), file=out)
    else:
        fails = sum(f.level == "fail" for f in report.findings)
        warns = sum(f.level == "warn" for f in report.findings)
        print(
            f"{fails} problem{'s' * (fails != 1)}, {warns} warning{'s' * (warns != 1)}"
            + ("" if fails else ": ready to serve"),
            file=out,
        )
    return 1 if report.failed else 0
