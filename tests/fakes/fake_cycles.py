"""A fake Cycles v0 server for tests: HTTP <-> the embedded :class:`Ledger`, validated by the spec.

The fake translates the Cycles v0 runtime API (``spec/cycles-protocol-v0.yaml``) onto the SAME
ledger the embedded authority uses, so remote and embedded share one set of semantics. On top it:

* validates every request body, query string, path parameter and idempotency header against the
  spec's schemas (jsonschema, ``additionalProperties: false`` honoured) and records each violation
  in :attr:`FakeCycles.violations` (tests assert it stays empty); invalid requests get the 400 the
  reference server would send;
* validates its own responses too (:attr:`FakeCycles.self_violations`), except injected faults;
* authenticates ``X-Cycles-API-Key`` (unknown -> 401), enforces tenancy (subject or reservation of
  another tenant -> 403) and sets ``X-Request-Id``, ``X-Cycles-Trace-Id`` and ``X-Cycles-Tenant``;
* injects faults per endpoint and per n-th call (:class:`Fault`): lost response after applying,
  5xx (before or after applying), 429 with ``Retry-After``, delays, dropped connections, forced
  410 on commit, schema-invalid 2xx, responses without ``remaining_ttl_ms``; and
  :class:`FakeCyclesServer` runs it on a real socket that can go down (connection refused) and
  come back on the same port.

Standalone: ``python -m tests.fakes.fake_cycles --port 7878 --key KEY=TENANT
--budget tenant:acme=USD_MICROCENTS:100000000``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import socket
import sqlite3
import tempfile
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jsonschema
import referencing
import referencing.jsonschema
import yaml
from aiohttp import web

from cycles_proxy.authority.base import (
    HTTP_STATUS,
    SUBJECT_LEVELS,
    Action,
    Amount,
    Balance,
    CyclesError,
    Decision,
    ErrorCode,
    Metrics,
    OveragePolicy,
    Reservation,
    ReserveRequest,
    Subject,
    Unit,
)
from cycles_proxy.authority.embedded import Ledger, ReservationRecord

log = logging.getLogger("fake_cycles")

SPEC_URI = "urn:cycles-protocol-v0"
_REPO = Path(__file__).resolve().parents[2]
SPEC_CANDIDATES = (
    Path(__file__).with_name("cycles-protocol-v0.yaml"),
    _REPO / "spec" / "cycles-protocol-v0.yaml",
    _REPO / "docs" / "spec" / "cycles-protocol-v0.yaml",
    Path("/work/shared/spec/cycles-protocol-v0.yaml"),
)
_TRACE_RE = re.compile(r"^[0-9a-f]{32}$")
_TRACEPARENT_RE = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")

Endpoint = Literal["reserve", "commit", "release", "extend", "event", "balances", "list", "get"]
ENDPOINTS: tuple[str, ...] = (
    "reserve",
    "commit",
    "release",
    "extend",
    "event",
    "balances",
    "list",
    "get",
)


# --------------------------------------------------------------------------------------------
# Spec loading and validation
# --------------------------------------------------------------------------------------------


def spec_path() -> Path:
    env = os.environ.get("CYCLES_SPEC")
    if env:
        return Path(env)
    for candidate in SPEC_CANDIDATES:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        "cycles-protocol-v0.yaml not found; set CYCLES_SPEC or vendor it next to fake_cycles.py"
    )


@functools.cache
def load_spec(path: str | None = None) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(path or spec_path(), encoding="utf-8") as f:
        spec: dict[str, Any] = yaml.load(f, Loader=loader)
    return spec


class SpecValidator:
    """Validates instances against ``components.schemas`` and operation query parameters."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        resource: referencing.Resource[Any] = referencing.Resource.from_contents(
            spec, default_specification=referencing.jsonschema.DRAFT202012
        )
        self.registry: referencing.Registry[Any] = referencing.Registry().with_resource(
            SPEC_URI, resource
        )
        self._validators: dict[str, jsonschema.Draft202012Validator] = {}

    def _validator(self, ref: str) -> jsonschema.Draft202012Validator:
        v = self._validators.get(ref)
        if v is None:
            v = jsonschema.Draft202012Validator(
                {"$ref": f"{SPEC_URI}{ref}"}, registry=self.registry
            )
            self._validators[ref] = v
        return v

    def schema_errors(self, name: str, instance: object) -> list[str]:
        return self.ref_errors(f"#/components/schemas/{name}", instance)

    def ref_errors(self, ref: str, instance: object) -> list[str]:
        out = []
        for e in self._validator(ref).iter_errors(instance):
            where = "/".join(str(p) for p in e.absolute_path) or "<body>"
            out.append(f"{where}: {e.message}")
        return out

    def _deref(self, node: dict[str, Any]) -> dict[str, Any]:
        seen = 0
        while "$ref" in node and seen < 10:
            target: Any = self.spec
            for part in node["$ref"].lstrip("#/").split("/"):
                target = target[part]
            node = target
            seen += 1
        return node

    def operation_params(self, path: str, method: str) -> list[dict[str, Any]]:
        op = self.spec["paths"][path][method]
        return [self._deref(p) for p in op.get("parameters", [])]

    def query_errors(self, path: str, method: str, query: Mapping[str, str]) -> list[str]:
        params = {p["name"]: p for p in self.operation_params(path, method) if p["in"] == "query"}
        errors: list[str] = []
        for name in query:
            if name not in params:
                errors.append(f"query: unknown parameter {name!r}")
                continue
            schema = params[name]["schema"]
            resolved = self._deref(schema)
            raw = query[name]
            value: object = raw
            kind = resolved.get("type")
            if kind == "integer":
                try:
                    value = int(raw)
                except ValueError:
                    errors.append(f"query {name}: {raw!r} is not an integer")
                    continue
            elif kind == "boolean":
                if raw not in ("true", "false"):
                    errors.append(f"query {name}: {raw!r} is not a boolean")
                    continue
                value = raw == "true"
            elif kind == "array":
                value = [t.strip() for t in raw.split(",") if t.strip()]
            if "$ref" in schema:
                errs = self.ref_errors(schema["$ref"], value)
            else:
                errs = [
                    e.message
                    for e in jsonschema.Draft202012Validator(
                        schema, registry=self.registry
                    ).iter_errors(value)
                ]
            errors.extend(f"query {name}: {m}" for m in errs)
        for name, p in params.items():
            if p.get("required") and name not in query:
                errors.append(f"query: missing required parameter {name!r}")
        return errors


