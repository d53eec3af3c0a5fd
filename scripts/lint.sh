#!/usr/bin/env bash
# The static gates CI runs before the tests (scripts/test.sh calls this): lint, format, types, layers.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check relayd tests benchmarks examples
ruff format --check relayd tests benchmarks examples
mypy
lint-imports --no-cache
