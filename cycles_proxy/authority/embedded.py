"""The embedded budget authority: a Cycles v0 ledger in one SQLite file.

:class:`Ledger` is synchronous and owns one ``sqlite3`` connection. It implements the Cycles v0
semantics of ``cycles-protocol.md`` §4-5 (scope derivation, atomic multi-scope reserve, overage
policies, TTL + grace expiry, extend, events, idempotency) plus budget periods and a usage report.
Every mutation runs in one ``BEGIN IMMEDIATE`` transaction that re-reads the rows it changes, so
another process (the CLI) may write the same file at the same time.

:class:`EmbeddedAuthority` adapts a ledger to the async :class:`~.base.Authority` interface: every
call runs on one dedicated worker thread, so the event loop never blocks on SQLite and all
operations of this process are serialized.

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
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal, TypeVar

from .base import (
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


def _enc_balance(b: Balance) -> list[Any]:
    return [
        b.scope,
        str(b.unit),
        b.allocated,
        b.spent,
        b.reserved,
        b.debt,
        b.overdraft_limit,
        b.is_over_limit,
        b.period_ends_at_ms,
    ]


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


def _enc_amount(a: Amount | None) -> list[Any] | None:
    return None if a is None else [str(a.unit), a.amount]


def _dec_amount(x: list[Any] | None) -> Amount | None:
    return None if x is None else Amount(_UNITS[x[0]], x[1])


def _dec_amount_required(x: list[Any]) -> Amount:
    return Amount(_UNITS[x[0]], x[1])


def _gpu_seconds(metrics: Metrics | None) -> float | None:
    if metrics is None:
        return None
    value = metrics.custom.get("gpu_seconds")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _metrics_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class _Budget:
    """One budget row, loaded inside a transaction and written back when dirty."""

    __slots__ = (
        "allocated",
        "debt",
        "dirty",
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
        self.dirty = False

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
            self.dirty = True

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


_BUDGET_COLS: Final = (
    "scope, unit, allocated, spent, reserved, debt, overdraft_limit, is_over_limit, status, "
    "period, period_start_ms"
)
_RES_COLS: Final = (
    "id, tenant, subject, action, scope_path, unit, reserved, budgeted_scopes, status, "
    "created_ms, expires_ms, grace_ms, overage_policy, extension_count, charged, finalized_ms, "
    "action_kind, action_name"
)
# One prepared statement per number of derived scopes (1..6), so sqlite3's cache reuses them.
_SQL_BUDGETS_FOR_SCOPES: Final = {
    n: f"SELECT {_BUDGET_COLS} FROM budgets WHERE scope IN ({','.join('?' * n)})"
    for n in range(1, len(SUBJECT_LEVELS) + 1)
}
_SQL_BUDGETS_FOR_SCOPES_UNIT: Final = {
    n: f"SELECT {_BUDGET_COLS} FROM budgets WHERE unit = ? AND scope IN ({','.join('?' * n)})"
    for n in range(1, len(SUBJECT_LEVELS) + 1)
}
# The common case of a mutation: the same change on every scope and no period rolled.
_SQL_ADD_RESERVED: Final = {
    n: "UPDATE budgets SET reserved = reserved + ? "
    f"WHERE unit = ? AND scope IN ({','.join('?' * n)})"
    for n in range(1, len(SUBJECT_LEVELS) + 1)
}
_SQL_SETTLE_UNIFORM: Final = {
    n: "UPDATE budgets SET reserved = reserved - ?, spent = spent + ? "
    f"WHERE unit = ? AND scope IN ({','.join('?' * n)})"
    for n in range(1, len(SUBJECT_LEVELS) + 1)
}
# A reservation with its idempotency record for one endpoint, in one round trip.
_SQL_RES_WITH_IDEM: Final = (
    f"SELECT {', '.join('r.' + c.strip() for c in _RES_COLS.split(','))}, i.payload_hash, "
    "i.response FROM reservations AS r LEFT JOIN idempotency AS i "
    "ON i.tenant = r.tenant AND i.endpoint = ? AND i.key = ? WHERE r.id = ?"
)
_SQL_INSERT_RES: Final = (
    "INSERT INTO reservations (id, tenant, idempotency_key, subject, action, action_kind, "
    "action_name, scope_path, unit, reserved, budgeted_scopes, status, created_ms, expires_ms, "
    "grace_ms, deadline_ms, overage_policy, metadata) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'ACTIVE', ?, ?, ?, ?, ?, ?)"
)
_SQL_WRITE_BUDGET: Final = (
    "UPDATE budgets SET spent = ?, reserved = ?, debt = ?, is_over_limit = ?, period_start_ms = ? "
    "WHERE scope = ? AND unit = ?"
)
_SQL_IDEM_GET: Final = (
    "SELECT payload_hash, response FROM idempotency WHERE tenant = ? AND endpoint = ? AND key = ?"
)
_SQL_IDEM_PUT: Final = (
    "INSERT OR REPLACE INTO idempotency (tenant, endpoint, key, payload_hash, response, "
    "created_ms, expires_ms) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_SQL_CHARGE: Final = (
    "INSERT INTO charges (ts_ms, tenant, scope_path, action_kind, action_name, unit, amount, "
    "tokens_input, tokens_output, gpu_seconds, latency_ms, reservation_id, event_id) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
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


class _Res:
    """One reservation row."""

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
            self.subject,
            self.action,
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
            self.action_kind,
            self.action_name,
        ) = row[:18]
        self.budgeted: list[str] = json.loads(budgeted)

    def record(self) -> ReservationRecord:
        unit = Unit(self.unit)
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


# --------------------------------------------------------------------------------------------
# The ledger
# --------------------------------------------------------------------------------------------


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
    ) -> None:
        sync = synchronous.upper()
        if sync not in _SYNC_MODES:
            raise ValueError(f"synchronous must be one of {_SYNC_MODES}, got {synchronous!r}")
        self.path = os.fspath(path)
        self._clock = clock_ms
        #: how long finalized/expired reservations are kept (charges are kept forever)
        self.retention_ms = retention_ms
        self._batching = False
        self._conn = sqlite3.connect(
            self.path,
            timeout=5.0,
            isolation_level=None,
            check_same_thread=check_same_thread,
            cached_statements=256,
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
        on ``busy_timeout`` instead of failing midway), or a savepoint inside :meth:`batch`."""
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

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Group commit: the operations called inside the block share one ``BEGIN IMMEDIATE``
        transaction, each in its own savepoint, so a refused operation leaves no trace while
        the others stand. Nothing is durable, or visible to other connections, before the
        block exits; if the final COMMIT fails every operation of the block is lost, so report
        results only after the block has exited."""
        if self._batching:
            raise RuntimeError("Ledger.batch() does not nest")
        with self._tx():
            self._batching = True
            try:
                yield
            finally:
                self._batching = False

    # ---------------------------------------------------------------- budget loading/writing

    def _load_subject_budgets(
        self, scopes: Sequence[str], unit: Unit
    ) -> tuple[list[_Budget], list[_Budget]]:
        """Budgets on the derived scopes: (in ``unit``, canonical order), (in other units)."""
        rows = self._conn.execute(_SQL_BUDGETS_FOR_SCOPES[len(scopes)], scopes).fetchall()
        mine: dict[str, _Budget] = {}
        others: list[_Budget] = []
        for row in rows:
            b = _Budget(row)
            if b.unit == unit:
                mine[b.scope] = b
            else:
                others.append(b)
        return [mine[s] for s in scopes if s in mine], others

    def _load_budgets(self, scopes: list[str], unit: str) -> list[_Budget]:
        if not scopes:
            return []
        rows = self._conn.execute(
            _SQL_BUDGETS_FOR_SCOPES_UNIT[len(scopes)], [unit, *scopes]
        ).fetchall()
        by_scope = {row[0]: _Budget(row) for row in rows}
        return [by_scope[s] for s in scopes if s in by_scope]

    def _write_budgets(self, budgets: list[_Budget]) -> None:
        self._conn.executemany(
            _SQL_WRITE_BUDGET,
            [
                (b.spent, b.reserved, b.debt, int(b.over), b.period_start, b.scope, b.unit)
                for b in budgets
            ],
        )

    @staticmethod
    def _no_budget(scopes: Sequence[str], unit: Unit, others: list[_Budget]) -> CyclesError:
        if others:
            first = min(others, key=lambda b: scopes.index(b.scope))
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
    def _retry_after_ms(b: _Budget, now_ms: int) -> int | None:
        return None if b.period_end is None else max(0, b.period_end - now_ms)

    def _denial(
        self, code: ErrorCode, b: _Budget, now_ms: int, message: str, **details: Any
    ) -> CyclesError:
        retry_ms = None
        if code in (
            ErrorCode.BUDGET_EXCEEDED,
            ErrorCode.OVERDRAFT_LIMIT_EXCEEDED,
            ErrorCode.DEBT_OUTSTANDING,
        ):
            retry_ms = self._retry_after_ms(b, now_ms)
        return CyclesError(
            code,
            message,
            retry_after_s=None if retry_ms is None else -(-retry_ms // 1000),
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

        Mutates the budgets in memory, marking those that need more than the common
        ``reserved -= r; spent += charged`` as dirty, and returns the amount charged. Raises on
        refusal (the caller's transaction then rolls back)."""
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
            b.dirty = True
        charged = reserved + capped
        for b in budgets:
            b.reserved -= reserved
            if b in debtors:
                # §5.3: "commit, add delta to debt, and let remaining go negative".
                b.spent += reserved
                b.debt += capped
                b.dirty = True
            else:
                b.spent += charged
        return charged

    def _store_settled(self, budgets: list[_Budget], reserved: int, charged: int) -> None:
        if any(b.dirty for b in budgets):
            self._write_budgets(budgets)
        else:
            self._conn.execute(
                _SQL_SETTLE_UNIFORM[len(budgets)],
                (reserved, charged, budgets[0].unit, *[b.scope for b in budgets]),
            )

    # ---------------------------------------------------------------- idempotency

    @staticmethod
    def _check_replay(
        stored_hash: str | None, response: str | None, payload_hash: str, key: str, endpoint: str
    ) -> Any:
        if stored_hash is None or response is None:
            return None
        if stored_hash != payload_hash:
            raise CyclesError(
                ErrorCode.IDEMPOTENCY_MISMATCH,
                f"idempotency key {key!r} was already used for a different {endpoint} request",
            )
        return json.loads(response)

    def _idem_get(self, tenant: str, endpoint: str, key: str, payload_hash: str) -> Any:
        row = self._conn.execute(_SQL_IDEM_GET, (tenant, endpoint, key)).fetchone()
        if row is None:
            return None
        return self._check_replay(row[0], row[1], payload_hash, key, endpoint)

    def _idem_put(
        self,
        tenant: str,
        endpoint: str,
        key: str,
        payload_hash: str,
        response: Any,
        now_ms: int,
        keep_ms: int = IDEMPOTENCY_RETENTION_MS,
    ) -> None:
        self._conn.execute(
            _SQL_IDEM_PUT,
            (tenant, endpoint, key, payload_hash, _JSON.encode(response), now_ms, now_ms + keep_ms),
        )

    # ---------------------------------------------------------------- reserve

    def reserve(self, req: ReserveRequest, *, tenant: str | None = None) -> Reservation:
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
        if dry_run:
            return self._reserve_dry_run(owner, key, payload_hash, scopes, unit, amount, now)

        with self._tx() as c:
            stored = self._idem_get(owner, "reserve", key, payload_hash)
            if stored is not None:
                return self._replay_reservation(stored, now)
            budgets, others = self._load_subject_budgets(scopes, unit)
            if not budgets:
                raise self._no_budget(scopes, unit, others)
            for b in budgets:
                b.roll(now)
            denial = self._reserve_check(budgets, amount, now)
            if denial is not None:
                raise denial
            for b in budgets:
                b.reserved += amount
            budgeted = [b.scope for b in budgets]
            if any(b.dirty for b in budgets):
                self._write_budgets(budgets)
            else:
                c.execute(_SQL_ADD_RESERVED[len(budgeted)], (amount, unit.value, *budgeted))
            rid = str(uuid.uuid4())
            expires = now + ttl
            c.execute(
                _SQL_INSERT_RES,
                (
                    rid, owner, key, subject_json, action_json, action.kind, action.name,
                    scopes[-1], unit.value, amount, _JSON.encode(budgeted), now, expires, grace,
                    expires + grace, policy.value, metadata_json,
                ),
            )  # fmt: skip
            balances = tuple(b.balance() for b in budgets)
            self._idem_put(
                owner,
                "reserve",
                key,
                payload_hash,
                [rid, scopes, amount, unit.value, expires, [_enc_balance(b) for b in balances]],
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

    def _replay_reservation(self, stored: list[Any], now_ms: int) -> Reservation:
        rid, scopes, amount, unit, expires, balances = stored
        row = self._conn.execute("SELECT status FROM reservations WHERE id = ?", (rid,)).fetchone()
        active = row is not None and row[0] == "ACTIVE"
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

    def _reserve_dry_run(
        self,
        owner: str,
        key: str,
        payload_hash: str,
        scopes: tuple[str, ...],
        unit: Unit,
        amount: int,
        now_ms: int,
    ) -> Reservation:
        """Evaluate without writing anything (rolled periods are computed in memory only).

        Dry runs share the reserve idempotency namespace: reusing a live reservation's key
        with ``dry_run`` flipped is an IDEMPOTENCY_MISMATCH. A dry run stores nothing."""
        stored = self._idem_get(owner, "reserve", key, payload_hash)
        if stored is not None:  # unreachable in practice: dry_run is part of the payload
            return self._replay_reservation(stored, now_ms)
        budgets, others = self._load_subject_budgets(scopes, unit)
        if not budgets:
            error = self._no_budget(scopes, unit, others)
            if error.code is ErrorCode.UNIT_MISMATCH:
                raise error
            return Reservation(
                decision=Decision.DENY,
                affected_scopes=scopes,
                scope_path=scopes[-1],
                reason_code="BUDGET_NOT_FOUND",
            )
        for b in budgets:
            b.roll(now_ms)
        denial = self._reserve_check(budgets, amount, now_ms)
        balances = tuple(b.balance() for b in budgets)
        if denial is not None:
            retry = denial.retry_after_s
            return Reservation(
                decision=Decision.DENY,
                affected_scopes=scopes,
                scope_path=scopes[-1],
                balances=balances,
                reason_code=str(denial.code),
                retry_after_ms=None if retry is None else retry * 1000,
            )
        return Reservation(
            decision=Decision.ALLOW,
            affected_scopes=scopes,
            reserved=Amount(unit, amount),
            scope_path=scopes[-1],
            balances=balances,
        )

    # ---------------------------------------------------------------- commit / release / extend

    def _load_reservation(
        self, reservation_id: str, tenant: str | None, endpoint: str, key: str
    ) -> tuple[_Res, str | None, str | None]:
        """The reservation, plus the hash and response stored under (its tenant, endpoint,
        key) if any."""
        if not isinstance(reservation_id, str) or not 1 <= len(reservation_id) <= 128:
            raise _invalid("reservation_id must be a string of 1..128 characters")
        row = self._conn.execute(_SQL_RES_WITH_IDEM, (endpoint, key, reservation_id)).fetchone()
        if row is None:
            raise CyclesError(ErrorCode.NOT_FOUND, f"Reservation {reservation_id} not found")
        res = _Res(row)
        if tenant is not None and tenant.lower() != res.tenant:
            raise CyclesError(ErrorCode.FORBIDDEN, "reservation belongs to another tenant")
        return res, row[-2], row[-1]

    @staticmethod
    def _check_state(res: _Res) -> None:
        if res.status in ("COMMITTED", "RELEASED"):
            raise CyclesError(
                ErrorCode.RESERVATION_FINALIZED, f"Reservation {res.id} is already {res.status}"
            )
        if res.status == "EXPIRED":
            raise CyclesError(ErrorCode.RESERVATION_EXPIRED, f"Reservation {res.id} has expired")

    def _expire_locked(self, res: _Res, now_ms: int) -> None:
        """Mark an overdue reservation EXPIRED and return its amount (inside a transaction)."""
        self._conn.executemany(
            "UPDATE budgets SET reserved = reserved - ? WHERE scope = ? AND unit = ?",
            [(res.reserved, scope, res.unit) for scope in res.budgeted],
        )
        self._conn.execute(
            "UPDATE reservations SET status = 'EXPIRED', finalized_ms = ? WHERE id = ?",
            (now_ms, res.id),
        )

    @staticmethod
    def _expired_error(res: _Res) -> CyclesError:
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
        key = _check_key(idempotency_key)
        unit = _check_unit(actual.unit)
        amount = _check_amount(actual.amount, "actual.amount")
        payload_hash = _digest(
            reservation_id, unit.value, amount, _metrics_canonical(metrics), _canonical(metadata)
        )
        now = self._clock()
        with self._tx() as c:
            res, stored_hash, stored = self._load_reservation(reservation_id, tenant, "commit", key)
            replay = self._check_replay(stored_hash, stored, payload_hash, key, "commit")
            if replay is not None:
                charged_amt, released_amt, balances = replay
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
            expired = now > res.expires + res.grace
            if expired:
                self._expire_locked(res, now)
            else:
                budgets = self._load_budgets(res.budgeted, res.unit)
                for b in budgets:
                    b.roll(now)
                charged = self._settle(
                    budgets, res.reserved, amount, OveragePolicy(res.policy), now, is_commit=True
                )
                if budgets:
                    self._store_settled(budgets, res.reserved, charged)
                c.execute(
                    "UPDATE reservations SET status = 'COMMITTED', charged = ?, finalized_ms = ? "
                    "WHERE id = ?",
                    (charged, now, res.id),
                )
                self._insert_charge(
                    now, res.tenant, res.scope_path, res.action_kind, res.action_name,
                    res.unit, charged, metrics, res.id, None,
                )  # fmt: skip
                released = max(0, res.reserved - charged)
                balances_t = tuple(b.balance() for b in budgets)
                self._idem_put(
                    res.tenant,
                    "commit",
                    key,
                    payload_hash,
                    [charged, released, [_enc_balance(b) for b in balances_t]],
                    now,
                )
        if expired:
            raise self._expired_error(res)
        return CommitResult(
            charged=Amount(unit, charged), released=Amount(unit, released), balances=balances_t
        )

    def _insert_charge(
        self,
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
    ) -> None:
        if metrics is None:
            tin = tout = latency = None
        else:
            tin = _metrics_int(metrics.tokens_input)
            tout = _metrics_int(metrics.tokens_output)
            latency = _metrics_int(metrics.latency_ms)
        self._conn.execute(
            _SQL_CHARGE,
            (
                now_ms, tenant, scope_path, kind, name, unit, amount, tin, tout,
                _gpu_seconds(metrics), latency, reservation_id, event_id,
            ),
        )  # fmt: skip

    def release(
        self,
        reservation_id: str,
        *,
        idempotency_key: str,
        reason: str | None = None,
        tenant: str | None = None,
    ) -> ReleaseResult:
        key = _check_key(idempotency_key)
        payload_hash = _digest(reservation_id, reason)
        now = self._clock()
        with self._tx() as c:
            res, stored_hash, stored = self._load_reservation(
                reservation_id, tenant, "release", key
            )
            replay = self._check_replay(stored_hash, stored, payload_hash, key, "release")
            if replay is not None:
                return ReleaseResult(
                    released=Amount(_UNITS[res.unit], replay[0]),
                    balances=tuple(_dec_balance(b) for b in replay[1]),
                )
            self._check_state(res)
            expired = now > res.expires + res.grace
            if expired:
                self._expire_locked(res, now)
            else:
                budgets = self._load_budgets(res.budgeted, res.unit)
                for b in budgets:
                    b.roll(now)
                    b.reserved -= res.reserved
                if budgets:
                    self._store_settled(budgets, res.reserved, 0)
                c.execute(
                    "UPDATE reservations SET status = 'RELEASED', charged = 0, finalized_ms = ? "
                    "WHERE id = ?",
                    (now, res.id),
                )
                balances = tuple(b.balance() for b in budgets)
                self._idem_put(
                    res.tenant,
                    "release",
                    key,
                    payload_hash,
                    [res.reserved, [_enc_balance(b) for b in balances]],
                    now,
                )
        if expired:
            raise self._expired_error(res)
        return ReleaseResult(released=Amount(_UNITS[res.unit], res.reserved), balances=balances)

    def extend(
        self,
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
        with self._tx() as c:
            res, stored_hash, stored = self._load_reservation(reservation_id, tenant, "extend", key)
            replay = self._check_replay(stored_hash, stored, payload_hash, key, "extend")
            if replay is not None:
                expires = replay[0]
                return ExtendResult(
                    expires_at_ms=expires,
                    remaining_ttl_ms=max(0, expires - now) if res.status == "ACTIVE" else 0,
                    balances=tuple(_dec_balance(b) for b in replay[1]),
                )
            self._check_state(res)
            if now > res.expires:
                raise self._expired_error(res)
            if res.extensions >= MAX_EXTENSIONS:
                raise CyclesError(
                    ErrorCode.MAX_EXTENSIONS_EXCEEDED,
                    f"Reservation {res.id} was already extended {MAX_EXTENSIONS} times",
                )
            expires = res.expires + extend_by_ms
            c.execute(
                "UPDATE reservations SET expires_ms = ?, deadline_ms = ?, "
                "extension_count = extension_count + 1 WHERE id = ?",
                (expires, expires + res.grace, res.id),
            )
            budgets = self._load_budgets(res.budgeted, res.unit)
            for b in budgets:
                b.roll(now)
            balances = tuple(b.balance() for b in budgets)
            self._idem_put(
                res.tenant,
                "extend",
                key,
                payload_hash,
                [expires, [_enc_balance(b) for b in balances]],
                now,
            )
        return ExtendResult(
            expires_at_ms=expires, remaining_ttl_ms=expires - now, balances=balances
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
        with self._tx():
            stored = self._idem_get(owner, "event", key, payload_hash)
            if stored is not None:
                event_id, charged, balances = stored
                return EventResult(
                    event_id=event_id,
                    charged=Amount(unit, charged),
                    balances=tuple(_dec_balance(b) for b in balances),
                )
            budgets, others = self._load_subject_budgets(scopes, unit)
            if not budgets:
                raise self._no_budget(scopes, unit, others)
            for b in budgets:
                b.roll(now)
            charged = self._settle(budgets, 0, amount, policy, now, is_commit=False)
            self._store_settled(budgets, 0, charged)
            event_id = str(uuid.uuid4())
            self._insert_charge(
                now, owner, scopes[-1], action.kind, action.name, unit.value, charged,
                metrics, None, event_id,
            )  # fmt: skip
            balances_t = tuple(b.balance() for b in budgets)
            self._idem_put(
                owner,
                "event",
                key,
                payload_hash,
                [event_id, charged, [_enc_balance(b) for b in balances_t]],
                now,
            )
        return EventResult(event_id=event_id, charged=Amount(unit, charged), balances=balances_t)

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

    def balances(self, subject: Subject, *, tenant: str | None = None) -> list[Balance]:
        """Balances of every derived scope of ``subject`` that has a budget (any unit)."""
        scopes = subject.scopes()
        if not scopes:
            raise _invalid("subject needs at least one level")
        if tenant is not None and tenant.lower() != subject.tenant.lower():
            raise CyclesError(ErrorCode.FORBIDDEN, "subject.tenant does not match the caller")
        now = self._clock()
        rows = self._conn.execute(_SQL_BUDGETS_FOR_SCOPES[len(scopes)], scopes).fetchall()
        order = {s: i for i, s in enumerate(scopes)}
        budgets = sorted((_Budget(r) for r in rows), key=lambda b: (order[b.scope], b.unit))
        for b in budgets:
            b.roll(now)
        return [b.balance() for b in budgets]

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


_Call = tuple[Callable[[], Any], "asyncio.Future[Any]", asyncio.AbstractEventLoop]
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
    batch ran is executed in one SQLite transaction (:meth:`Ledger.batch`, one savepoint per
    call) and the results are delivered after its COMMIT. Under concurrency this group commit
    shares one BEGIN/COMMIT and one write of the hot budget pages among many requests; with a
    single caller every call is its own transaction.

    SQLite failures (a locked or full disk, a corrupt file) surface as
    :class:`~.base.AuthorityUnavailable` so that the proxy's failure policy decides.
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
    ) -> None:
        self.sweep_interval_s = sweep_interval_s
        self.max_batch = max(1, max_batch)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cycles-ledger")
        # Opened here with check_same_thread=False, then used only from the worker thread.
        self._ledger = Ledger(
            path, clock_ms=clock_ms, synchronous=synchronous, check_same_thread=False
        )
        self._pending: collections.deque[_Call] = collections.deque()
        self._lock = threading.Lock()
        self._draining = False
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def ledger(self) -> Ledger:
        """The underlying ledger: only touch it through :meth:`call`."""
        return self._ledger

    async def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` (a ledger operation) on the worker thread.

        If the awaiting task is cancelled before the call ran, it does not run."""
        if self._closed:
            raise AuthorityUnavailable("the embedded ledger is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        job = functools.partial(fn, *args, **kwargs) if args or kwargs else fn
        with self._lock:
            self._pending.append((job, future, loop))
            start = not self._draining
            self._draining = True
        if start:
            self._executor.submit(self._drain)
        return await future

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
        outcomes: list[_Outcome] = []
        try:
            if len(live) == 1:
                job, future, loop = live[0]
                try:
                    outcomes.append((future, loop, True, job()))
                except Exception as exc:
                    outcomes.append((future, loop, False, _unavailable(exc)))
            elif live:
                with self._ledger.batch():
                    for job, future, loop in live:
                        try:
                            outcomes.append((future, loop, True, job()))
                        except Exception as exc:
                            outcomes.append((future, loop, False, _unavailable(exc)))
        except Exception as exc:  # the group COMMIT failed: nothing of the batch is durable
            error = _unavailable(exc)
            outcomes = [(future, loop, False, error) for _, future, loop in live]
        by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
        for outcome in outcomes:
            by_loop.setdefault(outcome[1], []).append(outcome)
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(_deliver, items)

    # -- lifecycle

    async def start(self) -> None:
        expired = await self.call(self._ledger.sweep_expired)
        if expired:
            log.info("expired %d stale reservations at startup", expired)
        if self._sweeper is None and self.sweep_interval_s > 0:
            self._sweeper = asyncio.create_task(self._sweep_loop(), name="cycles-ledger-sweep")

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
        loop = asyncio.get_running_loop()
        try:
            # FIFO single worker: this runs after the drain job that holds any queued calls.
            await loop.run_in_executor(self._executor, self._ledger.close)
        finally:
            self._executor.shutdown(wait=False)

    async def reserve(self, req: ReserveRequest) -> Reservation:
        return await self.call(self._ledger.reserve, req)

    async def commit(
        self,
        reservation_id: str,
        *,
        idempotency_key: str,
        actual: Amount,
        metrics: Metrics | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> CommitResult:
        return await self.call(
            self._ledger.commit,
            reservation_id,
            idempotency_key=idempotency_key,
            actual=actual,
            metrics=metrics,
            metadata=metadata,
        )

    async def release(
        self, reservation_id: str, *, idempotency_key: str, reason: str | None = None
    ) -> ReleaseResult:
        return await self.call(
            self._ledger.release, reservation_id, idempotency_key=idempotency_key, reason=reason
        )

    async def extend(
        self, reservation_id: str, *, idempotency_key: str, extend_by_ms: int
    ) -> ExtendResult:
        return await self.call(
            self._ledger.extend,
            reservation_id,
            idempotency_key=idempotency_key,
            extend_by_ms=extend_by_ms,
        )

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
        return await self.call(
            self._ledger.event,
            idempotency_key=idempotency_key,
            subject=subject,
            action=action,
            actual=actual,
            overage_policy=overage_policy,
            metrics=metrics,
            metadata=metadata,
        )

    async def balances(self, subject: Subject) -> list[Balance]:
        return await self.call(self._ledger.balances, subject)
