"""SNOpt vs Adam vs SGD: wall time to training-loss targets on sklearn's digits with an ODE block.

Run: ``python -m benchmarks.snopt [--quick] [--out DIR]``.  Prints markdown tables
(machine, date, medians over seeds) and writes ``DIR/snopt_digits.png`` (training
loss vs wall time).  One torch thread; the wall time counts training only (the
full-training-set loss used for the curves is evaluated with the clock stopped).

Model: ``Linear(64, 32) -> tanh -> NeuralODE(f, rk4, 4 steps on [0, 1]) -> Linear(32, 10)``
with ``f(t, y) = W2 tanh(W1 [y, t])``; cross-entropy, mini-batches of 128, float64.
Adam is run with lr 3e-3 and 1e-2 and the better one (less time to the last
target reached) is the reference.  Goal (issue 6): SNOpt reaches the target in at
most 0.7x the wall time of the best Adam with equal or better test accuracy.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import pnode
from pnode.control import SNOpt


class Field(nn.Module):
    def __init__(self, dim: int = 32, width: int = 64) -> None:
        super().__init__()
        self.l1 = nn.Linear(dim + 1, width)
        self.l2 = nn.Linear(width, dim)

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(torch.cat([y, t.expand(y.shape[0], 1)], dim=1))))


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(),
                         pnode.NeuralODE(Field(), method="rk4", options={"step_size": 0.25}),
                         nn.Linear(32, 10)).double()


def load_data(seed: int = 0):
    from sklearn.datasets import load_digits

    ds = load_digits()
    x = torch.tensor(ds.data, dtype=torch.float64) / 16.0
    y = torch.tensor(ds.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    x, y = x[perm], y[perm]
    n_test = 400
    xtr, ytr, xte, yte = x[n_test:], y[n_test:], x[:n_test], y[:n_test]
    mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-3)
    return (xtr - mean) / std, ytr, (xte - mean) / std, yte


def make_optimizer(name: str, model: nn.Module):
    if name == "snopt":
        return SNOpt(model)
    if name.startswith("adam"):
        return torch.optim.Adam(model.parameters(), lr=float(name.split("@")[1]))
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    raise ValueError(name)


def train(name: str, seed: int, budget_s: float, data, batch: int = 128, eval_every: int = 2):
    """Train until ``budget_s`` seconds of training time; returns the loss trace and test accuracy."""
    xtr, ytr, xte, yte = data
    model = make_model(seed)
    opt = make_optimizer(name, model)
    g = torch.Generator().manual_seed(seed + 100)
    trace, clock, it = [], 0.0, 0

    def evaluate():
        with torch.no_grad():
            loss = float(F.cross_entropy(model(xtr), ytr))
            acc = float((model(xte).argmax(1) == yte).double().mean())
        trace.append((clock, loss, acc))

    evaluate()
    while clock < budget_s:
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr) - batch + 1, batch):
            idx = perm[i:i + batch]
            s = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
            clock += time.perf_counter() - s
            it += 1
            if it % eval_every == 0:
                evaluate()
            if clock >= budget_s:
                break
    evaluate()
    if hasattr(opt, "remove_hooks"):
        opt.remove_hooks()
    return trace


def time_to(trace, target: float):
    """(wall time, test accuracy) at the first evaluation with training loss <= target, else None."""
    for clock, loss, acc in trace:
        if loss <= target:
            return clock, acc
    return None


def _fmt(v, fmt="{:.2f}"):
    return "—" if v is None else fmt.format(v)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 seeds, 8 s per run (about 2 minutes)")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--budget", type=float, default=None, help="training seconds per run")
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    seeds = args.seeds or (2 if args.quick else 3)
    budget = args.budget or (8.0 if args.quick else 30.0)
    targets = [0.3, 0.1, 0.03] if not args.quick else [0.3, 0.1]
    names = ["snopt", "adam@3e-3", "adam@1e-2", "sgd"]
    data = load_data()

    # round-robin over optimizers within each seed, so a change in the machine's load
    # (shared cores) does not fall on one optimizer only
    traces = {n: [] for n in names}
    for s in range(seeds):
        for n in names:
            traces[n].append(train(n, s, budget, data))

    print(f"# SNOpt on digits (issue 6)\n\nmachine: {platform.machine()} {platform.processor() or ''}, "
          f"{os.cpu_count()} cores, date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"torch {torch.__version__}, 1 thread; {seeds} seeds, {budget:.0f} s training per run; medians "
          "over the seeds that reach the target (n/seeds)\n")
    print("| optimizer | " + " | ".join(f"time to loss {t} [s]" for t in targets)
          + " | test acc at last target | final train loss | final test acc |")
    print("|---" * (len(targets) + 4) + "|")
    summary = {}
    for n in names:
        cells, acc_at = [], None
        summary[n] = {}
        for t in targets:
            hits = [h for h in (time_to(tr, t) for tr in traces[n]) if h is not None]
            med = statistics.median(h[0] for h in hits) if len(hits) == seeds else None
            summary[n][t] = med
            if hits:
                acc_at = statistics.median(h[1] for h in hits)
            cells.append(f"{_fmt(med)} ({len(hits)}/{seeds})")
        fl = statistics.median(tr[-1][1] for tr in traces[n])
        fa = statistics.median(tr[-1][2] for tr in traces[n])
        summary[n]["final_acc"] = fa
        print(f"| {n} | " + " | ".join(cells) + f" | {_fmt(acc_at, '{:.3f}')} | {fl:.4f} | {fa:.3f} |")

    print("\n| target | best Adam | SNOpt / best Adam (goal <= 0.7) |\n|---|---|---|")
    for t in targets:
        adams = {n: summary[n][t] for n in ("adam@3e-3", "adam@1e-2") if summary[n][t] is not None}
        sn = summary["snopt"][t]
        if not adams:
            print(f"| {t} | none reached | — |")
            continue
        best = min(adams, key=adams.get)
        ratio = None if sn is None else sn / adams[best]
        print(f"| {t} | {best} ({adams[best]:.2f} s) | {_fmt(ratio)} |")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\n(matplotlib missing: no plot)")
        return
    os.makedirs(args.out, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for n in names:
        for s, tr in enumerate(traces[n]):
            ax.plot([c for c, _, _ in tr], [loss for _, loss, _ in tr], color=f"C{names.index(n)}",
                    alpha=1.0 if s == 0 else 0.35, label=n if s == 0 else None)
    for t in targets:
        ax.axhline(t, color="gray", lw=0.5, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("training wall time [s]")
    ax.set_ylabel("training loss (full set)")
    ax.set_title("digits, ODE-block classifier")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(args.out, "snopt_digits.png")
    fig.savefig(path, dpi=120)
    print(f"\nplot: {path}")


if __name__ == "__main__":
    main()
