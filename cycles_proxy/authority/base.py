"""The budget-authority interface: Cycles v0 semantics shared by the embedded and remote backends.

Both backends (``embedded.EmbeddedAuthority``, a SQLite ledger, and ``remote.RemoteAuthority``, a
Cycles v0 HTTP client) implement :class:`Authority`. The proxy only ever talks to this interface,
so both behave identically from the request lifecycle's point of view. Amounts are always
integers in the budget's unit (design promise 7: no floats touch balances).
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


class Unit(enum.StrEnum):
    USD_MICROCENTS = "USD_MICROCENTS"  # 1 USD = 100_000_000
    TOKENS = "TOKENS"
    CREDITS = "CREDITS"
    RISK_POINTS = "RISK_POINTS"


class OveragePolicy(enum.StrEnum):
    REJECT = "REJECT"
    ALLOW_IF_AVAILABLE = "ALLOW_IF_AVAILABLE"
    ALLOW_WITH_OVERDRAFT = "ALLOW_WITH_OVERDRAFT"


class Decision(enum.StrEnum):
    ALLOW = "ALLOW"
    ALLOW_WITH_CAPS = "ALLOW_WITH_CAPS"
    DENY = "DENY"


class ReservationStatus(enum.StrEnum):
    ACTIVE = "ACTIVE"
    COMMITTED = "COMMITTED"
    RELEASED = "RELEASED"
    EXPIRED = "EXPIRED"


class ErrorCode(enum.StrEnum):
    INVALID_REQUEST = "INVALID_REQUEST"
    UNAUTHORIZED = "UNAUTHORIZED"
    FORBIDDEN = "FORBIDDEN"
    NOT_FOUND = "NOT_FOUND"
    BUDGET_EXCEEDED = "BUDGET_EXCEEDED"
    BUDGET_FROZEN = "BUDGET_FROZEN"
    BUDGET_CLOSED = "BUDGET_CLOSED"
    OVERDRAFT_LIMIT_EXCEEDED = "OVERDRAFT_LIMIT_EXCEEDED"
    DEBT_OUTSTANDING = "DEBT_OUTSTANDING"
    IDEMPOTENCY_MISMATCH = "IDEMPOTENCY_MISMATCH"
    RESERVATION_FINALIZED = "RESERVATION_FINALIZED"
    RESERVATION_EXPIRED = "RESERVATION_EXPIRED"
    UNIT_MISMATCH = "UNIT_MISMATCH"
    MAX_EXTENSIONS_EXCEEDED = "MAX_EXTENSIONS_EXCEEDED"
    LIMIT_EXCEEDED = "LIMIT_EXCEEDED"
    TENANT_CLOSED = "TENANT_CLOSED"
    INTERNAL_ERROR = "INTERNAL_ERROR"


#: HTTP status the Cycles v0 protocol uses for each error code (cycles-protocol.md §2.2).
HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.BUDGET_EXCEEDED: 409,
    ErrorCode.BUDGET_FROZEN: 409,
    ErrorCode.BUDGET_CLOSED: 409,
    ErrorCode.OVERDRAFT_LIMIT_EXCEEDED: 409,
    ErrorCode.DEBT_OUTSTANDING: 409,
    ErrorCode.IDEMPOTENCY_MISMATCH: 409,
    ErrorCode.RESERVATION_FINALIZED: 409,
    ErrorCode.RESERVATION_EXPIRED: 410,
    ErrorCode.UNIT_MISMATCH: 400,
    ErrorCode.MAX_EXTENSIONS_EXCEEDED: 409,
    ErrorCode.LIMIT_EXCEEDED: 429,
    ErrorCode.TENANT_CLOSED: 409,
    ErrorCode.INTERNAL_ERROR: 500,
}

#: Codes that mean "this tenant may not spend now": the caller gets a budget denial.
DENIAL_CODES = frozenset(
    {
        ErrorCode.BUDGET_EXCEEDED,
        ErrorCode.BUDGET_FROZEN,
        ErrorCode.BUDGET_CLOSED,
        ErrorCode.OVERDRAFT_LIMIT_EXCEEDED,
        ErrorCode.DEBT_OUTSTANDING,
        ErrorCode.TENANT_CLOSED,
    }
)

SUBJECT_LEVELS = ("tenant", "workspace", "app", "workflow", "agent", "toolset")

#: Idempotency keys with this prefix are used exactly once, by a caller in the same process that
#: never resends them (the proxy's request path). The embedded ledger skips storing them for
#: replay, which halves what each request writes; a remote server treats them like any key.
ONCE_KEY_PREFIX = "once-"


def once_key() -> str:
    """A fresh single-use idempotency key (see :data:`ONCE_KEY_PREFIX`)."""
    return ONCE_KEY_PREFIX + uuid.uuid4().hex


class CyclesError(Exception):
    """A protocol-level refusal from the authority (an ``ErrorResponse`` in Cycles terms)."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        retry_after_s: int | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.http_status = HTTP_STATUS[code]
        #: seconds until retrying may succeed (budget period refill, or the server's 429 hint)
        self.retry_after_s = retry_after_s
        self.details = details or {}


