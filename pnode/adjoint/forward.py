"""The forward sweep: one TSSolve through every output time, and what it records.

One ``TSSolve`` runs from ``t[0]`` to ``t[-1]`` with the output times as PETSc
evaluation times: TSAdapt shortens the step that would pass an output time so
that a step ends there (``MATCHSTEP``), so no output is matched with a
tolerance.  The monitor records every accepted step; the step index of each
output time (``seg_steps``) is what the adjoint sweeps need.
"""

from __future__ import annotations

import time as _time
from typing import TYPE_CHECKING

import torch
from petsc4py import PETSc

from . import failures
from .initial_step import initial_step
from .stats import SolveStats
from .vecs import vec_view

if TYPE_CHECKING:
    from .solver import TSSolver

__all__ = ["StepLog", "forward_sweep"]


class StepLog:
    """The accepted steps ``(step number, time)`` of the running forward sweep.

    ``grid`` (fixed-step solves without ``step_size``): the output times, one
    step per output interval, as torchdiffeq's fixed-grid solvers.
    """

    def __init__(self) -> None:
        self.steps: list[tuple[int, float]] = []
        self.grid: list[float] = []
        # hook(ts, step, t, u) at the start and after each accepted step of a forward solve
        # (event search, torchdiffeq-style step callbacks); set by the caller per solve
        self.hooks: list = []
        self._at_start = False
        self.start_time = 0.0  # perf_counter() at the start of the sweep

    def start(self, t0: float) -> None:
        self.steps = [(0, t0)]
        self._at_start = True

    def monitor(self, ts, step, t, u) -> None:
        new = step > self.steps[-1][0]
        if new:
            self.steps.append((step, t))
        if self.hooks and (new or (step == 0 and self._at_start)):
            self._at_start = False
            for hook in self.hooks:
                hook(ts, step, t, u)

    def to_next_output(self, ts) -> None:
        """Post-step: the next step ends at the next output time."""
        k = len(self.steps)  # steps taken so far, +1 (the monitor has not seen this one yet)
        if k < len(self.grid) - 1:
            ts.setTimeStep(self.grid[k + 1] - self.grid[k])


def forward_sweep(solver: TSSolver, y0: torch.Tensor, t: torch.Tensor, *,
                  record: bool) -> torch.Tensor:
    """Integrate from ``t[0]`` through every output time (see :meth:`TSSolver.forward`)."""
    ts, prob = solver.ts, solver.problem
    _begin(solver, y0, record)
    c0 = (prob.counters.rhs, prob.counters.jvp, prob.counters.vjp, prob.counters.jacobians)
    start = _time.perf_counter()
    tt = t.tolist()
    prob.views.write(solver.x).copy_(y0)  # the solution Vec: one cached view
    ts.setTime(tt[0])
    ts.setStepNumber(0)
    ts.setMaxTime(tt[-1])
    # One TSSolve through all output times: TSAdapt shortens the step that would pass an
    # evaluation time so that a step ends there (the memory trajectory needs one
    # uninterrupted solve; a solve that ends early would not record its last step).
    ts.setEvaluationTimes(tt)
    solver.eval_times = tt
    solver.log.start(tt[0])
    _first_step(solver, tt, y0)
    solver.guard.arm(tt[0], tt[-1])
    try:
        ts.solve(solver.x)
    except PETSc.Error as exc:
        failures.sync(solver, "forward", tt[-1], exc)
        failures.fail(solver, "forward", tt[-1], exc)
    finally:
        solver.guard.disarm()
    failures.sync(solver, "forward", tt[-1])
    if prob.error is not None or ts.getConvergedReason() < 0:
        failures.fail(solver, "forward", tt[-1])
    ys = _outputs(solver, tt, y0)
    _record_stats(solver, c0, start)
    solver.busy = record
    return ys


def _begin(solver: TSSolver, y0: torch.Tensor, record: bool) -> None:
    prob = solver.problem
    # A fresh trajectory per forward solve: PETSc's memory trajectory is not built to be
    # replayed twice (reusing it after an adjoint sweep can read freed stack entries).
    # Without a following adjoint no trajectory is kept at all.
    solver.ts.removeTrajectory()
    solver.opts.checkpoint.begin_forward(solver, y0, record)  # what the policy records
    solver.petsc.configure_forward()
    prob.reset_error()
    prob.forget_points()
    solver.log.start_time = _time.perf_counter()
    # the failure detector (and the fixed-grid step rule) after every accepted step
    solver.ts.setPostStep(solver.guard.post_step)