@functools.cache
def spec_validator() -> SpecValidator:
    return SpecValidator(load_spec())


# --------------------------------------------------------------------------------------------
# Fault injection
# --------------------------------------------------------------------------------------------

FaultKind = Literal[
    "drop",  # apply the operation, then close the connection without a response
    "refuse",  # close the connection before reading/applying anything
    "status",  # answer ``status`` with an ErrorResponse (before applying, or after if apply)
    "throttle",  # 429 LIMIT_EXCEEDED with Retry-After (not applied)
    "delay",  # sleep ``delay_s`` before handling (slow server)
    "expire",  # commit: answer 410 RESERVATION_EXPIRED without applying
    "invalid",  # apply, then answer 2xx with a schema-invalid body (ambiguous)
    "no_ttl",  # strip ``remaining_ttl_ms`` from reserve/extend responses
]


@dataclass(slots=True)
class Fault:
    kind: FaultKind
    status: int = 503
    apply: bool = False
    retry_after: str | None = "1"
    delay_s: float = 0.0
    #: for "status": answer this error code (default INTERNAL_ERROR)
    code: ErrorCode | None = None

    @classmethod
    def drop(cls) -> Fault:
        return cls("drop")

    @classmethod
    def refuse(cls) -> Fault:
        return cls("refuse")

    @classmethod
    def error(
        cls, status: int | None = None, *, code: ErrorCode | None = None, apply: bool = False
    ) -> Fault:
        """An ErrorResponse: 5xx by default, or any protocol ``code`` (e.g. a forced 409)."""
        if status is None:
            status = HTTP_STATUS[code] if code is not None else 503
        return cls("status", status=status, apply=apply, code=code)

    @classmethod
    def throttle(cls, retry_after: str | None = "1") -> Fault:
        return cls("throttle", status=429, retry_after=retry_after)

    @classmethod
    def slow(cls, delay_s: float) -> Fault:
        return cls("delay", delay_s=delay_s)

    @classmethod
    def expire(cls) -> Fault:
        return cls("expire", status=410)

    @classmethod
    def invalid(cls) -> Fault:
        return cls("invalid")

    @classmethod
    def no_ttl(cls) -> Fault:
        return cls("no_ttl")


@dataclass(slots=True)
class _Rule:
    endpoint: str  # an endpoint name or "*"
    fault: Fault
    calls: frozenset[int] | None  # 1-based call numbers of that endpoint; None = any
    remaining: int | None  # how many more times it fires; None = unlimited


@dataclass(slots=True)
class Recorded:
    """One request the fake received (after fault bookkeeping)."""

    endpoint: str
    n: int  # 1-based call number of this endpoint
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    api_key: str | None
    tenant: str | None = None
    status: int | None = None  # None: connection dropped
    #: ledger time (ms) and local monotonic time (s) when the request arrived
    ledger_ms: int = 0
    at: float = 0.0


