#!/usr/bin/env bash
# The README's quick start: relayd on its embedded default (127.0.0.1:8080, data in
# ./relayd-data), from this checkout. relayd is installed in the active virtual environment or
# else in the checkout's .venv, made on first use (scripts/venv.sh): a system Python refuses
# `pip install` outside one. Arguments go to `relayd serve` (e.g. --port 9000, --config relay.toml).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
source "$root/scripts/venv.sh"
use_venv "$root" ""
exec relayd serve "$@"
