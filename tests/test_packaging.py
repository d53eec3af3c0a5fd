"""What ships with relayd: the license text and metadata, the install extras, the changelog.

Most tests check the inputs that decide what the wheel and sdist hold; ``python -m build`` then
shows LICENSE in both (``relayd-*.dist-info/licenses/LICENSE``) and prints no setuptools
deprecation warning. The one that builds a wheel needs setuptools>=77 from the package index
(pip's isolated build), as tests/test_deploy.py's image build check does.
"""

from __future__ import annotations

import shutil
import sys
import tomllib
from pathlib import Path

from tests.helpers import pure_wheel_files

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


def test_a_wheel_takes_nothing_from_an_earlier_build(tmp_path: Path) -> None:
    """Extension modules an earlier compiled build left in build/ do not go into the next wheel.

    setuptools packs whatever its build/lib holds: after a compiled build, a pure one (or one
    with a module fewer in HOT_MODULES) would ship stale .so files that shadow the .py files. The
    build backend starts every wheel from fresh build directories.
    """
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    for name in ("build_backend", "relayd"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for lib in ("lib", "lib.linux-x86_64-cpython-311"):  # a pure build's and a compiled build's
        stale = source / "build" / lib / "relayd"
        stale.mkdir(parents=True)
        (stale / "metrics.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF stale")
        (stale.parent / "relayd__mypyc.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF stale")
    names = pure_wheel_files(source, tmp_path / "wheels")
    assert "relayd/metrics.py" in names
    assert [n for n in names if n.endswith(".so")] == []
