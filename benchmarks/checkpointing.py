"""Memory and time of the checkpoint policies, against plain backprop and torchdiffeq.

Run: ``.venv/bin/python -m benchmarks.checkpointing [--steps 200 1000 2000]``.

Problem (issue 4): MLP f 32-128-32 (tanh), batch 64, RK4 with fixed steps over
[0, 1], float64, one thread.  Every configuration runs in its own process; the
table shows the peak resident memory that one training iteration (forward +
gradient) adds on top of the process after imports and a warm-up, and the
median time per iteration.  Ratios are taken within the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CONFIGS = ["pnode:stages", "pnode:graph", "pnode:solution", "pnode:binomial8", "torch-backprop",
           "torchdiffeq-backprop", "torchdiffeq-adjoint"]

_CHILD = r'''
import json, resource, statistics, sys, time
import torch
torch.set_num_threads(1)
import pnode, torchdiffeq
from benchmarks.engine import mlp_field

cfg, steps, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
func = mlp_field(32, 128)
y0 = torch.randn(64, 32, dtype=torch.float64)
t = torch.tensor([0.0, 1.0], dtype=torch.float64)
h = 1.0 / steps

def rk4_loop(y):
    tt = torch.tensor(0.0, dtype=torch.float64)
    for _ in range(steps):
        k1 = func(tt, y); k2 = func(tt + h / 2, y + h / 2 * k1)
        k3 = func(tt + h / 2, y + h / 2 * k2); k4 = func(tt + h, y + h * k3)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4); tt = tt + h
    return y

def run():
    y = y0.clone().requires_grad_()
    if cfg.startswith("pnode:"):
        pol = cfg.split(":")[1]
        pol = pnode.Checkpoint.binomial(8) if pol == "binomial8" else pol
        out = pnode.odeint(func, y, t, method="rk4", options={"step_size": h}, checkpoint=pol)[-1]
    elif cfg == "torch-backprop":
        out = rk4_loop(y)
    else:
        solve = torchdiffeq.odeint_adjoint if cfg.endswith("adjoint") else torchdiffeq.odeint
        out = solve(func, y, t, method="rk4", options={"step_size": h})[-1]
    out.pow(2).sum().backward()

def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20

import threading

steps_saved = steps
steps, h = 10, 0.1
run()                      # warm-up at a small size: caches, allocator, PETSc objects
steps = steps_saved
h = 1.0 / steps
base = rss()
peak = [base]
done = threading.Event()

def sample():              # the process-lifetime ru_maxrss would include import-time peaks
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)

sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
times = []
for _ in range(repeats):
    s = time.perf_counter(); run(); times.append(time.perf_counter() - s)
done.set(); sampler.join()
print(json.dumps({"mem": peak[0] - base, "time": statistics.median(times)}))
'''


def measure(cfg: str, steps: int, repeats: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, cfg, str(steps), str(repeats)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, nargs="+", default=[200, 1000, 2000])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    res = {(c, n): measure(c, n, args.repeats) for n in args.steps for c in CONFIGS}
    print("### Peak memory added by one iteration (MiB) and median time per iteration (s)\n")
    print("| config | " + " | ".join(f"{n} steps: MiB / s" for n in args.steps) + " |")
    print("|---|" + "---|" * len(args.steps))
    for c in CONFIGS:
        cells = [f"{res[c, n]['mem']:.1f} / {res[c, n]['time']:.3f}" for n in args.steps]
        print(f"| {c} | " + " | ".join(cells) + " |")
    n_lo, n_hi = min(args.steps), max(args.steps)
    b = res["pnode:binomial8", n_hi]["mem"]
    print(f"\nbinomial(8): memory at {n_hi} steps / at {n_lo} steps = "
          f"{b / max(res['pnode:binomial8', n_lo]['mem'], 1e-9):.2f}; "
          f"vs torchdiffeq backprop at {n_hi} steps = "
          f"{b / res['torchdiffeq-backprop', n_hi]['mem']:.2f}")
    for c in CONFIGS:
        print(f"time ratio {c} / torch-backprop at {n_hi} steps: "
              f"{res[c, n_hi]['time'] / res['torch-backprop', n_hi]['time']:.2f}")


if __name__ == "__main__":
    main()
