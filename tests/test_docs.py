"""The Markdown docs hold together: every relative link and #anchor resolves inside the repository.

A reader of a clone (or of the sdist) has only what is in the repository: a link to a file
outside it, or to a heading that was renamed, is a dead end. Links inside code blocks are code,
not links; absolute URLs are not fetched.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted(
    {
        *ROOT.glob("*.md"),
        *ROOT.glob("docs/*.md"),
        *ROOT.glob("examples/*.md"),
        *ROOT.glob("benchmarks/*.md"),
        *ROOT.glob("deploy/**/*.md"),
    }
)
INLINE_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code (where brackets are not links)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def links(path: Path) -> list[str]:
    text = prose(path.read_text())
    return INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of ``path`` (lowercased, punctuation dropped, spaces to -,
    repeats numbered), plus explicit ``<a id=…>``/``<a name=…>``."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    for line in FENCE.sub("", path.read_text()).splitlines():
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading is None:
            continue
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.group(1))  # a link's text
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    found.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", path.read_text()))
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(doc: Path) -> None:
    """Every relative link names a file or directory of the repository, and its #anchor a heading there."""
    broken = []
    for target in links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # https:, mailto:, ...
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (doc.parent / unquote(path_part)).resolve() if path_part else doc
        if not resolved.is_relative_to(ROOT):
            broken.append(f"{target}: outside the repository")
        elif not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.relative_to(ROOT)}")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_link_check_sees_links_and_anchors(tmp_path: Path) -> None:
    """The checker's own parts: links outside code, GitHub heading anchors."""
    doc = tmp_path / "x.md"
    doc.write_text(
        '# Title: `one` & two\n\n## Title: one & two\n\n[a](b.md#c) `[no](link)` ![img](i.png "t")\n'
        "```\n[no](link)\n```\n[ref]: ../r.md\n"
    )
    assert links(doc) == ["b.md#c", "i.png", "../r.md"]
    assert anchors(doc) == {"title-one--two", "title-one--two-1"}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_doc_points_at_files_outside_the_repository(doc: Path) -> None:
    """No doc sends the reader to the project's private notes (a design brief, research files) by name."""
    assert not re.search(r"shared/(research|DESIGN)|(?<![\w/])DESIGN\.md|perf-ceilings", doc.read_text())


def test_readme_shows_examples_push_py_as_it_is() -> None:
    """The walkthrough's listing of examples/push.py is the file itself."""
    readme = (ROOT / "README.md").read_text()
    listing = re.search(r"```python\n(\"\"\"Push a demo stream.*?)```\n", readme, re.DOTALL)
    assert listing is not None
    assert listing.group(1) == (ROOT / "examples" / "push.py").read_text()


def test_readme_quick_start_commands_are_the_scripts_and_ci_runs_the_test_one() -> None:
    """The README's two commands are scripts of the checkout (which make their own virtual
    environment), and CI runs exactly the test one."""
    readme = (ROOT / "README.md").read_text()
    quick_start = readme[readme.index("## Quick start") : readme.index("## A five-minute walkthrough")]
    assert re.findall(r"```sh\n(.*?)\n```", quick_start, re.DOTALL) == ["scripts/serve.sh", "scripts/test.sh"]
    for script in ("serve.sh", "test.sh"):
        path = ROOT / "scripts" / script
        assert path.stat().st_mode & 0o111, f"{path} is not executable"
        assert "use_venv" in path.read_text()
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == "scripts/test.sh"
