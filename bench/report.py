"""Turns one benchmark run (``bench/run.py``) into ``bench/RESULTS.md`` and ``results.json``."""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

ORDER = [
    "direct",
    "nginx",
    "cycles-pass",
    "cycles-embedded",
    "cycles-embedded-nolog",
    "cycles-remote",
    "litellm",
]
SHORT = {
    "direct": "direct",
    "nginx": "nginx",
    "cycles-pass": "cycles-proxy pass-through",
    "cycles-embedded": "**cycles-proxy metered (embedded)**",
    "cycles-embedded-nolog": "cycles-proxy metered (embedded, access log off)",
    "cycles-remote": "cycles-proxy metered (remote Cycles)",
    "litellm": "LiteLLM",
}


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    k = min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))
    return float(s[k])


def ms(us: float, digits: int = 2) -> str:
    return "–" if math.isnan(us) else f"{us / 1000:.{digits}f}"


def signed_ms(us: float, digits: int = 2) -> str:
    return "–" if math.isnan(us) else f"{us / 1000:+.{digits}f}"


def one_line(r: dict[str, Any]) -> str:
    """A progress line for the console."""
    fg = f" foreign {r.get('foreign_cores', 0):.2f} cores"
    if r["mode"] == "wrk":
        return f"{r['rps']:.0f} req/s non2xx {r['non2xx']}{fg}"
    if r["mode"] == "hold":
        return (
            f"{r['streaming']}/{r['c']} streaming, rss {r['rss_peak_kb'] / 1024:.1f} MB, "
            f"opened in {r['open_s']:.1f} s{fg}"
        )
    lat = r.get("lat_us", [])
    line = f"ok {r['ok']} err {sum(r['errors'].values())} {r['rps']:.0f} req/s"
    if r["mode"] == "latency" or not r.get("ttft_us"):
        line += f" p50 {ms(pct(lat, 0.5))} p99 {ms(pct(lat, 0.99))} ms"
    if r.get("ttft_us"):
        line += f" ttft p50 {ms(pct(r['ttft_us'], 0.5))} ms"
    if r.get("chunk_delay_us"):
        line += f" chunk p50 {ms(pct(r['chunk_delay_us'], 0.5), 3)} ms"
    if "tokens_per_s" in r:
        line += f" {r['tokens_per_s']:.0f} tok/s"
    return line + fg


def runs_of(data: dict[str, Any], scenario: str, target: str) -> list[dict[str, Any]]:
    return [r for r in data["runs"] if r["scenario"] == scenario and r["target"] == target]


def pooled(data: dict[str, Any], scenario: str, target: str, key: str) -> list[float]:
    out: list[float] = []
    for r in runs_of(data, scenario, target):
        out += r.get(key, [])
    return out


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def targets_in(data: dict[str, Any]) -> list[str]:
    present = {r["target"] for r in data["runs"]}
    return [t for t in ORDER if t in present] + sorted(present - set(ORDER))


def label(t: str) -> str:
    return SHORT.get(t, f"cycles-proxy metered ({t.removeprefix('cycles-')})")


# ----------------------------------------------------------------------------------------------
def latency_table(data: dict[str, Any], keys: list[tuple[str, str]]) -> list[str]:
    head = (
        "| target | "
        + " | ".join(f"{title} p50 | {title} p99" for _, title in keys)
        + " | CPU per request (c=1) |"
    )
    lines = [head, "|---" * (2 * len(keys) + 2) + "|"]
    base = {k: pooled(data, k, "direct", "lat_us") for k, _ in keys}
    for t in targets_in(data):
        cells = []
        for k, _ in keys:
            lat = pooled(data, k, t, "lat_us")
            if not lat:
                cells += ["n/a", "n/a"]
                continue
            if t == "direct":
                cells += [f"{ms(pct(lat, 0.5))} ms", f"{ms(pct(lat, 0.99))} ms"]
            else:
                cells += [
                    signed_ms(pct(lat, 0.5) - pct(base[k], 0.5)),
                    signed_ms(pct(lat, 0.99) - pct(base[k], 0.99)),
                ]
        cpu = [
            r["target_cpu_us_per_req"]
            for r in runs_of(data, keys[0][0], t)
            if "target_cpu_us_per_req" in r
        ]
        cells.append(f"{mean(cpu):.0f} µs" if cpu and t != "direct" else "–")
        lines.append(f"| {label(t)} | " + " | ".join(cells) + " |")
    return lines


