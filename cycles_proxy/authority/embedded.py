"""The embedded budget authority: a Cycles v0 ledger in one SQLite file.

:class:`Ledger` is synchronous and owns one ``sqlite3`` connection. It implements the Cycles v0
semantics of ``cycles-protocol.md`` §4-5 (scope derivation, atomic multi-scope reserve, overage
policies, TTL + grace expiry, extend, events, idempotency) plus budget periods and a usage report.
Every mutation runs in one ``BEGIN IMMEDIATE`` transaction that re-reads the rows it changes, so
another process (the CLI) may write the same file at the same time.

Each operation is written against a unit of work (``_Work``): it reads the rows it needs, changes
them in memory and the unit writes them back with one statement per table. That lets
:meth:`Ledger.run_many` run a whole batch of operations (a group commit) with a handful of
statements, whatever the batch size.

:class:`EmbeddedAuthority` adapts a ledger to the async :class:`~.base.Authority` interface: every
call runs on one dedicated worker thread, so the event loop never blocks on SQLite and all
operations of this process are serialized; calls that queue up while a batch runs form the next
batch.

Balances are stored as ``allocated / spent / reserved / debt``; ``remaining`` is never stored, it
is always ``allocated - spent - reserved - debt``, so that identity cannot drift.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal, NamedTuple, TypeVar

from .base import (
    ONCE_KEY_PREFIX,
    SUBJECT_LEVELS,
    Action,
    Amount,
    AuthorityUnavailable,
    Balance,
    CommitResult,
    CyclesError,
    Decision,
    ErrorCode,
    EventResult,
    ExtendResult,
    Metrics,
    OveragePolicy,
    ReleaseResult,
    Reservation,
    ReservationStatus,
    ReserveRequest,
    Subject,
    Unit,
)

__all__ = [
    "MAX_EXTENSIONS",
    "SCHEMA_VERSION",
    "BudgetRecord",
    "EmbeddedAuthority",
    "Ledger",
    "Period",
    "ReservationRecord",
    "UsageRow",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA_VERSION: Final = 1
#: Extensions allowed per reservation (the reference server's default).
MAX_EXTENSIONS: Final = 10
TTL_MIN_MS: Final = 1_000
TTL_MAX_MS: Final = 86_400_000
GRACE_MAX_MS: Final = 60_000
EXTEND_MAX_MS: Final = 86_400_000
#: How long a successful response stays replayable under its idempotency key (at least).
IDEMPOTENCY_RETENTION_MS: Final = 86_400_000
DAY_MS: Final = 86_400_000
_INT64_MAX: Final = 2**63 - 1
_PRUNE_BATCH: Final = 5_000
_CHARGE_CLOCK_SLACK_MS: Final = 600_000

Period = Literal["daily", "weekly", "monthly"]
_PERIODS: Final = ("daily", "weekly", "monthly")
_BUDGET_STATUSES: Final = ("ACTIVE", "FROZEN", "CLOSED")
_SYNC_MODES: Final = ("OFF", "NORMAL", "FULL", "EXTRA")


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


# --------------------------------------------------------------------------------------------
# Public records (CLI / reports)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BudgetRecord:
    """A budget with its management fields (what ``cycles-proxy budgets list`` shows)."""

    balance: Balance
    status: str  # ACTIVE | FROZEN | CLOSED
    period: Period | None
    period_start_ms: int | None


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One line of the usage report: a tenant's use of one model on one UTC day, in one unit."""

    tenant: str
    model: str  # the action name, e.g. "ollama:llama3.2"
    day: str  # YYYY-MM-DD (UTC)
    unit: Unit
    requests: int
    tokens_input: int
    tokens_output: int
    gpu_seconds: float
    cost: int  # sum of amounts charged, in ``unit``


@dataclass(frozen=True, slots=True)
class ReservationRecord:
    reservation_id: str
    tenant: str
    status: ReservationStatus
    subject: dict[str, str]
    action: dict[str, Any]
    scope_path: str
    budgeted_scopes: tuple[str, ...]
    reserved: Amount
    overage_policy: OveragePolicy
    created_at_ms: int
    expires_at_ms: int
    grace_period_ms: int
    extension_count: int
    charged: Amount | None
    finalized_at_ms: int | None


# --------------------------------------------------------------------------------------------
# Helpers: periods, validation, (de)serialisation
# --------------------------------------------------------------------------------------------


