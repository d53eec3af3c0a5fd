"""relayd/ as of a git commit, for the benchmarks' side-by-side runs (``--ref``, ``--relayd-ref``).

extract_relayd("8c8110b", tree)            # tree/relayd/ as of that commit (git archive)
run_at_ref("8c8110b", __file__, argv)      # this script again with that relayd/; its last line
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def extract_relayd(ref: str, into: Path | str) -> None:
    """Write relayd/ as of ``ref`` into ``into`` (read-only for the repository: git archive)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "relayd"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)


def run_at_ref(ref: str, script: str, argv: list[str]) -> str:
    """Run ``script`` with ``argv`` against relayd/ as of ``ref``; the last line it printed."""
    with tempfile.TemporaryDirectory() as tree:
        extract_relayd(ref, tree)
        out = subprocess.run(
            [sys.executable, script, *argv],
            env={**os.environ, "PYTHONPATH": tree},
            check=True,
            capture_output=True,
            text=True,
        )
    return out.stdout.strip().splitlines()[-1]
