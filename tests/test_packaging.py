"""What ships with relayd: the license text and metadata, the install extras, the changelog.

Building a wheel needs the network (setuptools>=77 in an isolated build), so the suite checks
the inputs that decide what the wheel and sdist hold; ``python -m build`` then shows LICENSE in
both (``relayd-*.dist-info/licenses/LICENSE``) and prints no setuptools deprecation warning.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_license_is_apache_2_with_its_text_shipped() -> None:
    """An SPDX license expression (not the deprecated table) and the full Apache-2.0 text in LICENSE, shipped."""
    project = PROJECT["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    assert not any(c.startswith("License ::") for c in project["classifiers"])  # PEP 639: the expression only
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in text and len(text) > 11_000
    (setuptools,) = PROJECT["build-system"]["requires"]
    assert setuptools == "setuptools>=77"  # the first to read license = "…" and license-files


def test_examples_extra_has_what_the_examples_import() -> None:
    """``pip install '.[examples]'`` installs the OpenAI SDK the examples call the model with."""
    extras = PROJECT["project"]["optional-dependencies"]
    assert any(dep.startswith("openai") for dep in extras["examples"])
    imported = {
        line.split()[1].split(".")[0]
        for path in (ROOT / "examples").glob("*.py")
        for line in path.read_text().splitlines()
        if line.startswith(("import ", "from ")) and " __future__ " not in line
    }
    local = {p.stem for p in (ROOT / "examples").glob("*.py")}
    third_party = imported - local - {"relayd", "aiohttp"} - set(sys.stdlib_module_names)
    assert third_party == {"openai"}, third_party


def test_changelog_keeps_an_unreleased_section() -> None:
    """CHANGELOG.md follows Keep a Changelog: an Unreleased section first, then the versions."""
    headings = [line for line in (ROOT / "CHANGELOG.md").read_text().splitlines() if line.startswith("## ")]
    assert headings[0] == "## [Unreleased]"
    assert f"## [{PROJECT['project']['version']}] - " in "\n".join(headings)
