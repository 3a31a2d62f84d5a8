"""The benchmark's load generator: closed-loop HTTP/1.1 clients on persistent connections.

One process, one event loop (uvloop), bare asyncio protocols: cheap enough to leave the CPU to the
target on a 2-core machine, precise enough to time single tokens. Modes:

* ``latency``: ``-c`` connections each send non-streaming requests back to back until ``-n``
  requests or ``--duration`` seconds; the first ``--warmup`` answers are not counted.
* ``stream``: the same with streamed answers; per stream the time to first token (request
  written -> first token read) and, per token, its delivery delay (token read -> the
  ``CLOCK_MONOTONIC`` stamp the upstream wrote into it, see ``bench/upstream.py``).
  ``--throughput`` skips per-token bookkeeping and reports tokens per second.
* ``hold``: opens ``-c`` streams, waits until every one has delivered its first token, samples
  the resident memory of ``--pids`` for a second, then hangs up on all of them.

Every loop is bounded by a count and a deadline, and the target must be a loopback address.
Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

from bench.httpwire import BodyReader, Head, close_quietly, install_uvloop, parse_head

MARKER = re.compile(rb"@(\d{6,20})@")


@dataclass(slots=True)
class Outcome:
    status: int = 0
    sent_ns: int = 0
    done_ns: int = 0
    first_token_ns: int = 0
    tokens: int = 0
    delays_ns: list[int] = field(default_factory=list)
    error: str | None = None


class Conn(asyncio.Protocol):
    """One persistent client connection; one request at a time."""

    def __init__(self, track_tokens: bool, keep_delays: bool) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.head: Head | None = None
        self.reader: BodyReader | None = None
        self.body = bytearray()
        self.scan_pos = 0
        self.track = track_tokens
        self.keep_delays = keep_delays
        self.out: Outcome | None = None
        self.waiter: asyncio.Future[Outcome] | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        self.transport = None
        if self.waiter is not None and not self.waiter.done():
            assert self.out is not None
            if self.reader is not None and self.reader._mode == "eof":
                self._finish()
            else:
                self.out.error = f"connection lost: {exc}"
                self.waiter.set_result(self.out)

    def send(self, data: bytes) -> asyncio.Future[Outcome]:
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        self.out = Outcome()
        self.head = None
        self.reader = None
        self.body.clear()
        self.scan_pos = 0
        if self.transport is None:
            self.out.error = "not connected"
            self.waiter.set_result(self.out)
            return self.waiter
        self.out.sent_ns = time.monotonic_ns()
        self.transport.write(data)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        if self.out is None:
            return
        self.buf += data
        if self.head is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head = parse_head(bytes(self.buf[:end]))
            del self.buf[: end + 4]
            try:
                self.out.status = int(self.head.first_line[1])
            except (IndexError, ValueError):
                self.out.status = 0
            self.reader = BodyReader(self.head, eof_body=True)
        assert self.reader is not None
        decoded, used = self.reader.feed(self.buf)
        del self.buf[:used]
        if self.track and decoded:
            self.body += decoded
            self._scan(now)
        if self.reader.done:
            self._finish()

    def _scan(self, now: int) -> None:
        out = self.out
        assert out is not None
        last = self.scan_pos
        count = 0
        for m in MARKER.finditer(self.body, self.scan_pos):
            count += 1
            last = m.end()
            if self.keep_delays:
                out.delays_ns.append(now - int(m.group(1)))
        if count:
            if not out.tokens:
                out.first_token_ns = now
            out.tokens += count
            self.scan_pos = last
            if last > 65536:  # keep the buffer short on long streams
                del self.body[:last]
                self.scan_pos = 0

    def _finish(self) -> None:
        assert self.out is not None and self.waiter is not None
        self.out.done_ns = time.monotonic_ns()
        if not self.waiter.done():
            self.waiter.set_result(self.out)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def request_bytes(url: str, body: bytes, headers: list[str]) -> tuple[str, int, bytes]:
    u = urlsplit(url)
    host = u.hostname or "127.0.0.1"
    if not ipaddress.ip_address(socket.gethostbyname(host)).is_loopback:
        raise SystemExit(f"refusing to load a non-loopback target: {host}")
    port = u.port or 80
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        "Accept: */*",
        f"Content-Length: {len(body)}",
        *headers,
    ]
    return host, port, ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def open_conn(host: str, port: int, track: bool, keep_delays: bool) -> Conn:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(lambda: Conn(track, keep_delays), host, port)
    return proto


def pct(values: list[int], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q * (len(s) - 1))))
    return float(s[k])


async def run_closed_loop(args: argparse.Namespace, stream: bool) -> dict[str, Any]:
    host, port, data = request_bytes(args.url, args.body.encode(), args.header)
    track = stream
    keep_delays = stream and not args.throughput
    conns = [await open_conn(host, port, track, keep_delays) for _ in range(args.c)]
    issued = 0
    results: list[Outcome] = []
    errors: dict[str, int] = {}
    statuses: dict[int, int] = {}
    deadline = time.monotonic() + args.duration
    t_start = [0]

    async def worker(i: int) -> None:
        nonlocal issued
        conn = conns[i]
        while issued < args.n + args.warmup and time.monotonic() < deadline:
            issued += 1
            n = issued
            if conn.transport is None:
                conn = conns[i] = await open_conn(host, port, track, keep_delays)
            out = await conn.send(data)
            if n == args.warmup + 1 or (args.warmup == 0 and n == 1):
                t_start[0] = out.sent_ns
            if out.error:
                errors[out.error] = errors.get(out.error, 0) + 1
                conn.abort()
                conns[i] = await open_conn(host, port, track, keep_delays)
                conn = conns[i]
                continue
            statuses[out.status] = statuses.get(out.status, 0) + 1
            if n > args.warmup:
                results.append(out)

    t0 = time.monotonic_ns()
    await asyncio.gather(*(worker(i) for i in range(args.c)))
    t1 = time.monotonic_ns()
    for conn in conns:
        close_quietly(conn.transport)
    ok = [r for r in results if r.status == 200]
    first = min((r.sent_ns for r in ok), default=t0)
    last = max((r.done_ns for r in ok), default=t1)
    span_s = max(1e-9, (last - first) / 1e9)
    report: dict[str, Any] = {
        "mode": "stream" if stream else "latency",
        "c": args.c,
        "requests": len(results),
        "ok": len(ok),
        "statuses": {str(k): v for k, v in statuses.items()},
        "errors": errors,
        "elapsed_s": (t1 - t0) / 1e9,
        "rps": len(ok) / span_s,
        "lat_us": [round((r.done_ns - r.sent_ns) / 1000, 1) for r in ok],
    }
    if stream:
        tokens = sum(r.tokens for r in ok)
        report["tokens"] = tokens
        report["tokens_per_s"] = tokens / span_s
        report["ttft_us"] = [
            round((r.first_token_ns - r.sent_ns) / 1000, 1) for r in ok if r.tokens
        ]
        report["tokens_per_stream"] = [r.tokens for r in ok]
        if keep_delays:
            report["chunk_delay_us"] = [round(d / 1000, 1) for r in ok for d in r.delays_ns]
    return report


def rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


async def run_hold(args: argparse.Namespace) -> dict[str, Any]:
    host, port, data = request_bytes(args.url, args.body.encode(), args.header)
    pids = [int(p) for p in args.pids.split(",") if p] if args.pids else []
    before_kb = rss_kb(pids)
    conns: list[Conn] = []
    waiters: list[asyncio.Future[Outcome]] = []
    deadline = time.monotonic() + args.duration
    errors = 0
    t0 = time.monotonic()
    for start in range(0, args.c, 50):
        batch = await asyncio.gather(
            *(open_conn(host, port, True, False) for _ in range(start, min(args.c, start + 50))),
            return_exceptions=True,
        )
        for conn in batch:
            if isinstance(conn, BaseException):
                errors += 1
                continue
            conns.append(conn)
            waiters.append(conn.send(data))
        await asyncio.sleep(0.02)
    # wait until every stream has delivered a token (or ended, or the deadline passed)
    while time.monotonic() < deadline:
        started = sum(1 for c in conns if c.out is not None and c.out.tokens > 0)
        if started >= len(conns):
            break
        await asyncio.sleep(0.05)
    open_s = time.monotonic() - t0
    started = sum(1 for c in conns if c.out is not None and c.out.tokens > 0)
    still_open = sum(1 for w in waiters if not w.done())
    samples = []
    for _ in range(10):
        samples.append(rss_kb(pids))
        await asyncio.sleep(0.1)
    still_open_after = sum(1 for w in waiters if not w.done())
    for conn in conns:
        conn.abort()
    await asyncio.sleep(0.2)
    failed = [w.result() for w in waiters if w.done() and w.result().status not in (200, 0)]
    return {
        "mode": "hold",
        "c": args.c,
        "connected": len(conns),
        "connect_errors": errors,
        "streaming": started,
        "open_while_sampling": min(still_open, still_open_after),
        "non_200": len(failed),
        "open_s": open_s,
        "rss_before_kb": before_kb,
        "rss_kb_samples": samples,
        "rss_peak_kb": max(samples) if samples else 0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("latency", "stream", "hold"))
    p.add_argument("--url", required=True)
    p.add_argument("--body", required=True)
    p.add_argument("--header", action="append", default=[], help="'Name: value'")
    p.add_argument("-c", type=int, default=1, help="concurrent connections")
    p.add_argument("-n", type=int, default=1000, help="measured requests (all connections)")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--duration", type=float, default=10.0, help="hard time limit, seconds")
    p.add_argument("--throughput", action="store_true", help="stream: no per-token delays")
    p.add_argument("--pids", default="", help="hold: comma-separated pids to sample RSS of")
    args = p.parse_args()
    install_uvloop()
    if args.mode == "hold":
        report = asyncio.run(run_hold(args))
    else:
        report = asyncio.run(run_closed_loop(args, stream=args.mode == "stream"))
    json.dump(report, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
