"""Durable journal of settlements the remote authority could not deliver.

When a commit (or a direct-debit event) still fails after the remote authority's retries are
exhausted, the GPU time has nevertheless been spent (cycles-protocol.md §6: never release after
the work ran). The settlement is written here, one JSON file per record, and re-delivered later
with its ORIGINAL idempotency key, so the server charges it exactly once however many times it is
replayed.

Files follow the client-recovery profile's durable level: ``v2-<sha256(reservation_id or
idempotency_key)>.json``, written atomically (temp file, fsync, rename, directory fsync) with mode
0600 in a 0700 directory. A record never holds an API key: it names the tenant and the SHA-256 of
the key that was used, and the authority looks the key up again at replay time.

Replay rules (:meth:`Journal.replay`):

* delivered (200 commit / 201 event) -> record removed;
* commit answered 410 ``RESERVATION_EXPIRED`` -> the record is switched to event mode on disk
  first, then posted as ``POST /v1/events`` with the same idempotency key;
* commit answered 409 ``RESERVATION_FINALIZED`` -> already settled, record removed;
* 429 -> the record remembers a "not before" time and the round stops;
* transport error / 5xx / timeout -> the round stops, everything stays pending;
* any other protocol refusal (a genuine 4xx) -> the record is kept and reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from .base import AuthorityUnavailable, CyclesError, ErrorCode

log = logging.getLogger(__name__)

RECORD_VERSION = 2
EVENTS_ENDPOINT = "/v1/events"

Mode = Literal["commit", "event"]


def record_id_for(reservation_id: str | None, idempotency_key: str) -> str:
    """SHA-256 hex of the reservation id (commits) or of the idempotency key (direct events)."""
    basis = reservation_id if reservation_id else idempotency_key
    return hashlib.sha256(basis.encode("utf-8")).hexdigest()


def key_hash(api_key: str) -> str:
    """The only form in which an API key may be persisted or used as a cache key."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


@dataclass(slots=True)
class JournalRecord:
    """One undelivered settlement. ``endpoint`` + ``body`` is exactly what gets POSTed."""

    record_id: str
    mode: Mode
    endpoint: str
    body: dict[str, Any]
    idempotency_key: str
    #: tenant whose configured key is used at replay (None: use the authority's default key)
    tenant: str | None
    #: sha256 of the API key used originally (lets a pass-through key be found again)
    key_hash: str | None
    reservation_id: str | None = None
    #: the ``POST /v1/events`` body to use if the commit turns out to be expired (commit mode)
    fallback_body: dict[str, Any] | None = None
    created_at_ms: int = 0
    updated_at_ms: int = 0
    attempts: int = 0
    #: wall-clock ms before which the server asked us not to retry (429 Retry-After)
    not_before_ms: int | None = None
    last_error: str | None = None
    version: int = RECORD_VERSION

    @property
    def file_name(self) -> str:
        return f"v2-{self.record_id}.json"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JournalRecord:
        mode = data["mode"]
        if mode not in ("commit", "event"):
            raise ValueError(f"unknown journal record mode {mode!r}")
        body = data["body"]
        fallback = data.get("fallback_body")
        if not isinstance(body, dict) or (fallback is not None and not isinstance(fallback, dict)):
            raise ValueError("journal record body must be an object")
        return cls(
            record_id=str(data["record_id"]),
            mode=mode,
            endpoint=str(data["endpoint"]),
            body=body,
            idempotency_key=str(data["idempotency_key"]),
            tenant=data.get("tenant"),
            key_hash=data.get("key_hash"),
            reservation_id=data.get("reservation_id"),
            fallback_body=fallback,
            created_at_ms=int(data.get("created_at_ms", 0)),
            updated_at_ms=int(data.get("updated_at_ms", 0)),
            attempts=int(data.get("attempts", 0)),
            not_before_ms=data.get("not_before_ms"),
            last_error=data.get("last_error"),
            version=int(data.get("version", RECORD_VERSION)),
        )

    def switch_to_event(self) -> None:
        """Commit expired: from now on this record is the ``POST /v1/events`` fallback."""
        if self.fallback_body is None:
            raise ValueError("record has no event fallback")
        self.mode = "event"
        self.endpoint = EVENTS_ENDPOINT
        self.body = self.fallback_body
        self.fallback_body = None
        self.not_before_ms = None


class SettlementSender(Protocol):
    """What :meth:`Journal.replay` needs from the authority (``RemoteAuthority`` provides it)."""

    def journal_api_key(self, tenant: str | None, key_hash: str | None) -> str | None:
        """The API key to replay with, or None when it is not known (yet) in this process."""
        ...

    async def deliver_settlement(
        self, endpoint: str, body: Mapping[str, Any], api_key: str
    ) -> Mapping[str, Any]:
        """POST once-per-call (with the authority's own retries); raises CyclesError for
        protocol refusals and AuthorityUnavailable when the outcome stays unknown."""
        ...

    def settlement_delivered(self, record: JournalRecord) -> None:
        """Hook: the record has been settled (or was already) and is about to be removed."""
        ...


