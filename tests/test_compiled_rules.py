"""Rules the modules of the compiled build (setup.py's ``HOT_MODULES``) keep for mypyc.

mypyc compiles what ``mypy --strict`` accepts, but not always as CPython runs it. One such case,
found by this suite's compiled pass (mypy 2.4.1): a coroutine with an ``await`` inside a
``finally`` block. Cancelled while in its ``try`` block, it runs the ``finally`` with the
``CancelledError`` in flight and leaves that exception behind as the thread's current one
(``sys.exc_info()``) once it ends; any compiled coroutine that later awaits in a ``finally`` block
then raises that stale ``CancelledError`` when its ``finally`` ends, although nothing cancelled
it. In relayd that cut SSE responses short and skipped a producer connection's clean-up. An
``except BaseException:`` block that awaits and re-raises, and ``async with``, are compiled right,
so the compiled modules use those instead (docs/operations.md, "The compiled build").
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def compiled_modules() -> list[Path]:
    """setup.py's HOT_MODULES, read from its source (setup.py runs setup() when imported)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "HOT_MODULES" for target in node.targets
        ):
            modules = ast.literal_eval(node.value)
            return [ROOT / module for module in modules]
    raise AssertionError("setup.py has no HOT_MODULES list")


def test_the_compiled_modules_exist() -> None:
    modules = compiled_modules()
    assert modules and all(path.is_file() and path.suffix == ".py" for path in modules), modules
    assert ROOT / "relayd" / "relay.py" in modules


def test_no_compiled_coroutine_awaits_in_a_finally_block() -> None:
    """An await (or ``async with``/``async for``) in a ``finally`` block of a compiled module."""
    found: list[str] = []
    for path in compiled_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Try | ast.TryStar):
                continue
            for statement in node.finalbody:
                found += [
                    f"{path.relative_to(ROOT)}:{sub.lineno}: {ast.unparse(sub)[:60]}"
                    for sub in ast.walk(statement)
                    if isinstance(sub, ast.Await | ast.AsyncWith | ast.AsyncFor)
                ]
    assert not found, "await in a finally block of a compiled module (see this file's docstring):\n" + "\n".join(found)
