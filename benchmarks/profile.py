"""Section 5: where the time of one engine callback goes (PETSc, pnode's Python glue, torch).

Run alone: ``python -m benchmarks.profile [--quick]``.  RK4 with fixed steps,
batch 256, MLP 32-128-32, float64, one thread.  Per RHS callback of TSSolve:

- *PETSc + petsc4py*: a bare petsc4py TS (same RK4, same state size) whose
  Python RHS callback only copies the state; wall time / callbacks.
- *pnode glue*: pnode with a trivial field ``a * y`` (one parameter), per
  callback, minus the bare-PETSc time and minus a direct call of that field.
- *torch*: time spent inside the MLP field during the solve, measured by a
  timer wrapped around ``forward``.
- *total*: forward-solve wall time / callbacks with the MLP; *rest* is what the
  three parts do not explain (cache effects, load).

Per adjoint stage (vjp callback of TSAdjointSolve) the same split uses the
trivial field's adjoint time per vjp for PETSc + glue, and a direct
``torch.autograd.grad`` of the MLP for torch.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import pnode
from benchmarks.common import Problem, build, md_table


class _Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(-0.5, dtype=torch.float64))

    def forward(self, t, y):
        return self.a * y


class _Timed(nn.Module):
    """Wraps a field and accumulates the wall time spent in its forward."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seconds = 0.0
        self.calls = 0

    def forward(self, t, y):
        s = time.perf_counter()
        out = self.inner(t, y)
        self.seconds += time.perf_counter() - s
        self.calls += 1
        return out


def _bare_petsc(n: int, steps: int, repeats: int) -> float:
    """Seconds per RHS callback of a petsc4py RK4 TS whose callback only copies the state."""
    from petsc4py import PETSc

    x = PETSc.Vec().createSeq(n)
    calls = [0]

    def rhs(ts, t, u, f):
        u.copy(f)
        calls[0] += 1

    ts = PETSc.TS().create(comm=PETSc.COMM_SELF)
    ts.setType(PETSc.TS.Type.RK)
    ts.setRKType("4")
    ts.setRHSFunction(rhs, x.duplicate())
    ts.setTimeStep(1.0 / steps)
    ts.setMaxTime(1.0)
    ts.setExactFinalTime(PETSc.TS.ExactFinalTime.MATCHSTEP)
    ts.setFromOptions()
    times = []
    for _ in range(repeats + 1):
        x.set(1.0)
        ts.setTime(0.0)
        ts.setStepNumber(0)
        ts.setTimeStep(1.0 / steps)
        calls[0] = 0
        s = time.perf_counter()
        ts.solve(x)
        times.append((time.perf_counter() - s) / calls[0])
    ts.destroy()
    x.destroy()
    return statistics.median(times[1:])


def _solve_times(func: nn.Module, y0: torch.Tensor, t: torch.Tensor, steps: int,
                 repeats: int) -> tuple[float, float, int, int]:
    """Median forward and adjoint sweep seconds of pnode (from ``last_stats``), and callback counts."""
    fwd, adj = [], []
    for _ in range(repeats + 1):
        y = y0.clone().requires_grad_()
        pnode.odeint(func, y, t, method="rk4", options={"step_size": 1.0 / steps})[-1].sum().backward()
        st = pnode.last_stats()
        fwd.append(st.forward_seconds)
        adj.append(st.adjoint_seconds)
    return statistics.median(fwd[1:]), statistics.median(adj[1:]), st.rhs_evals, st.vjps


def _direct(fn, calls: int = 50, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        s = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - s) / calls)
    return statistics.median(times)


def run(quick: bool = False, prob: Problem | None = None, repeats: int | None = None) -> dict:
    """Microseconds per forward and adjoint callback, split into PETSc, glue and torch."""
    torch.set_num_threads(1)
    prob = prob or Problem(steps=50 if quick else 100)
    repeats = repeats or (3 if quick else 5)
    mlp, y0, t = build(prob)
    timed = _Timed(mlp)
    trivial = _Scale()
    tt = torch.tensor(0.5, dtype=torch.float64)

    petsc = _bare_petsc(y0.numel(), prob.steps, repeats)
    triv_fwd, triv_adj, triv_rhs, triv_vjp = _solve_times(trivial, y0, t, prob.steps, repeats)
    with torch.no_grad():
        triv_call = _direct(lambda: trivial(tt, y0))
    timed.seconds, timed.calls = 0.0, 0
    mlp_fwd, mlp_adj, n_rhs, n_vjp = _solve_times(timed, y0, t, prob.steps, repeats)
    # forward callbacks also run during the adjoint sweep under some policies; count only the
    # calls of the forward sweeps: (repeats + 1) solves of n_rhs calls each
    torch_in_solve = timed.seconds / max(timed.calls, 1)
    with torch.no_grad():
        mlp_call = _direct(lambda: mlp(tt, y0))
    params = list(mlp.parameters())
    v = torch.randn_like(y0)

    def vjp() -> None:
        x = y0.detach().requires_grad_()
        torch.autograd.grad(mlp(tt, x), [x, *params], v)

    mlp_vjp = _direct(vjp)
    us = 1e6
    fwd_total = mlp_fwd / n_rhs
    glue = triv_fwd / triv_rhs - petsc - triv_call
    adj_total = mlp_adj / n_vjp
    adj_engine = triv_adj / triv_vjp
    return {
        "problem": prob.as_dict(),
        "forward": {"callbacks": n_rhs, "total_us": us * fwd_total, "petsc_us": us * petsc,
                    "glue_us": us * glue, "torch_us": us * torch_in_solve,
                    "torch_direct_us": us * mlp_call,
                    "rest_us": us * (fwd_total - petsc - glue - torch_in_solve)},
        "adjoint": {"callbacks": n_vjp, "total_us": us * adj_total, "petsc_glue_us": us * adj_engine,
                    "torch_vjp_direct_us": us * mlp_vjp,
                    "rest_us": us * (adj_total - adj_engine - mlp_vjp)},
    }


def tables(res: dict) -> str:
    f, a = res["forward"], res["adjoint"]
    rows = [
        ["forward RHS callback", f["callbacks"], f["total_us"], f["petsc_us"], f["glue_us"], f["torch_us"],
         f["rest_us"]],
        ["adjoint stage (vjp)", a["callbacks"], a["total_us"], a["petsc_glue_us"], "(in PETSc column)",
         a["torch_vjp_direct_us"], a["rest_us"]],
    ]
    return "\n\n".join([
        f"### 5. Engine overhead per callback (microseconds, median)\n\nRK4, {res['problem']['steps']} "
        f"steps, batch {res['problem']['batch']}, MLP 32-{res['problem']['width']}-32, float64, "
        "1 thread, checkpoint 'stages'. total = sweep time "
        "(pnode.last_stats) / callbacks. Forward: PETSc = bare petsc4py RK4 TS with a copy-only Python "
        "callback; glue = pnode with a trivial field a*y per callback minus bare PETSc minus a direct "
        "call of a*y; torch = time inside the MLP's forward during the solve (timer wrapper; direct "
        f"call outside the solve: {f['torch_direct_us']:.0f} us). Adjoint: PETSc+glue = the trivial "
        "field's adjoint time per vjp (includes its tiny autograd call); torch = direct "
        "torch.autograd.grad of the MLP for state and parameters. rest = total minus the parts.",
        md_table(["callback", "count", "total", "PETSc", "pnode glue", "torch", "rest"], rows),
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    print(tables(run(ap.parse_args().quick)))


if __name__ == "__main__":
    main()
