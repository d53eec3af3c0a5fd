"""Running the TypeScript SDK's node tests (clients/js/test) from pytest, against a real relayd.

``build()`` compiles clients/js/src into clients/js/dist with tsc (once per session);
``node_test()`` runs ``node --test`` on some of its test files with relayd's URL and secrets in
the environment and returns the exit code and the TAP output. clients/js/node_modules must be
installed (``npm ci`` in clients/js: scripts/test.sh does it).
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import API_KEY, JWT_SECRET

JS = Path(__file__).resolve().parents[1] / "clients" / "js"
NODE_TIMEOUT_S = 60


def require_node() -> str:
    node = shutil.which("node")
    if node is None or not (JS / "node_modules" / "typescript").is_dir():
        pytest.fail(
            "the TypeScript SDK tests need node and `npm ci` in clients/js: run the suite with scripts/test.sh",
            pytrace=False,
        )
    return node


@functools.cache
def build() -> None:
    """tsc: clients/js/src -> clients/js/dist (what the node tests import)."""
    node = require_node()
    tsc = JS / "node_modules" / "typescript" / "bin" / "tsc"
    done = subprocess.run([node, str(tsc), "-p", "tsconfig.json"], cwd=JS, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"tsc failed:\n{done.stdout}{done.stderr}"


async def node_test(relayd_url: str, *files: str, **env: str) -> tuple[int, str]:
    """``node --test`` on clients/js/test/<files>; (exit code, TAP output)."""
    node = require_node()
    build()
    proc = await asyncio.create_subprocess_exec(
        node,
        "--test",
        "--test-reporter=tap",
        *(f"test/{name}" for name in files),
        cwd=JS,
        env={
            **os.environ,
            "RELAYD_URL": relayd_url,
            "RELAYD_API_KEY": API_KEY,
            "RELAYD_JWT_SECRET": JWT_SECRET,
            **env,
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), NODE_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
        return -1, out.decode(errors="replace") + f"\n(node --test killed after {NODE_TIMEOUT_S}s)"
    return proc.returncode or 0, out.decode(errors="replace")
