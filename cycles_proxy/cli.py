"""Command line: ``serve``, ``keys``, ``budgets``, ``usage``, ``check``.

Management commands work on the embedded ledger file (``--db`` / ``CYCLES_PROXY_DB``) and are
safe to run while the proxy is serving from the same file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Coroutine, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from cycles_proxy.authority.base import Unit
from cycles_proxy.money import AmountError, format_amount, parse_amount
from cycles_proxy.settings import Settings, load_settings
from cycles_proxy.tenants import KeyError_, KeyStore, validate_tenant

PERIODS = ("none", "daily", "weekly", "monthly")


class CliError(Exception):
    pass


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML settings file (also CYCLES_PROXY_CONFIG)")
    p.add_argument("--db", help="ledger file (also CYCLES_PROXY_DB)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cycles-proxy",
        description="Budget-guarded reverse proxy for Ollama and OpenAI-compatible servers.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the proxy")
    _common(s)
    s.add_argument("--host", help="listen address (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="listen port (default 11434)")
    s.add_argument("--upstream", help="model server URL (default http://127.0.0.1:11435)")
    s.add_argument("--anonymous-tenant", help="bill key-less requests to this tenant")
    s.add_argument("--admin-port", type=int, help="operational listener port (default 11439)")

    k = sub.add_parser("keys", help="manage API keys")
    ksub = k.add_subparsers(dest="action", required=True)
    kc = ksub.add_parser("create", help="create a key for TENANT and print it (shown once)")
    _common(kc)
    kc.add_argument("tenant")
    kc.add_argument("--role", choices=("user", "admin"), default="user")
    kc.add_argument("--label", help="a note to recognise the key by")
    kl = ksub.add_parser("list", help="list keys (never the secrets)")
    _common(kl)
    kl.add_argument("--tenant")
    kl.add_argument("--all", action="store_true", help="include revoked keys")
    kl.add_argument("--json", action="store_true")
    kr = ksub.add_parser("revoke", help="revoke a key by its id (from `keys list`)")
    _common(kr)
    kr.add_argument("key_id")

    b = sub.add_parser("budgets", help="manage budgets")
    bsub = b.add_subparsers(dest="action", required=True)
    bs = bsub.add_parser("set", help="set TENANT's budget to AMOUNT (e.g. 5usd, 100000, 2m)")
    _common(bs)
    bs.add_argument("tenant")
    bs.add_argument("amount")
    bs.add_argument("--unit", choices=[u.value for u in Unit], help="default: the proxy's unit")
    bs.add_argument(
        "--period", choices=PERIODS, default="none", help="refill the budget each period"
    )
    bs.add_argument("--overdraft", default="0", help="debt allowed under ALLOW_WITH_OVERDRAFT")
    bs.add_argument("--scope", help="a full Cycles scope instead of tenant:TENANT")
    bs.add_argument("--json", action="store_true")
    bw = bsub.add_parser("show", help="show budgets and balances")
    _common(bw)
    bw.add_argument("tenant", nargs="?")
    bw.add_argument("--json", action="store_true")

    u = sub.add_parser("usage", help="spend per tenant, model and day")
    _common(u)
    u.add_argument("--tenant")
    u.add_argument("--days", type=int, default=30, help="how many days back (default 30)")
    u.add_argument("--json", action="store_true")

    from cycles_proxy.check import add_parser as add_check_parser

    add_check_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "check":
            from cycles_proxy.check import cmd_check

            return cmd_check(args)
        settings = _settings(args)
        if args.command == "keys":
            return cmd_keys(args, settings)
        if args.command == "budgets":
            return cmd_budgets(args, settings)
        if args.command == "usage":
            return cmd_usage(args, settings)
    except (CliError, KeyError_, AmountError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"error: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    return 0  # pragma: no cover


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    return load_settings(args.config, db=args.db, **extra)


def cmd_serve(args: argparse.Namespace) -> int:
    from cycles_proxy.app import serve

    try:
        settings = _settings(
            args,
            host=args.host,
            port=args.port,
            upstream=args.upstream,
            anonymous_tenant=args.anonymous_tenant,
            admin_port=args.admin_port,
        )
    except ValidationError as exc:
        print(f"error: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    try:
        run_event_loop(serve(settings))
    except OSError as exc:
        print(
            f"error: cannot listen on {settings.host}:{settings.port}: {exc.strerror}",
            file=sys.stderr,
        )
        return 1
    return 0


def run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """uvloop where it is installed (Linux, macOS): ~8 % less CPU per request and a lower p99
    in bench/PROFILE.md; the standard loop elsewhere."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    store = KeyStore(settings.db)
    try:
        if args.action == "create":
            secret, key_id = store.create(args.tenant, role=args.role, label=args.label)
            print(secret)  # only the key: scripts capture it with $(...)
            print(
                f"created {key_id} for tenant '{args.tenant}' ({args.role}); "
                "store the key now, it is not shown again",
                file=sys.stderr,
            )
        elif args.action == "list":
            keys = store.list(tenant=args.tenant, include_revoked=args.all)
            rows = [
                {
                    "key_id": k.key_id,
                    "tenant": k.tenant,
                    "role": k.role,
                    "label": k.label,
                    "created": _iso(k.created_ms),
                    "revoked": _iso(k.revoked_ms),
                }
                for k in keys
            ]
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                _table(rows, ["key_id", "tenant", "role", "label", "created", "revoked"])
        elif args.action == "revoke":
            info = store.revoke(args.key_id)
            print(f"revoked {info.key_id} of tenant '{info.tenant}'")
    finally:
        store.close()
    return 0