# --------------------------------------------------------------------------------------------
# The fake
# --------------------------------------------------------------------------------------------


def _amount_json(a: Amount) -> dict[str, Any]:
    return {"unit": str(a.unit), "amount": a.amount}


def balance_json(b: Balance) -> dict[str, Any]:
    unit = str(b.unit)
    out: dict[str, Any] = {
        "scope": b.scope,
        "scope_path": b.scope,
        "remaining": {"unit": unit, "amount": b.remaining},
        "reserved": {"unit": unit, "amount": b.reserved},
        "spent": {"unit": unit, "amount": b.spent},
        "allocated": {"unit": unit, "amount": b.allocated},
        "debt": {"unit": unit, "amount": b.debt},
        "is_over_limit": b.is_over_limit,
    }
    if b.overdraft_limit:
        out["overdraft_limit"] = {"unit": unit, "amount": b.overdraft_limit}
    return out


def reservation_json(r: Reservation, *, dry_run: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"decision": str(r.decision), "affected_scopes": list(r.affected_scopes)}
    if r.reservation_id is not None and not dry_run:
        out["reservation_id"] = r.reservation_id
    if r.reserved is not None:
        out["reserved"] = _amount_json(r.reserved)
    if not dry_run:
        if r.expires_at_ms is not None:
            out["expires_at_ms"] = r.expires_at_ms
        if r.remaining_ttl_ms is not None and r.decision is not Decision.DENY:
            out["remaining_ttl_ms"] = r.remaining_ttl_ms
    if r.scope_path:
        out["scope_path"] = r.scope_path
    if r.caps is not None and r.decision is Decision.ALLOW_WITH_CAPS:
        out["caps"] = {} if r.caps.max_tokens is None else {"max_tokens": r.caps.max_tokens}
    if r.balances:
        out["balances"] = [balance_json(b) for b in r.balances]
    if r.reason_code:
        out["reason_code"] = r.reason_code
    if r.retry_after_ms is not None:
        out["retry_after_ms"] = r.retry_after_ms
    return out


def _subject(d: Mapping[str, Any]) -> Subject:
    return Subject(**{k: d[k] for k in SUBJECT_LEVELS if isinstance(d.get(k), str)})


def _action(d: Mapping[str, Any]) -> Action:
    return Action(kind=d["kind"], name=d["name"], tags=tuple(d.get("tags") or ()))


def _amount(d: Mapping[str, Any]) -> Amount:
    return Amount(Unit(d["unit"]), int(d["amount"]))


def _metrics(d: Mapping[str, Any] | None) -> Metrics | None:
    if not d:
        return None
    return Metrics(
        tokens_input=d.get("tokens_input"),
        tokens_output=d.get("tokens_output"),
        latency_ms=d.get("latency_ms"),
        model_version=d.get("model_version"),
        custom=dict(d.get("custom") or {}),
    )


class _Dropped(Exception):
    """The response must not be sent (connection closed)."""


@dataclass(slots=True)
class _Ctx:
    request: web.Request
    endpoint: str
    n: int
    rec: Recorded
    faults: list[Fault] = field(default_factory=list)
    request_id: str = ""
    trace_id: str = ""
    tenant: str | None = None


