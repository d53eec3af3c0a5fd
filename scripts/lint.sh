#!/usr/bin/env bash
# The static gates CI runs before the tests (scripts/test.sh calls this): lint, format, types, layers.
#   scripts/lint.sh [PYTHON]   # the interpreter whose environment has the dev extras (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-python3}
"$py" -m ruff check relayd tests benchmarks examples
"$py" -m ruff format --check relayd tests benchmarks examples
"$py" -m mypy
"$py" -c 'import sys; from importlinter.cli import lint_imports_command; sys.argv = ["lint-imports", "--no-cache"]; lint_imports_command()'
