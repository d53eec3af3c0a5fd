"""Valkey's (or Redis') own account of its work, from ``INFO cpu`` and ``INFO commandstats``.

Two snapshots around a measurement window give the server's CPU (user + sys, every thread) and
the calls and microseconds per command in between; divided by the chunks stored, they say what
each chunk cost the server and in which commands. Commands a Lua script runs are counted both
as themselves and inside the script's own ``usec`` (``evalsha``), so the per-command figures do
not add up to the total when scripts run; the CPU figure is the one to compare.
"""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse


@dataclass
class Snapshot:
    cpu_s: float
    commands: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (calls, usec)


def _info(host: str, port: int, password: str | None) -> str:
    with socket.create_connection((host, port), timeout=2) as sock:
        request = b""
        if password:
            request += b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(password), password.encode())
        request += b"*2\r\n$4\r\nINFO\r\n$3\r\nall\r\n"  # "all" has commandstats; plain INFO has not
        sock.sendall(request)
        buf = b""
        if password:  # the +OK of AUTH comes first
            while b"\r\n" not in buf:
                buf += sock.recv(65536)
            buf = buf.split(b"\r\n", 1)[1]
        while b"\r\n" not in buf:
            buf += sock.recv(65536)
        head, _, body = buf.partition(b"\r\n")
        if not head.startswith(b"$"):
            raise OSError(f"INFO refused: {head[:80]!r}")
        size = int(head[1:])
        while len(body) < size:
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise OSError("connection closed during INFO")
            body += chunk
        return body[:size].decode(errors="replace")


def snapshot(address: tuple[str, int, str | None] | None) -> Snapshot | None:
    """INFO of the server at ``(host, port, password)``; None if there is none or it does not answer."""
    if address is None:
        return None
    try:
        text = _info(*address)
    except OSError:
        return None
    cpu = 0.0
    commands: dict[str, tuple[int, int]] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("used_cpu_sys", "used_cpu_user"):
            with contextlib.suppress(ValueError):
                cpu += float(value)
        elif key.startswith("cmdstat_"):
            fields = dict(item.split("=", 1) for item in value.split(",") if "=" in item)
            with contextlib.suppress(KeyError, ValueError):
                commands[key[8:].replace("|", "_")] = (int(fields["calls"]), int(fields["usec"]))
    return Snapshot(cpu, commands)


def address_of(url: str | None) -> tuple[str, int, str | None] | None:
    if not url:
        return None
    parsed = urlparse(url)
    return parsed.hostname or "127.0.0.1", parsed.port or 6379, parsed.password


def figures(before: Snapshot | None, after: Snapshot | None, chunks: int) -> dict[str, Any]:
    """``valkey_info_cpu_us_per_chunk``, ``valkey_calls_per_chunk`` and per command (calls in the
    window, not the INFO of the snapshots): ``valkey_cmd_<name>_per_chunk`` and ``_us_per_call``."""
    if before is None or after is None:
        return {}
    per = max(1, chunks)
    out: dict[str, Any] = {"valkey_info_cpu_us_per_chunk": round(1e6 * (after.cpu_s - before.cpu_s) / per, 2)}
    total = 0
    for name, (calls, usec) in sorted(after.commands.items()):
        calls0, usec0 = before.commands.get(name, (0, 0))
        n = calls - calls0
        if n <= 0 or name in ("info", "auth"):
            continue
        total += n
        out[f"valkey_cmd_{name}_per_chunk"] = round(n / per, 3)
        out[f"valkey_cmd_{name}_us_per_call"] = round((usec - usec0) / n, 2)
    out["valkey_calls_per_chunk"] = round(total / per, 3)
    return out


def describe(summary: dict[str, Any]) -> str:
    """One line: the CPU per chunk and the commands behind it."""
    names = sorted(
        k[len("valkey_cmd_") : -len("_per_chunk")]
        for k in summary
        if k.endswith("_per_chunk") and k.startswith("valkey_cmd_")
    )
    cmds = ", ".join(
        f"{n} {summary[f'valkey_cmd_{n}_per_chunk']}/chunk ({summary.get(f'valkey_cmd_{n}_us_per_call')} us/call)"
        for n in names
    )
    return f"Valkey (INFO): {summary.get('valkey_info_cpu_us_per_chunk')} us CPU/chunk; commands: {cmds or 'none'}"
