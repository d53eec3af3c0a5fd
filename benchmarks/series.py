#!/usr/bin/env python3
"""Variants of the fleet workload side by side: interleaved runs, then medians and ratios.

Each round runs every variant once, in order, with fresh servers (round 1: A B C, round 2:
A B C, ...), so a slow drift of the shared machine's load falls on every variant alike instead
of on whichever ran last. After the rounds: one table of medians per variant, and the ratio of
each variant to the first one.

    python benchmarks/series.py --rounds 3 --wait-quiet-s 60 \\
        --variant one="--instances 1" \\
        --variant same="--instances 2 --placement same" \\
        --variant cross="--instances 2 --placement cross" \\
        -- --streams 200 --spawn

``--ratio-to yardstick`` divides by that variant instead of the first (issue 10: relayd as a
multiple of benchmarks/yardstick.py measured in the same rounds).

Everything after ``--`` is given to every variant (fleet.py's options); a variant's own options
come after them, so they win. Every run and every variant's medians are appended to
``out/fleet-results.jsonl`` with ``"series"`` and ``"variant"`` fields; the table also goes to
``out/series-<time>.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fleet

ROWS = [
    *fleet.TABLE_KEYS[:6],  # delivered %, duplicates, out of order, latency p50 / p99 / max
    ("relay_cpu_us_per_chunk", "relay CPU us/chunk (all relayd)"),
    ("producer_side_cpu_us_per_chunk", "  producer side us/chunk"),
    ("delivering_side_cpu_us_per_chunk", "  delivering side us/chunk"),
    ("inst_i0_cpu_us_per_chunk", "  instance 0 us/chunk"),
    ("inst_i1_cpu_us_per_chunk", "  instance 1 us/chunk"),
    ("inst_w0_cpu_us_per_chunk", "  worker 0 us/chunk"),
    ("inst_w1_cpu_us_per_chunk", "  worker 1 us/chunk"),
    ("relay_cpu_us_per_delivery", "relay CPU us/delivery"),
    ("relay_cpu_ms_per_replay", "relay CPU ms per replay"),
    ("relay_cpu_pct", "relay CPU % of a core (all)"),
    ("chunks_per_s", "durable chunks/s"),
    ("deliveries_per_s", "deliveries/s"),
    ("late_replay_ms_p50", "late joiner replay/catch-up p50 ms"),
    ("late_replay_ms_min", "replay min ms"),
    ("late_replay_ms_max", "replay max ms"),
    ("redis_cpu_us_per_chunk", "Valkey CPU us/chunk"),
    ("valkey_info_cpu_us_per_chunk", "Valkey INFO CPU us/chunk"),
    ("valkey_calls_per_chunk", "Valkey calls/chunk"),
    ("redis_cpu_pct", "Valkey CPU % of a core"),
    ("gen_cpu_pct", "generator CPU % of a core"),
    ("gen_cpu_pct_max_proc", "generator busiest process %"),
    ("warning_runs", "runs with a generator warning"),
    ("inst_i0_broker_notifications", "instance 0 notifications in"),
    ("inst_i1_broker_notifications", "instance 1 notifications in"),
    ("inst_w0_broker_notifications", "worker 0 notifications in"),
    ("inst_w1_broker_notifications", "worker 1 notifications in"),
    ("inst_i1_broker_lag_mean_ms", "instance 1 broker lag mean ms"),
    ("inst_i1_broker_lag_p99_le_ms", "instance 1 broker lag p99 <= ms"),
    ("relay_peak_rss_mib", "relay peak RSS MiB (sum)"),
    ("elapsed_s", "run time s"),
    ("send_lag_p99_ms", "producer send lag p99 ms"),
    ("foreign_load_relay_core_pct", "foreign load relay core %"),
    ("foreign_load_aux_core_pct", "foreign load aux core %"),
    ("foreign_load_all_cores_pct", "foreign load all cores %"),
    ("discarded_runs", "disturbed runs discarded"),
]
RATIOS = [
    "latency_p50_ms",
    "latency_p99_ms",
    "latency_max_ms",
    "relay_cpu_us_per_chunk",
    "relay_cpu_us_per_delivery",
    "redis_cpu_us_per_chunk",
    "valkey_info_cpu_us_per_chunk",
    "relay_peak_rss_mib",
    "chunks_per_s",
    "deliveries_per_s",
    "late_replay_ms_p50",
]


def table(names: list[str], meds: dict[str, dict[str, Any]], base_name: str | None = None) -> str:
    width = max(12, *(len(n) for n in names))
    rows = [
        (label, [meds[n].get(key, "-") for n in names]) for key, label in ROWS if any(key in meds[n] for n in names)
    ]
    base_name = base_name or names[0]
    base = meds[base_name]
    for key in RATIOS:
        cells = []
        for n in names:
            a, b = meds[n].get(key), base.get(key)
            cells.append(f"{a / b:.2f}x" if isinstance(a, int | float) and isinstance(b, int | float) and b else "-")
        if any(c != "-" for c in cells):
            rows.append((f"ratio {key} / {base_name}", cells))
    lw = max(34, *(len(label) + 1 for label, _ in rows))
    lines = [f"{'':{lw}s}" + "".join(f"{n:>{width + 2}s}" for n in names)]
    lines += [f"{label:{lw}s}" + "".join(f"{c!s:>{width + 2}s}" for c in cells) for label, cells in rows]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variant", action="append", required=True, help='NAME="fleet.py options" (repeatable)')
    ap.add_argument("--wait-quiet-s", type=float, default=0.0, help="before each run: wait up to N s for idle cores")
    ap.add_argument("--quiet-busy-pct", type=float, default=20.0)
    ap.add_argument(
        "--max-foreign-pct",
        type=float,
        default=0.0,
        help="rerun a run whose load from other processes (foreign_load_all_cores_pct) is above this (0: never)",
    )
    ap.add_argument("--retries", type=int, default=2, help="reruns of one disturbed run at most")
    ap.add_argument("--ratio-to", default=None, help="the variant the ratios divide by (default: the first)")
    ap.add_argument("fleet_args", nargs=argparse.REMAINDER, help="-- then fleet.py options for every variant")
    opts = ap.parse_args()
    common = opts.fleet_args[1:] if opts.fleet_args[:1] == ["--"] else opts.fleet_args
    common += ["--wait-quiet-s", str(opts.wait_quiet_s), "--quiet-busy-pct", str(opts.quiet_busy_pct)]

    parser = fleet.build_parser()
    variants: dict[str, argparse.Namespace] = {}
    for spec in opts.variant:
        name, _, extra = spec.partition("=")
        variants[name] = fleet.check_args(parser, parser.parse_args(common + shlex.split(extra)))
    if opts.ratio_to is not None and opts.ratio_to not in variants:
        ap.error(f"--ratio-to {opts.ratio_to}: no such variant")
    first = next(iter(variants.values()))
    fleet.stop_on_signals()
    first.out.mkdir(parents=True, exist_ok=True)
    gen_cpu = first.gen_cpu or (first.aux_cpu if first.spawn else None)
    if gen_cpu:
        os.sched_setaffinity(0, {int(c) for c in gen_cpu.split(",")})

    series = time.strftime("%Y%m%d-%H%M%S")
    results = first.out / "fleet-results.jsonl"
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    discarded = dict.fromkeys(variants, 0)

    def record(summary: dict[str, Any]) -> None:
        line = json.dumps(summary, sort_keys=True)
        with results.open("a") as fh:
            fh.write(line + "\n")

    try:
        for n in range(1, opts.rounds + 1):
            for name, args in variants.items():
                print(f"\n### round {n}/{opts.rounds}: {name}", flush=True)
                for attempt in range(opts.retries + 1):
                    summary = fleet.run_once(args, n, args.out)
                    foreign = summary.get("foreign_load_all_cores_pct") or 0.0
                    disturbed = bool(opts.max_foreign_pct) and foreign > opts.max_foreign_pct
                    summary.update(
                        kind="discarded" if disturbed and attempt < opts.retries else "run",
                        series=series,
                        variant=name,
                        instances=args.instances,
                        placement=args.placement,
                        workers=args.workers,
                    )
                    fleet.print_summary(summary)
                    record(summary)
                    if summary["kind"] == "run":
                        break
                    print(f"disturbed: {foreign}% of a core from other processes; run again", flush=True)
                    discarded[name] += 1
                runs[name].append(summary)
    except KeyboardInterrupt:
        print("\ninterrupted: children stopped", file=sys.stderr)
        return 130

    meds = {}
    variant_args = dict(spec.partition("=")[::2] for spec in opts.variant)
    for name, done in runs.items():
        med = fleet.medians(done)
        med.update(series=series, variant=name, variant_args=variant_args[name], discarded_runs=discarded[name])
        record(med)
        meds[name] = med
    text = (
        f"series {series}: {opts.rounds} rounds, medians; common options: {' '.join(common)}\n"
        + "".join(f"  {s}\n" for s in opts.variant)
        + table(list(variants), meds, opts.ratio_to)
    )
    print("\n" + text)
    (first.out / f"series-{series}.txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