def absolute_table(data: dict[str, Any], keys: list[tuple[str, str]], field: str) -> list[str]:
    lines = [
        "| target | " + " | ".join(f"{t} p50 / p90 / p99 (n)" for _, t in keys) + " |",
        "|---" * (len(keys) + 1) + "|",
    ]
    for t in targets_in(data):
        cells = []
        for k, _ in keys:
            v = pooled(data, k, t, field)
            cells.append(
                f"{ms(pct(v, 0.5))} / {ms(pct(v, 0.9))} / {ms(pct(v, 0.99))} ({len(v)})"
                if v
                else "n/a"
            )
        lines.append(f"| {label(t)} | " + " | ".join(cells) + " |")
    return lines


def stream_table(data: dict[str, Any]) -> list[str]:
    keys = [("stream-sse", "SSE"), ("stream-ndjson", "NDJSON")]
    lines = [
        "| target | "
        + " | ".join(f"{d}: TTFT p50 / p99 | {d}: per-chunk p50 / p99" for _, d in keys)
        + " |",
        "|---" * (2 * len(keys) + 1) + "|",
    ]
    for t in targets_in(data):
        cells = []
        for k, _ in keys:
            ttft = pooled(data, k, t, "ttft_us")
            delay = pooled(data, k, t, "chunk_delay_us")
            if not ttft:
                cells += ["n/a", "n/a"]
                continue
            bt = pooled(data, k, "direct", "ttft_us")
            bd = pooled(data, k, "direct", "chunk_delay_us")
            if t == "direct":
                cells.append(f"{ms(pct(ttft, 0.5))} / {ms(pct(ttft, 0.99))} ms")
                cells.append(f"{ms(pct(delay, 0.5), 3)} / {ms(pct(delay, 0.99), 3)} ms")
            else:
                cells.append(
                    f"{signed_ms(pct(ttft, 0.5) - pct(bt, 0.5))} / "
                    f"{signed_ms(pct(ttft, 0.99) - pct(bt, 0.99))}"
                )
                cells.append(
                    f"{signed_ms(pct(delay, 0.5) - pct(bd, 0.5), 3)} / "
                    f"{signed_ms(pct(delay, 0.99) - pct(bd, 0.99), 3)}"
                )
        lines.append(f"| {label(t)} | " + " | ".join(cells) + " |")
    return lines


def throughput_table(data: dict[str, Any]) -> list[str]:
    keys = [
        ("tput-sse", "SSE unpaced"),
        ("tput-ndjson", "NDJSON unpaced"),
        ("tput-sse-paced", "SSE at 100 tok/s per stream"),
    ]
    lines = [
        "| target | " + " | ".join(f"{t}: tokens/s (% of direct)" for _, t in keys) + " |",
        "|---" * (len(keys) + 1) + "|",
    ]
    for t in targets_in(data):
        cells = []
        for k, _ in keys:
            v = [r["tokens_per_s"] for r in runs_of(data, k, t) if "tokens_per_s" in r]
            if not v:
                cells.append("n/a")
                continue
            base = mean([r["tokens_per_s"] for r in runs_of(data, k, "direct")])
            cells.append(f"{mean(v):,.0f} ({mean(v) / base * 100:.1f} %)")
        lines.append(f"| {label(t)} | " + " | ".join(cells) + " |")
    return lines


def wrk_table(data: dict[str, Any]) -> list[str]:
    lines = [
        "| target | req/s (each round) | mean req/s | non-2xx | target CPU per request |",
        "|---|---|---|---|---|",
    ]
    for t in targets_in(data):
        rs = runs_of(data, "wrk", t)
        if not rs:
            continue
        each = ", ".join(f"{r['rps']:,.0f}" for r in rs)
        cpu = mean([r.get("target_cpu_us_per_req", math.nan) for r in rs])
        cpu_s = "–" if t == "direct" or math.isnan(cpu) else f"{cpu:.0f} µs"
        lines.append(
            f"| {label(t)} | {each} | {mean([r['rps'] for r in rs]):,.0f} | "
            f"{sum(r['non2xx'] for r in rs)} | {cpu_s} |"
        )
    return lines