class FakeCycles:
    """State of one fake Cycles server (ledger, keys, faults, recordings)."""

    def __init__(
        self,
        *,
        keys: Mapping[str, str],
        ledger: Ledger | None = None,
        db_path: str | os.PathLike[str] | None = None,
        clock_ms: Callable[[], int] | None = None,
        auto_sweep: bool = True,
        require_idempotency_header: bool = True,
    ) -> None:
        self.keys = dict(keys)
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        if ledger is None:
            if db_path is None:
                self._tmpdir = tempfile.TemporaryDirectory(prefix="fake-cycles-")
                db_path = Path(self._tmpdir.name) / "ledger.db"
            kwargs: dict[str, Any] = {"check_same_thread": False}
            if clock_ms is not None:
                kwargs["clock_ms"] = clock_ms
            ledger = Ledger(db_path, **kwargs)
        self.ledger = ledger
        self.auto_sweep = auto_sweep
        self.require_idempotency_header = require_idempotency_header
        self.validator = spec_validator()
        #: requests that broke the spec (what the client sent)
        self.violations: list[str] = []
        #: responses of the fake itself that broke the spec (excluding injected faults)
        self.self_violations: list[str] = []
        self.requests: list[Recorded] = []
        self.calls: Counter[str] = Counter()
        self._rules: list[_Rule] = []
        #: (tenant, reservation_id, idempotency key) of reservations created here, in order
        self._index: list[tuple[str, str, str]] = []

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.ledger.close()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()

    # -- test helpers ----------------------------------------------------------------------

    def inject(
        self,
        endpoint: str,
        fault: Fault,
        *,
        calls: Iterable[int] | None = None,
        times: int | None = None,
    ) -> None:
        """Inject ``fault`` on ``endpoint`` (a name of :data:`ENDPOINTS` or ``"*"``).

        ``calls``: the 1-based call numbers of that endpoint it applies to (counting every call
        since the fake started); ``times``: fire only that many times; neither: every call until
        :meth:`clear_faults`."""
        if endpoint != "*" and endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}")
        self._rules.append(
            _Rule(endpoint, fault, frozenset(calls) if calls is not None else None, times)
        )

    def clear_faults(self) -> None:
        self._rules.clear()

    def requests_for(self, endpoint: str) -> list[Recorded]:
        return [r for r in self.requests if r.endpoint == endpoint]

    def assert_clean(self) -> None:
        assert not self.violations, "client broke the Cycles spec:\n" + "\n".join(self.violations)
        assert not self.self_violations, "fake broke the spec:\n" + "\n".join(self.self_violations)

    def _match(self, endpoint: str, n: int) -> list[Fault]:
        out = []
        for rule in self._rules:
            if rule.endpoint not in ("*", endpoint):
                continue
            if rule.calls is not None and n not in rule.calls:
                continue
            if rule.remaining is not None:
                if rule.remaining <= 0:
                    continue
                rule.remaining -= 1
            out.append(rule.fault)
        return out

    # -- request plumbing ------------------------------------------------------------------

    def _violation(self, ctx: _Ctx, message: str) -> None:
        text = f"{ctx.rec.method} {ctx.rec.path} (#{ctx.n} {ctx.endpoint}): {message}"
        self.violations.append(text)
        log.warning("spec violation: %s", text)

    def _headers(self, ctx: _Ctx) -> dict[str, str]:
        h = {"X-Request-Id": ctx.request_id, "X-Cycles-Trace-Id": ctx.trace_id}
        if ctx.tenant is not None:
            h["X-Cycles-Tenant"] = ctx.tenant
            h["X-RateLimit-Remaining"] = "-1"
            h["X-RateLimit-Reset"] = "0"
        return h

    def _error(
        self,
        ctx: _Ctx,
        code: ErrorCode,
        message: str,
        *,
        status: int | None = None,
        details: dict[str, Any] | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> web.Response:
        body: dict[str, Any] = {
            "error": str(code),
            "message": message,
            "request_id": ctx.request_id,
            "trace_id": ctx.trace_id,
        }
        if details:
            body["details"] = details
        self._check_response(ctx, "ErrorResponse", body)
        headers = self._headers(ctx)
        if extra_headers:
            headers.update(extra_headers)
        ctx.rec.status = status or HTTP_STATUS[code]
        return web.json_response(body, status=ctx.rec.status, headers=headers)

    def _ok(self, ctx: _Ctx, schema: str, body: dict[str, Any], status: int = 200) -> web.Response:
        for f in ctx.faults:
            if f.kind == "no_ttl":
                body.pop("remaining_ttl_ms", None)
        self._check_response(ctx, schema, body)
        for f in ctx.faults:
            if f.kind == "drop":
                raise _Dropped
            if f.kind == "status" and f.apply:
                return self._error(
                    ctx,
                    f.code or ErrorCode.INTERNAL_ERROR,
                    "injected failure after apply",
                    status=f.status,
                )
            if f.kind == "invalid":
                broken = {k: v for k, v in body.items() if k in ("status",)}
                broken["unexpected_field"] = True
                ctx.rec.status = status
                return web.json_response(broken, status=status, headers=self._headers(ctx))
        ctx.rec.status = status
        return web.json_response(body, status=status, headers=self._headers(ctx))

    def _check_response(self, ctx: _Ctx, schema: str, body: object) -> None:
        for e in self.validator.schema_errors(schema, body):
            self.self_violations.append(f"{ctx.endpoint} response {schema}: {e}")

    async def _run(
        self,
        request: web.Request,
        endpoint: str,
        spec_path_: str,
        method: str,
        schema: str | None,
        handler: Callable[[_Ctx, Any], Awaitable[web.Response]],
    ) -> web.StreamResponse:
        self.calls[endpoint] += 1
        n = self.calls[endpoint]
        rec = Recorded(
            endpoint=endpoint,
            n=n,
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers={k: v for k, v in request.headers.items() if k.lower() != "x-cycles-api-key"},
            body=None,
            api_key=request.headers.get("X-Cycles-API-Key"),
            ledger_ms=self.ledger.now_ms(),
            at=time.monotonic(),
        )
        self.requests.append(rec)
        ctx = _Ctx(request, endpoint, n, rec, faults=self._match(endpoint, n))
        ctx.request_id = f"req_{uuid.uuid4().hex[:16]}"
        ctx.trace_id = self._trace_id(request)
        for f in ctx.faults:
            if f.kind == "delay":
                await asyncio.sleep(f.delay_s)
        for f in ctx.faults:
            if f.kind == "refuse":
                return self._drop(request)
        try:
            body = await self._parse(ctx, spec_path_, method, schema)
            if isinstance(body, web.Response):
                return body
            if self.auto_sweep:
                self.ledger.sweep_expired()
            # pre-apply faults
            for f in ctx.faults:
                if f.kind == "throttle":
                    extra = {"X-RateLimit-Reset": "0"}
                    if f.retry_after is not None:
                        extra["Retry-After"] = f.retry_after
                    return self._error(
                        ctx, ErrorCode.LIMIT_EXCEEDED, "injected throttling", extra_headers=extra
                    )
                if f.kind == "status" and not f.apply:
                    return self._error(
                        ctx, f.code or ErrorCode.INTERNAL_ERROR, "injected failure", status=f.status
                    )
                if f.kind == "expire" and endpoint == "commit":
                    return self._error(
                        ctx, ErrorCode.RESERVATION_EXPIRED, "injected: reservation expired"
                    )
            try:
                return await handler(ctx, body)
            except CyclesError as exc:
                return self._error(ctx, exc.code, exc.message, details=exc.details or None)
            except sqlite3.Error as exc:
                return self._error(ctx, ErrorCode.INTERNAL_ERROR, f"ledger error: {exc}")
        except _Dropped:
            return self._drop(request)
        except Exception as exc:  # a bug in the fake: make the test fail loudly
            self.self_violations.append(f"{endpoint}: fake crashed: {traceback.format_exc()}")
            return self._error(ctx, ErrorCode.INTERNAL_ERROR, f"fake crashed: {exc!r}")

    @staticmethod
    def _drop(request: web.Request) -> web.StreamResponse:
        if request.transport is not None:
            request.transport.close()
        return web.Response(status=204)

    @staticmethod
    def _trace_id(request: web.Request) -> str:
        tp = _TRACEPARENT_RE.match(request.headers.get("traceparent", ""))
        if tp and tp.group(1) != "0" * 32 and tp.group(2) != "0" * 16:
            return tp.group(1)
        tid = request.headers.get("X-Cycles-Trace-Id", "")
        if _TRACE_RE.match(tid) and tid != "0" * 32:
            return tid
        return uuid.uuid4().hex

    async def _parse(
        self, ctx: _Ctx, path: str, method: str, schema: str | None
    ) -> Any | web.Response:
        """Authenticate and validate; returns the body, or an error response."""
        request = ctx.request
        # path parameter
        rid = request.match_info.get("reservation_id")
        if rid is not None and not 1 <= len(rid) <= 128:
            self._violation(ctx, "reservation_id path parameter must be 1..128 characters")
        # query
        for m in self.validator.query_errors(path, method, request.query):
            self._violation(ctx, m)
        body: Any = None
        if schema is not None:
            ctype = request.headers.get("Content-Type", "")
            if not ctype.startswith("application/json"):
                self._violation(ctx, f"Content-Type {ctype!r} is not application/json")
            raw = await request.read()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                self._violation(ctx, "body is not JSON")
                return self._error(ctx, ErrorCode.INVALID_REQUEST, "malformed JSON body")
            ctx.rec.body = body
            errors = self.validator.schema_errors(schema, body)
            for m in errors:
                self._violation(ctx, f"{schema}: {m}")
            header_key = request.headers.get("X-Idempotency-Key")
            body_key = body.get("idempotency_key") if isinstance(body, dict) else None
            if header_key is None:
                if self.require_idempotency_header:
                    self._violation(ctx, "X-Idempotency-Key header missing")
            elif header_key != body_key:
                self._violation(ctx, "X-Idempotency-Key does not match body.idempotency_key")
                return self._error(
                    ctx,
                    ErrorCode.INVALID_REQUEST,
                    "X-Idempotency-Key header does not match idempotency_key",
                )
            if errors:
                return self._error(ctx, ErrorCode.INVALID_REQUEST, "; ".join(errors)[:500])
        # authentication (after validation, so violations are recorded for any key)
        key = request.headers.get("X-Cycles-API-Key")
        if not key:
            self._violation(ctx, "X-Cycles-API-Key header missing")
        tenant = self.keys.get(key or "")
        if tenant is None:
            return self._error(ctx, ErrorCode.UNAUTHORIZED, "invalid or missing API key")
        ctx.tenant = tenant
        ctx.rec.tenant = tenant
        if isinstance(body, dict) and isinstance(body.get("subject"), dict):
            st = body["subject"].get("tenant")
            if st and str(st).lower() != tenant.lower():
                return self._error(
                    ctx, ErrorCode.FORBIDDEN, "subject.tenant does not match the API key's tenant"
                )
        return body

    # -- handlers --------------------------------------------------------------------------

    async def _reserve(self, ctx: _Ctx, body: dict[str, Any]) -> web.Response:
        assert ctx.tenant is not None
        dry = bool(body.get("dry_run", False))
        req = ReserveRequest(
            idempotency_key=body["idempotency_key"],
            subject=_subject(body["subject"]),
            action=_action(body["action"]),
            estimate=_amount(body["estimate"]),
            ttl_ms=body.get("ttl_ms", 60_000),
            grace_period_ms=body.get("grace_period_ms", 5_000),
            overage_policy=OveragePolicy(body.get("overage_policy", "ALLOW_IF_AVAILABLE")),
            dry_run=dry,
            metadata=body.get("metadata"),
        )
        res = self.ledger.reserve(req, tenant=ctx.tenant)
        if res.reservation_id is not None and not dry:
            entry = (ctx.tenant, res.reservation_id, req.idempotency_key)
            if entry not in self._index:
                self._index.append(entry)
        return self._ok(ctx, "ReservationCreateResponse", reservation_json(res, dry_run=dry))

    async def _commit(self, ctx: _Ctx, body: dict[str, Any]) -> web.Response:
        r = self.ledger.commit(
            ctx.request.match_info["reservation_id"],
            idempotency_key=body["idempotency_key"],
            actual=_amount(body["actual"]),
            metrics=_metrics(body.get("metrics")),
            metadata=body.get("metadata"),
            tenant=ctx.tenant,
        )
        out: dict[str, Any] = {"status": "COMMITTED", "charged": _amount_json(r.charged)}
        if r.released is not None:
            out["released"] = _amount_json(r.released)
        if r.balances:
            out["balances"] = [balance_json(b) for b in r.balances]
        return self._ok(ctx, "CommitResponse", out)

    async def _release(self, ctx: _Ctx, body: dict[str, Any]) -> web.Response:
        r = self.ledger.release(
            ctx.request.match_info["reservation_id"],
            idempotency_key=body["idempotency_key"],
            reason=body.get("reason"),
            tenant=ctx.tenant,
        )
        out: dict[str, Any] = {"status": "RELEASED", "released": _amount_json(r.released)}
        if r.balances:
            out["balances"] = [balance_json(b) for b in r.balances]
        return self._ok(ctx, "ReleaseResponse", out)

    async def _extend(self, ctx: _Ctx, body: dict[str, Any]) -> web.Response:
        r = self.ledger.extend(
            ctx.request.match_info["reservation_id"],
            idempotency_key=body["idempotency_key"],
            extend_by_ms=body["extend_by_ms"],
            tenant=ctx.tenant,
        )
        out: dict[str, Any] = {"status": "ACTIVE", "expires_at_ms": r.expires_at_ms}
        if r.remaining_ttl_ms is not None:
            out["remaining_ttl_ms"] = max(0, r.remaining_ttl_ms)
        if r.balances:
            out["balances"] = [balance_json(b) for b in r.balances]
        return self._ok(ctx, "ReservationExtendResponse", out)

    async def _event(self, ctx: _Ctx, body: dict[str, Any]) -> web.Response:
        r = self.ledger.event(
            idempotency_key=body["idempotency_key"],
            subject=_subject(body["subject"]),
            action=_action(body["action"]),
            actual=_amount(body["actual"]),
            overage_policy=OveragePolicy(body.get("overage_policy", "ALLOW_IF_AVAILABLE")),
            metrics=_metrics(body.get("metrics")),
            metadata=body.get("metadata"),
            tenant=ctx.tenant,
        )
        out: dict[str, Any] = {"status": "APPLIED", "event_id": r.event_id}
        if r.charged is not None:
            out["charged"] = _amount_json(r.charged)
        if r.balances:
            out["balances"] = [balance_json(b) for b in r.balances]
        return self._ok(ctx, "EventCreateResponse", out, status=201)

    async def _balances(self, ctx: _Ctx, _body: None) -> web.Response:
        assert ctx.tenant is not None
        q = ctx.request.query
        filters = {k: q[k] for k in SUBJECT_LEVELS if q.get(k)}
        if not filters:
            raise CyclesError(ErrorCode.INVALID_REQUEST, "at least one subject filter is required")
        if "tenant" in filters and filters["tenant"].lower() != ctx.tenant.lower():
            raise CyclesError(ErrorCode.FORBIDDEN, "tenant filter does not match the API key")
        filters["tenant"] = filters.get("tenant", ctx.tenant)
        balances = self.ledger.balances(Subject(**filters), tenant=ctx.tenant)
        return self._ok(
            ctx,
            "BalanceResponse",
            {"balances": [balance_json(b) for b in balances], "has_more": False},
        )

    def _summary(self, rec: ReservationRecord, idem: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "reservation_id": rec.reservation_id,
            "status": str(rec.status),
            "subject": dict(rec.subject),
            "action": dict(rec.action),
            "reserved": _amount_json(rec.reserved),
            "created_at_ms": rec.created_at_ms,
            "expires_at_ms": rec.expires_at_ms,
            "scope_path": rec.scope_path,
            "affected_scopes": _subject(rec.subject).scopes(),
        }
        if idem:
            out["idempotency_key"] = idem
        if str(rec.status) == "COMMITTED" and rec.charged is not None:
            out["committed"] = _amount_json(rec.charged)
        if str(rec.status) in ("COMMITTED", "RELEASED") and rec.finalized_at_ms is not None:
            out["finalized_at_ms"] = rec.finalized_at_ms
        return out

    async def _list(self, ctx: _Ctx, _body: None) -> web.Response:
        q = ctx.request.query
        if q.get("tenant") and ctx.tenant and q["tenant"].lower() != ctx.tenant.lower():
            raise CyclesError(ErrorCode.FORBIDDEN, "tenant filter does not match the API key")
        rows = []
        for tenant, rid, idem in reversed(self._index):
            if tenant != ctx.tenant:
                continue
            if q.get("idempotency_key") and q["idempotency_key"] != idem:
                continue
            rec = self.ledger.get_reservation(rid)
            if rec is None:
                continue
            if q.get("status") and q["status"] != str(rec.status):
                continue
            if any(q.get(k) and q[k] != rec.subject.get(k) for k in SUBJECT_LEVELS[1:]):
                continue
            rows.append(self._summary(rec, idem))
        start = int(q.get("cursor") or 0) if (q.get("cursor") or "0").isdigit() else 0
        limit = int(q.get("limit") or 50)
        page = rows[start : start + limit]
        out: dict[str, Any] = {"reservations": page, "has_more": start + limit < len(rows)}
        if out["has_more"]:
            out["next_cursor"] = str(start + limit)
        return self._ok(ctx, "ReservationListResponse", out)

    async def _get(self, ctx: _Ctx, _body: None) -> web.Response:
        rid = ctx.request.match_info["reservation_id"]
        rec = self.ledger.get_reservation(rid)
        if rec is None:
            raise CyclesError(ErrorCode.NOT_FOUND, f"Reservation {rid} not found")
        if ctx.tenant is None or rec.tenant != ctx.tenant.lower():
            raise CyclesError(ErrorCode.FORBIDDEN, "reservation belongs to another tenant")
        if str(rec.status) == "EXPIRED":
            raise CyclesError(ErrorCode.RESERVATION_EXPIRED, f"Reservation {rid} has expired")
        idem = next((i for _t, r, i in self._index if r == rid), None)
        return self._ok(ctx, "ReservationDetail", self._summary(rec, idem))

    async def _unknown(self, request: web.Request) -> web.Response:
        self.violations.append(f"{request.method} {request.path}: not a Cycles v0 endpoint")
        return web.json_response(
            {
                "error": "NOT_FOUND",
                "message": "unknown endpoint",
                "request_id": f"req_{uuid.uuid4().hex[:16]}",
            },
            status=404,
        )

    def routes(self) -> list[web.RouteDef]:
        def route(
            method: str,
            path: str,
            endpoint: str,
            schema: str | None,
            handler: Callable[[_Ctx, Any], Awaitable[web.Response]],
        ) -> web.RouteDef:
            async def h(request: web.Request) -> web.StreamResponse:
                return await self._run(request, endpoint, path, method.lower(), schema, handler)

            return web.route(method, path, h)

        return [
            route("POST", "/v1/reservations", "reserve", "ReservationCreateRequest", self._reserve),
            route("GET", "/v1/reservations", "list", None, self._list),
            route("GET", "/v1/reservations/{reservation_id}", "get", None, self._get),
            route(
                "POST",
                "/v1/reservations/{reservation_id}/commit",
                "commit",
                "CommitRequest",
                self._commit,
            ),
            route(
                "POST",
                "/v1/reservations/{reservation_id}/release",
                "release",
                "ReleaseRequest",
                self._release,
            ),
            route(
                "POST",
                "/v1/reservations/{reservation_id}/extend",
                "extend",
                "ReservationExtendRequest",
                self._extend,
            ),
            route("POST", "/v1/events", "event", "EventCreateRequest", self._event),
            route("GET", "/v1/balances", "balances", None, self._balances),
            web.route("*", "/{tail:.*}", self._unknown),
        ]


FAKE_KEY = web.AppKey("fake_cycles", FakeCycles)


def make_fake_cycles(
    *,
    keys: Mapping[str, str] | None = None,
    ledger: Ledger | None = None,
    db_path: str | os.PathLike[str] | None = None,
    clock_ms: Callable[[], int] | None = None,
    auto_sweep: bool = True,
    state: FakeCycles | None = None,
) -> web.Application:
    """Build the fake's aiohttp app. ``keys`` maps API key -> tenant. Pass ``state`` to serve an
    existing :class:`FakeCycles` (e.g. after a simulated outage); the app's ``FAKE_KEY`` holds it.
    """
    fake = state or FakeCycles(
        keys=keys or {}, ledger=ledger, db_path=db_path, clock_ms=clock_ms, auto_sweep=auto_sweep
    )
    app = web.Application()
    app[FAKE_KEY] = fake
    app.add_routes(fake.routes())
    return app


class FakeCyclesServer:
    """Runs a :class:`FakeCycles` on a real localhost socket; can go down and come back."""

    def __init__(self, fake: FakeCycles, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.fake = fake
        self.host = host
        self.port = port or _free_port(host)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def is_up(self) -> bool:
        return self._runner is not None

    async def up(self) -> None:
        if self._runner is not None:
            return
        runner = web.AppRunner(
            make_fake_cycles(state=self.fake),
            handle_signals=False,
            shutdown_timeout=0.5,
            access_log=None,
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        await site.start()
        self._runner = runner

    async def down(self) -> None:
        """Close the listener and every connection: clients get connection refused."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> FakeCyclesServer:
        await self.up()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.down()


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class VirtualClock:
    """Virtual time shared by a ledger (``now_ms``) and a RemoteAuthority (``monotonic`` /
    ``sleep``). ``sleep`` advances time instantly, but never past :attr:`limit`: a sleeper whose
    wake-up lies beyond it waits until the test raises the limit (:meth:`set_limit`); tests use
    :meth:`parked` to wait until the system under test is blocked there."""

    def __init__(self, start_ms: int = 1_800_000_000_000) -> None:
        self._base_ms = start_ms
        self._t = 0.0
        self.limit = float("inf")
        self._parked = 0
        self._limit_ev = asyncio.Event()
        self._parked_ev = asyncio.Event()

    def monotonic(self) -> float:
        return self._t

    def now_ms(self) -> int:
        return self._base_ms + round(self._t * 1000)

    def advance(self, seconds: float) -> None:
        self._t += seconds

    def set_limit(self, limit: float) -> None:
        self.limit = limit
        ev, self._limit_ev = self._limit_ev, asyncio.Event()
        ev.set()

    def _parked_changed(self, delta: int) -> None:
        self._parked += delta
        ev, self._parked_ev = self._parked_ev, asyncio.Event()
        ev.set()

    async def sleep(self, seconds: float) -> None:
        target = self._t + max(0.0, seconds)
        if target > self.limit:
            self._parked_changed(+1)
            try:
                while target > self.limit:
                    await self._limit_ev.wait()
            finally:
                self._parked_changed(-1)
        self._t = max(self._t, target)
        await asyncio.sleep(0)

    async def parked(self, count: int = 1, timeout_s: float = 10.0) -> None:
        """Wait (real time) until ``count`` sleepers are blocked on the limit."""
        async with asyncio.timeout(timeout_s):
            while self._parked < count:
                await self._parked_ev.wait()


# --------------------------------------------------------------------------------------------
# Standalone
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Fake Cycles v0 server (tests)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7878)
    p.add_argument("--db", help="SQLite ledger file (default: a temporary file)")
    p.add_argument("--key", action="append", default=[], help="API key mapping KEY=TENANT")
    p.add_argument(
        "--budget",
        action="append",
        default=[],
        help="budget SCOPE=UNIT:AMOUNT, e.g. tenant:acme=USD_MICROCENTS:100000000",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    keys = dict(k.split("=", 1) for k in args.key) or {"test-key": "acme"}
    fake = FakeCycles(keys=keys, db_path=args.db)
    for spec in args.budget:
        scope, rest = spec.split("=", 1)
        unit, amount = rest.split(":", 1)
        fake.ledger.set_budget(scope, unit, int(amount))
    print(f"fake Cycles on http://{args.host}:{args.port} keys for {sorted(keys.values())}")
    web.run_app(make_fake_cycles(state=fake), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