@dataclass(slots=True)
class ReplayReport:
    delivered: int = 0
    #: commits the server reported as already finalized (settled earlier)
    finalized: int = 0
    #: commits that had expired and were delivered as events
    recovered_as_event: int = 0
    #: skipped because a 429 "not before" time has not passed yet
    deferred: int = 0
    #: record ids whose API key is not known in this process
    missing_key: list[str] = field(default_factory=list)
    #: (record id, error code, message) of genuine protocol refusals; records are kept
    rejected: list[tuple[str, str, str]] = field(default_factory=list)
    #: True when the round stopped because the authority was unreachable
    unavailable: bool = False
    pending: int = 0


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Journal:
    """A directory of pending settlement records; see the module docstring."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            os.chmod(self.directory, 0o700)
        self._records: dict[str, JournalRecord] = {}
        self._replay_lock = asyncio.Lock()
        self._load()

    # -- inspection -------------------------------------------------------------------------

    def pending(self) -> int:
        return len(self._records)

    def records(self) -> list[JournalRecord]:
        return sorted(self._records.values(), key=lambda r: (r.created_at_ms, r.record_id))

    def get(self, record_id: str) -> JournalRecord | None:
        return self._records.get(record_id)

    # -- writing ----------------------------------------------------------------------------

    async def add(self, record: JournalRecord) -> None:
        """Persist (or overwrite) a record durably before returning."""
        now = _now_ms()
        if not record.created_at_ms:
            record.created_at_ms = now
        record.updated_at_ms = now
        await asyncio.to_thread(self._write_sync, record)
        self._records[record.record_id] = record

    async def remove(self, record_id: str) -> None:
        record = self._records.pop(record_id, None)
        if record is not None:
            await asyncio.to_thread(self._unlink_sync, record.file_name)

    def _write_sync(self, record: JournalRecord) -> None:
        data = json.dumps(record.to_json(), separators=(",", ":"), sort_keys=True).encode()
        final = self.directory / record.file_name
        tmp = self.directory / f".{record.file_name}.{os.getpid()}.{time.monotonic_ns()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._fsync_dir()

    def _unlink_sync(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.directory / name)
        self._fsync_dir()

    def _fsync_dir(self) -> None:
        try:
            dfd = os.open(self.directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dfd)
        except OSError:
            pass
        finally:
            os.close(dfd)

    def _load(self) -> None:
        for path in sorted(self.directory.glob("v2-*.json")):
            try:
                record = JournalRecord.from_json(json.loads(path.read_text("utf-8")))
                if path.name != record.file_name:
                    raise ValueError("file name does not match record id")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("journal: unreadable record %s (%s); moved aside", path.name, exc)
                with contextlib.suppress(OSError):
                    os.replace(path, path.with_name(path.name + ".corrupt"))
                continue
            self._records[record.record_id] = record
        # leftovers of writes interrupted by a crash (not the live writes of another process)
        stale_before = time.time() - 300
        for tmp in self.directory.glob(".v2-*.tmp"):
            with contextlib.suppress(OSError):
                if tmp.stat().st_mtime < stale_before:
                    tmp.unlink()

    # -- replay -----------------------------------------------------------------------------

    async def replay(self, authority: SettlementSender) -> ReplayReport:
        """Re-deliver pending records with their original idempotency keys (module docstring)."""
        report = ReplayReport()
        async with self._replay_lock:
            for record in self.records():
                if record.record_id not in self._records:
                    continue
                if record.not_before_ms is not None and _now_ms() < record.not_before_ms:
                    report.deferred += 1
                    continue
                api_key = authority.journal_api_key(record.tenant, record.key_hash)
                if api_key is None:
                    report.missing_key.append(record.record_id)
                    continue
                if not await self._replay_one(authority, record, api_key, report):
                    break
        report.pending = self.pending()
        if report.delivered or report.finalized or report.rejected or report.unavailable:
            log.info(
                "journal replay: delivered=%d finalized=%d as_event=%d rejected=%d pending=%d%s",
                report.delivered,
                report.finalized,
                report.recovered_as_event,
                len(report.rejected),
                report.pending,
                " (authority unavailable)" if report.unavailable else "",
            )
        return report

    async def _replay_one(
        self,
        authority: SettlementSender,
        record: JournalRecord,
        api_key: str,
        report: ReplayReport,
    ) -> bool:
        """Deliver one record; False means stop the round (authority down or throttling)."""
        while True:
            record.attempts += 1
            try:
                await authority.deliver_settlement(record.endpoint, record.body, api_key)
            except CyclesError as exc:
                if record.mode == "commit" and exc.code is ErrorCode.RESERVATION_FINALIZED:
                    log.info("journal: %s already finalized; dropping", record.record_id)
                    report.finalized += 1
                    await self._settled(authority, record)
                    return True
                if (
                    record.mode == "commit"
                    and exc.code is ErrorCode.RESERVATION_EXPIRED
                    and record.fallback_body is not None
                ):
                    # durable level: switch the record to event mode BEFORE the event retry
                    record.switch_to_event()
                    record.last_error = str(exc.code)
                    await self.add(record)
                    report.recovered_as_event += 1
                    continue
                record.last_error = f"{exc.code}: {exc.message}"
                if exc.code is ErrorCode.LIMIT_EXCEEDED:
                    delay_ms = (exc.retry_after_s or 1) * 1000
                    record.not_before_ms = _now_ms() + delay_ms
                    await self.add(record)
                    report.deferred += 1
                    return False
                await self.add(record)
                report.rejected.append((record.record_id, str(exc.code), exc.message))
                log.warning(
                    "journal: %s rejected by the authority (%s); kept for an operator",
                    record.record_id,
                    exc.code,
                )
                return True
            except AuthorityUnavailable as exc:
                record.last_error = f"unavailable: {exc}"
                await self.add(record)
                report.unavailable = True
                return False
            report.delivered += 1
            await self._settled(authority, record)
            return True

    async def _settled(self, authority: SettlementSender, record: JournalRecord) -> None:
        authority.settlement_delivered(record)
        await self.remove(record.record_id)