def hold_table(data: dict[str, Any]) -> list[str]:
    lines = [
        "| target | streams open (of 1,000) | RSS idle | RSS with the streams open | "
        "time to open them |",
        "|---|---|---|---|---|",
    ]
    for t in targets_in(data):
        for r in runs_of(data, "hold", t):
            if t == "direct":
                lines.append(f"| {label(t)} | {r['streaming']} | – | – | {r['open_s']:.1f} s |")
                continue
            idle = data.get("idle_rss_kb", {}).get(t, r.get("rss_before_kb", 0))
            lines.append(
                f"| {label(t)} | {r['streaming']} (still open while sampled: "
                f"{r['open_while_sampling']}) | {idle / 1024:.1f} MB | "
                f"{r['rss_peak_kb'] / 1024:.1f} MB | {r['open_s']:.1f} s |"
            )
    return lines


# ----------------------------------------------------------------------------------------------
def verdicts(data: dict[str, Any], t: str = "cycles-embedded") -> list[tuple[str, str, str, bool]]:
    out: list[tuple[str, str, str, bool]] = []

    def added(key: str, field: str, q: float, target: str = t) -> float:
        return pct(pooled(data, key, target, field), q) - pct(pooled(data, key, "direct", field), q)

    if runs_of(data, "lat-c1", t):
        a50, a99 = added("lat-c1", "lat_us", 0.5), added("lat-c1", "lat_us", 0.99)
        out.append(("added latency p50, c=1", "≤ 1 ms", f"{ms(a50)} ms", a50 <= 1000))
        out.append(("added latency p99, c=1", "≤ 2 ms", f"{ms(a99)} ms", a99 <= 2000))
    for key, name in (("stream-sse", "SSE"), ("stream-ndjson", "NDJSON")):
        if runs_of(data, key, t):
            a = added(key, "ttft_us", 0.5)
            out.append(
                (f"added time to first token p50 ({name})", "≤ 1 ms", f"{ms(a)} ms", a <= 1000)
            )
    rs = runs_of(data, "wrk", t)
    if rs:
        rps = mean([r["rps"] for r in rs])
        out.append(("metered requests/s, one process", "≥ 1,500", f"{rps:,.0f}", rps >= 1500))
    for key, name in (("tput-sse", "SSE"), ("tput-ndjson", "NDJSON")):
        v = [r["tokens_per_s"] for r in runs_of(data, key, t)]
        b = [r["tokens_per_s"] for r in runs_of(data, key, "direct")]
        if v and b:
            ratio = mean(v) / mean(b) * 100
            out.append(
                (
                    f"streamed tokens/s with 64 streams ({name}, unpaced)",
                    "≥ 95 % of direct",
                    f"{ratio:.1f} %",
                    ratio >= 95,
                )
            )
    v = [r["tokens_per_s"] for r in runs_of(data, "tput-sse-paced", t)]
    b = [r["tokens_per_s"] for r in runs_of(data, "tput-sse-paced", "direct")]
    if v and b:
        ratio = mean(v) / mean(b) * 100
        out.append(
            (
                "streamed tokens/s with 64 streams (SSE, 100 tok/s each)",
                "≥ 95 % of direct",
                f"{ratio:.1f} %",
                ratio >= 95,
            )
        )
    for r in runs_of(data, "hold", t):
        mb = r["rss_peak_kb"] / 1024
        full = r["streaming"] >= 1000
        out.append(
            (
                "resident memory with 1,000 open streams",
                "≤ 150 MB",
                f"{mb:.1f} MB ({r['streaming']} streams open)",
                mb <= 150 and full,
            )
        )
    for key, c in (("lat-c1", 1), ("lat-c16", 16), ("lat-c64", 64)):
        if runs_of(data, key, t) and runs_of(data, key, "litellm"):
            ours, theirs = added(key, "lat_us", 0.99), added(key, "lat_us", 0.99, "litellm")
            out.append(
                (
                    f"added p99 lower than LiteLLM, c={c}",
                    f"< LiteLLM's {ms(theirs)} ms",
                    f"{ms(ours)} ms",
                    ours < theirs,
                )
            )
    return out


