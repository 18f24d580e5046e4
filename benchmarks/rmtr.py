"""RMTR (multilevel trust region) against single-level trust region, Adam and SGD.

Run: ``.venv/bin/python -m benchmarks.rmtr [--quick] [--depths 16 32 64] [--repeats 3]``.

Tasks (issue 7): sklearn's bundled 8x8 digits (no download; 75/25 stratified
split, pixels scaled to [0, 1], cross-entropy) and a generated regression task
(8 inputs, smooth nonlinear target, mean-squared error), both with the
fully connected :class:`pnode.multilevel.ResNet` (width 16, T = 1, float64)
whose blocks are one forward-Euler ``pnode.odeint`` solve.  For depth 16, 32
and 64 every method trains from the same initialisations until the training
loss reaches the task's target (or a time cap); the tables give medians over
the repeats of the wall time and work units (one unit = one gradient of the
finest network on the whole training set) to the target, the test accuracy
(or test MSE) when it was reached, and the ratio of each time to that of the
single-level trust region.  Monitoring evaluations of the full training loss
are excluded from every method's time and work.  One torch thread.

Methods: RMTR with 3 levels as an F-cycle (nested iteration from depth/4, then
V-cycles) and as plain V-cycles, the single-level L-SR1 trust region (``levels=1``,
same code), Adam (lr 1e-2) and SGD with momentum (lr 0.1, 0.9), mini-batches of 128.
RMTR runs deterministic (full batch).  Plots go to ``bench-out/rmtr_<task>.png`` (``--plots DIR``).
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from pnode.multilevel import RMTR, History, ResNet

METHODS = ["RMTR 3 levels (F)", "RMTR 3 levels (V)", "TR 1 level", "Adam", "SGD"]
# (moderate, tight) training-loss targets; runs stop at the tight one
TARGETS = {"digits": (0.05, 0.01), "regression": (0.01, 0.005)}
WIDTH = 16


def digits() -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    Xtr, Xte, ytr, yte = train_test_split(d.data / 16.0, d.target, test_size=0.25, random_state=0,
                                          stratify=d.target)
    f = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    return f(Xtr), torch.tensor(ytr), f(Xte), torch.tensor(yte)


def regression(n_train: int = 1024, n_test: int = 256) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(123)
    W = torch.randn(8, 3, dtype=torch.float64, generator=gen) / math.sqrt(8)
    X = torch.randn(n_train + n_test, 8, dtype=torch.float64, generator=gen)
    Z = X @ W
    y = (torch.sin(2 * Z[:, 0]) * torch.cos(Z[:, 1]) + 0.5 * torch.tanh(Z[:, 2])).unsqueeze(1)
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


def _make(task: str, depth: int, seed: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    if task == "digits":
        return ResNet(64, WIDTH, depth, 10).double(), nn.CrossEntropyLoss()
    return ResNet(8, WIDTH, depth, 1).double(), nn.MSELoss()


def _test_metric(net: nn.Module, task: str, Xte: torch.Tensor, yte: torch.Tensor) -> float:
    with torch.no_grad():
        out = net(Xte)
    if task == "digits":
        return float((out.argmax(dim=1) == yte).double().mean())
    return float(nn.functional.mse_loss(out, yte))


def _first_order(net, loss_fn, X, y, target, cap, opt_name, seed) -> History:
    """Adam / SGD on mini-batches of 128, monitored once per epoch (monitoring untimed)."""
    params = list(net.parameters())
    opt = (torch.optim.Adam(params, lr=1e-2) if opt_name == "Adam"
           else torch.optim.SGD(params, lr=0.1, momentum=0.9))
    gen = torch.Generator().manual_seed(seed)
    N, b = X.shape[0], 128
    hist, elapsed, work = History(), 0.0, 0.0
    while elapsed < cap:
        t0 = time.perf_counter()
        perm = torch.randperm(N, generator=gen)
        for i in range(0, N, b):
            idx = perm[i:i + b]
            opt.zero_grad()
            loss_fn(net(X[idx]), y[idx]).backward()
            opt.step()
            work += idx.numel() / N
        elapsed += time.perf_counter() - t0
        with torch.no_grad():
            out = net(X)
            loss = float(loss_fn(out, y))
        hist.loss.append(loss)
        hist.time.append(elapsed)
        hist.work.append(work)
        hist.accuracy.append(float((out.argmax(1) == y).double().mean()) if not y.is_floating_point()
                             else math.nan)
        if not math.isfinite(loss) or loss <= target:
            break
    return hist


def run_one(task, data, depth, method, seed, cap) -> dict:
    Xtr, ytr, Xte, yte = data
    net, loss_fn = _make(task, depth, seed)
    loose, target = TARGETS[task]
    if method.startswith("RMTR") or method.startswith("TR"):
        levels = 1 if method.startswith("TR") else 3
        cycle = "F" if "(F)" in method else "V"
        hist = RMTR(net, loss_fn, levels=levels, cycle=cycle, progress=False, seed=seed).fit(
            Xtr, ytr, max_seconds=cap, target_loss=target)
    else:
        hist = _first_order(net, loss_fn, Xtr, ytr, target, cap, method, seed)
    return {"time": hist.first_reaching(target), "work": hist.first_reaching(target, "work"),
            "time_loose": hist.first_reaching(loose), "work_loose": hist.first_reaching(loose, "work"),
            "test": _test_metric(net, task, Xte, yte), "hist": hist}


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _fmt(v, spec=".2f"):
    return "—" if v is None else format(v, spec)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="depth 16, one repeat (~2 min)")
    ap.add_argument("--depths", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tasks", nargs="+", default=["digits", "regression"])
    ap.add_argument("--cap", type=float, default=None, help="seconds per run (default 8 * depth / 16)")
    ap.add_argument("--plots", default="bench-out", help="directory for the PNG plots")
    args = ap.parse_args(argv)
    if args.quick:
        args.depths, args.repeats = [16], 1
    torch.set_num_threads(1)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {platform.node()}, date "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch "
          f"{torch.__version__}, 1 thread; medians over {args.repeats} seed(s)\n")
    results: dict = {}
    for task in args.tasks:
        data = digits() if task == "digits" else regression()
        metric = "test acc" if task == "digits" else "test MSE"
        print(f"### {task}: train {data[0].shape[0]}, test {data[2].shape[0]}, ResNet width {WIDTH}, "
              f"training-loss targets {TARGETS[task][0]} and {TARGETS[task][1]}\n")
        lo, hi = TARGETS[task]
        print(f"| depth | method | time to {lo} [s] | work to {lo} | time to {hi} [s] | work to {hi} | "
              f"reached {hi} | {metric} | time to {lo} / TR | time to {hi} / TR |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for depth in args.depths:
            cap = args.cap or 8.0 * depth / 16
            rows = {}
            for method in METHODS:
                runs = [run_one(task, data, depth, method, seed, cap) for seed in range(args.repeats)]
                rows[method] = runs
                results[(task, depth, method)] = runs
            t1 = _median([r["time"] for r in rows["TR 1 level"]])
            t1l = _median([r["time_loose"] for r in rows["TR 1 level"]])
            for method, runs in rows.items():
                t = _median([r["time"] for r in runs])
                tl = _median([r["time_loose"] for r in runs])
                ratio = None if t is None or t1 is None else t / t1
                ratio_l = None if tl is None or t1l is None else tl / t1l
                reached = sum(r["time"] is not None for r in runs)
                test = statistics.median(r["test"] for r in runs)
                wl = _median([r["work_loose"] for r in runs])
                w = _median([r["work"] for r in runs])
                print(f"| {depth} | {method} | {_fmt(tl)} | {_fmt(wl, '.1f')} | {_fmt(t)} | {_fmt(w, '.1f')} "
                      f"| {reached}/{len(runs)} | {test:.4f} | {_fmt(ratio_l)} | {_fmt(ratio)} |", flush=True)
        print()
        _plot(task, args.depths, results, Path(args.plots))
    _goals(args, results)


def _goals(args, results) -> None:
    print("### goal: 3 levels reach the target in <= 0.7x the time of 1 level, test accuracy within 1% "
          "of Adam's (digits)\n")
    for task in args.tasks:
        for depth in args.depths:
            for method in METHODS[:2]:
                for key, target in (("time_loose", TARGETS[task][0]), ("time", TARGETS[task][1])):
                    t3 = _median([r[key] for r in results[(task, depth, method)]])
                    t1 = _median([r[key] for r in results[(task, depth, "TR 1 level")]])
                    ratio = None if t3 is None or t1 is None else t3 / t1
                    line = f"- {task}, depth {depth}, {method}, target {target}: time ratio {_fmt(ratio)}"
                    ok = ratio is not None and ratio <= 0.7
                    if task == "digits":
                        a3 = statistics.median(r["test"] for r in results[(task, depth, method)])
                        aa = statistics.median(r["test"] for r in results[(task, depth, "Adam")])
                        line += f", test accuracy {a3:.4f} vs Adam {aa:.4f} ({100 * (a3 - aa):+.2f} points)"
                        ok = ok and a3 >= aa - 0.01
                    print(line + (" — met" if ok else " — missed"))
    print()


def _plot(task, depths, results, outdir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(depths), figsize=(4.5 * len(depths), 7), squeeze=False)
    for j, depth in enumerate(depths):
        for method in METHODS:
            h = results[(task, depth, method)][0]["hist"]
            axes[0, j].semilogy(h.time, h.loss, label=method)
            axes[1, j].semilogy(h.work, h.loss, label=method)
        for i, xl in enumerate(("wall time [s]", "work units")):
            for target in TARGETS[task]:
                axes[i, j].axhline(target, color="k", lw=0.8, ls=":")
            axes[i, j].set_xlabel(xl)
            axes[i, j].set_ylabel("training loss")
            axes[i, j].set_title(f"{task}, depth {depth} (seed 0)")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / f"rmtr_{task}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot: {path}\n")


if __name__ == "__main__":
    main()
