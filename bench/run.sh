#!/usr/bin/env bash
# The benchmark's one command: installs what it needs, runs every target, writes
# bench/RESULTS.md and bench/results.json. Arguments go to `python -m bench` (see --help).
# Everything it starts listens on and talks to 127.0.0.1 only, and stops when it ends.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# the project (cycles-proxy) and what the benchmark's own processes use
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q -e . uvloop jsonschema pyyaml

# nginx (the plain reverse proxy to compare with) and wrk (saturation), from Debian
if ! command -v nginx >/dev/null 2>&1 || ! command -v wrk >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "nginx and wrk are missing: run as root, or apt-get install nginx wrk" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq nginx wrk
fi

# LiteLLM proxy (and py-spy for bench/profile.py) in a separate venv (gitignored: .venv-*).
# Never 1.107.0: that release was compromised.
if [ ! -x .venv-bench/bin/litellm ] || [ ! -x .venv-bench/bin/py-spy ]; then
  "$PY" -m venv .venv-bench
  .venv-bench/bin/python -m pip install -q 'litellm[proxy]!=1.107.0' py-spy
fi

# 1,000 open streams need a few thousand descriptors per process
ulimit -n 65536 2>/dev/null || ulimit -n 16384 2>/dev/null || true
exec .venv/bin/python -m bench "$@"
