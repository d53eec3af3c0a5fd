#!/usr/bin/env python3
"""Summarise a ``py-spy record --format raw`` profile: top functions by own and total time.

    python benchmarks/pyspy_summary.py benchmarks/out/profile-*.txt [--top 30]

Own time is the leaf frame of each sample; total time counts a function once per sample in
which it appears anywhere on the stack. Line numbers are dropped so a function is one row.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m.group('func')} ({path})"


def _module(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    path = m.group("file") if m else frame
    if "relayd/" in path:
        return "relayd/" + path.split("relayd/", 1)[1]
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0]
    if "lib/python3" in path:
        return "stdlib:" + path.rsplit("/", 1)[-1]
    return path


def summarise(path: Path, top: int) -> str:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    modules: Counter[str] = Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f]
        # py-spy puts the thread name first ("process 1:..." / "thread (0x...)"): drop it
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        samples += count
        own[_short(frames[-1])] += count
        modules[_module(frames[-1])] += count
        for name in {_short(f) for f in frames}:
            total[name] += count
    if not samples:
        return f"{path}: no samples\n"
    out = [f"{path.name}: {samples} samples (non-idle)\n", "own time, top functions:"]
    out += [f"  {100 * n / samples:5.1f}%  {name}" for name, n in own.most_common(top)]
    out.append("\nown time by module/file:")
    out += [f"  {100 * n / samples:5.1f}%  {name}" for name, n in modules.most_common(top)]
    out.append("\ntotal (inclusive) time, top functions:")
    out += [f"  {100 * n / samples:5.1f}%  {name}" for name, n in total.most_common(top)]
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("profiles", nargs="+", type=Path)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    for p in args.profiles:
        sys.stdout.write(summarise(p, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
