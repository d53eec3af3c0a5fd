#!/usr/bin/env bash
# The README's test command: installs everything the suite needs on a fresh Debian machine
# (Python 3.11 or newer), then runs it. Extra arguments go to pytest.
#
#   - Debian's chromium (browser client tests, driven by Playwright's Python package),
#     prometheus/promtool (metrics tests), systemd's systemd-analyze (deploy/ unit checks) and
#     Node.js with npm (tests/test_durable_conformance.py runs an npm test suite), installed with
#     apt-get when missing;
#   - relayd with its dev extras (pytest, websockets, playwright, openai, ...), in the active
#     virtual environment or else in ./.venv, made on first use (scripts/venv.sh): a system
#     Python refuses `pip install` outside one.
# Tests start their own Redis-compatible server (the embedded Valkey) on a free port.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)  # deploy/systemd unit checks
command -v npm >/dev/null 2>&1 || need+=(nodejs npm)  # the Durable Streams conformance suite (vitest 4: node >= 20.19)
if ((${#need[@]})); then
    sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    echo "scripts/test.sh: installing ${need[*]} with apt-get" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

source scripts/venv.sh
use_venv "$PWD" dev
scripts/lint.sh "$VENV_PYTHON"  # ruff, mypy --strict and the import-layer contracts gate the suite
exec "$VENV_PYTHON" -m pytest "$@"
