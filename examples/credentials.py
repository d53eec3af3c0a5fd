"""Where the examples find relayd's API key and JWT secret, so each runs with one command.

In order: the command-line option, the environment (``RELAYD_API_KEY``; ``RELAYD_JWT_SECRET``
or ``RELAYD_AUTH_JWT_SECRET``, the variable relayd itself reads), then the development
credentials ``relayd serve`` writes when none are configured: ``./relayd-data/dev-credentials``,
the API key on its first line and the JWT secret on its second.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DEV_CREDENTIALS = Path("relayd-data") / "dev-credentials"


def api_key(given: str | None = None, path: Path = DEV_CREDENTIALS) -> str:
    return given or os.environ.get("RELAYD_API_KEY") or _dev_line(path, 0, "RELAYD_API_KEY / --api-key")


def jwt_secret(given: str | None = None, path: Path = DEV_CREDENTIALS) -> str:
    env = os.environ.get("RELAYD_JWT_SECRET") or os.environ.get("RELAYD_AUTH_JWT_SECRET")
    return given or env or _dev_line(path, 1, "RELAYD_JWT_SECRET / --jwt-secret")


def _dev_line(path: Path, index: int, option: str) -> str:
    try:
        return path.read_text().split()[index]
    except (OSError, IndexError):
        sys.exit(f"no credentials: set {option}, or run `relayd serve` in this directory first (it writes {path})")
