"""API key -> tenant. Keys are stored only as SHA-256 hashes, next to the ledger in SQLite.

Keys are 256-bit random tokens, so an unsalted fast hash is safe (nothing to brute-force) and
cheap enough for the request path; lookups go by hash, so no secret is ever compared byte by byte
(and the final check uses ``hmac.compare_digest`` anyway).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cycles_proxy.authority.base import Subject

KEY_PREFIX = "cyp_"
ROLES = ("user", "admin")
#: what unconfigured clients send (Ollama docs tell OpenAI-SDK users to pass "ollama")
PLACEHOLDER_KEYS = frozenset({"", "ollama", "unused", "none", "null", "sk-no-key-required"})
TENANT_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_CACHE_TTL_S = 2.0
_CACHE_MAX = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_hash    TEXT PRIMARY KEY,
    key_id      TEXT NOT NULL UNIQUE,
    tenant      TEXT NOT NULL,
    role        TEXT NOT NULL DEFAULT 'user',
    label       TEXT,
    app         TEXT,
    created_ms  INTEGER NOT NULL,
    revoked_ms  INTEGER
);
CREATE INDEX IF NOT EXISTS api_keys_tenant ON api_keys(tenant);
"""


class KeyError_(ValueError):
    """A key-management request that cannot be carried out (bad tenant name, unknown key)."""


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    role: str
    key_id: str | None
    subject: Subject
    #: pass-through tenancy: the caller's own Cycles API key (never logged: repr=False)
    cycles_key: str | None = field(default=None, repr=False)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True, slots=True)
class KeyInfo:
    key_id: str
    tenant: str
    role: str
    label: str | None
    created_ms: int
    revoked_ms: int | None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def extract_key(headers: Mapping[str, str]) -> str | None:
    """The caller's key from ``Authorization: Bearer`` or ``x-api-key``; placeholders -> None."""
    auth = headers.get("Authorization")
    key: str | None = None
    if auth:
        scheme, _, rest = auth.strip().partition(" ")
        if scheme.lower() == "bearer":
            key = rest.strip()
    if not key:
        key = (headers.get("x-api-key") or "").strip()
    if not key or key.lower() in PLACEHOLDER_KEYS:
        return None
    return key


def validate_tenant(name: str) -> str:
    if not TENANT_RE.match(name):
        raise KeyError_(f"invalid tenant name {name!r}: use 1-128 letters, digits, '_', '-' or '.'")
    return name


class KeyStore:
    """API keys in the ledger's SQLite file. Safe to use from the proxy and the CLI at once."""

    def __init__(self, path: Path, *, app: str | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._app = app
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, Tenant | None]] = {}

    def close(self) -> None:
        with self._lock:  # never under a query running in a worker thread (admin key listing)
            self._db.close()

    def create(self, tenant: str, role: str = "user", label: str | None = None) -> tuple[str, str]:
        """Create a key; returns ``(secret, key_id)``. The secret is shown once, never stored."""
        validate_tenant(tenant)
        if role not in ROLES:
            raise KeyError_(f"role must be one of {', '.join(ROLES)}")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = "key_" + secrets.token_hex(6)
        with self._lock:
            self._db.execute(
                "INSERT INTO api_keys(key_hash, key_id, tenant, role, label, created_ms)"
                " VALUES (?,?,?,?,?,?)",
                (hash_key(secret), key_id, tenant, role, label, int(time.time() * 1000)),
            )
        return secret, key_id

    def list(self, tenant: str | None = None, include_revoked: bool = False) -> list[KeyInfo]:
        sql = "SELECT key_id, tenant, role, label, created_ms, revoked_ms FROM api_keys"
        where, args = [], []
        if tenant:
            where.append("tenant = ?")
            args.append(tenant)
        if not include_revoked:
            where.append("revoked_ms IS NULL")
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY tenant, created_ms"
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [KeyInfo(*r) for r in rows]

    def revoke(self, key_id: str) -> KeyInfo:
        with self._lock:
            cur = self._db.execute(
                "UPDATE api_keys SET revoked_ms = ? WHERE key_id = ? AND revoked_ms IS NULL",
                (int(time.time() * 1000), key_id),
            )
            if cur.rowcount == 0:
                raise KeyError_(f"no active key with id {key_id!r} (see `cycles-proxy keys list`)")
            row = self._db.execute(
                "SELECT key_id, tenant, role, label, created_ms, revoked_ms FROM api_keys"
                " WHERE key_id = ?",
                (key_id,),
            ).fetchone()
        self._cache.clear()
        return KeyInfo(*row)

    def lookup(self, key: str) -> Tenant | None:
        """The tenant owning ``key``, or None. Cached briefly so revocations apply within ~2 s."""
        h = hash_key(key)
        now = time.monotonic()
        hit = self._cache.get(h)
        if hit is not None and hit[0] > now:
            return hit[1]
        with self._lock:
            row = self._db.execute(
                "SELECT key_hash, key_id, tenant, role FROM api_keys"
                " WHERE key_hash = ? AND revoked_ms IS NULL",
                (h,),
            ).fetchone()
        tenant: Tenant | None = None
        if row is not None and hmac.compare_digest(row[0], h):
            tenant = self.tenant(row[2], row[3], row[1])
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[h] = (now + _CACHE_TTL_S, tenant)
        return tenant

    def tenant(self, name: str, role: str = "user", key_id: str | None = None) -> Tenant:
        return Tenant(name, role, key_id, Subject(tenant=name, app=self._app))
