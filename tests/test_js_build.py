"""The TypeScript package's build outputs: the checked-in browser client, and what npm would publish.

relayd serves relayd/web/static/relayd-client.js at /v1/client.js; it is generated from
clients/js/src by clients/js/build-browser.mjs and checked in. Rebuilt into a temporary file here,
it must be byte-for-byte the checked-in one: a change to the source without `npm run build` fails.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from relayd.web.static import CLIENT_JS
from tests.jsnode import JS, require_node

CHECKED_IN = JS.parents[1] / "relayd" / "web" / "static" / CLIENT_JS


def test_the_checked_in_browser_client_is_the_build_of_the_current_source(tmp_path: Path) -> None:
    out = tmp_path / "client.js"
    done = subprocess.run(
        [require_node(), "build-browser.mjs", str(out)], cwd=JS, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert out.read_bytes() == CHECKED_IN.read_bytes(), (
        "relayd/web/static/relayd-client.js is out of date: run `npm run build` in clients/js and commit it"
    )
    assert out.read_text().startswith("// relayd browser client"), "the generated header"


def test_npm_pack_holds_the_modules_their_types_the_readme_and_the_license() -> None:
    require_node()
    done = subprocess.run(
        ["npm", "pack", "--dry-run", "--json", "--silent"], cwd=JS, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (pack,) = json.loads(done.stdout[done.stdout.index("[") :])
    files = {entry["path"] for entry in pack["files"]}
    manifest = json.loads((JS / "package.json").read_text())
    for entry in manifest["exports"].values():
        if isinstance(entry, dict):
            assert {entry["types"].removeprefix("./"), entry["default"].removeprefix("./")} <= files
    assert {"README.md", "LICENSE", "package.json"} <= files
    assert not any(path.startswith(("src/", "test/", "node_modules/")) for path in files)
