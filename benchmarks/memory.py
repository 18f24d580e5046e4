"""Section 2: peak memory of one training iteration, one process per configuration.

Run alone: ``python -m benchmarks.memory [--quick]``.  Each (configuration,
problem) pair runs in a fresh interpreter: after imports and a warm-up
iteration at 10 steps the resident set size is taken as the baseline, then a
thread samples RSS every 2 ms during one full-size iteration; the table shows
the peak above that baseline.  (The process-lifetime ``ru_maxrss`` would
include import-time peaks, hence the sampler.)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.common import CONFIGS, Problem, md_table

ROOT = Path(__file__).resolve().parent.parent


def rss_mib() -> float:
    """Current resident set size of this process in MiB (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _child(cfg: str, prob: Problem) -> dict:
    import torch

    torch.set_num_threads(1)
    from benchmarks.common import build, iteration

    func, y0, t = build(prob)
    iteration(cfg, func, y0, t, 10)()  # warm-up at a small size: caches, allocator, PETSc objects
    run = iteration(cfg, func, y0, t, prob.steps)
    base = rss_mib()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    s = time.perf_counter()
    run()
    elapsed = time.perf_counter() - s
    done.set()
    sampler.join()
    peak[0] = max(peak[0], rss_mib())
    return {"mib": peak[0] - base, "baseline_mib": base, "seconds": elapsed}


def measure(cfg: str, prob: Problem, timeout: float = 300.0) -> dict:
    """Peak MiB above baseline of one iteration of ``cfg`` on ``prob``, in a fresh process."""
    args = [sys.executable, "-m", "benchmarks.memory", "--child", cfg, str(prob.steps), str(prob.batch),
            str(prob.width)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(args, capture_output=True, text=True, check=True, cwd=ROOT, env=env,
                         timeout=timeout)
    return json.loads(out.stdout.strip().splitlines()[-1])


def problems(quick: bool) -> list[Problem]:
    return [Problem(steps=n) for n in ((20,) if quick else (20, 500))]


def run(quick: bool = False, configs: tuple[str, ...] = CONFIGS, workers: int = 2) -> list[dict]:
    """Peak memory of every configuration at each step count (batch 256, width 128).

    Children run ``workers`` at a time: only their memory is reported, and start-up
    (imports) dominates their wall time.
    """
    from concurrent.futures import ThreadPoolExecutor

    probs = problems(quick)
    with ThreadPoolExecutor(workers) as pool:
        futs = {(p, c): pool.submit(measure, c, p) for p in probs for c in configs}
        return [{"problem": p.as_dict(), "memory": {c: futs[p, c].result() for c in configs}} for p in probs]


def tables(rows: list[dict]) -> str:
    configs = list(rows[0]["memory"])
    body = [[r["problem"]["steps"], *(r["memory"][c]["mib"] for c in configs)] for r in rows]
    return "\n\n".join([
        "### 2. Peak memory added by one training iteration (MiB)\n\nOne fresh process per cell; RSS "
        "sampled every 2 ms during one iteration, minus the RSS after imports and a 10-step warm-up. "
        "Batch 256, width 128 (the state is 64 KiB, one stored RK4 step with stages about 320 KiB).",
        md_table(["steps", *configs], body),
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", nargs=4, metavar=("CONFIG", "STEPS", "BATCH", "WIDTH"))
    args = ap.parse_args()
    if args.child:
        cfg, steps, batch, width = args.child
        print(json.dumps(_child(cfg, Problem(steps=int(steps), batch=int(batch), width=int(width)))))
        return
    print(tables(run(args.quick)))


if __name__ == "__main__":
    main()
