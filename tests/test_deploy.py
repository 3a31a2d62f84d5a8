"""Deployment artefacts: the Grafana dashboard and the alert rules use metrics that exist and
valid PromQL; the Dockerfile's settings, entrypoint and health check work (no Docker engine runs
here, so what it runs is run directly); the compose example wires Ollama behind the proxy."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

from cycles_proxy.metrics import ProxyMetrics, metric_names
from cycles_proxy.settings import Settings, load_settings
from tests.fakes.fake_ollama import serve_fake_ollama

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
#: metrics of Prometheus itself that the rules may use
PROMETHEUS_BUILTINS = {"up"}


def exposed_names() -> set[str]:
    m = ProxyMetrics(Settings(upstream="http://127.0.0.1:9", admin_port=None))
    return set(metric_names(m.registry))


def selectors(expr: str) -> list[str]:
    """Metric names selected by a PromQL expression (Grafana's variables substituted)."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
    ast = promql_parser.parse(expr)  # raises ValueError on invalid PromQL
    names: list[str] = []

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.append(node.name)
        return True

    promql_parser.walk(ast, visit)
    return names


# --------------------------------------------------------------------------------------------
# Grafana and Prometheus
# --------------------------------------------------------------------------------------------
def dashboard_targets(dash: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in dash["panels"]:
        for sub in [panel, *panel.get("panels", [])]:
            for t in sub.get("targets", []):
                yield sub["title"], t["expr"]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", q)
            assert m, q
            yield f"variable {var['name']}", m[1]


def test_the_dashboard_uses_only_metrics_that_exist() -> None:
    dash = json.loads((DEPLOY / "grafana" / "cycles-proxy.json").read_text())
    exist = exposed_names()
    used: set[str] = set()
    for title, expr in dashboard_targets(dash):
        names = selectors(expr)
        assert names, f"{title}: {expr}"
        for name in names:
            assert name in exist, f"panel {title!r} uses {name}, which cycles-proxy does not expose"
        used.update(names)
    # the list: requests, GPU seconds, cost, tokens, denials, in-flight, authority
    # latency and errors, journal backlog, upstream TTFB and duration, remaining budget
    for family in (
        "cycles_proxy_requests_total",
        "cycles_proxy_gpu_seconds_total",
        "cycles_proxy_cost_total",
        "cycles_proxy_tokens_total",
        "cycles_proxy_denials_total",
        "cycles_proxy_inflight_requests",
        "cycles_proxy_authority_request_duration_seconds_bucket",
        "cycles_proxy_authority_errors_total",
        "cycles_proxy_journal_backlog",
        "cycles_proxy_upstream_ttfb_seconds_bucket",
        "cycles_proxy_upstream_duration_seconds_bucket",
        "cycles_proxy_budget_remaining",
    ):
        assert family in used, f"the dashboard shows nothing of {family}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert {"x", "y", "w", "h"} <= set(p["gridPos"])
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}"
    assert dash["uid"] == "cycles-proxy" and dash["schemaVersion"] >= 36


def test_alert_rules_are_valid_and_use_metrics_that_exist() -> None:
    doc = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    exist = exposed_names() | PROMETHEUS_BUILTINS
    rules = [r for g in doc["groups"] for r in g["rules"]]
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("info", "warning", "critical")
        assert rule["annotations"]["summary"]
        for name in selectors(rule["expr"]):
            assert name in exist, f"alert {rule['alert']} uses {name}, which does not exist"
    names = {r["alert"] for r in rules}
    assert {"CyclesBudgetLow", "CyclesAuthorityUnreachable", "CyclesHighDenialRate"} <= names
    [low] = [r for r in rules if r["alert"] == "CyclesBudgetLow"]
    assert "cycles_proxy_budget_remaining" in low["expr"] and "0.10" in low["expr"]
    # the scrape config loads these rules and scrapes the admin port
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yaml").read_text())
    assert prom["rule_files"] == ["/etc/prometheus/alerts.yaml"]
    [job] = prom["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["cycles-proxy:11439"]


def test_promql_checking_catches_mistakes() -> None:
    with pytest.raises(ValueError):
        selectors("sum(rate(cycles_proxy_requests_total[5m])")
    assert selectors("rate(cycles_proxy_nope_total[5m])") == ["cycles_proxy_nope_total"]
    assert "cycles_proxy_nope_total" not in exposed_names()


# --------------------------------------------------------------------------------------------
# the Dockerfile
# --------------------------------------------------------------------------------------------
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") and not pending:
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if line:
            instr, _, rest = line.partition(" ")
            out.append((instr.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    instrs = dockerfile()
    last_from = max(i for i, (k, _) in enumerate(instrs) if k == "FROM")
    return instrs[last_from:]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instr, args in final_stage():
        if instr == "ENV":
            for item in shlex.split(args):
                k, _, v = item.partition("=")
                env[k] = v
    return env


def one(instr: str) -> str:
    [args] = [a for k, a in final_stage() if k == instr]
    return args


def test_dockerfile_builds_from_files_that_exist_and_runs_as_non_root() -> None:
    for instr, args in dockerfile():
        if instr == "COPY" and "--from" not in args:
            *sources, _dest = shlex.split(args)
            for src in sources:
                matches = list(ROOT.glob(src))
                assert matches or "*" in src, f"COPY {src}: not in the repository"
    assert (ROOT / "pyproject.toml").is_file() and (ROOT / "cycles_proxy" / "cli.py").is_file()
    user = one("USER").split(":")[0]
    assert user.isdigit() and int(user) != 0, "run as a numeric non-root user"
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert "*" in ignore and "!cycles_proxy/" in ignore and "!pyproject.toml" in ignore
    # the entrypoint is the console script pyproject installs
    assert json.loads(one("ENTRYPOINT")) == ["cycles-proxy"]
    assert json.loads(one("CMD")) == ["serve"]
    assert "cycles-proxy" in (ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1]


def test_the_images_environment_is_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith("CYCLES_"):
            monkeypatch.delenv(k)
    env = image_env()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = load_settings()
    assert (s.host, s.admin_host) == ("0.0.0.0", "0.0.0.0")
    assert str(s.db) == "/data/ledger.db" and s.upstream == "http://ollama:11434"
    exposed = {int(p) for p in one("EXPOSE").split()}
    assert exposed == {s.port, s.admin_port}
    assert "/data" in one("VOLUME")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def healthcheck(env: dict[str, str]) -> int:
    """Run the image's HEALTHCHECK command as Docker would (exit status 0 = healthy)."""
    args = one("HEALTHCHECK")
    cmd = json.loads(args[args.index("CMD") + 3 :].strip())
    assert cmd[0] == "python"
    return subprocess.run(
        [sys.executable, *cmd[1:]], env=env, capture_output=True, timeout=30
    ).returncode


async def test_the_entrypoint_serves_and_the_healthcheck_sees_it(tmp_path: Path) -> None:
    script = shutil.which("cycles-proxy", path=str(Path(sys.executable).parent))
    assert script, "the cycles-proxy console script is installed (pip install -e .)"
    port, admin = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CYCLES_")}
    env.update(image_env())
    async with serve_fake_ollama() as fake:
        env.update(
            # loopback and free ports instead of the image's 0.0.0.0:11434/11439
            CYCLES_PROXY_HOST="127.0.0.1",
            CYCLES_PROXY_ADMIN_HOST="127.0.0.1",
            CYCLES_PROXY_PORT=str(port),
            CYCLES_PROXY_ADMIN_PORT=str(admin),
            CYCLES_PROXY_DB=str(tmp_path / "data" / "ledger.db"),
            CYCLES_PROXY_UPSTREAM=fake.url,
        )
        assert await asyncio.to_thread(healthcheck, env) != 0  # nothing runs yet
        entry = json.loads(one("ENTRYPOINT")) + json.loads(one("CMD"))
        proc = await asyncio.create_subprocess_exec(
            script, *entry[1:], env=env, stderr=asyncio.subprocess.PIPE
        )
        try:
            assert proc.stderr is not None
            banner = ""
            while "admin:" not in banner:
                line = await asyncio.wait_for(proc.stderr.readline(), timeout=30)
                assert line, f"serve exited early: {banner}"
                banner += line.decode()
            # serve says where it listens, which upstream and which authority it uses
            assert f"listening on http://127.0.0.1:{port}" in banner
            assert f"upstream:  {fake.url}" in banner
            assert f"embedded ledger {tmp_path / 'data' / 'ledger.db'}" in banner
            assert f"admin:     http://127.0.0.1:{admin}" in banner
            assert await asyncio.to_thread(healthcheck, env) == 0
            url = f"http://127.0.0.1:{admin}/readyz"
            ready = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).status)
            assert ready == 200
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            rc = await asyncio.wait_for(proc.wait(), timeout=30)
        assert rc == 0
        assert await asyncio.to_thread(healthcheck, env) != 0


# --------------------------------------------------------------------------------------------
# compose
# --------------------------------------------------------------------------------------------
def test_compose_puts_ollama_behind_the_proxy() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    ollama, proxy = services["ollama"], services["cycles-proxy"]
    # Ollama is not published: only the proxy reaches it, by service name
    assert "ports" not in ollama and ollama["expose"] == ["11434"]
    assert proxy["environment"]["CYCLES_PROXY_UPSTREAM"] == "http://ollama:11434"
    assert proxy["depends_on"]["ollama"]["condition"] == "service_healthy"
    assert (DEPLOY / proxy["build"]["context"] / proxy["build"]["dockerfile"]).is_file()
    ports = proxy["ports"]
    assert "11434:11434" in ports
    assert "127.0.0.1:11439:11439" in ports  # the admin port stays on the host's loopback
    assert any(v.endswith(":/data") for v in proxy["volumes"])
    # the monitoring profile mounts files that exist
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
        for volume in services[name]["volumes"]:
            src = volume.split(":")[0]
            assert (DEPLOY / src).exists(), volume
