"""Does the multilevel advantage of RMTR grow with depth?  Issue 18's depth study on the digits.

Run: ``.venv/bin/python -m benchmarks.rmtr_depth [--depths 16 32 64] [--seeds 3] [--cap S]``
(about 10 minutes on a quiet 2-core machine with the defaults; ``--quick``: depths 16 and 32,
one seed).

For each depth the same ResNets (width 16, T = 1, float64, forward Euler through the engine;
see :mod:`benchmarks.rmtr`, whose task, methods and timing this reuses) are trained by

- RMTR with 3 levels (F-cycle: nested iteration from depth/4, then V-cycles), full batch;
- the single-level L-SR1 trust region (``levels=1``, the same code), full batch;
- Adam (lr 1e-2, mini-batches of 128),

from seeds ``0 .. seeds-1``, until the training loss reaches 0.01 or the time cap.  The table
gives the medians over seeds of the wall time to the training losses 0.05 and 0.01 (monitoring
evaluations excluded), the ratio of RMTR's time to the single-level time, and the test
accuracy at the end.  The issue's goal: at depth >= 32 and the 0.01 target, 3 levels take
<= 0.6x the single-level time, with test accuracy within 1 point of Adam's.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics

import torch

from benchmarks.rmtr import TARGETS, _fmt, _median, digits, run_one

METHODS = ["RMTR 3 levels (F)", "TR 1 level", "Adam"]
GOAL_RATIO, GOAL_ACC_POINTS, GOAL_DEPTH = 0.6, 1.0, 32


def study(depths: list[int], seeds: int, cap: float | None) -> dict:
    """Every (depth, method) -> list of :func:`benchmarks.rmtr.run_one` results (one per seed)."""
    data = digits()
    results = {}
    for depth in depths:
        for method in METHODS:
            c = cap if cap is not None else 8.0 * depth / 16
            results[(depth, method)] = [run_one("digits", data, depth, method, s, c) for s in range(seeds)]
            print(f"  depth {depth}, {method}: done", flush=True)
    return results


def report(depths: list[int], seeds: int, results: dict) -> list[str]:
    lo, hi = TARGETS["digits"]
    lines = [f"| depth | method | time to {lo} [s] | time to {hi} [s] | reached {hi} | "
             f"test accuracy | time to {lo} / TR | time to {hi} / TR |", "|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for depth in depths:
        tr = results[(depth, "TR 1 level")]
        t1l, t1 = _median([r["time_loose"] for r in tr]), _median([r["time"] for r in tr])
        adam_acc = statistics.median(r["test"] for r in results[(depth, "Adam")])
        for method in METHODS:
            runs = results[(depth, method)]
            tl, t = _median([r["time_loose"] for r in runs]), _median([r["time"] for r in runs])
            rl = None if tl is None or t1l is None else tl / t1l
            r = None if t is None or t1 is None else t / t1
            acc = statistics.median(x["test"] for x in runs)
            reached = sum(x["time"] is not None for x in runs)
            lines.append(f"| {depth} | {method} | {_fmt(tl)} | {_fmt(t)} | {reached}/{seeds} | {acc:.4f} "
                         f"| {_fmt(rl)} | {_fmt(r)} |")
            if method.startswith("RMTR") and depth >= GOAL_DEPTH:
                ok = r is not None and r <= GOAL_RATIO and 100 * (adam_acc - acc) <= GOAL_ACC_POINTS
                verdicts.append(f"- depth {depth}: RMTR / TR time to {hi} = {_fmt(r)} "
                                f"(goal <= {GOAL_RATIO}), "
                                f"test accuracy {acc:.4f} vs Adam {adam_acc:.4f} "
                                f"({100 * (acc - adam_acc):+.2f} points): {'met' if ok else 'missed'}")
    return lines + ["", *verdicts]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--cap", type=float, default=None, help="seconds per run (default 8 * depth / 16)")
    ap.add_argument("--quick", action="store_true", help="depths 16 and 32, one seed")
    args = ap.parse_args(argv)
    if args.quick:
        args.depths, args.seeds = [16, 32], 1
    torch.set_num_threads(1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load {load:.1f}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
          f"1 thread; medians over {args.seeds} seed(s)")
    results = study(args.depths, args.seeds, args.cap)
    print("\n".join(report(args.depths, args.seeds, results)))


if __name__ == "__main__":
    main()
