"""A/B experiments on cycles-proxy: several variants side by side, alternating, same upstream.

Each variant is one cycles-proxy process (``bench/serve_cycles.py``) with its own flags and,
optionally, its own source tree (a patched copy of ``cycles_proxy/`` elsewhere; the project's
tree is never touched). Rounds alternate the variants; per variant the report gives the median
over rounds of p50/p99 latency and, the figure least disturbed by other load on the machine,
the proxy's own CPU time per request.

Run: ``python -m bench.ab --variant base= --variant uvloop=,--uvloop
--variant patched=/tmp/exp/src --rounds 5`` (``NAME=SRC[,flag...]``; empty SRC = this tree).
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import pct
from bench.targets import ROOT, Proc, cpu_ticks, free_port, python_argv, read_key, spawn
from bench.targets import wait_port as _wait_port

WORKLOADS: dict[str, tuple[str, dict[str, Any], int, int, bool]] = {
    # name: (path, body extras, concurrency, requests, streaming)
    "c1": ("/v1/chat/completions", {"model": "bench-n16"}, 1, 600, False),
    "c16": ("/v1/chat/completions", {"model": "bench-n16"}, 16, 2500, False),
    "sse16": ("/v1/chat/completions", {"model": "bench-n100-i0", "stream": True}, 16, 160, True),
    "ndjson16": ("/api/chat", {"model": "bench-n100-i0"}, 16, 160, True),
    "pass1": ("/bench-passthrough/v1/chat/completions", {"model": "bench-n16"}, 1, 600, False),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", action="append", required=True, metavar="NAME=SRC[,flag...]")
    p.add_argument("--workload", action="append", default=[], choices=sorted(WORKLOADS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--nice", type=int, default=-10)
    p.add_argument("--json", help="write the per-round numbers here")
    args = p.parse_args()
    # SIGTERM stops the run like Ctrl-C: every process it started is stopped on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workloads = args.workload or ["c1", "c16"]
    work = Path(tempfile.mkdtemp(prefix="cycles-ab-"))
    procs: list[Proc] = []
    up_port = free_port()
    up = spawn("upstream", python_argv("bench.upstream", "--port", str(up_port)), work,
               nice=args.nice)  # fmt: skip
    procs.append(up)
    variants: dict[str, tuple[int, Proc, str]] = {}
    try:
        _wait_port(up_port, 20, up.popen)
        for spec in args.variant:
            name, _, rest = spec.partition("=")
            src_s, *flags = rest.split(",") if rest else [""]
            db = work / f"{name}.db"
            port = free_port()
            argv = python_argv(
                "bench.serve_cycles",
                "--port",
                str(port),
                "--upstream",
                f"http://127.0.0.1:{up_port}",
                "--db",
                str(db),
                "--bootstrap",
                str(work / f"{name}.key"),
                *flags,
                src=Path(src_s) if src_s else None,
            )
            proc = spawn(name, argv, work, nice=args.nice)
            procs.append(proc)
            variants[name] = (port, proc, read_key(work / f"{name}.key", proc.popen))
        for port, proc, _ in variants.values():
            _wait_port(port, 30, proc.popen)
        rows: dict[tuple[str, str], list[dict[str, float]]] = {}
        names = list(variants)
        for rnd in range(args.rounds):
            for wl in workloads:
                path, extra, c, n, stream = WORKLOADS[wl]
                body = {"messages": [{"role": "user", "content": "hi"}], **extra}
                k = rnd % len(names)
                for name in names[k:] + names[:k]:
                    port, proc, key = variants[name]
                    pids = proc.pids()
                    cpu0 = cpu_ticks(pids)
                    out = subprocess.run(
                        [
                            "nice",
                            "-n",
                            str(args.nice),
                            *python_argv(
                                "bench.loadgen",
                                "stream" if stream else "latency",
                                "--url",
                                f"http://127.0.0.1:{port}{path}",
                                "--body",
                                json.dumps(body),
                                "--header",
                                f"Authorization: Bearer {key}",
                                "-c",
                                str(c),
                                "-n",
                                str(n),
                                "--warmup",
                                str(2 * c),
                                "--duration",
                                "20",
                                *(["--throughput"] if stream else []),
                            ),
                        ],
                        capture_output=True,
                        cwd=ROOT,
                        check=True,
                        timeout=80,
                    )
                    r = json.loads(out.stdout)
                    cpu = (cpu_ticks(pids) - cpu0) / 100
                    lat = r["lat_us"]
                    row = {
                        "ok": r["ok"],
                        "rps": r["rps"],
                        "p50_ms": pct(lat, 0.5) / 1000,
                        "p99_ms": pct(lat, 0.99) / 1000,
                        "cpu_us_per_req": cpu / max(1, r["ok"] + 2 * c) * 1e6,
                    }
                    if stream:
                        row["tokens_per_s"] = r["tokens_per_s"]
                        row["cpu_us_per_token"] = cpu / max(1, r["tokens"]) * 1e6
                    rows.setdefault((wl, name), []).append(row)
                    print(f"r{rnd} {wl:8s} {name:14s} " + json.dumps(
                        {k2: round(v, 3) for k2, v in row.items()}), flush=True)  # fmt: skip
                    time.sleep(0.2)
        print()
        for wl in workloads:
            print(f"== {wl}: medians over {args.rounds} rounds")
            for name in names:
                rs = rows[(wl, name)]
                med = {k2: statistics.median(r[k2] for r in rs) for k2 in rs[0]}
                print(f"  {name:14s} " + "  ".join(f"{k2} {v:,.3f}" for k2, v in med.items()))
        if args.json:
            Path(args.json).write_text(
                json.dumps({f"{wl}|{name}": v for (wl, name), v in rows.items()})
            )
    finally:
        for proc in reversed(procs):
            proc.stop()


if __name__ == "__main__":
    main()