def render(data: dict[str, Any]) -> str:
    env, meta = data["environment"], data["meta"]
    L: list[str] = []
    L += [
        "# cycles-proxy benchmark results",
        "",
        f"One run of `{data['command']}`, started {meta.get('started', '?')}; measuring took "
        f"{meta.get('measure_s', 0) / 60:.1f} min (startup included). Every target below was "
        "measured in this same run, alternating target order round by round, against the same "
        "fake upstream. Method, scenario definitions and how to rerun: "
        "[bench/README.md](README.md). Profile findings and the before/after of proposed "
        "fixes: [bench/PROFILE.md](PROFILE.md).",
        "",
        f"cycles-proxy under test: {meta.get('cycles_src') or env.get('cycles-proxy', '?')}.",
        "",
        "**Added** = target minus direct at the same percentile (a target's p99 minus direct's "
        "p99), as ai-gateway-bench reports it; values in milliseconds.",
        "",
    ]
    foreign = [r.get("foreign_cores", 0.0) for r in data["runs"]]
    if foreign:
        busy = sum(1 for f in foreign if f > 0.25)
        L += [
            f"**Machine load from other work during the run:** mean {mean(foreign):.2f} cores, "
            f"max {max(foreign):.2f} of 2; {busy} of {len(foreign)} measurements had more than "
            "0.25 cores of other load (column `foreign` in the raw table). Benchmark processes "
            f"ran at nice {meta.get('nice', -10)} to keep such load from dominating.",
            "",
        ]
    L += [
        "## cycles-proxy (metered, embedded ledger) against its targets",
        "",
        "| target (issue 7) | goal | measured | met? |",
        "|---|---|---|---|",
    ]
    for name, goal, got, ok in verdicts(data):
        L.append(f"| {name} | {goal} | {got} | {'yes' if ok else '**no**'} |")
    L += [""]
    for extra in [t for t in targets_in(data) if t not in ORDER]:
        L += [
            f"### The same targets for `{extra}` ({data['targets'][extra]['label']})",
            "",
            "Another source tree measured in the same run, side by side with the one above "
            "(its label says which; see [PROFILE.md](PROFILE.md)).",
            "",
            "| target (issue 7) | goal | measured | met? |",
            "|---|---|---|---|",
        ]
        for name, goal, got, ok in verdicts(data, extra):
            L.append(f"| {name} | {goal} | {got} | {'yes' if ok else '**no**'} |")
        L += [""]
    L += why(data)
    L += [
        "## 1. Added latency, non-streaming (`POST /v1/chat/completions`, 16-token answer)",
        "",
        "Direct row: absolute latency. Other rows: added over direct (ms).",
        "",
    ]
    keys = [("lat-c1", "c=1"), ("lat-c16", "c=16"), ("lat-c64", "c=64")]
    L += latency_table(data, keys)
    L += ["", "Absolute latency (ms, pooled over rounds):", ""]
    L += absolute_table(data, [*keys, ("lat-c1-ollama", "Ollama /api/chat c=1")], "lat_us")
    L += ["", "Ollama native dialect (`POST /api/chat`, `stream: false`), c=1, added:", ""]
    L += latency_table(data, [("lat-c1-ollama", "c=1")])
    L += [
        "",
        "## 2. Streaming: added time to first token and per streamed chunk",
        "",
        "One stream at a time, 10 tokens 5 ms apart. TTFT: request written -> first token read. "
        "Per-chunk: each token's read time minus the upstream's write time (stamped into the "
        "token, same clock). Direct row absolute, other rows added (ms).",
        "",
    ]
    L += stream_table(data)
    L += [
        "",
        "## 3. Requests per second at saturation, one process per proxy",
        "",
        "`wrk -t1 -c32`, non-streaming, 16-token answers; nginx with one worker, LiteLLM with "
        "one worker, cycles-proxy one process. CPU per request: the target's own CPU time "
        "divided by the requests it served.",
        "",
    ]
    L += wrk_table(data)
    L += [
        "",
        "## 4. Streamed tokens per second through 64 concurrent streams",
        "",
        "Unpaced: the upstream writes each stream's 400 tokens as fast as the reader takes them "
        "(one write per token), so the figure is the ceiling of the whole machine. Paced: each "
        "stream 400 tokens at 100 tokens/s (a fast GPU), the real question being whether the "
        "proxy keeps up; the time to set the 64 streams up (reservations included) counts.",
        "",
    ]
    L += throughput_table(data)
    L += [
        "",
        "## 5. Resident memory with 1,000 concurrent open streams",
        "",
        "1,000 streams opened (50 at a time), each delivering a token per second; RSS of the "
        "target's process tree (nginx: master + worker) sampled 10 times over 1 s once every "
        "stream had delivered its first token; peak reported.",
        "",
    ]
    L += hold_table(data)
    L += [
        "",
        "## Metering was real",
        "",
        "Charges recorded in each ledger by the end of the run (one per settled metered request; "
        "the pass-through target records none):",
        "",
    ]
    for name, n in meta.get("ledger_rows", {}).items():
        if n >= 0:
            L.append(f"- `{name}`: {n:,}")
    L += [
        "",
        "## Machine and versions",
        "",
    ]
    for k, v in env.items():
        L.append(f"- {k}: {v}")
    L += ["", "## Targets", ""]
    for n, t in data["targets"].items():
        where = f"127.0.0.1:{t['port']}{t['prefix']}"
        L.append(f"- `{n}`: {t['label']} ({where})")
    L += [
        "",
        "## Raw numbers, every measurement",
        "",
        "| scenario | round | target | ok | errors | req/s | p50 | p99 | TTFT p50 | chunk p50 | "
        "tokens/s | target CPU s | foreign cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["runs"]:
        if r["mode"] == "wrk":
            L.append(
                f"| {r['scenario']} | {r['round']} | {r['target']} | {r['requests']} | "
                f"{r['non2xx']} | {r['rps']:,.0f} | | | | | | {r['target_cpu_s']:.2f} | "
                f"{r['foreign_cores']:.2f} |"
            )
            continue
        if r["mode"] == "hold":
            L.append(
                f"| {r['scenario']} | {r['round']} | {r['target']} | {r['streaming']} | "
                f"{r['connect_errors'] + r['non_200']} | | | | | | | {r['target_cpu_s']:.2f} | "
                f"{r['foreign_cores']:.2f} |"
            )
            continue
        lat = r.get("lat_us", [])
        L.append(
            f"| {r['scenario']} | {r['round']} | {r['target']} | {r['ok']} | "
            f"{sum(r['errors'].values())} | {r['rps']:,.0f} | {ms(pct(lat, 0.5))} | "
            f"{ms(pct(lat, 0.99))} | {ms(pct(r.get('ttft_us', []), 0.5))} | "
            f"{ms(pct(r.get('chunk_delay_us', []), 0.5), 3)} | "
            f"{r.get('tokens_per_s', 0):,.0f} | {r['target_cpu_s']:.2f} | "
            f"{r['foreign_cores']:.2f} |"
        )
    L += ["", "wrk output, first round of each target:", ""]
    for name, raw in data.get("wrk_raw", {}).items():
        if name.endswith("r0"):
            L += [f"`{name}`:", "", "```", raw.strip(), "```", ""]
    return "\n".join(L) + "\n"


def compact(data: dict[str, Any]) -> dict[str, Any]:
    """The JSON file: every run with percentiles instead of raw sample lists."""
    out = dict(data)
    runs = []
    for r in data["runs"]:
        c = {}
        for k, v in r.items():
            if (
                isinstance(v, list)
                and v
                and isinstance(v[0], int | float)
                and k != "rss_kb_samples"
            ):
                c[k] = {
                    "n": len(v),
                    "p50": pct(v, 0.5),
                    "p90": pct(v, 0.9),
                    "p99": pct(v, 0.99),
                    "max": max(v),
                    "mean": mean(v),
                }
            else:
                c[k] = v
        runs.append(c)
    out["runs"] = runs
    return out


def why(data: dict[str, Any]) -> list[str]:
    """Why the targets are missed, with this run's own numbers."""

    def cpu(target: str) -> float:
        rs = runs_of(data, "wrk", target)
        return mean([r.get("target_cpu_us_per_req", math.nan) for r in rs])

    def added(key: str, target: str, q: float) -> float:
        return pct(pooled(data, key, target, "lat_us"), q) - pct(
            pooled(data, key, "direct", "lat_us"), q
        )

    emb, pas, ngx = cpu("cycles-embedded"), cpu("cycles-pass"), cpu("nginx")
    nolog = cpu("cycles-embedded-nolog")
    if math.isnan(emb) or math.isnan(pas):
        return []
    speed = data["environment"].get("python speed", "")
    m = re.search(r"takes ([\d.]+) µs", speed)
    ratio = f"about {float(m.group(1)) / 9:.1f} times" if m else "several times"
    foreign = mean([r.get("foreign_cores", 0.0) for r in data["runs"]])
    d = [r["tokens_per_s"] for r in runs_of(data, "tput-sse", "direct")]
    n = [r["tokens_per_s"] for r in runs_of(data, "tput-sse", "nginx")]
    ngx_sse = f"{mean(n) / mean(d) * 100:.0f} % with SSE" if d and n else "see section 4"
    pd = [r["tokens_per_s"] for r in runs_of(data, "tput-sse-paced", "direct")]
    pe = [r["tokens_per_s"] for r in runs_of(data, "tput-sse-paced", "cycles-embedded")]
    paced = f"{mean(pe) / mean(pd) * 100:.1f} % of direct" if pd and pe else "(not measured)"
    p99_emb, p99_pass = (
        added("lat-c1", "cycles-embedded", 0.99),
        added("lat-c1", "cycles-pass", 0.99),
    )
    p50_pass = added("lat-c1", "cycles-pass", 0.5)
    return [
        "### Why the targets are missed",
        "",
        f"- **CPU per request.** 1,500 requests/s in one process leaves at most 667 µs of CPU "
        f"per request. Here a metered request costs the proxy {emb:,.0f} µs of CPU at saturation "
        f"({nolog:,.0f} µs with the access log off); the pass-through path alone (aiohttp "
        f"server + aiohttp client, key lookup, access log, no metering) costs {pas:,.0f} µs, "
        f"nginx {ngx:,.0f} µs. The other {emb - pas:,.0f} µs are metering: the embedded ledger "
        "(two SQLite transactions on its worker thread), parsing, estimating, metrics and "
        "settling; [PROFILE.md](PROFILE.md) splits them.",
        f"- **Latency at c=1 is that CPU.** Pass-through already adds {ms(p50_pass)} ms at p50 "
        f"and {ms(p99_pass)} ms at p99; metering adds the two ledger round trips to the worker "
        f"thread (p99 {ms(p99_emb)} ms).",
        f"- **A slow CPU for Python.** {speed}: {ratio} slower than a current laptop CPU "
        "for the same code.",
        f"- **Shared cores.** Load generator, upstream and proxy share two cores (other work "
        f"used {foreign:.2f} cores on average during this run). Unpaced streaming throughput is "
        "a contest for those two cores: any proxy's CPU is taken from the upstream and the "
        f"client, which is why nginx too stays under 95 % of direct there ({ngx_sse}). Paced "
        "at 100 tokens/s per stream, the figure that says whether a proxy keeps up with a "
        f"real model, the metered proxy delivers {paced}.",
        "",
        "What would close the gap, with measured gains: [PROFILE.md](PROFILE.md).",
        "",
    ]


def main() -> None:
    p = argparse.ArgumentParser(description="Re-render RESULTS.md from a run's raw samples.")
    p.add_argument("raw", help="results-raw.json from the run's temporary directory")
    p.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    args = p.parse_args()
    data = json.loads(Path(args.raw).read_text())
    Path(args.out).write_text(render(data))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
