"""Gradient error of every method against the exact discrete gradient.

Run: ``.venv/bin/python -m benchmarks.gradient_errors``.  For each method the
pnode gradient (PETSc TSAdjoint) of a loss over several output times is
compared with backpropagation through the same scheme on the same steps in
plain torch (``pnode.adjoint.reference``); ARKIMEX methods, which have no
reference implementation, are compared with central finite differences along
random directions (whose own error is ~1e-8).  Float64, a time-dependent MLP.
"""

from __future__ import annotations

import torch

import pnode
from pnode.adjoint.reference import finite_difference_errors, gradient_errors
from pnode.models import TimeMLP

T = torch.tensor([0.0, 0.3, 0.75, 1.2], dtype=torch.float64)


def _problem():
    torch.manual_seed(0)
    func = TimeMLP().double()
    y0 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    return func, y0


def reference_error(method: str, **kw) -> tuple[float, float, int]:
    func, y0 = _problem()
    _, errs = gradient_errors(func, y0, T, method=method, **kw)
    return errs[0], max(errs[1:]), pnode.last_stats().steps


def fd_error(method: str, **kw) -> tuple[float, float, int]:
    func, y0 = _problem()
    w = torch.randn(len(T), *y0.shape, dtype=torch.float64)

    def loss():
        return (pnode.odeint(func, y0, T, method=method, **kw) * w).sum()

    errs = finite_difference_errors(loss, [y0, *func.parameters()])
    return errs[0], max(errs[1:]), pnode.last_stats().steps


def main() -> None:
    torch.set_num_threads(1)
    print("| method | steps | y0 rel. error | params rel. error | compared with |")
    print("|---|---|---|---|---|")
    fixed = {"options": {"step_size": 0.1}}
    rows = [(m, fixed, reference_error) for m in
            ["euler", "midpoint", "heun", "rk3", "bosh3", "rk4", "fehlberg5", "dopri5"]]
    rows += [(m + " (adaptive)", {"rtol": 1e-6, "atol": 1e-8}, reference_error)
             for m in ["heun", "bosh3", "fehlberg5", "dopri5"]]
    rows += [(m, fixed, reference_error) for m in ["implicit_euler", "trapezoid", "theta"]]
    rows += [("trapezoid (matrix-free)", {"options": {"step_size": 0.1, "jacobian": "matfree"}},
              reference_error)]
    rows += [(m, fixed, fd_error) for m in ["kencarp3", "kencarp4", "kencarp5"]]
    for label, kw, fn in rows:
        method = label.split(" ")[0]
        e0, ep, steps = fn(method, **kw)
        what = "backprop, same scheme" if fn is reference_error else "central differences"
        print(f"| {label} | {steps} | {e0:.1e} | {ep:.1e} | {what} |")


if __name__ == "__main__":
    main()