def _window_start(period: str, now_ms: int) -> int:
    """Start (ms, UTC) of the calendar window of ``period`` that contains ``now_ms``."""
    if period == "daily":
        return now_ms - now_ms % DAY_MS
    if period == "weekly":
        day = now_ms // DAY_MS
        # 1970-01-01 was a Thursday: Monday-based weekday of day 0 is 3.
        return (day - (day + 3) % 7) * DAY_MS
    dt = datetime.fromtimestamp(now_ms // 1000, UTC)
    return int(datetime(dt.year, dt.month, 1, tzinfo=UTC).timestamp()) * 1000


@functools.lru_cache(maxsize=1024)
def _window_end(period: str, start_ms: int) -> int:
    if period == "daily":
        return start_ms + DAY_MS
    if period == "weekly":
        return start_ms + 7 * DAY_MS
    dt = datetime.fromtimestamp(start_ms // 1000, UTC)
    year, month = (dt.year + 1, 1) if dt.month == 12 else (dt.year, dt.month + 1)
    return int(datetime(year, month, 1, tzinfo=UTC).timestamp()) * 1000


def _invalid(message: str) -> CyclesError:
    return CyclesError(ErrorCode.INVALID_REQUEST, message)


def _check_amount(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _invalid(f"{what} must be an integer")
    if value < 0 or value > _INT64_MAX:
        raise _invalid(f"{what} must be between 0 and {_INT64_MAX}")
    return value


def _check_unit(value: object) -> Unit:
    try:
        return Unit(str(value))
    except ValueError:
        raise _invalid(f"unknown unit {value!r}") from None


def _check_key(key: object) -> str:
    if not isinstance(key, str) or not 1 <= len(key) <= 256:
        raise _invalid("idempotency_key must be a string of 1..256 characters")
    return key


def _check_policy(value: object) -> OveragePolicy:
    try:
        return OveragePolicy(str(value))
    except ValueError:
        raise _invalid(f"unknown overage_policy {value!r}") from None


def _check_period(value: object) -> Period | None:
    if value is None or value == "none":
        return None
    if value not in _PERIODS:
        raise _invalid(f"period must be one of none, daily, weekly, monthly (got {value!r})")
    return value


def _normalize_scope(scope: str) -> str:
    """Lower-case and validate a scope path (``tenant:acme/app:bot``) like Subject.scopes()."""
    if not isinstance(scope, str) or not scope:
        raise _invalid("scope must be a non-empty string")
    out: list[str] = []
    last_level = -1
    for segment in scope.split("/"):
        level, sep, value = segment.partition(":")
        level = level.strip().lower()
        value = value.strip().lower()
        if not sep or not value or level not in SUBJECT_LEVELS:
            raise _invalid(f"bad scope segment {segment!r} (expected level:value)")
        index = SUBJECT_LEVELS.index(level)
        if index <= last_level:
            raise _invalid(f"scope levels must follow {' -> '.join(SUBJECT_LEVELS)}: {scope!r}")
        last_level = index
        out.append(f"{level}:{value}")
    return "/".join(out)


_JSON: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str)
_JSON_CANONICAL: Final = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, sort_keys=True, default=str
)
_UNITS: Final = {u.value: u for u in Unit}


def _canonical(value: Any) -> str | None:
    return None if value is None else _JSON_CANONICAL.encode(value)


def _digest(*parts: object) -> str:
    """Payload fingerprint for idempotency: ``parts`` are str/int/bool/None (canonical JSON for
    free-form objects), so their ``repr`` is a stable serialization."""
    return hashlib.blake2b(repr(parts).encode(), digest_size=16).hexdigest()


def _metrics_canonical(m: Metrics | None) -> tuple[Any, ...] | None:
    if m is None:
        return None
    custom = _canonical(m.custom) if m.custom else None
    return (m.tokens_input, m.tokens_output, m.latency_ms, m.model_version, custom)


@functools.lru_cache(maxsize=4096)
def _subject_info(subject: Subject) -> tuple[tuple[str, ...], str, str]:
    """(derived scopes, owning tenant, canonical JSON) of a subject; proxies reuse a few."""
    return (
        tuple(subject.scopes()),
        subject.tenant.lower() if subject.tenant else "",
        _JSON_CANONICAL.encode(subject.to_dict()),
    )


@functools.lru_cache(maxsize=4096)
def _action_json(action: Action) -> str:
    return _JSON_CANONICAL.encode(action.to_dict())


@functools.lru_cache(maxsize=8192)
def _jstr(value: str) -> str:
    """A JSON string literal (scopes, units and ids repeat: cached)."""
    return json.dumps(value, ensure_ascii=False)


@functools.lru_cache(maxsize=4096)
def _jlist(values: tuple[str, ...]) -> str:
    return "[" + ",".join(map(_jstr, values)) + "]"


def _balances_json(budgets: Sequence[_Budget]) -> str:
    """Stored responses are written by hand: json.dumps of the same lists costs several times
    more, on every request."""
    return (
        "["
        + ",".join(
            f"[{_jstr(b.scope)},{_jstr(b.unit)},{b.allocated},{b.spent},{b.reserved},{b.debt},"
            f"{b.overdraft_limit},{'true' if b.over else 'false'},"
            f"{'null' if b.period_end is None else b.period_end}]"
            for b in budgets
        )
        + "]"
    )


def _dec_balance(x: list[Any]) -> Balance:
    return Balance(
        scope=x[0],
        unit=_UNITS[x[1]],
        allocated=x[2],
        spent=x[3],
        reserved=x[4],
        debt=x[5],
        overdraft_limit=x[6],
        is_over_limit=bool(x[7]),
        period_ends_at_ms=x[8],
    )


def _gpu_seconds(metrics: Metrics | None) -> float | None:
    if metrics is None:
        return None
    value = metrics.custom.get("gpu_seconds")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _metrics_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _charge_row(
    now_ms: int,
    tenant: str,
    scope_path: str,
    kind: str,
    name: str,
    unit: str,
    amount: int,
    metrics: Metrics | None,
    reservation_id: str | None,
    event_id: str | None,
) -> list[Any]:
    tin = tout = latency = None
    if metrics is not None:
        tin = _metrics_int(metrics.tokens_input)
        tout = _metrics_int(metrics.tokens_output)
        latency = _metrics_int(metrics.latency_ms)
    return [
        now_ms, tenant, scope_path, kind, name, unit, amount, tin, tout, _gpu_seconds(metrics),
        latency, reservation_id, event_id,
    ]  # fmt: skip


class _Budget:
    """One budget row, loaded inside a transaction, changed in memory, written back by flush."""

    __slots__ = (
        "allocated",
        "debt",
        "over",
        "overdraft_limit",
        "period",
        "period_end",
        "period_start",
        "reserved",
        "scope",
        "spent",
        "status",
        "unit",
    )

    def __init__(self, row: Sequence[Any]) -> None:
        (
            self.scope,
            self.unit,
            self.allocated,
            self.spent,
            self.reserved,
            self.debt,
            self.overdraft_limit,
            over,
            self.status,
            self.period,
            self.period_start,
        ) = row
        self.over: bool = bool(over)
        self.period_end: int | None = (
            _window_end(self.period, self.period_start) if self.period else None
        )

    @property
    def remaining(self) -> int:
        return int(self.allocated - self.spent - self.reserved - self.debt)

    def roll(self, now_ms: int) -> None:
        """Start a new period if the current one has ended; in-flight reservations stay held."""
        if self.period_end is not None and now_ms >= self.period_end:
            self.period_start = _window_start(self.period, now_ms)
            self.period_end = _window_end(self.period, self.period_start)
            self.spent = 0
            self.debt = 0
            self.over = False

    def balance(self) -> Balance:
        return Balance(
            scope=self.scope,
            unit=_UNITS[self.unit],
            allocated=self.allocated,
            spent=self.spent,
            reserved=self.reserved,
            debt=self.debt,
            overdraft_limit=self.overdraft_limit,
            is_over_limit=self.over,
            period_ends_at_ms=self.period_end,
        )

    def record(self) -> BudgetRecord:
        return BudgetRecord(self.balance(), self.status, self.period, self.period_start)


class _Res:
    """One reservation row (all columns but the derived ``deadline_ms``)."""

    __slots__ = (
        "action",
        "action_kind",
        "action_name",
        "budgeted",
        "charged",
        "created",
        "expires",
        "extensions",
        "finalized",
        "grace",
        "id",
        "idempotency_key",
        "metadata",
        "policy",
        "reserved",
        "scope_path",
        "status",
        "subject",
        "tenant",
        "unit",
    )

    def __init__(self, row: Sequence[Any]) -> None:
        (
            self.id,
            self.tenant,
            self.idempotency_key,
            self.subject,
            self.action,
            self.action_kind,
            self.action_name,
            self.scope_path,
            self.unit,
            self.reserved,
            budgeted,
            self.status,
            self.created,
            self.expires,
            self.grace,
            self.policy,
            self.extensions,
            self.charged,
            self.finalized,
            self.metadata,
        ) = row
        self.budgeted: list[str] = json.loads(budgeted) if isinstance(budgeted, str) else budgeted

    def insert_row(self) -> list[Any]:
        return [
            self.id, self.tenant, self.idempotency_key, self.subject, self.action,
            self.action_kind, self.action_name, self.scope_path, self.unit, self.reserved,
            _jlist(tuple(self.budgeted)), self.status, self.created, self.expires, self.grace,
            self.expires + self.grace, self.policy, self.extensions, self.charged,
            self.finalized, self.metadata,
        ]  # fmt: skip

    def update_row(self) -> list[Any]:
        return [
            self.id, self.status, self.charged, self.finalized, self.expires,
            self.expires + self.grace, self.extensions,
        ]  # fmt: skip

    def record(self) -> ReservationRecord:
        unit = _UNITS[self.unit]
        return ReservationRecord(
            reservation_id=self.id,
            tenant=self.tenant,
            status=ReservationStatus(self.status),
            subject=json.loads(self.subject),
            action=json.loads(self.action),
            scope_path=self.scope_path,
            budgeted_scopes=tuple(self.budgeted),
            reserved=Amount(unit, self.reserved),
            overage_policy=OveragePolicy(self.policy),
            created_at_ms=self.created,
            expires_at_ms=self.expires,
            grace_period_ms=self.grace,
            extension_count=self.extensions,
            charged=None if self.charged is None else Amount(unit, self.charged),
            finalized_at_ms=self.finalized,
        )


_BUDGET_COLS: Final = (
    "scope, unit, allocated, spent, reserved, debt, overdraft_limit, is_over_limit, status, "
    "period, period_start_ms"
)
_RES_COLS: Final = (
    "id, tenant, idempotency_key, subject, action, action_kind, action_name, scope_path, unit, "
    "reserved, budgeted_scopes, status, created_ms, expires_ms, grace_ms, overage_policy, "
    "extension_count, charged, finalized_ms, metadata"
)
_RES_INSERT_COLS: Final = (
    "id, tenant, idempotency_key, subject, action, action_kind, action_name, scope_path, unit, "
    "reserved, budgeted_scopes, status, created_ms, expires_ms, grace_ms, deadline_ms, "
    "overage_policy, extension_count, charged, finalized_ms, metadata"
)
_CHARGE_COLS: Final = (
    "ts_ms, tenant, scope_path, action_kind, action_name, unit, amount, tokens_input, "
    "tokens_output, gpu_seconds, latency_ms, reservation_id, event_id"
)
_IDEM_COLS: Final = "tenant, endpoint, key, payload_hash, response, created_ms, expires_ms"


def _n_cols(cols: str) -> int:
    return len(cols.split(","))


# Inserts bind their rows directly, many rows per statement (cheaper for SQLite than decoding
# JSON, still one step); one prepared statement per (table, row count), kept by sqlite3's cache.
@functools.lru_cache(maxsize=1024)
def _insert_sql(verb: str, table: str, cols: str, rows: int) -> str:
    row = "(" + ", ".join("?" * _n_cols(cols)) + ")"
    return f"{verb} INTO {table} ({cols}) VALUES " + ", ".join([row] * rows)


def _insert_many(
    conn: sqlite3.Connection, verb: str, table: str, cols: str, rows: Sequence[Sequence[Any]]
) -> None:
    per = max(1, conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // _n_cols(cols))
    for i in range(0, len(rows), per):
        chunk = rows[i : i + per]
        conn.execute(_insert_sql(verb, table, cols, len(chunk)), [v for r in chunk for v in r])


# Every read and write of a unit of work is one statement, whatever the number of rows: the
# rows travel as one JSON array parameter (json_each) and come back as one JSON array
# (json_group_array). A batch of operations therefore costs a handful of sqlite3_step calls,
# which matters because each one releases the GIL and must win it back from the event loop.
# ... and a single operation (the CLI, an idle proxy) uses plain rows, which cost less.
_SQL_BUDGETS_IN: Final = {
    n: f"SELECT {_BUDGET_COLS} FROM budgets WHERE scope IN ({','.join('?' * n)})"
    for n in range(1, len(SUBJECT_LEVELS) + 1)
}
_SQL_LOAD_RESERVATION: Final = f"SELECT {_RES_COLS} FROM reservations WHERE id = ?"
_SQL_LOAD_ONE_IDEMPOTENCY: Final = (
    "SELECT tenant, endpoint, key, payload_hash, response FROM idempotency "
    "WHERE tenant = ? AND endpoint = ? AND key = ?"
)
_SQL_WRITE_BUDGET: Final = (
    "UPDATE budgets SET spent = ?, reserved = ?, debt = ?, is_over_limit = ?, period_start_ms = ? "
    "WHERE scope = ? AND unit = ?"
)
_SQL_UPDATE_RESERVATION: Final = (
    "UPDATE reservations SET status = ?, charged = ?, finalized_ms = ?, expires_ms = ?, "
    "deadline_ms = ?, extension_count = ? WHERE id = ?"
)
_SQL_LOAD_BUDGETS: Final = (
    f"SELECT json_group_array(json_array({_BUDGET_COLS})) FROM budgets "
    "WHERE scope IN (SELECT value FROM json_each(?))"
)
_SQL_LOAD_RESERVATIONS: Final = (
    f"SELECT json_group_array(json_array({_RES_COLS})) FROM reservations "
    "WHERE id IN (SELECT value FROM json_each(?))"
)
_SQL_LOAD_IDEMPOTENCY: Final = (
    "SELECT json_group_array(json_array(i.tenant, i.endpoint, i.key, i.payload_hash, "
    "i.response)) FROM json_each(?) AS j JOIN idempotency AS i "
    "ON i.tenant = json_extract(j.value, '$[0]') AND i.endpoint = json_extract(j.value, '$[1]') "
    "AND i.key = json_extract(j.value, '$[2]')"
)
_SQL_WRITE_BUDGETS: Final = (
    "UPDATE budgets SET spent = json_extract(j.value, '$[2]'), "
    "reserved = json_extract(j.value, '$[3]'), debt = json_extract(j.value, '$[4]'), "
    "is_over_limit = json_extract(j.value, '$[5]'), "
    "period_start_ms = json_extract(j.value, '$[6]') FROM json_each(?) AS j "
    "WHERE budgets.scope = json_extract(j.value, '$[0]') "
    "AND budgets.unit = json_extract(j.value, '$[1]')"
)
_SQL_UPDATE_RESERVATIONS: Final = (
    "UPDATE reservations SET status = json_extract(j.value, '$[1]'), "
    "charged = json_extract(j.value, '$[2]'), finalized_ms = json_extract(j.value, '$[3]'), "
    "expires_ms = json_extract(j.value, '$[4]'), deadline_ms = json_extract(j.value, '$[5]'), "
    "extension_count = json_extract(j.value, '$[6]') FROM json_each(?) AS j "
    "WHERE reservations.id = json_extract(j.value, '$[0]')"
)

_SCHEMA: Final = (
    """
    CREATE TABLE IF NOT EXISTS budgets (
        scope           TEXT    NOT NULL,
        unit            TEXT    NOT NULL,
        allocated       INTEGER NOT NULL CHECK (typeof(allocated) = 'integer'),
        spent           INTEGER NOT NULL DEFAULT 0 CHECK (typeof(spent) = 'integer'),
        reserved        INTEGER NOT NULL DEFAULT 0 CHECK (typeof(reserved) = 'integer'),
        debt            INTEGER NOT NULL DEFAULT 0 CHECK (typeof(debt) = 'integer'),
        overdraft_limit INTEGER NOT NULL DEFAULT 0 CHECK (typeof(overdraft_limit) = 'integer'),
        is_over_limit   INTEGER NOT NULL DEFAULT 0,
        status          TEXT    NOT NULL DEFAULT 'ACTIVE',
        period          TEXT,
        period_start_ms INTEGER,
        created_ms      INTEGER NOT NULL,
        PRIMARY KEY (scope, unit)
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE IF NOT EXISTS reservations (
        id              TEXT    PRIMARY KEY,
        tenant          TEXT    NOT NULL,
        idempotency_key TEXT    NOT NULL,
        subject         TEXT    NOT NULL,
        action          TEXT    NOT NULL,
        action_kind     TEXT    NOT NULL,
        action_name     TEXT    NOT NULL,
        scope_path      TEXT    NOT NULL,
        unit            TEXT    NOT NULL,
        reserved        INTEGER NOT NULL CHECK (typeof(reserved) = 'integer'),
        budgeted_scopes TEXT    NOT NULL,
        status          TEXT    NOT NULL,
        created_ms      INTEGER NOT NULL,
        expires_ms      INTEGER NOT NULL,
        grace_ms        INTEGER NOT NULL,
        deadline_ms     INTEGER NOT NULL,
        overage_policy  TEXT    NOT NULL,
        extension_count INTEGER NOT NULL DEFAULT 0,
        charged         INTEGER,
        finalized_ms    INTEGER,
        metadata        TEXT
    ) WITHOUT ROWID
    """,
    "CREATE INDEX IF NOT EXISTS reservations_active_deadline ON reservations (deadline_ms) "
    "WHERE status = 'ACTIVE'",
    # Partial, so creating a reservation never touches it; finalizing appends at its tail.
    "CREATE INDEX IF NOT EXISTS reservations_finalized ON reservations (finalized_ms) "
    "WHERE finalized_ms IS NOT NULL",
    """
    CREATE TABLE IF NOT EXISTS idempotency (
        tenant       TEXT    NOT NULL,
        endpoint     TEXT    NOT NULL,
        key          TEXT    NOT NULL,
        payload_hash TEXT    NOT NULL,
        response     TEXT    NOT NULL,
        created_ms   INTEGER NOT NULL,
        expires_ms   INTEGER NOT NULL,
        PRIMARY KEY (tenant, endpoint, key)
    ) WITHOUT ROWID
    """,
    "CREATE INDEX IF NOT EXISTS idempotency_expires ON idempotency (expires_ms)",
    """
    CREATE TABLE IF NOT EXISTS charges (
        id             INTEGER PRIMARY KEY,
        ts_ms          INTEGER NOT NULL,
        tenant         TEXT    NOT NULL,
        scope_path     TEXT    NOT NULL,
        action_kind    TEXT    NOT NULL,
        action_name    TEXT    NOT NULL,
        unit           TEXT    NOT NULL,
        amount         INTEGER NOT NULL CHECK (typeof(amount) = 'integer'),
        tokens_input   INTEGER,
        tokens_output  INTEGER,
        gpu_seconds    REAL,
        latency_ms     INTEGER,
        reservation_id TEXT,
        event_id       TEXT
    )
    """,
    # No secondary index on charges: rows are appended in time order, so the usage report
    # finds its first row by binary search on the rowid (see Ledger.usage); every index would
    # cost each commit another page write.
)


class _Work:
    """The rows one transaction reads and writes.

    Rows are loaded on demand (or in bulk for a batch, :meth:`preload`), changed in memory by
    the operations, and written back by :meth:`flush` with one statement per table. Only valid
    inside one ``BEGIN IMMEDIATE`` transaction: the absolute values written back are those read
    under the same write lock."""

    __slots__ = (
        "budgets",
        "changed_res",
        "charges",
        "conn",
        "dirty_budgets",
        "idem",
        "idem_new",
        "new_res",
        "res",
    )

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        #: scope -> unit -> budget, for every scope loaded so far (empty dict: none there)
        self.budgets: dict[str, dict[str, _Budget]] = {}
        self.res: dict[str, _Res | None] = {}
        self.idem: dict[tuple[str, str, str], tuple[str, str] | None] = {}
        self.dirty_budgets: dict[tuple[str, str], _Budget] = {}
        self.new_res: dict[str, _Res] = {}
        self.changed_res: dict[str, _Res] = {}
        self.charges: list[list[Any]] = []
        self.idem_new: dict[tuple[str, str, str], list[Any]] = {}

    # -- reads

    def load_scopes(self, scopes: Iterable[str]) -> None:
        missing = [s for s in dict.fromkeys(scopes) if s not in self.budgets]
        if not missing:
            return
        for s in missing:
            self.budgets[s] = {}
        rows: Iterable[Sequence[Any]]
        if len(missing) <= len(SUBJECT_LEVELS):  # one operation: plain rows are cheaper
            rows = self.conn.execute(_SQL_BUDGETS_IN[len(missing)], missing).fetchall()
        else:
            (text,) = self.conn.execute(_SQL_LOAD_BUDGETS, (_JSON.encode(missing),)).fetchone()
            rows = json.loads(text)
        for row in rows:
            b = _Budget(row)
            self.budgets[b.scope][b.unit] = b

    def subject_budgets(
        self, scopes: Sequence[str], unit: str
    ) -> tuple[list[_Budget], list[_Budget]]:
        """Budgets on the derived scopes: (in ``unit``, canonical order), (in other units)."""
        self.load_scopes(scopes)
        mine: list[_Budget] = []
        others: list[_Budget] = []
        for s in scopes:
            for u, b in self.budgets[s].items():
                (mine if u == unit else others).append(b)
        return mine, others

    def budgets_in(self, scopes: Sequence[str], unit: str) -> list[_Budget]:
        self.load_scopes(scopes)
        return [b for s in scopes if (b := self.budgets[s].get(unit)) is not None]

    def load_reservations(self, ids: Iterable[str]) -> None:
        missing = [i for i in dict.fromkeys(ids) if i not in self.res]
        if not missing:
            return
        for i in missing:
            self.res[i] = None
        rows: Iterable[Sequence[Any]]
        if len(missing) == 1:
            rows = self.conn.execute(_SQL_LOAD_RESERVATION, missing).fetchall()
        else:
            (text,) = self.conn.execute(_SQL_LOAD_RESERVATIONS, (_JSON.encode(missing),)).fetchone()
            rows = json.loads(text)
        for row in rows:
            r = _Res(row)
            self.res[r.id] = r

    def reservation(self, reservation_id: str) -> _Res | None:
        if reservation_id not in self.res:
            self.load_reservations((reservation_id,))
        return self.res[reservation_id]

    def load_idempotency(self, keys: Iterable[tuple[str, str, str]]) -> None:
        missing = [k for k in dict.fromkeys(keys) if k not in self.idem]
        if not missing:
            return
        for k in missing:
            self.idem[k] = None
        rows: Iterable[Sequence[Any]]
        if len(missing) == 1:
            rows = self.conn.execute(_SQL_LOAD_ONE_IDEMPOTENCY, missing[0]).fetchall()
        else:
            (text,) = self.conn.execute(_SQL_LOAD_IDEMPOTENCY, (_JSON.encode(missing),)).fetchone()
            rows = json.loads(text)
        for tenant, endpoint, key, payload_hash, response in rows:
            self.idem[(tenant, endpoint, key)] = (payload_hash, response)

    def replay(self, tenant: str, endpoint: str, key: str, payload_hash: str) -> Any:
        """The stored response for this key, None if new; IDEMPOTENCY_MISMATCH if the key
        was used for a different payload."""
        if key.startswith(ONCE_KEY_PREFIX):  # a single-use key: nothing to replay
            return None
        k = (tenant, endpoint, key)
        if k not in self.idem:
            self.load_idempotency((k,))
        stored = self.idem[k]
        if stored is None:
            return None
        if stored[0] != payload_hash:
            raise CyclesError(
                ErrorCode.IDEMPOTENCY_MISMATCH,
                f"idempotency key {key!r} was already used for a different {endpoint} request",
            )
        return json.loads(stored[1])

    # -- writes (in memory until flush)

    def remember(
        self,
        tenant: str,
        endpoint: str,
        key: str,
        payload_hash: str,
        text: str,
        now_ms: int,
        keep_ms: int = IDEMPOTENCY_RETENTION_MS,
    ) -> None:
        """Store a successful response (JSON ``text``) for replays of this key."""
        if key.startswith(ONCE_KEY_PREFIX):
            return
        k = (tenant, endpoint, key)
        self.idem[k] = (payload_hash, text)
        self.idem_new[k] = [tenant, endpoint, key, payload_hash, text, now_ms, now_ms + keep_ms]

    def touch(self, budgets: Iterable[_Budget]) -> None:
        for b in budgets:
            self.dirty_budgets[(b.scope, b.unit)] = b

    def add_reservation(self, res: _Res) -> None:
        self.res[res.id] = res
        self.new_res[res.id] = res

    def changed(self, res: _Res) -> None:
        if res.id not in self.new_res:
            self.changed_res[res.id] = res

    def flush(self) -> None:
        c = self.conn
        if self.dirty_budgets:
            if len(self.dirty_budgets) <= len(SUBJECT_LEVELS):
                c.executemany(
                    _SQL_WRITE_BUDGET,
                    [
                        (b.spent, b.reserved, b.debt, int(b.over), b.period_start, b.scope, b.unit)
                        for b in self.dirty_budgets.values()
                    ],
                )
            else:
                rows = [
                    [b.scope, b.unit, b.spent, b.reserved, b.debt, int(b.over), b.period_start]
                    for b in self.dirty_budgets.values()
                ]
                c.execute(_SQL_WRITE_BUDGETS, (_JSON.encode(rows),))
            self.dirty_budgets.clear()
        if self.new_res:
            rows = [r.insert_row() for r in self.new_res.values()]
            _insert_many(c, "INSERT", "reservations", _RES_INSERT_COLS, rows)
            self.new_res.clear()
        if self.changed_res:
            if len(self.changed_res) == 1:
                [r] = self.changed_res.values()
                c.execute(_SQL_UPDATE_RESERVATION, (*r.update_row()[1:], r.id))
            else:
                rows = [r.update_row() for r in self.changed_res.values()]
                c.execute(_SQL_UPDATE_RESERVATIONS, (_JSON.encode(rows),))
            self.changed_res.clear()
        if self.charges:
            _insert_many(c, "INSERT", "charges", _CHARGE_COLS, self.charges)
            self.charges.clear()
        if self.idem_new:
            rows = list(self.idem_new.values())
            _insert_many(c, "INSERT OR REPLACE", "idempotency", _IDEM_COLS, rows)
            self.idem_new.clear()


class _Op(NamedTuple):
    """A ledger operation queued for a group commit: ``Ledger.<name>(*args, **kwargs)``."""

    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class Ledger:
    """A Cycles v0 ledger in one SQLite file (synchronous; not safe to share between threads
    without external serialization: :class:`EmbeddedAuthority` uses it from one thread)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock_ms: Callable[[], int] = _wall_clock_ms,
        synchronous: str = "NORMAL",
        check_same_thread: bool = True,
        retention_ms: int = 7 * DAY_MS,
        max_extensions: int = MAX_EXTENSIONS,
    ) -> None:
        sync = synchronous.upper()
        if sync not in _SYNC_MODES:
            raise ValueError(f"synchronous must be one of {_SYNC_MODES}, got {synchronous!r}")
        self.path = os.fspath(path)
        self._clock = clock_ms
        #: extensions granted to one reservation (MAX_EXTENSIONS_EXCEEDED past it)
        self.max_extensions = max_extensions
        #: how long finalized/expired reservations are kept (charges are kept forever)
        self.retention_ms = retention_ms
        self._batching = False
        self._conn = sqlite3.connect(
            self.path,
            timeout=5.0,
            isolation_level=None,
            check_same_thread=check_same_thread,
            cached_statements=512,
        )
        try:
            self._setup(sync)
        except BaseException:
            self._conn.close()
            raise

    def _setup(self, sync: str) -> None:
        c = self._conn
        c.execute("PRAGMA busy_timeout = 5000")
        mode = c.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal" and self.path != ":memory:":
            raise sqlite3.OperationalError(f"could not enable WAL on {self.path} (got {mode})")
        c.execute(f"PRAGMA synchronous = {sync}")
        # Savepoint journals (one per operation inside a group commit) stay in memory, and
        # a 32 MiB page cache keeps the hot part of the reservation/idempotency B-trees.
        c.execute("PRAGMA temp_store = MEMORY")
        c.execute("PRAGMA cache_size = -32768")
        with self._tx():
            version = c.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path} has ledger schema {version}, newer than this build "
                    f"({SCHEMA_VERSION}); upgrade cycles-proxy"
                )
            for statement in _SCHEMA:
                c.execute(statement)
            if version < SCHEMA_VERSION:
                c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def now_ms(self) -> int:
        return self._clock()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One operation's transaction: ``BEGIN IMMEDIATE`` (so another process's writer waits
        on ``busy_timeout`` instead of failing midway), or a savepoint inside :meth:`run_many`."""
        c = self._conn
        if self._batching:
            if not c.in_transaction:  # a failed statement already rolled the batch back
                raise sqlite3.OperationalError("the batch transaction was rolled back")
            c.execute("SAVEPOINT op")
            try:
                yield c
            except BaseException:
                if c.in_transaction:
                    c.execute("ROLLBACK TO op")
                    c.execute("RELEASE op")
                raise
            c.execute("RELEASE op")
            return
        c.execute("BEGIN IMMEDIATE")
        try:
            yield c
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise

    def _single(self, op: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one operation in its own transaction."""
        error: CyclesError | None = None
        with self._tx():
            work = _Work(self._conn)
            try:
                result = op(work, *args, **kwargs)
            except CyclesError as exc:
                error = exc  # a refusal may still have changed something (an expiry): commit
            work.flush()
        if error is not None:
            raise error
        return result

    def run_many(self, items: Sequence[_Op | Callable[[], Any]]) -> list[tuple[bool, Any]]:
        """Group commit: run ``items`` in order in ONE ``BEGIN IMMEDIATE`` transaction and
        return ``(ok, result or exception)`` for each.

        :class:`_Op` items (reserve, commit, release, extend, event, balances) share one unit
        of work: their rows are loaded in bulk up front and written back with one statement per
        table at the end, so a batch costs a handful of statements whatever its size. A
        :class:`~.base.CyclesError` is that item's answer and the others go on (every operation
        checks before it changes anything). Any other item is a plain callable run in its own
        savepoint after the preceding work is flushed. If anything else fails, or the COMMIT
        does, this raises and nothing of the batch is kept: report results only after it
        returned."""
        if self._batching:
            raise RuntimeError("Ledger.run_many() does not nest")
        out: list[tuple[bool, Any]] = []
        with self._tx():
            work = _Work(self._conn)
            self._preload(work, [item for item in items if isinstance(item, _Op)])
            self._batching = True
            try:
                for item in items:
                    if isinstance(item, _Op):
                        op = getattr(self, "_op_" + item.name)
                        try:
                            out.append((True, op(work, *item.args, **item.kwargs)))
                        except CyclesError as exc:
                            out.append((False, exc))
                        continue
                    work.flush()
                    work = _Work(self._conn)  # the call may change anything: forget the cache
                    try:
                        with self._tx():
                            out.append((True, item()))
                    except Exception as exc:
                        if not self._conn.in_transaction:
                            raise
                        out.append((False, exc))
                work.flush()
            finally:
                self._batching = False
        return out

    @staticmethod
    def _preload(work: _Work, ops: list[_Op]) -> None:
        """Load every row a batch of operations will touch with three statements."""
        if len(ops) < 2:
            return
        ids: list[str] = []
        scopes: list[str] = []
        keys: list[tuple[str, str, str]] = []
        settling: list[_Op] = []
        for op in ops:
            if op.name in ("reserve", "event", "balances"):
                if op.name == "reserve":
                    req = op.args[0] if op.args else None
                    subject = getattr(req, "subject", None)
                    key = getattr(req, "idempotency_key", None)
                else:
                    subject = op.kwargs.get("subject", op.args[0] if op.args else None)
                    key = op.kwargs.get("idempotency_key")
                if not isinstance(subject, Subject):
                    continue
                subject_scopes, owner, _ = _subject_info(subject)
                scopes.extend(subject_scopes)
                if isinstance(key, str) and op.name != "balances":
                    keys.append((owner, op.name, key))
            elif op.args and isinstance(op.args[0], str):  # commit, release, extend
                ids.append(op.args[0])
                settling.append(op)
        work.load_reservations(ids)
        for op in settling:
            res = work.res.get(op.args[0])
            key = op.kwargs.get("idempotency_key")
            if res is not None and isinstance(key, str):
                keys.append((res.tenant, op.name, key))
                if op.name != "extend":
                    scopes.extend(res.budgeted)
        work.load_idempotency(keys)
        work.load_scopes(scopes)

    # ---------------------------------------------------------------- checks and charges

    @staticmethod
    def _no_budget(scopes: Sequence[str], unit: Unit, others: list[_Budget]) -> CyclesError:
        if others:
            first = others[0]  # others come in canonical scope order
            expected = sorted({b.unit for b in others if b.scope == first.scope})
            return CyclesError(
                ErrorCode.UNIT_MISMATCH,
                f"No budget in {unit} for scope {first.scope}; budgets exist in "
                f"{', '.join(expected)}",
                details={
                    "scope": first.scope,
                    "requested_unit": str(unit),
                    "expected_units": expected,
                },
            )
        return CyclesError(
            ErrorCode.NOT_FOUND, f"Budget not found for provided scope: {scopes[-1]}"
        )

    @staticmethod
    def _denial(
        code: ErrorCode, b: _Budget, now_ms: int, message: str, **details: Any
    ) -> CyclesError:
        retry_s = None
        if b.period_end is not None and code in (
            ErrorCode.BUDGET_EXCEEDED,
            ErrorCode.OVERDRAFT_LIMIT_EXCEEDED,
            ErrorCode.DEBT_OUTSTANDING,
        ):
            # A refill resets spent, debt and is_over_limit: retrying may work from then on.
            retry_s = -(-max(0, b.period_end - now_ms) // 1000)
        return CyclesError(
            code,
            message,
            retry_after_s=retry_s,
            details={"scope": b.scope, "unit": b.unit, **details},
        )

    def _reserve_check(
        self, budgets: list[_Budget], amount: int, now_ms: int
    ) -> CyclesError | None:
        """Fail-fast evaluation, scope by scope in canonical order (as the reference server)."""
        for b in budgets:
            if b.status == "FROZEN":
                return self._denial(
                    ErrorCode.BUDGET_FROZEN, b, now_ms, f"Budget {b.scope} is frozen"
                )
            if b.status == "CLOSED":
                return self._denial(
                    ErrorCode.BUDGET_CLOSED, b, now_ms, f"Budget {b.scope} is closed"
                )
            if b.over:
                return self._denial(
                    ErrorCode.OVERDRAFT_LIMIT_EXCEEDED,
                    b,
                    now_ms,
                    f"Budget {b.scope} is over its limit; no new reservations until reconciled",
                )
            if b.debt > 0 and b.overdraft_limit == 0:
                return self._denial(
                    ErrorCode.DEBT_OUTSTANDING,
                    b,
                    now_ms,
                    f"Budget {b.scope} has outstanding debt of {b.debt} {b.unit}",
                    debt=b.debt,
                )
            if b.remaining < amount:
                return self._denial(
                    ErrorCode.BUDGET_EXCEEDED,
                    b,
                    now_ms,
                    f"Budget {b.scope} has {b.remaining} {b.unit} remaining, {amount} requested",
                    remaining=b.remaining,
                    requested=amount,
                )
        return None

    def _settle(
        self,
        budgets: list[_Budget],
        reserved: int,
        actual: int,
        policy: OveragePolicy,
        now_ms: int,
        *,
        is_commit: bool,
    ) -> int:
        """Release ``reserved`` and charge ``actual`` on every budget, under ``policy`` (§5.3).

        Changes the budgets in memory and returns the amount charged; raises on refusal
        before changing anything."""
        delta = actual - reserved
        if delta <= 0:
            for b in budgets:
                b.reserved -= reserved
                b.spent += actual
            return actual
        if is_commit and policy is OveragePolicy.REJECT:
            # §2.2 / §5.3 (and the reference commit.lua): under REJECT a commit above the
            # reservation is refused, whether or not the budgets could cover the delta.
            raise CyclesError(
                ErrorCode.BUDGET_EXCEEDED,
                f"Actual {actual} exceeds the reserved {reserved} and the overage policy is REJECT",
                details={"reserved": reserved, "actual": actual},
            )
        short = [b for b in budgets if b.remaining < delta]
        if not short:
            for b in budgets:
                b.reserved -= reserved
                b.spent += actual
            return actual
        if policy is OveragePolicy.REJECT:  # an event (§4.8)
            b = short[0]
            raise self._denial(
                ErrorCode.BUDGET_EXCEEDED,
                b,
                now_ms,
                f"Budget {b.scope} has {b.remaining} {b.unit} remaining, {actual} charged",
                remaining=b.remaining,
                requested=actual,
            )
        overdraft = policy is OveragePolicy.ALLOW_WITH_OVERDRAFT
        # ALLOW_IF_AVAILABLE caps the overage at the minimum remaining and marks the short scopes
        # over limit. Under ALLOW_WITH_OVERDRAFT only scopes without an overdraft limit do so
        # ("with overdraft_limit 0 it behaves like ALLOW_IF_AVAILABLE"); the others take debt.
        capping = [b for b in short if b.overdraft_limit == 0] if overdraft else short
        capped = delta
        if capping:
            capped = max(0, min(delta, min(b.remaining for b in capping)))
        debtors = (
            [b for b in short if b.overdraft_limit > 0 and b.remaining < capped]
            if overdraft
            else []
        )
        for b in debtors:
            if b.debt + capped > b.overdraft_limit:
                raise CyclesError(
                    ErrorCode.OVERDRAFT_LIMIT_EXCEEDED,
                    f"Budget {b.scope}: debt {b.debt} + overage {capped} would exceed the "
                    f"overdraft limit {b.overdraft_limit}",
                    details={
                        "scope": b.scope,
                        "unit": b.unit,
                        "debt": b.debt,
                        "delta": capped,
                        "overdraft_limit": b.overdraft_limit,
                    },
                )
        for b in capping:
            b.over = True
        charged = reserved + capped
        for b in budgets:
            b.reserved -= reserved
            if b in debtors:
                # §5.3: "commit, add delta to debt, and let remaining go negative".
                b.spent += reserved
                b.debt += capped
            else:
                b.spent += charged
        return charged

    # ---------------------------------------------------------------- reserve

    def reserve(self, req: ReserveRequest, *, tenant: str | None = None) -> Reservation:
        """Reserve ``req.estimate`` on every budgeted scope of ``req.subject`` (§4.1, §4.6).

        A live denial raises :class:`~.base.CyclesError`; a dry run changes nothing and
        answers DENY with a reason code instead. ``tenant``, when given, must own the subject."""
        return self._single(self._op_reserve, req, tenant=tenant)

    def _op_reserve(
        self, work: _Work, req: ReserveRequest, *, tenant: str | None = None
    ) -> Reservation:
        key = _check_key(req.idempotency_key)
        unit = _check_unit(req.estimate.unit)
        amount = _check_amount(req.estimate.amount, "estimate.amount")
        policy = _check_policy(req.overage_policy)
        ttl, grace = req.ttl_ms, req.grace_period_ms
        if not isinstance(ttl, int) or not TTL_MIN_MS <= ttl <= TTL_MAX_MS:
            raise _invalid(f"ttl_ms must be between {TTL_MIN_MS} and {TTL_MAX_MS}")
        if not isinstance(grace, int) or not 0 <= grace <= GRACE_MAX_MS:
            raise _invalid(f"grace_period_ms must be between 0 and {GRACE_MAX_MS}")
        action = req.action
        if not action.kind or not action.name:
            raise _invalid("action.kind and action.name are required")
        scopes, owner, subject_json = _subject_info(req.subject)
        if not owner:
            raise _invalid("subject.tenant is required")
        if tenant is not None and tenant.lower() != owner:
            raise CyclesError(ErrorCode.FORBIDDEN, "subject.tenant does not match the caller")
        action_json = _action_json(action)
        metadata_json = _canonical(req.metadata)
        dry_run = bool(req.dry_run)
        payload_hash = _digest(
            subject_json, action_json, unit.value, amount, ttl, grace, policy.value, dry_run,
            metadata_json,
        )  # fmt: skip
        now = self._clock()
        # Dry runs share the namespace (flipping dry_run on a used key is a mismatch) but are
        # never stored, so they consume no key.
        stored = work.replay(owner, "reserve", key, payload_hash)
        if stored is not None:
            return self._replay_reservation(work, stored, now)
        budgets, others = work.subject_budgets(scopes, unit.value)
        if not budgets:
            error = self._no_budget(scopes, unit, others)
            if dry_run and error.code is ErrorCode.NOT_FOUND:
                return Reservation(
                    decision=Decision.DENY,
                    affected_scopes=scopes,
                    scope_path=scopes[-1],
                    reason_code="BUDGET_NOT_FOUND",
                )
            raise error
        for b in budgets:
            b.roll(now)
        denial = self._reserve_check(budgets, amount, now)
        if dry_run:
            balances = tuple(b.balance() for b in budgets)
            if denial is None:
                return Reservation(
                    decision=Decision.ALLOW,
                    affected_scopes=scopes,
                    reserved=Amount(unit, amount),
                    scope_path=scopes[-1],
                    balances=balances,
                )
            retry = denial.retry_after_s
            return Reservation(
                decision=Decision.DENY,
                affected_scopes=scopes,
                scope_path=scopes[-1],
                balances=balances,
                reason_code=str(denial.code),
                retry_after_ms=None if retry is None else retry * 1000,
            )
        if denial is not None:
            raise denial
        for b in budgets:
            b.reserved += amount
        work.touch(budgets)
        rid = str(uuid.uuid4())
        expires = now + ttl
        budgeted = [b.scope for b in budgets]
        work.add_reservation(
            _Res(
                (
                    rid, owner, key, subject_json, action_json, action.kind, action.name,
                    scopes[-1], unit.value, amount, budgeted, "ACTIVE", now, expires, grace,
                    policy.value, 0, None, None, metadata_json,
                )
            )
        )  # fmt: skip
        balances = tuple(b.balance() for b in budgets)
        work.remember(
            owner,
            "reserve",
            key,
            payload_hash,
            f'["{rid}",{_jlist(scopes)},{amount},{_jstr(unit.value)},{expires},'
            f"{_balances_json(budgets)}]",
            now,
            max(IDEMPOTENCY_RETENTION_MS, ttl + grace),
        )
        return Reservation(
            decision=Decision.ALLOW,
            affected_scopes=scopes,
            reservation_id=rid,
            reserved=Amount(unit, amount),
            expires_at_ms=expires,
            remaining_ttl_ms=ttl,
            scope_path=scopes[-1],
            balances=balances,
        )

    @staticmethod
    def _replay_reservation(work: _Work, stored: list[Any], now_ms: int) -> Reservation:
        rid, scopes, amount, unit, expires, balances = stored
        res = work.reservation(rid)
        active = res is not None and res.status == "ACTIVE"
        return Reservation(
            decision=Decision.ALLOW,
            affected_scopes=tuple(scopes),
            reservation_id=rid,
            reserved=Amount(_UNITS[unit], amount),
            expires_at_ms=expires,
            remaining_ttl_ms=max(0, expires - now_ms) if active else 0,
            scope_path=scopes[-1],
            balances=tuple(_dec_balance(b) for b in balances),
        )

    # ---------------------------------------------------------------- commit / release / extend

    @staticmethod
    def _reservation(work: _Work, reservation_id: str, tenant: str | None) -> _Res:
        if not isinstance(reservation_id, str) or not 1 <= len(reservation_id) <= 128:
            raise _invalid("reservation_id must be a string of 1..128 characters")
        res = work.reservation(reservation_id)
        if res is None:
            raise CyclesError(ErrorCode.NOT_FOUND, f"Reservation {reservation_id} not found")
        if tenant is not None and tenant.lower() != res.tenant:
            raise CyclesError(ErrorCode.FORBIDDEN, "reservation belongs to another tenant")
        return res

    @staticmethod
    def _check_state(res: _Res) -> None:
        if res.status in ("COMMITTED", "RELEASED"):
            raise CyclesError(
                ErrorCode.RESERVATION_FINALIZED, f"Reservation {res.id} is already {res.status}"
            )
        if res.status == "EXPIRED":
            raise CyclesError(ErrorCode.RESERVATION_EXPIRED, f"Reservation {res.id} has expired")

    @staticmethod
    def _expire(work: _Work, res: _Res, now_ms: int) -> CyclesError:
        """Expire an overdue reservation on the spot (its amount returns to every scope) and
        return the 410 to raise."""
        budgets = work.budgets_in(res.budgeted, res.unit)
        for b in budgets:
            b.reserved -= res.reserved
        work.touch(budgets)
        res.status = "EXPIRED"
        res.finalized = now_ms
        work.changed(res)
        return CyclesError(
            ErrorCode.RESERVATION_EXPIRED,
            f"Reservation {res.id} expired at {res.expires} (+{res.grace} ms grace)",
        )

    def commit(
        self,
        reservation_id: str,
        *,
        idempotency_key: str,
        actual: Amount,
        metrics: Metrics | None = None,
        metadata: dict[str, Any] | None = None,
        tenant: str | None = None,
    ) -> CommitResult:
        """Charge ``actual`` for a reservation (§4.2, §5.3); the unused part is released."""
        return self._single(
            self._op_commit,
            reservation_id,
            idempotency_key=idempotency_key,
            actual=actual,
            metrics=metrics,
            metadata=metadata,
            tenant=tenant,
        )

    def _op_commit(
        self,
        work: _Work,
        reservation_id: str,
        *,
        idempotency_key: str,
        actual: Amount,
        metrics: Metrics | None = None,
        metadata: dict[str, Any] | None = None,
        tenant: str | None = None,
    ) -> CommitResult:
        key = _check_key(idempotency_key)
        unit = _check_unit(actual.unit)
        amount = _check_amount(actual.amount, "actual.amount")
        payload_hash = _digest(
            reservation_id, unit.value, amount, _metrics_canonical(metrics), _canonical(metadata)
        )
        now = self._clock()
        res = self._reservation(work, reservation_id, tenant)
        stored = work.replay(res.tenant, "commit", key, payload_hash)
        if stored is not None:
            charged_amt, released_amt, balances = stored
            return CommitResult(
                charged=Amount(unit, charged_amt),
                released=Amount(unit, released_amt),
                balances=tuple(_dec_balance(b) for b in balances),
            )
        self._check_state(res)
        if unit != res.unit:
            raise CyclesError(
                ErrorCode.UNIT_MISMATCH,
                f"actual.unit {unit} differs from the reservation's unit {res.unit}",
                details={"requested_unit": unit.value, "expected_units": [res.unit]},
            )
        if now > res.expires + res.grace:
            raise self._expire(work, res, now)
        budgets = work.budgets_in(res.budgeted, res.unit)
        for b in budgets:
            b.roll(now)
        charged = self._settle(
            budgets, res.reserved, amount, OveragePolicy(res.policy), now, is_commit=True
        )
        work.touch(budgets)
        res.status = "COMMITTED"
        res.charged = charged
        res.finalized = now
        work.changed(res)
        work.charges.append(
            _charge_row(
                now, res.tenant, res.scope_path, res.action_kind, res.action_name, res.unit,
                charged, metrics, res.id, None,
            )
        )  # fmt: skip
        released = max(0, res.reserved - charged)
        balances_t = tuple(b.balance() for b in budgets)
        work.remember(
            res.tenant,
            "commit",
            key,
            payload_hash,
            f"[{charged},{released},{_balances_json(budgets)}]",
            now,
        )
        return CommitResult(
            charged=Amount(unit, charged), released=Amount(unit, released), balances=balances_t
        )

    def release(
        self,
        reservation_id: str,
        *,
        idempotency_key: str,
        reason: str | None = None,
        tenant: str | None = None,
    ) -> ReleaseResult:
        """Return a reservation's whole amount to its scopes (§4.3)."""
        return self._single(
            self._op_release,
            reservation_id,
            idempotency_key=idempotency_key,
            reason=reason,
            tenant=tenant,
        )

    def _op_release(
        self,
        work: _Work,
        reservation_id: str,
        *,
        idempotency_key: str,
        reason: str | None = None,
        tenant: str | None = None,
    ) -> ReleaseResult:
        key = _check_key(idempotency_key)
        payload_hash = _digest(reservation_id, reason)
        now = self._clock()
        res = self._reservation(work, reservation_id, tenant)
        stored = work.replay(res.tenant, "release", key, payload_hash)
        if stored is not None:
            return ReleaseResult(
                released=Amount(_UNITS[res.unit], stored[0]),
                balances=tuple(_dec_balance(b) for b in stored[1]),
            )
        self._check_state(res)
        if now > res.expires + res.grace:
            raise self._expire(work, res, now)
        budgets = work.budgets_in(res.budgeted, res.unit)
        for b in budgets:
            b.roll(now)
            b.reserved -= res.reserved
        work.touch(budgets)
        res.status = "RELEASED"
        res.charged = 0
        res.finalized = now
        work.changed(res)
        balances = tuple(b.balance() for b in budgets)
        work.remember(
            res.tenant,
            "release",
            key,
            payload_hash,
            f"[{res.reserved},{_balances_json(budgets)}]",
            now,
        )
        return ReleaseResult(released=Amount(_UNITS[res.unit], res.reserved), balances=balances)

    def extend(
        self,
        reservation_id: str,
        *,
        idempotency_key: str,
        extend_by_ms: int,
        tenant: str | None = None,
    ) -> ExtendResult:
        """Move ``expires_at`` out by ``extend_by_ms`` (§4.4, §5.5)."""
        return self._single(
            self._op_extend,
            reservation_id,
            idempotency_key=idempotency_key,
            extend_by_ms=extend_by_ms,
            tenant=tenant,
        )

    def _op_extend(
        self,
        work: _Work,
        reservation_id: str,
        *,
        idempotency_key: str,
        extend_by_ms: int,
        tenant: str | None = None,
    ) -> ExtendResult:
        key = _check_key(idempotency_key)
        if (
            not isinstance(extend_by_ms, int)
            or isinstance(extend_by_ms, bool)
            or not 1 <= extend_by_ms <= EXTEND_MAX_MS
        ):
            raise _invalid(f"extend_by_ms must be between 1 and {EXTEND_MAX_MS}")
        payload_hash = _digest(reservation_id, extend_by_ms)
        now = self._clock()
        res = self._reservation(work, reservation_id, tenant)
        stored = work.replay(res.tenant, "extend", key, payload_hash)
        if stored is not None:
            expires = stored[0]
            return ExtendResult(
                expires_at_ms=expires,
                remaining_ttl_ms=max(0, expires - now) if res.status == "ACTIVE" else 0,
                balances=tuple(_dec_balance(b) for b in stored[1]),
            )
        self._check_state(res)
        if now > res.expires:
            raise CyclesError(
                ErrorCode.RESERVATION_EXPIRED,
                f"Reservation {res.id} expired at {res.expires}; extend is not allowed after it",
            )
        if res.extensions >= self.max_extensions:
            raise CyclesError(
                ErrorCode.MAX_EXTENSIONS_EXCEEDED,
                f"Reservation {res.id} was already extended {self.max_extensions} times",
            )
        res.expires += extend_by_ms
        res.extensions += 1
        work.changed(res)
        budgets = work.budgets_in(res.budgeted, res.unit)
        for b in budgets:
            b.roll(now)
        balances = tuple(b.balance() for b in budgets)
        work.remember(
            res.tenant,
            "extend",
            key,
            payload_hash,
            f"[{res.expires},{_balances_json(budgets)}]",
            now,
        )
        return ExtendResult(
            expires_at_ms=res.expires, remaining_ttl_ms=res.expires - now, balances=balances
        )

    # ---------------------------------------------------------------- events

    def event(
        self,
        *,
        idempotency_key: str,
        subject: Subject,
        action: Action,
        actual: Amount,
        overage_policy: OveragePolicy = OveragePolicy.ALLOW_IF_AVAILABLE,
        metrics: Metrics | None = None,
        metadata: dict[str, Any] | None = None,
        tenant: str | None = None,
    ) -> EventResult:
        """Direct debit without a reservation (§4.8), under the commit overage rules."""
        return self._single(
            self._op_event,
            idempotency_key=idempotency_key,
            subject=subject,
            action=action,
            actual=actual,
            overage_policy=overage_policy,
            metrics=metrics,
            metadata=metadata,
            tenant=tenant,
        )

    def _op_event(
        self,
        work: _Work,
        *,
        idempotency_key: str,
        subject: Subject,
        action: Action,
        actual: Amount,
        overage_policy: OveragePolicy = OveragePolicy.ALLOW_IF_AVAILABLE,
        metrics: Metrics | None = None,
        metadata: dict[str, Any] | None = None,
        tenant: str | None = None,
    ) -> EventResult:
        key = _check_key(idempotency_key)
        unit = _check_unit(actual.unit)
        amount = _check_amount(actual.amount, "actual.amount")
        policy = _check_policy(overage_policy)
        if not action.kind or not action.name:
            raise _invalid("action.kind and action.name are required")
        scopes, owner, subject_json = _subject_info(subject)
        if not owner:
            raise _invalid("subject.tenant is required")
        if tenant is not None and tenant.lower() != owner:
            raise CyclesError(ErrorCode.FORBIDDEN, "subject.tenant does not match the caller")
        payload_hash = _digest(
            subject_json, _action_json(action), unit.value, amount, policy.value,
            _metrics_canonical(metrics), _canonical(metadata),
        )  # fmt: skip
        now = self._clock()
        stored = work.replay(owner, "event", key, payload_hash)
        if stored is not None:
            event_id, charged, balances = stored
            return EventResult(
                event_id=event_id,
                charged=Amount(unit, charged),
                balances=tuple(_dec_balance(b) for b in balances),
            )
        budgets, others = work.subject_budgets(scopes, unit.value)
        if not budgets:
            raise self._no_budget(scopes, unit, others)
        for b in budgets:
            b.roll(now)
        charged = self._settle(budgets, 0, amount, policy, now, is_commit=False)
        work.touch(budgets)
        event_id = str(uuid.uuid4())
        work.charges.append(
            _charge_row(
                now, owner, scopes[-1], action.kind, action.name, unit.value, charged,
                metrics, None, event_id,
            )
        )  # fmt: skip
        balances_t = tuple(b.balance() for b in budgets)
        work.remember(
            owner,
            "event",
            key,
            payload_hash,
            f'["{event_id}",{charged},{_balances_json(budgets)}]',
            now,
        )
        return EventResult(event_id=event_id, charged=Amount(unit, charged), balances=balances_t)

    # ---------------------------------------------------------------- balances

    def balances(self, subject: Subject, *, tenant: str | None = None) -> list[Balance]:
        """Balances of every derived scope of ``subject`` that has a budget (any unit)."""
        return self._single(self._op_balances, subject, tenant=tenant)

    def _op_balances(
        self, work: _Work, subject: Subject, *, tenant: str | None = None
    ) -> list[Balance]:
        scopes, owner, _ = _subject_info(subject)
        if not scopes:
            raise _invalid("subject needs at least one level")
        if tenant is not None and tenant.lower() != owner:
            raise CyclesError(ErrorCode.FORBIDDEN, "subject.tenant does not match the caller")
        now = self._clock()
        work.load_scopes(scopes)
        out = []
        for s in scopes:
            for unit in sorted(work.budgets[s]):
                b = work.budgets[s][unit]
                b.roll(now)  # the view as of now; written only if an operation changes it
                out.append(b.balance())
        return out

    # ---------------------------------------------------------------- expiry

    def sweep_expired(self) -> int:
        """Expire ACTIVE reservations past ``expires_at + grace``, returning their amounts to
        every scope; also prunes old idempotency records and finalized reservations.
        Returns how many reservations expired."""
        now = self._clock()
        with self._tx() as c:
            rows = c.execute(
                "SELECT id, unit, reserved, budgeted_scopes FROM reservations "
                "WHERE status = 'ACTIVE' AND deadline_ms < ?",
                (now,),
            ).fetchall()
            if rows:
                returned: dict[tuple[str, str], int] = {}
                for _rid, unit, reserved, budgeted in rows:
                    for scope in json.loads(budgeted):
                        returned[(scope, unit)] = returned.get((scope, unit), 0) + reserved
                c.executemany(
                    "UPDATE budgets SET reserved = reserved - ? WHERE scope = ? AND unit = ?",
                    [(amount, scope, unit) for (scope, unit), amount in returned.items()],
                )
                c.executemany(
                    "UPDATE reservations SET status = 'EXPIRED', finalized_ms = ? WHERE id = ?",
                    [(now, row[0]) for row in rows],
                )
            c.execute(
                "DELETE FROM idempotency WHERE (tenant, endpoint, key) IN (SELECT tenant, "
                "endpoint, key FROM idempotency WHERE expires_ms < ? LIMIT ?)",
                (now, _PRUNE_BATCH),
            )
            c.execute(
                "DELETE FROM reservations WHERE id IN (SELECT id FROM reservations "
                "WHERE finalized_ms IS NOT NULL AND finalized_ms < ? LIMIT ?)",
                (now - self.retention_ms, _PRUNE_BATCH),
            )
        return len(rows)

    # ---------------------------------------------------------------- reads

    def get_reservation(self, reservation_id: str) -> ReservationRecord | None:
        row = self._conn.execute(
            f"SELECT {_RES_COLS} FROM reservations WHERE id = ?", (reservation_id,)
        ).fetchone()
        return None if row is None else _Res(row).record()

    # ---------------------------------------------------------------- budget management (CLI)

    def set_budget(
        self,
        scope: str,
        unit: Unit | str,
        allocated: int,
        *,
        period: Period | None = None,
        overdraft_limit: int = 0,
    ) -> Balance:
        """Create a budget, or change an existing one's allocation, period and overdraft limit.

        Changing a budget keeps ``spent``, ``reserved`` and ``debt``. If afterwards
        ``remaining >= 0`` and ``debt <= overdraft_limit``, ``is_over_limit`` is cleared (this is
        how an operator reconciles an over-limit scope). A changed period starts at the current
        calendar window; an unchanged one keeps its window (rolling it first if it ended).
        """
        scope = _normalize_scope(scope)
        u = _check_unit(unit)
        allocated = _check_amount(allocated, "allocated")
        overdraft_limit = _check_amount(overdraft_limit, "overdraft_limit")
        p = _check_period(period)
        now = self._clock()
        with self._tx() as c:
            row = c.execute(
                f"SELECT {_BUDGET_COLS} FROM budgets WHERE scope = ? AND unit = ?",
                (scope, str(u)),
            ).fetchone()
            if row is None:
                start = _window_start(p, now) if p else None
                c.execute(
                    "INSERT INTO budgets (scope, unit, allocated, overdraft_limit, period, "
                    "period_start_ms, created_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (scope, str(u), allocated, overdraft_limit, p, start, now),
                )
                row = (scope, str(u), allocated, 0, 0, 0, overdraft_limit, 0, "ACTIVE", p, start)
                return _Budget(row).balance()
            b = _Budget(row)
            b.roll(now)
            if p != b.period:
                b.period = p
                b.period_start = _window_start(p, now) if p else None
                b.period_end = None if b.period_start is None else _window_end(p, b.period_start)
            b.allocated = allocated
            b.overdraft_limit = overdraft_limit
            if b.over and b.remaining >= 0 and b.debt <= b.overdraft_limit:
                b.over = False
            c.execute(
                "UPDATE budgets SET allocated = ?, spent = ?, debt = ?, overdraft_limit = ?, "
                "is_over_limit = ?, period = ?, period_start_ms = ? WHERE scope = ? AND unit = ?",
                (
                    b.allocated, b.spent, b.debt, b.overdraft_limit, int(b.over), b.period,
                    b.period_start, b.scope, b.unit,
                ),
            )  # fmt: skip
            return b.balance()

    def set_budget_status(self, scope: str, unit: Unit | str, status: str) -> Balance:
        """Freeze, close or re-activate a budget (``ACTIVE`` | ``FROZEN`` | ``CLOSED``)."""
        scope = _normalize_scope(scope)
        u = _check_unit(unit)
        status = status.upper()
        if status not in _BUDGET_STATUSES:
            raise _invalid(f"status must be one of {', '.join(_BUDGET_STATUSES)}")
        now = self._clock()
        with self._tx() as c:
            updated = c.execute(
                "UPDATE budgets SET status = ? WHERE scope = ? AND unit = ?",
                (status, scope, str(u)),
            ).rowcount
            if not updated:
                raise CyclesError(ErrorCode.NOT_FOUND, f"No {u} budget on scope {scope}")
            row = c.execute(
                f"SELECT {_BUDGET_COLS} FROM budgets WHERE scope = ? AND unit = ?",
                (scope, str(u)),
            ).fetchone()
        b = _Budget(row)
        b.roll(now)
        return b.balance()

    def get_budget(self, scope: str, unit: Unit | str) -> BudgetRecord | None:
        scope = _normalize_scope(scope)
        row = self._conn.execute(
            f"SELECT {_BUDGET_COLS} FROM budgets WHERE scope = ? AND unit = ?",
            (scope, str(_check_unit(unit))),
        ).fetchone()
        if row is None:
            return None
        b = _Budget(row)
        b.roll(self._clock())
        return b.record()

    def get_balance(self, scope: str, unit: Unit | str) -> Balance | None:
        """The budget's balance as of now (a period that ended shows as refilled), or None."""
        record = self.get_budget(scope, unit)
        return None if record is None else record.balance

    def list_budgets(self, scope_prefix: str | None = None) -> list[BudgetRecord]:
        now = self._clock()
        if scope_prefix:
            prefix = scope_prefix.lower()
            rows = self._conn.execute(
                f"SELECT {_BUDGET_COLS} FROM budgets WHERE substr(scope, 1, ?) = ? "
                "ORDER BY scope, unit",
                (len(prefix), prefix),
            ).fetchall()
        else:
            rows = self._conn.execute(
                f"SELECT {_BUDGET_COLS} FROM budgets ORDER BY scope, unit"
            ).fetchall()
        out = []
        for row in rows:
            b = _Budget(row)
            b.roll(now)
            out.append(b.record())
        return out

    def list_balances(self, scope_prefix: str | None = None) -> list[Balance]:
        """Balances of every budget whose scope starts with ``scope_prefix`` (all when None)."""
        return [r.balance for r in self.list_budgets(scope_prefix)]

    def _first_charge_id(self, ts_ms: int) -> int:
        """Smallest charge id whose ts_ms >= ``ts_ms``, assuming ids grow with time (writers'
        clocks may disagree a little: callers subtract a slack and filter exactly)."""
        c = self._conn
        lo, hi = c.execute("SELECT min(id), max(id) FROM charges").fetchone()
        if lo is None:
            return 0
        hi += 1  # answer in [lo, hi]; hi = "none"
        while lo < hi:
            mid = (lo + hi) // 2
            row = c.execute(
                "SELECT id, ts_ms FROM charges WHERE id >= ? ORDER BY id LIMIT 1", (mid,)
            ).fetchone()
            if row is None or row[1] >= ts_ms:
                hi = mid
            else:
                lo = row[0] + 1
        return int(lo)

    def usage(self, since_ms: int | None = None, tenant: str | None = None) -> list[UsageRow]:
        """Charges aggregated per tenant, model (action name), UTC day and unit."""
        where: list[str] = []
        params: list[Any] = []
        if since_ms is not None:
            where.append("id >= ? AND ts_ms >= ?")
            params += [self._first_charge_id(since_ms - _CHARGE_CLOCK_SLACK_MS), since_ms]
        if tenant is not None:
            where.append("tenant = ?")
            params.append(tenant.lower())
        sql = (
            "SELECT tenant, action_name, strftime('%Y-%m-%d', ts_ms / 1000, 'unixepoch') AS day, "
            "unit, count(*), coalesce(sum(tokens_input), 0), coalesce(sum(tokens_output), 0), "
            "coalesce(sum(gpu_seconds), 0.0), coalesce(sum(amount), 0) FROM charges"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " GROUP BY tenant, action_name, day, unit ORDER BY day, tenant, action_name, unit"
        )
        return [
            UsageRow(
                tenant=r[0],
                model=r[1],
                day=r[2],
                unit=Unit(r[3]),
                requests=r[4],
                tokens_input=r[5],
                tokens_output=r[6],
                gpu_seconds=float(r[7]),
                cost=r[8],
            )
            for r in self._conn.execute(sql, params)
        ]


# --------------------------------------------------------------------------------------------
# The async authority
# --------------------------------------------------------------------------------------------


_Call = tuple[_Op | Callable[[], Any], "asyncio.Future[Any]", asyncio.AbstractEventLoop]
_Outcome = tuple["asyncio.Future[Any]", asyncio.AbstractEventLoop, bool, Any]


def _unavailable(exc: Exception) -> Exception:
    if isinstance(exc, sqlite3.Error):
        error = AuthorityUnavailable(f"embedded ledger error: {exc}")
        error.__cause__ = exc
        return error
    return exc


def _deliver(outcomes: list[_Outcome]) -> None:
    for future, _loop, ok, value in outcomes:
        if future.cancelled():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


class EmbeddedAuthority:
    """:class:`~.base.Authority` backed by a :class:`Ledger`, run on one worker thread.

    Calls are queued and executed by a single worker (a ``ThreadPoolExecutor`` with one
    thread), which drains the queue in batches: everything that arrived while the previous
    batch ran is executed in one SQLite transaction (:meth:`Ledger.run_many`) and the results
    are delivered after its COMMIT. A batch loads and writes its rows with a few statements
    whatever its size, so under load the worker needs few round trips through SQLite, each of
    which hands the GIL to the (busy) event loop and has to win it back.

    SQLite failures (a locked or full disk, a corrupt file) surface as
    :class:`~.base.AuthorityUnavailable` so that the proxy's failure policy decides. Settlements
    (commit, release, event) are the exception: they report spend that already happened, so
    while the file cannot be written (another process holds the lock past the busy timeout,
    the disk is full) they are retried for up to ``settle_retry_s`` before giving up.
    """

    name = "embedded"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        sweep_interval_s: float = 5.0,
        clock_ms: Callable[[], int] = _wall_clock_ms,
        synchronous: str = "NORMAL",
        max_batch: int = 128,
        settle_retry_s: float = 60.0,
        max_extensions: int = MAX_EXTENSIONS,
    ) -> None:
        self.sweep_interval_s = sweep_interval_s
        self.settle_retry_s = settle_retry_s
        self.max_batch = max(1, max_batch)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cycles-ledger")
        # Opened here with check_same_thread=False, then used only from the worker thread.
        self._ledger = Ledger(
            path,
            clock_ms=clock_ms,
            synchronous=synchronous,
            check_same_thread=False,
            max_extensions=max_extensions,
        )
        self._pending: collections.deque[_Call] = collections.deque()
        self._lock = threading.Lock()
        self._draining = False
        self._sweeper: asyncio.Task[None] | None = None
        self._checkpointer: asyncio.Task[None] | None = None
        self._ckpt_conn: sqlite3.Connection | None = None
        # Cancelling the checkpoint task does not stop a checkpoint already running in its
        # thread; closing the connection under it crashed the process (SIGSEGV in sqlite3).
        # The lock makes close wait for that checkpoint.
        self._ckpt_lock = threading.Lock()
        self._closed = False

    @property
    def ledger(self) -> Ledger:
        """The underlying ledger: only touch it through :meth:`call`."""
        return self._ledger

    async def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` (typically a ledger method) on the worker thread, inside
        the transaction of the batch it lands in.

        If the awaiting task is cancelled before the call ran, it does not run."""
        job = functools.partial(fn, *args, **kwargs) if args or kwargs else fn
        result: T = await self._submit(job)
        return result

    async def _submit(self, item: _Op | Callable[[], Any]) -> Any:
        if self._closed:
            raise AuthorityUnavailable("the embedded ledger is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._lock:
            self._pending.append((item, future, loop))
            start = not self._draining
            self._draining = True
        if start:
            self._executor.submit(self._drain)
        return await future

    async def _settle(self, op: _Op) -> Any:
        """:meth:`_submit` for a settlement: retried while SQLite cannot write (locked, full).
        Retrying is safe: a failed transaction left nothing behind, and the idempotency key is
        the same on every attempt."""
        deadline = time.monotonic() + self.settle_retry_s
        delay = 0.05
        while True:
            try:
                return await self._submit(op)
            except AuthorityUnavailable as exc:
                transient = isinstance(exc.__cause__, sqlite3.OperationalError)
                if not transient or self._closed or time.monotonic() + delay > deadline:
                    raise
                log.warning("ledger not writable (%s); retrying in %.2f s", exc.__cause__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    # -- worker thread

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    self._draining = False
                    return
                count = min(len(self._pending), self.max_batch)
                batch = [self._pending.popleft() for _ in range(count)]
            self._run_batch(batch)

    def _run_batch(self, batch: list[_Call]) -> None:
        # Reading cancelled() from this thread is a benign race: at worst a call whose
        # caller just went away still runs, exactly as if it had been cancelled a bit later.
        live = [call for call in batch if not call[1].cancelled()]
        if not live:
            return
        outcomes: list[_Outcome]
        try:
            results = self._ledger.run_many([item for item, _, _ in live])
        except Exception as exc:  # the group COMMIT failed: nothing of the batch is durable
            error = _unavailable(exc)
            outcomes = [(future, loop, False, error) for _, future, loop in live]
        else:
            outcomes = [
                (future, loop, ok, value if ok else _unavailable(value))
                for (_, future, loop), (ok, value) in zip(live, results, strict=True)
            ]
        by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
        for outcome in outcomes:
            by_loop.setdefault(outcome[1], []).append(outcome)
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(_deliver, items)

    # -- lifecycle

    async def start(self) -> None:
        # WAL checkpoints (and their fsync) run on their own connection and thread, not inside
        # whichever request's transaction happens to cross the auto-checkpoint size
        await self.call(self._ledger._conn.execute, "PRAGMA wal_autocheckpoint = 0")
        if self._checkpointer is None:
            self._checkpointer = asyncio.create_task(
                self._checkpoint_loop(), name="cycles-ledger-checkpoint"
            )
        expired = await self.call(self._ledger.sweep_expired)
        if expired:
            log.info("expired %d stale reservations at startup", expired)
        if self._sweeper is None and self.sweep_interval_s > 0:
            self._sweeper = asyncio.create_task(self._sweep_loop(), name="cycles-ledger-sweep")

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                await asyncio.to_thread(self._checkpoint)
            except sqlite3.Error as exc:  # busy or locked: the next round catches up
                log.debug("WAL checkpoint skipped: %s", exc)

    def _checkpoint(self) -> None:
        with self._ckpt_lock:
            if self._closed:
                return
            if self._ckpt_conn is None:
                self._ckpt_conn = sqlite3.connect(
                    self._ledger.path, timeout=1.0, isolation_level=None, check_same_thread=False
                )
            # PASSIVE never blocks writers; it copies what it can and leaves the rest for later
            self._ckpt_conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def _close_checkpointer(self) -> None:
        with self._ckpt_lock:
            if self._ckpt_conn is not None:
                self._ckpt_conn.close()
                self._ckpt_conn = None

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            try:
                expired = await self.call(self._ledger.sweep_expired)
            except Exception:  # keep sweeping; a transient lock must not kill the task
                log.exception("reservation sweep failed")
            else:
                if expired:
                    log.info("expired %d reservations", expired)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True  # refuse new calls; queued ones still run
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self._checkpointer is not None:
            self._checkpointer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpointer
            self._checkpointer = None
        loop = asyncio.get_running_loop()
        try:
            # FIFO single worker: this runs after the drain job that holds any queued calls.
            await loop.run_in_executor(self._executor, self._ledger.close)
        finally:
            self._executor.shutdown(wait=False)
            await asyncio.to_thread(self._close_checkpointer)

    async def reserve(self, req: ReserveRequest) -> Reservation:
        result: Reservation = await self._submit(_Op("reserve", (req,), {}))
        return result

    async def commit(
        self,
        reservation_id: str,
        *,
        idempotency_key: str,
        actual: Amount,
        metrics: Metrics | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> CommitResult:
        kwargs = {
            "idempotency_key": idempotency_key,
            "actual": actual,
            "metrics": metrics,
            "metadata": metadata,
        }
        result: CommitResult = await self._settle(_Op("commit", (reservation_id,), kwargs))
        return result

    async def release(
        self, reservation_id: str, *, idempotency_key: str, reason: str | None = None
    ) -> ReleaseResult:
        kwargs = {"idempotency_key": idempotency_key, "reason": reason}
        result: ReleaseResult = await self._settle(_Op("release", (reservation_id,), kwargs))
        return result

    async def extend(
        self, reservation_id: str, *, idempotency_key: str, extend_by_ms: int
    ) -> ExtendResult:
        kwargs = {"idempotency_key": idempotency_key, "extend_by_ms": extend_by_ms}
        result: ExtendResult = await self._submit(_Op("extend", (reservation_id,), kwargs))
        return result

    async def event(
        self,
        *,
        idempotency_key: str,
        subject: Subject,
        action: Action,
        actual: Amount,
        overage_policy: OveragePolicy = OveragePolicy.ALLOW_IF_AVAILABLE,
        metrics: Metrics | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> EventResult:
        kwargs = {
            "idempotency_key": idempotency_key,
            "subject": subject,
            "action": action,
            "actual": actual,
            "overage_policy": overage_policy,
            "metrics": metrics,
            "metadata": metadata,
        }
        result: EventResult = await self._settle(_Op("event", (), kwargs))
        return result

    async def balances(self, subject: Subject) -> list[Balance]:
        result: list[Balance] = await self._submit(_Op("balances", (subject,), {}))
        return result