def _ledger(settings: Settings) -> Any:
    from cycles_proxy.authority.embedded import Ledger

    settings.db.parent.mkdir(parents=True, exist_ok=True)
    return Ledger(settings.db, synchronous=settings.db_synchronous)


def cmd_budgets(args: argparse.Namespace, settings: Settings) -> int:
    if settings.remote:
        raise CliError(
            "budgets live on the Cycles server (CYCLES_BASE_URL is set); "
            "manage them with its admin API"
        )
    ledger = _ledger(settings)
    try:
        if args.action == "set":
            unit = Unit(args.unit) if args.unit else settings.unit
            scope = args.scope or f"tenant:{validate_tenant(args.tenant).lower()}"
            amount = parse_amount(args.amount)
            overdraft = parse_amount(args.overdraft)
            period = None if args.period == "none" else args.period
            ledger.set_budget(scope, unit, amount, period=period, overdraft_limit=overdraft)
            record = ledger.get_budget(scope, unit)
            bal = record.balance
            if args.json:
                print(json.dumps(_budget_row(record), indent=2))
            else:
                print(
                    f"{scope}: {format_amount(amount, unit)} ({unit})"
                    + (f", refilled {period}" if period else "")
                    + f"; remaining {format_amount(bal.remaining, unit)}"
                )
        else:
            prefix = f"tenant:{args.tenant.lower()}" if args.tenant else None
            rows = [_budget_row(r) for r in ledger.list_budgets(prefix)]
            if args.tenant and not rows:
                raise CliError(
                    f"tenant '{args.tenant}' has no budget; "
                    f"create one with `cycles-proxy budgets set {args.tenant} 5usd`"
                )
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                _table(
                    [
                        {
                            **r,
                            **{
                                k: format_amount(r[k], r["unit"])
                                for k in ("allocated", "spent", "reserved", "remaining")
                            },
                        }
                        for r in rows
                    ],
                    [
                        "scope",
                        "unit",
                        "allocated",
                        "spent",
                        "reserved",
                        "remaining",
                        "period",
                        "period_ends",
                    ],
                )
    finally:
        ledger.close()
    return 0


def _budget_row(r: Any) -> dict[str, Any]:
    b = r.balance
    return {
        "scope": b.scope,
        "unit": str(b.unit),
        "allocated": b.allocated,
        "spent": b.spent,
        "reserved": b.reserved,
        "debt": b.debt,
        "remaining": b.remaining,
        "overdraft_limit": b.overdraft_limit,
        "is_over_limit": b.is_over_limit,
        "status": r.status,
        "period": r.period,
        "period_ends": _iso(b.period_ends_at_ms),
    }


def cmd_usage(args: argparse.Namespace, settings: Settings) -> int:
    ledger = _ledger(settings)
    try:
        since = int((time.time() - args.days * 86400) * 1000)
        rows = [
            {**asdict(r), "unit": str(r.unit)}
            for r in ledger.usage(since_ms=since, tenant=args.tenant)
        ]
    finally:
        ledger.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    _table(
        [
            {
                **r,
                "gpu_seconds": f"{r['gpu_seconds']:.3f}",
                "cost": format_amount(r["cost"], r["unit"]),
            }
            for r in rows
        ],
        [
            "day",
            "tenant",
            "model",
            "requests",
            "tokens_input",
            "tokens_output",
            "gpu_seconds",
            "cost",
        ],
    )
    return 0


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _table(rows: list[dict[str, Any]], cols: list[str]) -> None:
    if not rows:
        print("(none)")
        return
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
