"""What the proxy tells operators: one JSON access-log line per request (and, later, metrics).

Keys never reach this module: records carry tenant names and key ids only.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field, fields
from typing import Any

import orjson

log = logging.getLogger("cycles_proxy")
_access = logging.getLogger("cycles_proxy.access")


@dataclass(slots=True)
class RequestRecord:
    """Everything known about one request when it ends."""

    method: str
    path: str
    route: str
    tenant: str | None = None
    key_id: str | None = None
    model: str | None = None
    status: int = 0
    #: allowed | denied | error | passthrough | unauthorized | forbidden | bad_request | ...
    outcome: str = ""
    reservation_id: str | None = None
    estimate: int | None = None
    charged: int | None = None
    unit: str | None = None
    #: committed | released | evented | journaled | none
    settlement: str | None = None
    gpu_seconds: float | None = None
    tokens_input: int | None = None
    tokens_output: int | None = None
    ttfb_ms: float | None = None
    #: from sending the request upstream to its last byte (the lifecycle's ``wall_ns``)
    upstream_ms: float | None = None
    duration_ms: float = 0.0
    #: why a denied request was denied: the Cycles error code in lower case, or ``no_budget``
    denial_reason: str | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


_FIELDS = tuple(f.name for f in fields(RequestRecord))


class Observer:
    """Receives every finished request. Subclass or extend to add metrics exporters."""

    def __init__(self, access_log: bool = True) -> None:
        self.access_log = access_log
        self.listeners: list[Any] = []

    def record(self, rec: RequestRecord) -> None:
        for listener in self.listeners:
            try:
                listener(rec)
            except Exception:  # an exporter bug must never break a request
                log.exception("request listener failed")
        if self.access_log:
            # a shallow walk of the slots: asdict() deep-copies every value on the hot path
            d = {k: v for k in _FIELDS if (v := getattr(rec, k)) is not None and v != {}}
            d["ts"] = round(time.time(), 3)
            try:
                line = orjson.dumps(d, default=str).decode()
            except TypeError:  # e.g. an integer beyond 64 bits: the stdlib writes anything
                line = json.dumps(d, separators=(",", ":"), default=str)
            _access.info(line)


def configure_logging(level: str = "INFO") -> None:
    root = logging.getLogger("cycles_proxy")
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
