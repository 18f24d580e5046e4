"""Engine micro-benchmarks: per-callback overhead and resident memory over many iterations.

Run: ``.venv/bin/python -m benchmarks.engine [--iterations 1000]``.  Prints
markdown tables; medians over repeats, one thread, float64.

- Overhead: time per right-hand side callback inside TSSolve minus the time of
  calling ``func`` directly (the PETSc <-> Python <-> torch glue), and the same
  for the vector-Jacobian products of TSAdjointSolve.
- Memory: resident set size during repeated training iterations (solver reuse
  must keep it flat).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import resource
import statistics
import time

import torch
from torch import nn

import pnode


def mlp_field(dim: int = 32, width: int = 128) -> nn.Module:
    """The benchmark field f(t, y) = W2 tanh(W1 y + b1) + b2 (float64), as in issues 4 and 5."""
    net = nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, dim)).double()

    class F(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, t, y):
            return self.net(y)

    return F()


def median_time(fn, repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` (seconds)."""
    times = []
    for _ in range(repeats):
        s = time.perf_counter()
        fn()
        times.append(time.perf_counter() - s)
    return statistics.median(times)


def overhead(batch: int, steps: int, repeats: int) -> list[tuple[str, float]]:
    func = mlp_field()
    y0 = torch.randn(batch, 32, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    opts = {"method": "rk4", "options": {"step_size": 1.0 / steps}}

    def fwd():
        with torch.no_grad():
            pnode.odeint(func, y0, t, **opts)

    def fwd_bwd():
        y = y0.clone().requires_grad_()
        pnode.odeint(func, y, t, **opts)[-1].sum().backward()

    fwd()
    fwd_bwd()
    st = pnode.last_stats()
    n_rhs, n_vjp = st.rhs_evals, st.vjps
    t_fwd = median_time(fwd, repeats)
    t_all = median_time(fwd_bwd, repeats)
    tt = torch.tensor(0.5, dtype=torch.float64)
    with torch.no_grad():
        t_eval = median_time(lambda: [func(tt, y0) for _ in range(100)], repeats) / 100

    params = list(func.parameters())
    v = torch.randn_like(y0)

    def vjp():
        x = y0.detach().requires_grad_()
        torch.autograd.grad(func(tt, x), [x, *params], v)

    t_vjp = median_time(lambda: [vjp() for _ in range(100)], repeats) / 100
    t_adj = t_all - t_fwd
    return [
        ("RHS callbacks per solve", n_rhs),
        ("func call, direct (us)", 1e6 * t_eval),
        ("RHS callback in TSSolve (us)", 1e6 * t_fwd / n_rhs),
        ("overhead per RHS callback (us)", 1e6 * (t_fwd / n_rhs - t_eval)),
        ("vjp callbacks per adjoint", n_vjp),
        ("vjp, direct autograd (us)", 1e6 * t_vjp),
        ("vjp in TSAdjointSolve (us)", 1e6 * t_adj / n_vjp),
        ("overhead per vjp (us)", 1e6 * (t_adj / n_vjp - t_vjp)),
    ]


def jacobian_strategies(batches=(16, 64, 256), repeats=3) -> list[tuple[int, int, str, float]]:
    """Forward + adjoint time of a batched implicit solve for each Jacobian strategy."""
    from pnode.models import TimeMLP

    rows = []
    for batch in batches:
        torch.manual_seed(0)
        func = TimeMLP(4, 32).double()
        y0 = torch.randn(batch, 4, dtype=torch.float64)
        t = torch.tensor([0.0, 1.0], dtype=torch.float64)
        for jac in ("dense", "blocks", "matfree"):
            def run(func=func, y0=y0, t=t, jac=jac):
                y = y0.clone().requires_grad_()
                pnode.odeint(func, y, t, method="trapezoid",
                             options={"step_size": 0.05, "jacobian": jac})[-1].sum().backward()

            run()
            rows.append((batch, 4 * batch, jac, median_time(run, repeats)))
    return rows


def memory(iterations: int) -> list[tuple[int, float]]:
    func = mlp_field(dim=8, width=32)
    opt = torch.optim.SGD(func.parameters(), lr=1e-3)
    y0 = torch.randn(16, 8, dtype=torch.float64)
    t = torch.linspace(0, 1, 4, dtype=torch.float64)
    rows = []
    for i in range(1, iterations + 1):
        opt.zero_grad()
        pnode.odeint(func, y0, t, method="dopri5", rtol=1e-6).pow(2).mean().backward()
        opt.step()
        if i in (10, 100, iterations // 2, iterations):
            rows.append((i, _rss_mib()))
    return rows


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, date "
          f"{datetime.date.today()}, torch {torch.__version__}, 1 thread\n")
    for batch in (1, 64):
        print(f"### Engine overhead: MLP 32-128-32, batch {batch}, RK4, 100 steps\n")
        print("| quantity | value |\n|---|---|")
        for k, v in overhead(batch, 100, args.repeats):
            print(f"| {k} | {v:.1f} |" if isinstance(v, float) else f"| {k} | {v} |")
        print()
    print("### Implicit Jacobian strategies: TimeMLP(4, 32), trapezoid, 20 steps, "
          "forward + adjoint\n")
    print("| batch | unknowns | jacobian | seconds |\n|---|---|---|---|")
    for b, n, jac, sec in jacobian_strategies():
        print(f"| {b} | {n} | {jac} | {sec:.3f} |")
    print()
    print(f"### Resident memory over {args.iterations} training iterations (dopri5)\n")
    print("| iteration | RSS (MiB) |\n|---|---|")
    for i, m in memory(args.iterations):
        print(f"| {i} | {m:.1f} |")


if __name__ == "__main__":
    main()
