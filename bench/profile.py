"""Profile cycles-proxy's request path under load with py-spy (from ``.venv-bench``).

Starts the fake upstream and one cycles-proxy (metered, embedded ledger), drives it with the
load generator, samples it with ``py-spy record --format raw`` and prints the functions with
the most samples (self and inclusive). ``--src`` profiles another source tree (an experiment).

Run: ``python -m bench.profile --workload lat-c16`` (workloads: lat-c1, lat-c16, stream-c16,
passthrough-c16).
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.targets import (
    BENCH_VENV,
    ROOT,
    free_port,
    python_argv,
    read_key,
    spawn,
    wait_port,
)

WORKLOADS = {
    # name: (path, body, concurrency, streaming)
    "lat-c1": ("/v1/chat/completions", {"model": "bench-n16"}, 1, False),
    "lat-c16": ("/v1/chat/completions", {"model": "bench-n16"}, 16, False),
    "passthrough-c16": (
        "/bench-passthrough/v1/chat/completions",
        {"model": "bench-n16"},
        16,
        False,
    ),
    "stream-c16": ("/v1/chat/completions", {"model": "bench-n200-i0", "stream": True}, 16, True),
    "ndjson-c16": ("/api/chat", {"model": "bench-n200-i0"}, 16, True),
}


def summarize(raw: Path, top: int) -> str:
    self_: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n_s = line.rpartition(" ")
        n = int(n_s)
        total += n
        frames = stack.split(";")
        self_[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    out = [f"samples: {total}", "", "self:"]
    out += [f"{n / total * 100:5.1f}%  {f}" for f, n in self_.most_common(top)]
    out += ["", "inclusive (cycles_proxy and aiohttp frames):"]
    out += [
        f"{n / total * 100:5.1f}%  {f}"
        for f, n in incl.most_common(top * 6)
        if "cycles_proxy" in f or "aiohttp" in f
    ][: top * 2]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="lat-c16")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--src", help="cycles_proxy source tree to profile instead of the project's")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", help="write the raw py-spy samples here")
    p.add_argument("--nice", type=int, default=-10)
    p.add_argument(
        "--serve-arg", action="append", default=[], help="extra bench.serve_cycles argument"
    )
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cycles-profile-"))
    up_port, px_port = free_port(), free_port()
    up = spawn("upstream", python_argv("bench.upstream", "--port", str(up_port)), work, nice=0)
    db = work / "ledger.db"
    src = Path(args.src) if args.src else None
    px = spawn(
        "proxy",
        python_argv(
            "bench.serve_cycles",
            "--port",
            str(px_port),
            "--upstream",
            f"http://127.0.0.1:{up_port}",
            "--db",
            str(db),
            "--bootstrap",
            str(work / "key"),
            *args.serve_arg,
            src=src,
        ),
        work,
        nice=args.nice,
    )
    key = read_key(work / "key", px.popen)
    try:
        wait_port(up_port, 20, up.popen)
        wait_port(px_port, 30, px.popen)
        path, extra, c, stream = WORKLOADS[args.workload]
        body = {"messages": [{"role": "user", "content": "hi"}], **extra}
        raw = Path(args.out) if args.out else work / "profile.txt"
        spy = subprocess.Popen(
            [
                str(BENCH_VENV / "bin" / "py-spy"),
                "record",
                "--format",
                "raw",
                "-r",
                "500",
                "-d",
                str(round(args.seconds)),
                "-o",
                str(raw),
                "--pid",
                str(px.pid),
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(work / "py-spy.log", "wb"),  # noqa: SIM115
        )
        time.sleep(0.5)
        lg = subprocess.run(
            [
                "nice",
                "-n",
                str(args.nice),
                *python_argv(
                    "bench.loadgen",
                    "stream" if stream else "latency",
                    "--url",
                    f"http://127.0.0.1:{px_port}{path}",
                    "--body",
                    json.dumps(body),
                    "--header",
                    f"Authorization: Bearer {key}",
                    "-c",
                    str(c),
                    "-n",
                    "1000000",
                    "--duration",
                    str(args.seconds - 1),
                    *(["--throughput"] if stream else []),
                ),
            ],
            capture_output=True,
            cwd=ROOT,
            check=True,
            timeout=args.seconds + 60,
        )
        spy.wait(timeout=args.seconds + 30)
        if not raw.exists():
            raise SystemExit(f"py-spy wrote nothing: {(work / 'py-spy.log').read_text()}")
        result = json.loads(lg.stdout)
        print(
            f"{args.workload}: {result['ok']} ok, {result['rps']:.0f} req/s"
            + (f", {result['tokens_per_s']:.0f} tokens/s" if stream else "")
        )
        print(summarize(raw, args.top))
    finally:
        px.stop()
        up.stop()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
