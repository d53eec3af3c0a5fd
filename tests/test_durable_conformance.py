"""The official Durable Streams server conformance suite against relayd's mount (real Valkey).

The suite is the npm package ``@durable-streams/server-conformance-tests``, pinned with its
dependencies in tests/durable/package-lock.json and installed with ``npm ci`` into a cache
directory named after the lock file's hash (``$RELAYD_TEST_CACHE``, default
``~/.cache/relayd-tests``). It runs under vitest against a relayd started here with
``[durable] enabled = true, auth = "none"`` and a 500 ms long-poll timeout (the suite's own
reference runs use the same). Every case but forks must pass: tests/durable/known-failures.txt
would list any that cannot, with the reason (docs/protocol.md, "Durable Streams").
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from relayd.config import Config
from tests.helpers import Relayd

HERE = Path(__file__).parent / "durable"
# Cases the suite (0.3.6) runs when forks are filtered out: 332 run by default, 82 are forks.
EXPECTED_CASES = 250
NOT_FORKS = "^(?!Fork - )"  # vitest -t: matched against "<group> <subgroup> <test>"
SUITE_TIMEOUT_S = 240


def _cache_dir() -> Path:
    base = Path(os.environ.get("RELAYD_TEST_CACHE") or Path.home() / ".cache" / "relayd-tests")
    digest = hashlib.sha256((HERE / "package-lock.json").read_bytes()).hexdigest()[:16]
    return base / f"ds-conformance-{digest}"


def _install() -> Path:
    """``npm ci`` of tests/durable/ into the cache (once per lock file); the directory."""
    node, npm = shutil.which("node"), shutil.which("npm")
    assert node and npm, "node and npm are needed (scripts/test.sh installs them)"
    version = subprocess.run([node, "-p", "process.versions.node"], capture_output=True, text=True, check=True)
    major, minor = (int(part) for part in version.stdout.strip().split(".")[:2])
    assert (major, minor) >= (20, 19), f"vitest 4 needs node >= 20.19, found {version.stdout.strip()}"
    cache = _cache_dir()
    if not (cache / "node_modules" / ".package-lock.json").exists():
        staging = cache.with_name(f"{cache.name}.{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for name in ("package.json", "package-lock.json"):
            shutil.copy(HERE / name, staging / name)
        subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=staging, check=True, timeout=300)
        shutil.rmtree(cache, ignore_errors=True)
        staging.rename(cache)  # whole or not at all: an interrupted install is not taken for one
    for name in ("conformance.test.mjs", "vitest.config.mjs"):
        shutil.copy(HERE / name, cache / name)
    return cache


def _results(path: Path) -> dict[str, str]:
    """Full test name -> status (passed, failed, skipped, ...) from vitest's JSON report."""
    report = orjson.loads(path.read_bytes())
    return {
        " > ".join([*case["ancestorTitles"], case["title"]]): case["status"]
        for file in report["testResults"]
        for case in file["assertionResults"]
    }


def _known_failures() -> set[str]:
    lines = (HERE / "known-failures.txt").read_text().splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


@pytest.mark.timeout(SUITE_TIMEOUT_S + 330)
async def test_every_non_fork_case_of_the_conformance_suite_passes(
    config_factory: Callable[..., Config], tmp_path: Path
) -> None:
    """Each case of the suite passes but forks (not run) and the listed known failures (none)."""
    cache = await asyncio.to_thread(_install)
    config = config_factory(durable={"enabled": True, "auth": "none", "long_poll_timeout_ms": 500})
    report = tmp_path / "results.json"
    async with Relayd(config) as server:
        vitest = await asyncio.create_subprocess_exec(
            str(cache / "node_modules" / ".bin" / "vitest"),
            "run",
            "--config",
            "vitest.config.mjs",
            "-t",
            NOT_FORKS,
            "--reporter=dot",
            "--reporter=json",
            f"--outputFile.json={report}",
            cwd=cache,
            env={**os.environ, "CONFORMANCE_TEST_URL": f"{server.url}/ds", "NO_COLOR": "1"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(vitest.communicate(), SUITE_TIMEOUT_S)
    log = output.decode(errors="replace")
    assert report.exists(), f"vitest wrote no report (exit {vitest.returncode}):\n{log[-5000:]}"
    results = _results(report)
    ran = {name: status for name, status in results.items() if status in ("passed", "failed")}
    failed = {name for name, status in ran.items() if status == "failed"}
    known = _known_failures()
    assert not failed - known, f"conformance cases failed:\n{log[-20000:]}"
    assert not known - failed, f"known failures that pass now (prune them): {sorted(known - failed)}"
    assert not [name for name in ran if name.startswith("Fork - ")]
    assert len(ran) == EXPECTED_CASES, f"{len(ran)} cases ran, expected {EXPECTED_CASES} (another suite version?)"
    passed = len(ran) - len(failed)
    print(f"conformance: {passed} passed, {len(failed)} failed, {len(results) - len(ran)} skipped")
