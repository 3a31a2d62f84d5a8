"""Starting and stopping everything the benchmark measures, each in its own process.

The upstream (``bench/upstream.py``), nginx (Debian package, our own config and prefix under the
run's temporary directory), cycles-proxy (``bench/serve_cycles.py``) in its pass-through,
embedded-ledger and remote-authority configurations, the fake Cycles server
(``bench/cycles_server.py``) and the LiteLLM proxy (from ``.venv-bench``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_VENV = ROOT / ".venv-bench"
LITELLM_KEY = "sk-bench-" + "0123456789abcdef" * 2
CYCLES_KEY = "bench-cycles-key"
TENANT = "bench"
PASSTHROUGH_PREFIX = "/bench-passthrough"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_key(path: Path, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> str:
    """The tenant key a ``serve_cycles --bootstrap`` process writes before it listens."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return path.read_text().strip()
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        time.sleep(0.1)
    raise TimeoutError(f"no key in {path}")


def wait_port(port: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except OSError:
            continue
    return total


def rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def pids(self) -> list[int]:
        return tree(self.pid)

    def stop(self) -> None:
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=15)
        except subprocess.TimeoutExpired:
            for pid in reversed(self.pids()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.popen.wait(timeout=5)


def spawn(
    name: str,
    argv: list[str],
    workdir: Path,
    *,
    nice: int = 0,
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
) -> Proc:
    log = workdir / f"{name}.log"
    prefix = ["nice", "-n", str(nice)] if nice else []
    fh = open(log, "wb")  # noqa: SIM115 - the child owns it
    popen = subprocess.Popen(
        prefix + argv,
        stdout=fh,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )
    fh.close()
    return Proc(name, popen, log)


@dataclass
class Target:
    """One thing the load generator talks to."""

    name: str
    label: str
    port: int
    proc: Proc | None = None
    prefix: str = ""
    headers: list[str] = field(default_factory=list)
    #: serves the Ollama native dialect (/api/chat) to clients
    ollama: bool = True
    #: extra processes whose memory and CPU belong to this target (e.g. nginx's workers)
    metered: bool = False

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{self.prefix}{path}"

    def pids(self) -> list[int]:
        return self.proc.pids() if self.proc is not None else []


NGINX_CONF = """\
worker_processes 1;
worker_rlimit_nofile 65536;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy_temp;
    fastcgi_temp_path {prefix}/fastcgi_temp;
    uwsgi_temp_path {prefix}/uwsgi_temp;
    scgi_temp_path {prefix}/scgi_temp;
    upstream model {{
        server 127.0.0.1:{upstream};
        keepalive 256;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        client_max_body_size 16m;
        keepalive_requests 1000000;
        location / {{
            proxy_pass http://model;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


def start_nginx(workdir: Path, upstream_port: int, nice: int) -> Target:
    prefix = workdir / "nginx"
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, upstream=upstream_port, port=port))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = spawn(
        "nginx",
        [nginx, "-c", str(conf), "-p", str(prefix), "-g", "daemon off;"],
        workdir,
        nice=nice,
    )
    return Target("nginx", "nginx (proxy_buffering off)", port, proc)


def litellm_config(workdir: Path, upstream_port: int, models: list[str]) -> Path:
    lines = ["model_list:"]
    for m in models:
        lines += [
            f"  - model_name: {m}",
            "    litellm_params:",
            f"      model: openai/{m}",
            f"      api_base: http://127.0.0.1:{upstream_port}/v1",
            "      api_key: sk-upstream-unused",
        ]
    lines += [
        "litellm_settings:",
        "  telemetry: false",
        "general_settings:",
        f"  master_key: {LITELLM_KEY}",
    ]
    path = workdir / "litellm.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def start_litellm(workdir: Path, upstream_port: int, models: list[str], nice: int) -> Target:
    port = free_port()
    cfg = litellm_config(workdir, upstream_port, models)
    exe = BENCH_VENV / "bin" / "litellm"
    env = {
        # never fetch the model price map from the internet (the run only talks to 127.0.0.1)
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "NO_PROXY": "*",
        "HOME": str(workdir),
    }
    argv = [str(exe), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--num_workers", "1"]
    proc = spawn("litellm", argv, workdir, nice=nice, env=env, cwd=workdir)
    return Target(
        "litellm",
        "LiteLLM proxy",
        port,
        proc,
        headers=[f"Authorization: Bearer {LITELLM_KEY}"],
        ollama=False,
    )


def wait_http(url: str, timeout_s: float, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited early; see {proc.log}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status < 500:
                    return
        except Exception as exc:
            last = exc
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout_s} s: {last}")


def python_argv(module: str, *args: str, src: Path | None = None) -> list[str]:
    """Run ``module`` with the project's interpreter (``src`` puts another cycles_proxy first)."""
    argv = [sys.executable]
    if src is not None:
        code = (
            f"import sys; sys.path.insert(0, {str(src)!r}); "
            f"sys.argv = [{module!r}, *sys.argv[1:]]; "
            f"import runpy; runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
        )
        return [*argv, "-c", code, *args]
    return [*argv, "-m", module, *args]
