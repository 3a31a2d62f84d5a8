"""The command line as a user runs it: real subprocesses, a real ledger file, a real server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import ollama
import pytest


def run(db: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CYCLES_PROXY_DB": str(db)}
    env.pop("CYCLES_BASE_URL", None)
    proc = subprocess.run(
        [sys.executable, "-m", "cycles_proxy", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_keys_create_prints_only_the_key_and_list_never_shows_it(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    key = run(db, "keys", "create", "acme").stdout.strip()
    assert key.startswith("cyp_") and len(key) > 40 and "\n" not in key
    admin = run(db, "keys", "create", "ops", "--role", "admin", "--label", "ci").stdout.strip()
    listing = run(db, "keys", "list", "--json").stdout
    rows = json.loads(listing)
    assert {(r["tenant"], r["role"]) for r in rows} == {("acme", "user"), ("ops", "admin")}
    assert key not in listing and admin not in listing
    assert key not in run(db, "keys", "list").stdout
    # the file holds hashes only
    assert key.encode() not in db.read_bytes()
    key_id = next(r["key_id"] for r in rows if r["tenant"] == "acme")
    assert "revoked" in run(db, "keys", "revoke", key_id).stdout
    assert [r["tenant"] for r in json.loads(run(db, "keys", "list", "--json").stdout)] == ["ops"]
    again = run(db, "keys", "revoke", key_id, check=False)
    assert again.returncode == 2 and "no active key" in again.stderr


def test_budgets_accept_readable_amounts_and_show_as_json(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    out = run(db, "budgets", "set", "acme", "5usd", "--period", "daily").stdout
    assert "tenant:acme" in out and "$5.00" in out
    run(db, "budgets", "set", "beta", "250000")
    rows = json.loads(run(db, "budgets", "show", "--json").stdout)
    by_scope = {r["scope"]: r for r in rows}
    assert by_scope["tenant:acme"]["allocated"] == 500_000_000
    assert by_scope["tenant:acme"]["period"] == "daily"
    assert by_scope["tenant:acme"]["period_ends"] is not None
    assert by_scope["tenant:beta"]["remaining"] == 250_000
    one = json.loads(run(db, "budgets", "show", "acme", "--json").stdout)
    assert [r["scope"] for r in one] == ["tenant:acme"]
    table = run(db, "budgets", "show").stdout
    assert "TENANT:ACME" not in table and "tenant:acme" in table and "$5.00" in table


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("budgets", "set", "acme", "five dollars"), "cannot read the amount"),
        (("budgets", "set", "bad name!", "5usd"), "invalid tenant name"),
        (("budgets", "show", "nobody"), "has no budget"),
        (("keys", "create", "x y"), "invalid tenant name"),
    ],
)
def test_cli_errors_say_what_to_fix(tmp_path: Path, args: tuple[str, ...], fragment: str) -> None:
    proc = run(tmp_path / "ledger.db", *args, check=False)
    assert proc.returncode == 2
    assert fragment in proc.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the process exited"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


def test_serve_as_a_user_runs_it(tmp_path: Path) -> None:
    """The README's flow, all in separate processes: an upstream, keys and budgets with the CLI,
    `serve`, the real ollama client, a denial once the budget is spent, usage, a clean SIGTERM."""
    db = tmp_path / "ledger.db"
    up_port, port = free_port(), free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.fake_ollama", "--port", str(up_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    env = {**os.environ, "CYCLES_PROXY_DB": str(db), "CYCLES_PROXY_ADMIN_PORT": "none"}
    env.pop("CYCLES_BASE_URL", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cycles_proxy",
            "serve",
            "--port",
            str(port),
            "--upstream",
            f"http://127.0.0.1:{up_port}",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        key = run(db, "keys", "create", "acme").stdout.strip()
        run(db, "budgets", "set", "acme", "1usd")
        wait_for_port(up_port, upstream)
        wait_for_port(port, proc)
        c = ollama.Client(host=f"127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"})
        assert c.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}]).done
        parts = list(c.generate(model="llama3.2", prompt="hi", stream=True))
        assert parts[-1].done
        usage = json.loads(run(db, "usage", "--json").stdout)
        assert [(u["tenant"], u["model"], u["requests"]) for u in usage] == [
            ("acme", "ollama:llama3.2", 2)
        ]
        shown = json.loads(run(db, "budgets", "show", "acme", "--json").stdout)[0]
        assert shown["spent"] == usage[0]["cost"] > 0
        assert shown["reserved"] == 0
        run(db, "budgets", "set", "acme", str(shown["spent"]))  # nothing left
        with pytest.raises(ollama.ResponseError) as info:
            c.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
        assert info.value.status_code == 429
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=20)
        upstream.terminate()
        upstream.wait(timeout=10)
    assert code == 0
    assert proc.stderr is not None
    log = proc.stderr.read()
    assert f"listening on http://127.0.0.1:{port}" in log
    assert f"http://127.0.0.1:{up_port}" in log and "embedded ledger" in log
    assert key not in log  # keys never reach a log line
    assert '"outcome":"denied"' in log
