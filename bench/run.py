"""The whole benchmark in one run: start every target, measure them alternating, write RESULTS.md.

``bench/run.sh`` installs what is missing and calls ``python -m bench``; see ``bench/README.md``.
Every process (upstream, targets, load generator) runs on this machine and talks to 127.0.0.1
only; every measurement is bounded by a request count and a deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bench import report
from bench.targets import (
    CYCLES_KEY,
    PASSTHROUGH_PREFIX,
    ROOT,
    TENANT,
    Proc,
    Target,
    cpu_ticks,
    free_port,
    python_argv,
    read_key,
    rss_kb,
    spawn,
    start_litellm,
    start_nginx,
    wait_http,
    wait_port,
)

HZ = os.sysconf("SC_CLK_TCK")
PROMPT = [{"role": "user", "content": "Write one sentence about budgets."}]


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    mode: str  # latency | stream | throughput | hold | wrk
    dialect: str  # openai | ollama
    model: str
    c: int
    n: int
    warmup: int
    duration: float
    rounds: int
    stream: bool = False
    #: targets this scenario leaves out
    skip: tuple[str, ...] = ()


def body_for(s: Scenario) -> str:
    if s.dialect == "openai":
        b: dict[str, Any] = {"model": s.model, "messages": PROMPT, "max_tokens": 512}
        if s.stream:
            b["stream"] = True
    else:
        b = {"model": s.model, "messages": PROMPT, "options": {"num_predict": 512}}
        if not s.stream:
            b["stream"] = False
    return json.dumps(b, separators=(",", ":"))


def path_for(s: Scenario) -> str:
    return "/v1/chat/completions" if s.dialect == "openai" else "/api/chat"


def scenarios(scale: float, access_log_variant: bool) -> list[Scenario]:
    def n(x: int) -> int:
        return max(10, int(x * scale))

    def d(x: float) -> float:
        return max(1.0, x * scale)

    # the access-log-off variant only where it tells something: c=1 latency and saturation
    no_log = ("cycles-embedded-nolog",)
    plan = [
        Scenario(
            "lat-c1",
            "non-streaming, c=1",
            "latency",
            "openai",
            "bench-n16",
            1,
            n(1500),
            20,
            d(4),
            3,
        ),
        Scenario(
            "lat-c16",
            "non-streaming, c=16",
            "latency",
            "openai",
            "bench-n16",
            16,
            n(3000),
            64,
            d(4),
            3,
        ),
        Scenario(
            "lat-c64",
            "non-streaming, c=64",
            "latency",
            "openai",
            "bench-n16",
            64,
            n(4000),
            128,
            d(5),
            3,
        ),
        Scenario(
            "lat-c1-ollama",
            "non-streaming Ollama /api/chat, c=1",
            "latency",
            "ollama",
            "bench-n16",
            1,
            n(1500),
            20,
            d(3),
            3,
        ),
        Scenario(
            "stream-sse",
            "SSE stream, 10 tokens every 5 ms, c=1",
            "stream",
            "openai",
            "bench-n10-i5000",
            1,
            n(80),
            3,
            d(4),
            3,
            stream=True,
        ),
        Scenario(
            "stream-ndjson",
            "NDJSON stream, 10 tokens every 5 ms, c=1",
            "stream",
            "ollama",
            "bench-n10-i5000",
            1,
            n(80),
            3,
            d(4),
            3,
            stream=True,
        ),
        Scenario(
            "tput-sse",
            "64 SSE streams of 400 tokens, unpaced",
            "throughput",
            "openai",
            "bench-n400-i0",
            64,
            n(192),
            0,
            d(6),
            2,
            stream=True,
        ),
        Scenario(
            "tput-ndjson",
            "64 NDJSON streams of 400 tokens, unpaced",
            "throughput",
            "ollama",
            "bench-n400-i0",
            64,
            n(192),
            0,
            d(6),
            2,
            stream=True,
        ),
        Scenario(
            "tput-sse-paced",
            "64 SSE streams, 100 tokens/s each",
            "throughput",
            "openai",
            "bench-n400-i10000",
            64,
            64,
            0,
            d(8),
            1,
            stream=True,
        ),
        Scenario(
            "wrk",
            "saturation, wrk -t1 -c32, non-streaming",
            "wrk",
            "openai",
            "bench-n16",
            32,
            0,
            0,
            d(5),
            2,
        ),
        Scenario(
            "hold",
            "1,000 concurrent open streams (1 token/s)",
            "hold",
            "openai",
            "bench-n120-i1000000",
            1000,
            0,
            0,
            75.0,
            1,
            stream=True,
        ),
    ]
    return [s if s.key in ("lat-c1", "wrk") else replace(s, skip=no_log) for s in plan]


# ----------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------
def machine_busy_ticks() -> int:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal
    return sum(fields[:8]) - fields[3] - fields[4]


@dataclass
class Meter:
    """CPU used while one measurement ran: by the target, by us, by everything else."""

    target_pids: list[int]
    our_pids: list[int]
    t0: float = 0.0
    busy0: int = 0
    target0: int = 0
    ours0: int = 0
    kids0: float = 0.0
    self0: float = 0.0
    result: dict[str, float] = field(default_factory=dict)

    def __enter__(self) -> Meter:
        self.t0 = time.monotonic()
        self.busy0 = machine_busy_ticks()
        self.target0 = cpu_ticks(self.target_pids)
        self.ours0 = cpu_ticks(self.our_pids)
        ch = resource.getrusage(resource.RUSAGE_CHILDREN)
        me = resource.getrusage(resource.RUSAGE_SELF)
        self.kids0 = ch.ru_utime + ch.ru_stime
        self.self0 = me.ru_utime + me.ru_stime
        return self

    def __exit__(self, *exc: object) -> None:
        wall = max(1e-6, time.monotonic() - self.t0)
        busy = (machine_busy_ticks() - self.busy0) / HZ
        target = (cpu_ticks(self.target_pids) - self.target0) / HZ
        ours = (cpu_ticks(self.our_pids) - self.ours0) / HZ
        ch = resource.getrusage(resource.RUSAGE_CHILDREN)
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = ch.ru_utime + ch.ru_stime - self.kids0
        mine = me.ru_utime + me.ru_stime - self.self0
        self.result = {
            "wall_s": wall,
            "target_cpu_s": target,
            "machine_cores": busy / wall,
            "foreign_cores": max(0.0, (busy - ours - kids - mine) / wall),
        }


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = Path(tempfile.mkdtemp(prefix="cycles-bench-"))
        self.procs: list[Proc] = []
        self.targets: dict[str, Target] = {}
        self.runs: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.meta: dict[str, Any] = {}
        self.nice = args.nice
        self.meta["nice"] = args.nice

    # -- lifecycle ---------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def start(self, models: list[str]) -> None:
        w = self.workdir
        up_port = free_port()
        up = spawn(
            "upstream", python_argv("bench.upstream", "--port", str(up_port)), w, nice=self.nice
        )
        self.procs.append(up)
        wait_port(up_port, 20, up.popen)
        self.upstream_port = up_port
        self.upstream = up
        self.targets["direct"] = Target("direct", "direct to the upstream (the limit)", up_port)

        want = set(self.args.targets.split(",")) if self.args.targets else None

        def wanted(name: str) -> bool:
            return want is None or name in want or name == "direct"

        if wanted("nginx"):
            t = start_nginx(w, up_port, self.nice)
            assert t.proc is not None
            self.procs.append(t.proc)
            self.targets["nginx"] = t
        litellm: Target | None = None
        if wanted("litellm") and not self.args.no_litellm:
            litellm = start_litellm(w, up_port, models, self.nice)
            assert litellm.proc is not None
            self.procs.append(litellm.proc)
        upstream_url = f"http://127.0.0.1:{up_port}"
        if self.args.cycles_src:
            src = Path(self.args.cycles_src)
            self.meta["cycles_src"] = f"run from the source tree {src}"
        elif self.args.cycles_rev:
            src = self.export(self.args.cycles_rev)
        else:
            src = self.snapshot()

        def cycles(
            name: str,
            label: str,
            *extra: str,
            prefix: str = "",
            source: Path | None = src,
        ) -> None:
            if not wanted(name):
                return
            db = w / f"{name}.db"
            key_file = w / f"{name}.key"
            port = free_port()
            argv = python_argv(
                "bench.serve_cycles",
                "--port",
                str(port),
                "--upstream",
                upstream_url,
                "--db",
                str(db),
                "--bootstrap",
                str(key_file),
                *extra,
                src=source,
            )
            proc = spawn(name, argv, w, nice=self.nice)
            self.procs.append(proc)
            key = read_key(key_file, proc.popen)
            self.targets[name] = Target(
                name,
                label,
                port,
                proc,
                prefix=prefix,
                headers=[f"Authorization: Bearer {key}"],
                metered=not prefix,
            )
            self.meta.setdefault("ledgers", {})[name] = str(db)

        cycles(
            "cycles-pass", "cycles-proxy pass-through (unmetered route)", prefix=PASSTHROUGH_PREFIX
        )
        cycles("cycles-embedded", "cycles-proxy metered, embedded ledger")
        if self.args.access_log_variant:
            cycles(
                "cycles-embedded-nolog",
                "cycles-proxy metered, embedded, access log off",
                "--no-access-log",
            )
        if wanted("cycles-remote"):
            cport = free_port()
            cdb = w / "cycles-server.db"
            server = spawn(
                "cycles-server",
                python_argv(
                    "bench.cycles_server",
                    "--port",
                    str(cport),
                    "--db",
                    str(cdb),
                    "--key",
                    CYCLES_KEY,
                    "--tenant",
                    TENANT,
                    src=src,
                ),
                w,
                nice=self.nice,
            )
            self.procs.append(server)
            wait_port(cport, 20, server.popen)
            self.meta["cycles_server_db"] = str(cdb)
            self.cycles_server = server
            cycles(
                "cycles-remote",
                "cycles-proxy metered, remote Cycles server (fake)",
                "--cycles-url",
                f"http://127.0.0.1:{cport}",
                "--cycles-key",
                CYCLES_KEY,
            )
        for extra in self.args.extra_cycles:
            name, _, rest = extra.partition("=")
            path, *flags = rest.split(",")
            cycles(
                f"cycles-{name}",
                f"cycles-proxy metered, embedded ({name}: {rest})",
                *flags,
                source=Path(path) if path else src,
            )
        if litellm is not None:
            self.targets["litellm"] = litellm
        for t in self.targets.values():
            if t.proc is not None:
                wait_port(t.port, 60, t.proc.popen)
        if litellm is not None:
            wait_http(f"http://127.0.0.1:{litellm.port}/health/liveliness", 120, litellm.proc)
        self.verify()

    def snapshot(self) -> Path:
        """A copy of cycles_proxy/ as it is now: others may edit the tree during the run."""
        dest = self.workdir / "src"
        shutil.copytree(
            ROOT / "cycles_proxy",
            dest / "cycles_proxy",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        self.meta["cycles_src"] = f"snapshot of the working tree at {time.strftime('%H:%M:%S')}"
        return dest

    def export(self, rev: str) -> Path:
        """cycles_proxy/ exactly as committed at ``rev``."""
        dest = self.workdir / "src"
        dest.mkdir(parents=True, exist_ok=True)
        sha = cmd_out(["git", "-C", str(ROOT), "rev-parse", "--short", rev])
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", rev, "cycles_proxy"],
            capture_output=True,
            check=True,
        )
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
        self.meta["cycles_src"] = f"exported from git {rev} ({sha})"
        self.meta["cycles_rev"] = sha
        return dest

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()

    def verify(self) -> None:
        """Every target answers a request and a stream correctly before anything is timed."""
        checks = [
            Scenario("v", "", "latency", "openai", "bench-n16", 1, 3, 0, 10, 1),
            Scenario("v", "", "stream", "openai", "bench-n8-i1000", 1, 2, 0, 10, 1, stream=True),
            Scenario("v", "", "stream", "ollama", "bench-n8-i1000", 1, 2, 0, 10, 1, stream=True),
        ]
        for t in self.targets.values():
            for s in checks:
                if s.dialect == "ollama" and not t.ollama:
                    continue
                r = self.loadgen(t, s)
                if r.get("ok") != s.n + 0 or (s.stream and min(r["tokens_per_stream"]) != 8):
                    raise RuntimeError(f"{t.name} failed the {s.dialect} check: {r}")
        self.log("all targets answer correctly")

    # -- one measurement ---------------------------------------------------------------------
    def our_pids(self) -> list[int]:
        out: list[int] = []
        for p in self.procs:
            out += p.pids()
        return out

    def loadgen(self, t: Target, s: Scenario) -> dict[str, Any]:
        mode = "stream" if s.mode == "throughput" else s.mode
        argv = python_argv(
            "bench.loadgen",
            mode,
            "--url",
            t.url(path_for(s)),
            "--body",
            body_for(s),
            "-c",
            str(s.c),
            "-n",
            str(s.n),
            "--warmup",
            str(s.warmup),
            "--duration",
            str(s.duration),
        )
        if s.mode == "throughput":
            argv.append("--throughput")
        if s.mode == "hold":
            argv += ["--pids", ",".join(str(p) for p in t.pids())]
        for h in t.headers:
            argv += ["--header", h]
        if self.nice:
            argv = ["nice", "-n", str(self.nice), *argv]
        out = subprocess.run(
            argv, capture_output=True, cwd=ROOT, timeout=s.duration + 60, check=False
        )
        if out.returncode != 0:
            raise RuntimeError(f"loadgen failed on {t.name}: {out.stderr.decode()[-2000:]}")
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    def wrk(self, t: Target, s: Scenario) -> dict[str, Any]:
        lua = self.workdir / f"wrk-{t.name}.lua"
        lines = ['wrk.method = "POST"', 'wrk.headers["Content-Type"] = "application/json"']
        for h in t.headers:
            name, _, value = h.partition(":")
            lines.append(f"wrk.headers[{json.dumps(name.strip())}] = {json.dumps(value.strip())}")
        lines.append(f"wrk.body = {json.dumps(body_for(s))}")
        lua.write_text("\n".join(lines) + "\n")
        argv = [
            "wrk",
            "-t1",
            f"-c{s.c}",
            f"-d{max(1, round(s.duration))}s",
            "--latency",
            "-s",
            str(lua),
            t.url(path_for(s)),
        ]
        if self.nice:
            argv = ["nice", "-n", str(self.nice), *argv]
        out = subprocess.run(argv, capture_output=True, timeout=s.duration + 60, check=False)
        text = out.stdout.decode()
        m = re.search(r"Requests/sec:\s+([\d.]+)", text)
        total = re.search(r"(\d+) requests in", text)
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
        errs = re.search(r"Socket errors: (.*)", text)
        return {
            "mode": "wrk",
            "rps": float(m.group(1)) if m else 0.0,
            "requests": int(total.group(1)) if total else 0,
            "non2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": errs.group(1) if errs else "",
            "raw": text,
            "command": " ".join(argv),
        }

    def measure(self, t: Target, s: Scenario, rnd: int) -> None:
        if t.name in s.skip:
            return
        if s.dialect == "ollama" and not t.ollama:
            return
        with Meter(t.pids(), self.our_pids()) as meter:
            result = self.wrk(t, s) if s.mode == "wrk" else self.loadgen(t, s)
        result.update(meter.result)
        result.update({"scenario": s.key, "target": t.name, "round": rnd})
        if s.mode == "hold":
            result["rss_idle_kb"] = result.get("rss_before_kb")
        ok = result.get("ok", result.get("requests", 0))
        if ok:
            result["target_cpu_us_per_req"] = result["target_cpu_s"] / ok * 1e6
        self.runs.append(result)
        self.log(f"{s.key:14s} r{rnd} {t.name:22s} {report.one_line(result)}")

    def run(self) -> None:
        scale = self.args.scale
        todo = [
            s
            for s in scenarios(scale, self.args.access_log_variant)
            if not self.args.only or s.key in self.args.only.split(",")
        ]
        models = sorted({s.model for s in todo} | {"bench-n16", "bench-n8-i1000"})
        self.meta["started"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        t0 = time.monotonic()
        self.start(models)
        self.meta["startup_s"] = time.monotonic() - t0
        names = list(self.targets)
        self.idle_rss = {n: rss_kb(t.pids()) for n, t in self.targets.items() if t.proc}
        try:
            for s in todo:
                for rnd in range(s.rounds):
                    # alternate: every round starts with a different target
                    k = rnd % len(names)
                    for name in names[k:] + names[:k]:
                        self.measure(self.targets[name], s, rnd)
                        if s.mode == "hold":
                            time.sleep(3)  # let the target settle 1,000 hung-up streams
        finally:
            self.meta["measure_s"] = time.monotonic() - t0
            self.final_rss = {n: rss_kb(t.pids()) for n, t in self.targets.items() if t.proc}
            self.meta["ledger_rows"] = self.count_charges()
            self.stop()

    def count_charges(self) -> dict[str, int]:
        import sqlite3

        out: dict[str, int] = {}
        dbs = dict(self.meta.get("ledgers", {}))
        if "cycles_server_db" in self.meta:
            dbs["cycles-server (remote ledger)"] = self.meta["cycles_server_db"]
        dbs.pop("cycles-remote", None)  # its file holds keys only; its ledger is the server's
        for name, db in dbs.items():
            try:
                con = sqlite3.connect(db)
                out[name] = int(con.execute("SELECT count(*) FROM charges").fetchone()[0])
                con.close()
            except sqlite3.Error:
                out[name] = -1
        return out


# ----------------------------------------------------------------------------------------------
# environment facts for the report
# ----------------------------------------------------------------------------------------------
def cmd_out(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    return (out.stdout + out.stderr).decode(errors="replace").strip()


def python_speed() -> str:
    """How fast this CPU runs Python: the same loop takes about 8-10 µs on a current laptop."""
    import timeit

    best = min(timeit.repeat("sum(range(1000))", number=2000, repeat=5)) / 2000
    return f"sum(range(1000)) takes {best * 1e6:.1f} µs (about 8-10 µs on a current laptop)"


def environment() -> dict[str, str]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    import aiohttp

    bench_py = str(ROOT / ".venv-bench" / "bin" / "python")
    litellm_v = cmd_out(
        [bench_py, "-c", "import importlib.metadata as m; print(m.version('litellm'))"]
    ).splitlines()
    uvloop_v = "not installed"
    try:
        import uvloop

        uvloop_v = uvloop.__version__
    except ImportError:
        pass
    git = cmd_out(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = cmd_out(["git", "-C", str(ROOT), "status", "--porcelain", "cycles_proxy"])
    changed = ", ".join(
        line.split("cycles_proxy/", 1)[-1] for line in dirty.splitlines() if "cycles_proxy/" in line
    )
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
        "os": cmd_out(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python": sys.version.split()[0],
        "python speed": python_speed(),
        "aiohttp": aiohttp.__version__,
        "uvloop (upstream, load generator)": uvloop_v,
        "nginx": cmd_out(["nginx", "-v"]).replace("nginx version: ", ""),
        "wrk": cmd_out(["wrk", "-v"]).splitlines()[0] if shutil.which("wrk") else "not found",
        "litellm": litellm_v[-1] if litellm_v else "not found",
        "cycles-proxy": f"git {git}"
        + (f" + uncommitted changes in cycles_proxy/ ({changed})" if dirty else ""),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"))
    p.add_argument("--json", default=str(ROOT / "bench" / "results.json"))
    p.add_argument("--scale", type=float, default=1.0, help="scale counts and durations")
    p.add_argument("--only", help="comma-separated scenario keys")
    p.add_argument("--targets", help="comma-separated target names (direct always runs)")
    p.add_argument("--no-litellm", action="store_true")
    p.add_argument(
        "--access-log-variant",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run cycles-proxy (embedded) with access_log=false",
    )
    p.add_argument("--cycles-rev", help="measure cycles_proxy/ as committed at this git revision")
    p.add_argument(
        "--cycles-src",
        help="run cycles-proxy from this source tree (default: a snapshot of cycles_proxy/)",
    )
    p.add_argument(
        "--extra-cycles",
        action="append",
        default=[],
        metavar="NAME=SRC[,FLAG...]",
        help="an extra metered (embedded) cycles-proxy target from another source tree (empty: "
        "the same one) with extra bench.serve_cycles flags, e.g. uvloop=,--uvloop",
    )
    p.add_argument(
        "--nice",
        type=int,
        default=-10 if os.geteuid() == 0 else 0,
        help="nice level of every benchmark process (default -10 as root)",
    )
    args = p.parse_args()
    # SIGTERM stops the run like Ctrl-C: every process it started is stopped on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    bench = Bench(args)
    env = environment()
    if args.cycles_src or args.cycles_rev:
        env["cycles-proxy"] = "see below: not the working tree"
    command = "bench/run.sh" + ("" if len(sys.argv) == 1 else " " + " ".join(sys.argv[1:]))
    try:
        bench.run()
    finally:
        bench.stop()
    data = {
        "command": command,
        "environment": env,
        "meta": bench.meta,
        "targets": {
            n: {"label": t.label, "port": t.port, "prefix": t.prefix}
            for n, t in bench.targets.items()
        },
        "idle_rss_kb": bench.idle_rss,
        "final_rss_kb": bench.final_rss,
        "scenarios": [asdict(s) for s in scenarios(args.scale, args.access_log_variant)],
        "runs": [{k: v for k, v in r.items() if k != "raw"} for r in bench.runs],
        "wrk_raw": {
            f"{r['target']} r{r['round']}": r.get("raw", "")
            for r in bench.runs
            if r.get("mode") == "wrk"
        },
        "workdir": str(bench.workdir),
    }
    raw = bench.workdir / "results-raw.json"
    raw.write_text(json.dumps(data))  # every sample: `python -m bench.report RAW` re-renders
    Path(args.json).write_text(json.dumps(report.compact(data)))
    Path(args.out).write_text(report.render(data))
    print(f"wrote {args.out} and {args.json} (logs in {bench.workdir})", flush=True)
