"""Section 1: time per training iteration of every configuration, and the issue-5 goals.

Run alone: ``python -m benchmarks.timing [--quick]``.  Each problem size is timed
in this process with all configurations called round-robin (so a change in
machine load hits them alike); the numbers are medians and every ratio is taken
between medians of the same round-robin.  The clock is the process's CPU time
(see :func:`run`).
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import CONFIGS, Problem, build, interleaved_medians, iteration, md_table

#: issue 5 goals on the base problem: (numerator, denominator, bound, "le" or "ge")
GOALS = (
    ("pnode-stages", "torch-backprop", 1.5, "le"),
    ("pnode-graph", "torch-backprop", 1.15, "le"),
    ("torchdiffeq-adjoint", "pnode-stages", 1.3, "ge"),
)


def problems(quick: bool) -> list[Problem]:
    """Problem sizes: steps at batch 256 / width 128, then batch and width at 20 steps."""
    steps = (20, 100) if quick else (20, 100, 500)
    batches = (16, 256) if quick else (16, 64, 256)
    widths = (64, 128) if quick else (64, 128, 256)
    out = [Problem(steps=n) for n in steps]
    out += [Problem(batch=b) for b in batches if b != 256]
    out += [Problem(width=w) for w in widths if w != 128]
    return out


def repeats_for(problem: Problem, quick: bool) -> int:
    """Fewer repeats for the long runs, so the whole suite fits its time budget."""
    if problem.steps >= 500:
        return 2
    return 3 if quick else 5


def run(quick: bool = False, configs: tuple[str, ...] = CONFIGS,
        sizes: list[Problem] | None = None, clock=time.process_time) -> list[dict]:
    """Median seconds per iteration for every problem size (default :func:`problems`) and configuration.

    ``clock``: CPU time of this process by default (one torch thread, serial PETSc: wall
    time on an idle machine, far less disturbed by other load on a shared one).
    """
    torch.set_num_threads(1)
    rows = []
    for prob in sizes or problems(quick):
        func, y0, t = build(prob)
        fns = {c: iteration(c, func, y0, t, prob.steps) for c in configs}
        # a 500-step iteration takes seconds: the first-call costs (solver set-up) are noise there
        med = interleaved_medians(fns, repeats_for(prob, quick), warmup=0 if prob.steps >= 500 else 1,
                                  clock=clock)
        rows.append({"problem": prob.as_dict(), "seconds": med, "repeats": repeats_for(prob, quick)})
    return rows


def goal_rows(rows: list[dict]) -> list[dict]:
    """The issue-5 ratios on the base problem (20 steps, batch 256, width 128), met or missed."""
    base = next((r for r in rows if r["problem"] == Problem().as_dict()), rows[0])["seconds"]
    out = []
    for num, den, bound, kind in GOALS:
        ratio = base[num] / base[den]
        met = ratio <= bound if kind == "le" else ratio >= bound
        # "missed by" as the factor the numerator (or denominator, for "ge") would have to shrink
        miss = ratio / bound if kind == "le" else bound / ratio
        out.append({"goal": f"{num} / {den} {'<=' if kind == 'le' else '>='} {bound}",
                    "ratio": ratio, "met": met, "missed_by": None if met else miss})
    return out


def tables(rows: list[dict]) -> str:
    """Markdown: seconds per iteration, ratios to plain backprop, and the goals."""
    configs = list(rows[0]["seconds"])
    head = ["steps", "batch", "width", *configs]
    sec = [[r["problem"]["steps"], r["problem"]["batch"], r["problem"]["width"],
            *(r["seconds"][c] for c in configs)] for r in rows]
    rat = [[r["problem"]["steps"], r["problem"]["batch"], r["problem"]["width"],
            *(r["seconds"][c] / r["seconds"]["torch-backprop"] for c in configs),
            r["seconds"]["torchdiffeq-adjoint"] / r["seconds"]["pnode-stages"]] for r in rows]
    goals = [[g["goal"], f"{g['ratio']:.2f}",
              "met" if g["met"] else f"missed by {100 * (g['missed_by'] - 1):.0f}%"]
             for g in goal_rows(rows)]
    return "\n\n".join([
        "### 1. Time per training iteration (s, median)\n\nCPU time of the process for forward + "
        "gradient of sum(y(1)^2); "
        "MLP 32-width-32 tanh, RK4 fixed steps on [0, 1], float64, 1 thread. All configurations "
        "of one row are timed round-robin in one process.",
        md_table(head, sec),
        "Ratio to torch-backprop (plain RK4 loop) in the same row; last column torchdiffeq-adjoint / "
        "pnode-stages.",
        md_table([*head, "tdq-adjoint / stages"], rat),
        "Issue-5 goals (20 steps, batch 256, width 128; else the first row):",
        md_table(["goal", "ratio", "status"], goals),
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    print(tables(run(args.quick)))


if __name__ == "__main__":
    main()