def _first_step(solver: TSSolver, tt: list[float], y0: torch.Tensor) -> None:
    ts, opts = solver.ts, solver.opts
    if solver.fixed:
        h = opts.step_size
        ts.setTimeStep(h if h is not None else tt[1] - tt[0])
        if h is None:  # one step per output interval, as torchdiffeq's fixed-grid solvers
            solver.log.grid = tt
        elif (tt[-1] - tt[0]) / h > ts.getMaxSteps():
            failures.too_many_fixed_steps(solver, tt, h)
    else:
        h0 = opts.first_step or _initial_step(solver, tt[0], y0, tt[-1] - tt[0])
        # TSAdapt clamps the steps it chooses, not the first one: options['max_step']
        dt_max = float(dict(opts.petsc_options).get("ts_adapt_dt_max", "inf"))
        ts.setTimeStep(min(h0, tt[1] - tt[0], dt_max))


def _initial_step(solver: TSSolver, t0: float, y0: torch.Tensor, span: float) -> float:
    """:func:`initial_step` on the solver's right-hand side, safe in collective solves."""
    prob, dist = solver.problem, solver.dist
    part = prob.implicit if prob.explicit is None else prob.explicit

    def f(t, y):
        try:
            out = prob._eval(part, t, y).to(torch.float64)
            if prob.explicit is not None and prob.implicit is not None:
                out = out + prob._eval(prob.implicit, t, y).to(torch.float64)
            return out
        except BaseException as exc:
            # a failure on one rank must not skip the others' reductions
            if dist is None:
                raise
            if prob.error is None:
                prob.error, prob.error_t = exc, t
            return torch.full_like(y, float("nan"))

    try:
        return initial_step(f, t0, y0, span, order=solver.method.order, rtol=solver.opts.rtol,
                            atol=solver.opts.atol, reduce=None if dist is None else dist.sum,
                            after_eval=lambda: failures.sync(solver, "forward", t0))
    except FloatingPointError as exc:  # NaN/Inf from func (a frozen parameter, a closure)
        prob.error, prob.error_t = exc, t0
        failures.fail(solver, "forward", t0)
    finally:
        prob.counters.rhs += 2


def _outputs(solver: TSSolver, tt: list[float], y0: torch.Tensor) -> torch.Tensor:
    """The solutions at the output times, and the step index of each (``seg_steps``)."""
    ts = solver.ts
    sol_times, sol_vecs = ts.getEvaluationSolutions()
    if len(sol_times) != len(tt):
        failures.fail(solver, "forward", tt[len(sol_times)] if len(sol_times) < len(tt) else tt[-1])
    # PETSc's first and last evaluation solutions are copies of the initial state and of the
    # final solution (the checks below make sure the last one is at the final step): the
    # tensors at hand serve, and only the times in between need views of PETSc's Vecs
    # (a view of a fresh Vec costs several microseconds)
    rows = [y0, *[vec_view(v) for v in sol_vecs[1:-1]], solver.problem.views.read(solver.x)]
    ys = torch.stack(rows)  # a new tensor: no copy needed
    # Step index of each output: the monitor saw the same ts->ptime values PETSc stored.
    step_of = {time: step for step, time in solver.log.steps}
    solver.seg_steps = [step_of[float(s)] for s in sol_times]
    if solver.seg_steps[0] != 0 or solver.seg_steps[-1] != ts.getStepNumber():
        raise AssertionError("internal: evaluation times do not match step boundaries")
    return ys


def _record_stats(solver: TSSolver, c0: tuple[int, ...], start: float) -> None:
    ts, prob = solver.ts, solver.problem
    st = solver.stats = SolveStats(solver.method.name)
    st.steps = solver.seg_steps[-1]
    st.step_times = [time for _, time in solver.log.steps]
    st.output_steps = list(solver.seg_steps)
    st.rejected = ts.getStepRejections()
    st.newton_iters, st.ksp_iters = ts.getSNESIterations(), ts.getKSPIterations()
    st.rhs_evals = prob.counters.rhs - c0[0]
    st.jvps = prob.counters.jvp - c0[1]
    st.jacobians = prob.counters.jacobians - c0[3]
    st.forward_seconds = _time.perf_counter() - start