class AuthorityUnavailable(Exception):
    """The authority could not be reached or failed (transport error, 5xx, timeout).

    Distinct from :class:`CyclesError`: the outcome is unknown, so the failure policy
    (fail_closed / fail_open / shadow) decides what the caller sees.
    """


class SettlementDeferred(AuthorityUnavailable):
    """A commit/event could not be delivered now; it is durably journaled and will be replayed
    with its original idempotency key (so the caller must NOT settle it another way)."""

    def __init__(self, message: str, *, record_id: str) -> None:
        super().__init__(message)
        self.record_id = record_id


@dataclass(frozen=True, slots=True)
class Subject:
    tenant: str
    workspace: str | None = None
    app: str | None = None
    workflow: str | None = None
    agent: str | None = None
    toolset: str | None = None

    def scopes(self) -> list[str]:
        """Derived scopes in canonical order, values lower-cased as the reference server does.

        ``{tenant: Acme, app: bot}`` -> ``["tenant:acme", "tenant:acme/app:bot"]``.
        """
        out: list[str] = []
        path = ""
        for level in SUBJECT_LEVELS:
            value = getattr(self, level)
            if value:
                segment = f"{level}:{value.lower()}"
                path = f"{path}/{segment}" if path else segment
                out.append(path)
        return out

    def to_dict(self) -> dict[str, str]:
        return {k: v for k in SUBJECT_LEVELS if (v := getattr(self, k))}


@dataclass(frozen=True, slots=True)
class Action:
    kind: str  # e.g. "llm.completion", "llm.embedding"
    name: str  # e.g. "ollama:llama3.2"
    tags: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "name": self.name}
        if self.tags:
            d["tags"] = list(self.tags)
        return d


@dataclass(frozen=True, slots=True)
class Amount:
    unit: Unit
    amount: int

    def to_dict(self) -> dict[str, Any]:
        return {"unit": str(self.unit), "amount": self.amount}


@dataclass(frozen=True, slots=True)
class Caps:
    max_tokens: int | None = None


@dataclass(slots=True)
class Metrics:
    """Cycles ``StandardMetrics``; GPU seconds and friends go in ``custom``."""

    tokens_input: int | None = None
    tokens_output: int | None = None
    latency_ms: int | None = None
    model_version: str | None = None
    custom: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for k in ("tokens_input", "tokens_output", "latency_ms", "model_version"):
            v = getattr(self, k)
            if v is not None:
                d[k] = v
        if self.custom:
            d["custom"] = self.custom
        return d


@dataclass(frozen=True, slots=True)
class Balance:
    scope: str
    unit: Unit
    allocated: int
    spent: int
    reserved: int
    debt: int
    overdraft_limit: int = 0
    is_over_limit: bool = False
    #: when the current budget period ends (embedded ledger only; None = no period / unknown)
    period_ends_at_ms: int | None = None

    @property
    def scope_path(self) -> str:
        return self.scope

    @property
    def remaining(self) -> int:
        return self.allocated - self.spent - self.reserved - self.debt


@dataclass(frozen=True, slots=True)
class ReserveRequest:
    idempotency_key: str
    subject: Subject
    action: Action
    estimate: Amount
    ttl_ms: int = 60_000
    grace_period_ms: int = 5_000
    overage_policy: OveragePolicy = OveragePolicy.ALLOW_IF_AVAILABLE
    dry_run: bool = False
    metadata: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Reservation:
    decision: Decision
    affected_scopes: tuple[str, ...]
    reservation_id: str | None = None
    reserved: Amount | None = None
    expires_at_ms: int | None = None
    remaining_ttl_ms: int | None = None
    scope_path: str | None = None
    caps: Caps | None = None
    balances: tuple[Balance, ...] = ()
    reason_code: str | None = None
    retry_after_ms: int | None = None


@dataclass(frozen=True, slots=True)
class CommitResult:
    charged: Amount
    released: Amount | None = None
    balances: tuple[Balance, ...] = ()


@dataclass(frozen=True, slots=True)
class ReleaseResult:
    released: Amount
    balances: tuple[Balance, ...] = ()


@dataclass(frozen=True, slots=True)
class ExtendResult:
    expires_at_ms: int
    remaining_ttl_ms: int | None = None
    balances: tuple[Balance, ...] = ()


@dataclass(frozen=True, slots=True)
class EventResult:
    event_id: str
    charged: Amount | None = None
    balances: tuple[Balance, ...] = ()


@runtime_checkable
class Authority(Protocol):
    """Cycles v0 operations. Every method raises :class:`CyclesError` for protocol refusals
    (a live reserve that is short is ``BUDGET_EXCEEDED``, never a DENY result) and
    :class:`AuthorityUnavailable` when the outcome is unknown."""

    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def reserve(self, req: ReserveRequest) -> Reservation: ...

    async def commit(
        self,
        reservation_id: str,
        *,
        idempotency_key: str,
        actual: Amount,
        metrics: Metrics | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> CommitResult: ...

    async def release(
        self, reservation_id: str, *, idempotency_key: str, reason: str | None = None
    ) -> ReleaseResult: ...

    async def extend(
        self, reservation_id: str, *, idempotency_key: str, extend_by_ms: int
    ) -> ExtendResult: ...

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
    ) -> EventResult: ...

    async def balances(self, subject: Subject) -> list[Balance]: ...
