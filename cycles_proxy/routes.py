"""The route table: which requests are metered (and in which dialect), admin-only or passed through.

Pure. Classification runs on a *normalised* path (percent-decoded, dot segments resolved, repeated
and trailing slashes folded) so that no spelling of a path can dodge metering or the admin rule;
the request is still forwarded with the path the client sent.
"""

from __future__ import annotations

import enum
import posixpath
from dataclasses import dataclass
from urllib.parse import unquote


class Dialect(enum.StrEnum):
    OLLAMA = "ollama"
    OPENAI = "openai"


class Kind(enum.StrEnum):
    METERED = "metered"
    ADMIN_ONLY = "admin_only"
    PASS = "pass"
    PUBLIC = "public"  # liveness checks that clients send without a key


@dataclass(frozen=True, slots=True)
class Route:
    kind: Kind
    dialect: Dialect
    #: short endpoint name for metered routes ("chat", "chat_completions", ...), else ""
    endpoint: str = ""
    #: Cycles action kind for metered routes
    action_kind: str = ""


METERED: dict[str, tuple[Dialect, str, str]] = {
    "/api/chat": (Dialect.OLLAMA, "chat", "llm.completion"),
    "/api/generate": (Dialect.OLLAMA, "generate", "llm.completion"),
    "/api/embed": (Dialect.OLLAMA, "embed", "llm.embedding"),
    "/api/embeddings": (Dialect.OLLAMA, "embeddings", "llm.embedding"),
    "/v1/chat/completions": (Dialect.OPENAI, "chat_completions", "llm.completion"),
    "/v1/completions": (Dialect.OPENAI, "completions", "llm.completion"),
    "/v1/embeddings": (Dialect.OPENAI, "v1_embeddings", "llm.embedding"),
    "/v1/responses": (Dialect.OPENAI, "responses", "llm.completion"),
}

ADMIN_PREFIXES = (
    "/api/pull",
    "/api/push",
    "/api/create",
    "/api/copy",
    "/api/delete",
    "/api/blobs",
)

PUBLIC_PATHS = frozenset({"/", "/api/version"})


def normalise(path: str) -> str:
    """The path as a router that decodes and cleans paths would see it."""
    # decode repeatedly so %252F-style double encoding cannot hide a segment
    for _ in range(3):
        decoded = unquote(path)
        if decoded == path:
            break
        path = decoded
    path = path.replace("\\", "/")
    norm = posixpath.normpath("/" + path.lstrip("/"))
    # posixpath keeps a leading "//"; fold it
    return "/" + norm.lstrip("/")


def classify(path: str) -> Route:
    """Route for a request path (as aiohttp's ``request.path``: already percent-decoded once)."""
    p = normalise(path)
    low = p.lower()
    hit = METERED.get(p) or METERED.get(low)
    if hit:
        return Route(Kind.METERED, hit[0], hit[1], hit[2])
    dialect = Dialect.OPENAI if low.startswith("/v1/") else Dialect.OLLAMA
    for prefix in ADMIN_PREFIXES:
        if low == prefix or low.startswith(prefix + "/"):
            return Route(Kind.ADMIN_ONLY, dialect)
    if p in PUBLIC_PATHS:
        return Route(Kind.PUBLIC, dialect)
    return Route(Kind.PASS, dialect)
