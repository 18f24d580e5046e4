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
from torch import nn

import pnode
from pnode.adjoint.reference import odeint_reference

T = torch.tensor([0.0, 0.3, 0.75, 1.2], dtype=torch.float64)


class TimeMLP(nn.Module):
    def __init__(self, dim=3, width=16):
        super().__init__()
        self.l1 = nn.Linear(dim, width)
        self.c = nn.Parameter(torch.randn(width) * 0.5)
        self.l2 = nn.Linear(width, dim)

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(y) + t * self.c))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def reference_error(method: str, **kw) -> tuple[float, float, int]:
    torch.manual_seed(0)
    func = TimeMLP().double()
    y0 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    params = list(func.parameters())
    ys = pnode.odeint(func, y0, T, method=method, **kw)
    st = pnode.last_stats()
    w = torch.randn_like(ys)
    g = torch.autograd.grad((ys * w).sum(), [y0, *params])
    ref = odeint_reference(func, y0, T, method=method, step_times=st.step_times,
                           output_steps=st.output_steps)
    r = torch.autograd.grad((ref * w).sum(), [y0, *params])
    gp, rp = torch.cat([x.reshape(-1) for x in g[1:]]), torch.cat([x.reshape(-1) for x in r[1:]])
    return _rel(g[0], r[0]), _rel(gp, rp), st.steps


def fd_error(method: str, **kw) -> tuple[float, float, int]:
    torch.manual_seed(0)
    func = TimeMLP().double()
    y0 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    params = list(func.parameters())
    ys = pnode.odeint(func, y0, T, method=method, **kw)
    steps = pnode.last_stats().steps
    w = torch.randn_like(ys)
    g = torch.autograd.grad((ys * w).sum(), [y0, *params])

    def loss():
        with torch.no_grad():
            return float((pnode.odeint(func, y0, T, method=method, **kw) * w).sum())

    errs = []
    for var, gv in zip([y0, *params], g, strict=True):
        d = torch.randn_like(var)
        eps = 1e-6
        var.data.add_(d, alpha=eps)
        fp = loss()
        var.data.add_(d, alpha=-2 * eps)
        fm = loss()
        var.data.add_(d, alpha=eps)
        fd = (fp - fm) / (2 * eps)
        errs.append(abs(float((gv * d).sum()) - fd) / max(abs(fd), 1e-300))
    return errs[0], max(errs[1:]), steps


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
