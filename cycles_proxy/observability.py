"""What the proxy tells operators: one JSON access-log line per request (and, later, metrics).

Keys never reach this module: records carry tenant names and key ids only.
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import sys
import threading
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


#: log lines waiting for the writer thread; past this the newest are dropped (and counted)
LOG_QUEUE_MAX = 100_000


class _QueueHandler(logging.handlers.QueueHandler):
    """Formats on the caller's thread, hands the line to the writer thread, never blocks: an
    event loop blocked on a full stderr pipe (a slow log collector) would stall every stream."""

    def __init__(self, q: queue.Queue[logging.LogRecord | None]) -> None:
        super().__init__(q)
        self.dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


class _LogWriter(threading.Thread):
    """Writes queued lines to stderr; a daemon, so a stuck stderr cannot hold the exit."""

    def __init__(self, source: _QueueHandler, target: logging.Handler) -> None:
        super().__init__(name="cycles-proxy-log", daemon=True)
        self.source, self.target, self.reported = source, target, 0
        self.queue: queue.Queue[logging.LogRecord | None] = source.queue  # type: ignore[assignment]

    def run(self) -> None:
        while (record := self.queue.get()) is not None:
            if self.source.dropped != self.reported:
                n, self.reported = self.source.dropped - self.reported, self.source.dropped
                self.target.handle(
                    logging.makeLogRecord(
                        {"msg": f"{n} log lines dropped: stderr did not keep up", "levelno": 30}
                    )
                )
            self.target.handle(record)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (for at most ``timeout`` seconds), then stop."""
        try:
            self.queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self.join(timeout)


def configure_logging(level: str = "INFO") -> None:
    root = logging.getLogger("cycles_proxy")
    if root.handlers:
        return
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(logging.Formatter("%(message)s"))
    handler = _QueueHandler(queue.Queue(LOG_QUEUE_MAX))
    handler.setFormatter(logging.Formatter("%(message)s"))
    writer = _LogWriter(handler, stderr)
    writer.start()
    atexit.register(writer.close)
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
