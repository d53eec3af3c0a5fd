#!/usr/bin/env bash
# The README's test command: installs everything the suite needs on a fresh Debian machine
# (Python 3.11 or newer), then runs it. Extra arguments go to pytest.
#
#   - Debian's chromium (browser client tests, driven by Playwright's Python package),
#     prometheus/promtool (metrics tests) and systemd's systemd-analyze (deploy/ unit checks),
#     installed with apt-get when missing;
#   - Node.js and npm (Debian's nodejs/npm), installed with apt-get when `node` is missing (and a
#     Node 22 from the npm registry when it is older than 20.19, as Debian bookworm's is),
#     then the TypeScript SDK's development packages and the AI SDK example's (`npm ci` in clients/js
#     and examples/ai-chat) for their tests; tests/test_durable_conformance.py runs the Durable
#     Streams conformance suite (vitest 4: Node >= 20.19) with npm;
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
command -v node >/dev/null 2>&1 || need+=(nodejs npm)  # the TypeScript SDK (clients/js), the Durable Streams conformance suite
command -v npm >/dev/null 2>&1 || need+=(npm)
if ((${#need[@]})); then
    sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    echo "scripts/test.sh: installing ${need[*]} with apt-get" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# Node >= 20.19 (vitest 4, in the Durable Streams conformance suite). Debian bookworm's nodejs is
# 18: then a newer Node comes from the npm registry (the node-linux-<arch> package carries the
# binary), once, into a cache, first on PATH for the rest of this script and the tests.
node_ok() { node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a == 20 && b >= 19) ? 0 : 1)'; }
if ! node_ok; then
    arch=$(node -p process.arch)
    node_dir="${XDG_CACHE_HOME:-$HOME/.cache}/relayd-tests/node-22"
    node_bin="$node_dir/node_modules/node-linux-$arch/bin"
    if [[ ! -x "$node_bin/node" ]]; then
        echo "scripts/test.sh: node $(node --version) is older than 20.19: installing node-linux-$arch@22 from npm" >&2
        npm install --prefix "$node_dir" --no-audit --no-fund --loglevel=error "node-linux-$arch@22" >/dev/null
    fi
    export PATH="$node_bin:$PATH"
    node_ok
fi

# The TypeScript SDK's build and test packages, exactly as package-lock.json pins them.
for dir in clients/js examples/ai-chat; do
    (cd "$dir" && npm ci --no-audit --no-fund --prefer-offline --loglevel=error >/dev/null)
done

source scripts/venv.sh
use_venv "$PWD" dev
scripts/lint.sh "$VENV_PYTHON"  # ruff, mypy --strict and the import-layer contracts gate the suite
if (($#)); then
    exec "$VENV_PYTHON" -m pytest "$@"  # a selection: the pure build only
fi
"$VENV_PYTHON" -m pytest

# What the compiled build runs again: the suite less what does not exercise relayd's compiled modules
# (the browser and Node clients, the Durable Streams conformance suite, docs, packaging, deploy files).
COMPILED_TESTS=(
    --ignore=tests/browser --ignore=tests/test_js_sdk.py --ignore=tests/test_js_build.py
    --ignore=tests/test_durable_conformance.py --ignore=tests/test_docs.py --ignore=tests/test_deploy.py
    --ignore=tests/test_packaging.py --ignore=tests/test_examples.py --ignore=tests/test_prometheus.py
)

# The compiled build (RELAYD_MYPYC=1: setup.py, docs/operations.md), where this machine can make it:
# built from this checkout into build/compiled, then the suite runs again against it (-P: not the
# checkout's own relayd/ from the current directory; tests/conftest.py refuses to run unless the
# compiled modules are the ones imported). mypyc compiles what mypy accepts and can still change
# what runs, so that build is tested, not assumed.
if "$VENV_PYTHON" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' &&
    command -v "${CC:-cc}" >/dev/null 2>&1; then
    echo "scripts/test.sh: building the compiled build (RELAYD_MYPYC=1) into build/compiled" >&2
    rm -rf build/compiled
    RELAYD_MYPYC=1 "$VENV_PYTHON" -m pip install --quiet --no-deps --target build/compiled . 2> >(grep -v "warning:" >&2)
    TEST_COMPILED_BUILD=1 PYTHONPATH="$PWD/build/compiled" "$VENV_PYTHON" -P -m pytest --import-mode=append \
        "${COMPILED_TESTS[@]}"
else
    echo "scripts/test.sh: no C compiler or Python headers: the compiled build (RELAYD_MYPYC=1) is not tested here" >&2
fi
