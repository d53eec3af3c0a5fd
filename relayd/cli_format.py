"""How ``relayd streams …`` and ``relayd status`` print: sizes, durations, times, tables, chunks.

Plain functions of values to text, kept apart from the commands (relayd/cli_admin.py) so the
commands read as what they ask relayd and what they print, not how.
"""

from __future__ import annotations

import re
import time
from typing import Any, TextIO

import click
import orjson


def print_json(value: Any) -> None:
    """The API's answer as it is, indented: what ``--json`` prints."""
    click.echo(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


def human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def when(ms: int | None) -> str:
    """A time in milliseconds since the epoch, local, to the millisecond; ``-`` for none."""
    if not ms:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) + f".{ms % 1000:03d}"


def table(rows: list[list[str]], out: TextIO | None = None) -> None:
    """Columns padded to their widest cell: the first left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        click.echo("  ".join(cells).rstrip(), file=out)


def write_chunk(data: Any, out: TextIO, escape: bool = False) -> None:
    """Text: strings as they are (a text stream reads as its text), anything else one JSON per line.

    ``escape`` (when ``out`` is a terminal): control characters written as escapes (:func:`escape_controls`).
    """
    text = data if isinstance(data, str) else orjson.dumps(data).decode() + "\n"
    out.write(escape_controls(text) if escape else text)


def write_json_line(frame: Any, out: TextIO, escape: bool = False) -> None:
    """One frame as one JSON line (``--json``, ``export`` jsonl); ``escape`` as for :func:`write_chunk`.

    orjson escapes C0 controls already; DEL, C1 and the bidirectional controls it writes as they are.
    """
    line = orjson.dumps(frame).decode()
    out.write((escape_controls(line) if escape else line) + "\n")


# What a terminal acts on instead of showing: C0 controls but tab and newline (ESC starts the
# sequences that set the window title, clear the screen or write the clipboard; CR overwrites a
# line), DEL, C1 controls (U+009B is a CSI on some terminals), and the bidirectional overrides
# and isolates that reorder what is shown.
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def escape_controls(text: str) -> str:
    """``text`` with every control character a terminal would act on written as ``\\xNN`` / ``\\uNNNN``.

    For what goes to an operator's terminal: a stream's chunks and messages are the producer's
    (a model's) text, and must not be able to drive the terminal.
    """
    return _CONTROLS.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def gap_line(gap: dict[str, Any]) -> str:
    """The stderr line for a ``gap`` frame: which part of the history is gone."""
    return f"-- gap: the history between {gap.get('cursor')} and {gap.get('next')} is gone (trimmed or expired)"
