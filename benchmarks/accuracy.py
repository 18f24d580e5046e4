"""Section 3: gradient error of every configuration against the exact discrete gradient.

Run alone: ``python -m benchmarks.accuracy [--quick]``.  The exact discrete
gradient of a scheme is backpropagation through that scheme in float64 (plain
torch loops in :mod:`benchmarks.common`).  pnode and the plain loop use
classical RK4; torchdiffeq's ``"rk4"`` is Kutta's 3/8 rule, so it is compared
with backprop through a 3/8-rule loop as well as with classical RK4.  A
discrete adjoint matches its own scheme to rounding; torchdiffeq's adjoint
integrates the continuous adjoint equation and so carries its truncation error.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import CONFIGS, Problem, build, gradient, md_table, rk4_38_loop, rk4_loop


def _exact(loop, func, y0, steps) -> torch.Tensor:
    y = y0.clone().requires_grad_()
    grads = torch.autograd.grad(loop(func, y, steps).pow(2).sum(), [y, *func.parameters()])
    return torch.cat([g.reshape(-1) for g in grads])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def run(quick: bool = False, configs: tuple[str, ...] = CONFIGS,
        sizes: list[Problem] | None = None) -> list[dict]:
    """Relative 2-norm gradient errors (y0 and parameters together) per configuration and problem."""
    torch.set_num_threads(1)
    rows = []
    for prob in sizes or [Problem(steps=n, batch=64) for n in ((20,) if quick else (20, 100))]:
        steps = prob.steps
        func, y0, t = build(prob)
        classical = _exact(rk4_loop, func, y0, steps)
        kutta38 = _exact(rk4_38_loop, func, y0, steps)
        errs = {}
        for c in configs:
            g = gradient(c, func, y0, t, steps)
            own = kutta38 if c.startswith("torchdiffeq") else classical
            errs[c] = {"own_scheme": _rel(g, own), "classical_rk4": _rel(g, classical)}
        rows.append({"problem": prob.as_dict(), "errors": errs})
    return rows


def tables(rows: list[dict]) -> str:
    configs = list(rows[0]["errors"])
    body = []
    for c in configs:
        cells = []
        for r in rows:
            e = r["errors"][c]
            cells += [e["own_scheme"], e["classical_rk4"]]
        body.append([c, *cells])
    head = ["config"]
    for r in rows:
        head += [f"{r['problem']['steps']} steps: vs own scheme", "vs classical RK4"]
    return "\n\n".join([
        "### 3. Gradient error vs the exact discrete gradient (relative 2-norm)\n\n"
        "Gradient of sum(y(1)^2) with respect to y0 and all parameters, batch 64, width 128, float64. "
        "'Own scheme': backprop through the configuration's own RK4 variant (classical for pnode and "
        "torch-backprop, Kutta's 3/8 rule for torchdiffeq); 'classical RK4': backprop through the "
        "classical RK4 loop.",
        md_table(head, body),
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    print(tables(run(ap.parse_args().quick)))


if __name__ == "__main__":
    main()
