"""Adjoint sweeps: TSAdjointSolve backwards over the forward solve, seeded at every output.

Two sweeps share one set-up and tear-down (:class:`AdjointSweep`):

- :func:`segmented_sweep` (policies that keep a PETSc trajectory: ``stages``,
  ``solution``, ``graph``): ``TSAdjointSolve`` runs segment by segment between
  consecutive output times (``TSAdjointSetSteps``), adding each output's incoming
  gradient at its time.
- :class:`ScheduledSweep` (``binomial``, ``disk``): a ``checkpoint-schedules``
  schedule drives it; forward actions re-integrate recorded steps from stored
  states, reverse actions run one adjoint step; one handler per action type, an
  unknown action is refused.
"""

from __future__ import annotations

import math
import time as _time
from typing import TYPE_CHECKING

import torch
from petsc4py import PETSc

from ..errors import CheckpointError
from . import failures
from .distributed import gather_failures
from .interrupts import files_removed_on_sigterm
from .store import StateStore
from .vecs import VECSUM_MAX

if TYPE_CHECKING:
    from .solver import TSSolver

__all__ = ["AdjointSweep", "segmented_sweep", "ScheduledSweep"]


class AdjointSweep:
    """Set-up and tear-down shared by every adjoint sweep (a context manager).

    Entering seeds the state adjoint with the gradient of the last output and zeroes
    the parameter adjoint; a PETSc error inside becomes a :class:`pnode.SolverError`
    (on every rank of a collective solve); leaving frees the solver's trajectory
    whatever happens.  :meth:`finish` checks the adjoint is finite and returns the
    gradients.
    """

    def __init__(self, solver: TSSolver, grad_ys: torch.Tensor) -> None:
        self.solver, self.grad_ys = solver, grad_ys

    def __enter__(self) -> AdjointSweep:
        s, prob = self.solver, self.solver.problem
        _check_seed(s, self.grad_ys)
        prob.reset_error()
        prob.forget_points()
        s.petsc.set_adjoint_mode(True)
        self.vjps, self.graph_hits = prob.counters.vjp, prob.counters.graph_hits
        self.start = _time.perf_counter()
        views = prob.views  # the solver's own Vecs: one cached view each
        views.write(s.lam).copy_(self.grad_ys[-1])
        if prob.param_grad is not None:  # accumulated by the problem (explicit RK)
            prob.param_grad.reset()
        elif s.n_params:
            views.write(s.mu).zero_()
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        s = self.solver
        try:
            if isinstance(exc, PETSc.Error):
                failures.sync(s, "adjoint", float("nan"), exc)
                failures.fail(s, "adjoint", float("nan"), exc)
        finally:
            s.busy = False
            s.y0 = None
            s.problem.keep_graphs(False)
        return False

    def add_output_gradient(self, k: int) -> None:
        """Add the incoming gradient of output ``k`` to the state adjoint."""
        s = self.solver
        s.problem.views.write(s.lam).add_(self.grad_ys[k])

    def check_finite(self, t: float, steps: int, hint: str = "") -> None:
        """Raise :class:`pnode.SolverError` if the adjoint is NaN/Inf (on any rank)."""
        s = self.solver
        # small states: one VecSum (collective: every rank calls it here), no torch operator;
        # a non-finite sum is re-checked element by element (finite values can overflow it)
        lam = s.problem.views.read(s.lam)
        if s.n <= VECSUM_MAX or s.dist is not None:
            ok = math.isfinite(s.lam.sum()) or _finite(lam)
        else:
            ok = _finite(lam)
        if s.n_params:
            pg = s.problem.param_grad
            ok = ok and (pg.finite() if pg is not None else _finite(s.problem.views.read(s.mu)))
        if not (ok if s.dist is None else s.dist.all_true(ok)):
            s.busy = False
            s.petsc.configure()
            raise failures.nonfinite_adjoint(t, steps, hint)

    def finish(self, hint: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """Check the adjoint, record the statistics, return ``(grad_y0, grad_params)``."""
        s, counters = self.solver, self.solver.problem.counters
        self.check_finite(s.stats.step_times[0], 0, hint)
        s.stats.vjps = counters.vjp - self.vjps
        s.stats.graph_hits = counters.graph_hits - self.graph_hits
        s.stats.adjoint_seconds = _time.perf_counter() - self.start
        return s.problem.views.read(s.lam).clone(), self._param_gradient()

    def _param_gradient(self) -> torch.Tensor:
        """The parameter gradient: this rank's block, summed over ranks (one allreduce)."""
        s = self.solver
        if not s.n_params:
            return torch.zeros(0, dtype=torch.float64)
        pg = s.problem.param_grad
        mu = pg.value(s.n_params) if pg is not None else s.problem.views.read(s.mu).clone()
        return s.dist.sum(mu) if s.dist is not None else mu


def _check_seed(solver: TSSolver, grad_ys: torch.Tensor) -> None:
    """Refuse a NaN/Inf incoming gradient: the loss is at fault, not the solver."""
    ok = _finite(grad_ys)
    if (ok if solver.dist is None else solver.dist.all_true(ok)):
        return
    solver.busy = False
    solver.petsc.configure()
    bad = [k for k in range(grad_ys.shape[0]) if not bool(torch.isfinite(grad_ys[k]).all())]
    where = (f"at output {bad[0]} (t={solver.eval_times[bad[0]]:.6g})" if bad else "on another rank")
    raise ValueError(f"the gradient of the loss with respect to the solution is NaN or Inf {where}: "
                     "the backward seed comes from the loss, check it (e.g. with "
                     "torch.autograd.set_detect_anomaly) before blaming the ODE solve")


def _finite(x: torch.Tensor) -> bool:
    # one reduction; a non-finite sum is re-checked element by element (it can overflow)
    return math.isfinite(float(x.sum())) or bool(torch.isfinite(x).all())


def segmented_sweep(solver: TSSolver, grad_ys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Adjoint through the PETSc trajectory of the forward solve, one segment per output."""
    ts, times, seg = solver.ts, solver.stats.step_times, solver.seg_steps
    with AdjointSweep(solver, grad_ys) as sweep:
        for k in range(len(seg) - 1, 0, -1):
            if seg[k] > seg[k - 1]:
                _adjoint_steps(solver, seg[k - 1], seg[k])
                reason = ts.getConvergedReason()
                failures.sync(solver, "adjoint", times[seg[k - 1]])
                if solver.problem.error is not None or reason < 0:
                    failures.fail(solver, "adjoint", times[seg[k - 1]])
                if k > 1:  # the first segment's adjoint: checked by finish, at the same time
                    sweep.check_finite(ts.getTime(), ts.getStepNumber(), _SINGULAR)
            sweep.add_output_gradient(k - 1)
    # (adding a finite output gradient keeps NaN/Inf as it is)
    return sweep.finish(_SINGULAR)


_SINGULAR = " (a singular or ill-conditioned Jacobian on the trajectory?)"


def _adjoint_steps(solver: TSSolver, lo: int, hi: int) -> None:
    """TSAdjoint from step ``hi`` back to ``lo``; one step at a time for step callbacks."""
    ts, cbs = solver.ts, solver.adjoint_callbacks
    if cbs is None:
        ts.adjointSetSteps(hi - lo)
        ts.adjointSolve()
        return
    times = solver.stats.step_times
    for j in range(hi, lo, -1):
        cbs.before_step(solver, j, times[j], times[j - 1])
        ts.adjointSetSteps(1)
        ts.adjointSolve()
        cbs.after_step()


class ScheduledSweep:
    """Adjoint sweep driven by a checkpoint schedule from ``checkpoint-schedules``.

    Forward actions re-integrate recorded steps from stored states (the step that a
    reverse action needs is re-integrated with a trajectory); reverse actions run
    one TSAdjoint step; the gradient of each output is added at its step.  States
    go to RAM or to files, as the schedule says; the files are removed at the end,
    whatever happens.

    Parameters
    ----------
    solver : TSSolver
        The solver whose forward solve kept its step times and initial state.
    schedule : iterable
        The schedule's actions (``checkpoint_schedules`` objects).
    directory : str or None
        Where the schedule's disk states go.
    """

    def __init__(self, solver: TSSolver, schedule, directory: str | None) -> None:
        import checkpoint_schedules as cs

        self.solver, self.schedule = solver, schedule
        self.store = StateStore(directory)
        self.handlers = {cs.Forward: self._forward, cs.Reverse: self._reverse,
                         cs.Copy: self._copy, cs.Move: self._move,
                         cs.EndForward: self._end_forward, cs.EndReverse: self._end_reverse}
        self.n = solver.seg_steps[-1]
        self.out_at = {step: k for k, step in enumerate(solver.seg_steps)}
        self.x, self.cur, self.recomputed = solver.y0, 0, 0
        self.replaying = False
        self.done = False

    def run(self, grad_ys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the schedule; returns ``(grad_y0, grad_params)``."""
        with files_removed_on_sigterm(self.store.parent is not None):
            try:
                with AdjointSweep(self.solver, grad_ys) as self.sweep:
                    for action in (self.schedule if self.n else ()):
                        handler = self.handlers.get(type(action))
                        if handler is None:
                            raise NotImplementedError(
                                f"internal: checkpoint schedule action {action!r} has no handler")
                        handler(action)
                        if self.done:
                            break
            finally:
                self.store.close()
        st = self.solver.stats
        st.recomputed_steps, st.max_stored_states = self.recomputed, self.store.peak
        st.disk_writes = self.store.disk_writes
        return self.sweep.finish()

    # -- one handler per schedule action ------------------------------------------------
    def _forward(self, action) -> None:
        if self.cur != action.n0:
            raise AssertionError("internal: schedule out of step")
        if action.write_ics:
            self._put(action.n0, self.x, action.storage)
        stop = action.n1 - 1 if action.write_adj_deps else action.n1
        for k in range(action.n0, stop):
            self.x = self._replay_step(self.x, k, record=False)
        if action.write_adj_deps:
            self.x = self._replay_step(self.x, action.n1 - 1, record=True)
        self.recomputed += action.n1 - action.n0
        self.cur = action.n1

    def _put(self, n: int, x: torch.Tensor, storage) -> None:
        """Store a state; in a collective solve every rank learns whether any rank failed.

        A full disk on one rank must not leave the others waiting in the next collective
        step: the ranks agree after each write, and all raise (the files are removed on
        every rank by the sweep's clean-up).
        """
        s, error = self.solver, None
        try:
            self.store.put(n, x, storage)
        except CheckpointError as exc:
            if s.dist is None:
                raise
            error = exc
        if s.dist is None:
            return
        bad, _ = gather_failures(s.dist.comm, error)
        if error is not None:
            raise error
        if bad:
            raise CheckpointError(f"rank {bad[0].rank} could not write a checkpoint: "
                                  f"{bad[0].message}", directory=self.store.parent or "")

    def _reverse(self, action) -> None:
        s, ts = self.solver, self.solver.ts
        ts.adjointSetSteps(action.n1 - action.n0)
        ts.adjointSolve()
        t = s.stats.step_times[action.n0]
        failures.sync(s, "adjoint", t)
        if s.problem.error is not None or ts.getConvergedReason() < 0:
            failures.fail(s, "adjoint", t)
        if action.n0 in self.out_at and action.n0 != self.n:
            self.sweep.add_output_gradient(self.out_at[action.n0])

    def _copy(self, action) -> None:
        self.x = self.store.get(action.n, action.from_storage, keep=True)
        self.cur = action.n

    def _move(self, action) -> None:
        self.x = self.store.get(action.n, action.from_storage, keep=False)
        self.cur = action.n

    def _end_forward(self, action) -> None:
        """The schedule's forward part is over; nothing to do."""

    def _end_reverse(self, action) -> None:
        self.done = True

    def _replay_step(self, x: torch.Tensor, k: int, *, record: bool) -> torch.Tensor:
        """Re-integrate step ``k`` (from ``t_k`` to ``t_{k+1}``) exactly as the forward solve did."""
        s = self.solver
        ts, times = s.ts, s.stats.step_times
        ts.removeTrajectory()
        if record:
            ts.setSaveTrajectory()
        if record or not self.replaying:
            # options are read once per adjoint-bearing step (a fresh memory trajectory) and
            # once at the start; no error control: the recorded step is re-taken as it was
            s.petsc.configure(force={"ts_adapt_type": "none"})
            s.petsc.set_adjoint_mode(True)
            self.replaying = True
        s.problem.views.write(s.x).copy_(x)
        ts.setTime(times[k])
        ts.setStepNumber(k)
        ts.restartStep()  # no first-same-as-last reuse of another step's stage
        ts.setMaxTime(times[k + 1])
        ts.setTimeStep(times[k + 1] - times[k])
        # Re-arm the forward's evaluation times (PETSc keeps a cursor into them across solves;
        # their count must not change, see odeint._Call). They are step boundaries, so they
        # never shorten a replayed step.
        ts.setEvaluationTimes(s.eval_times)
        try:
            ts.solve(s.x)
        except PETSc.Error as exc:
            failures.sync(s, "adjoint", times[k + 1], exc)
            failures.fail(s, "adjoint", times[k + 1], exc)
        failures.sync(s, "adjoint", times[k + 1])
        if s.problem.error is not None or ts.getConvergedReason() < 0 \
                or ts.getStepNumber() != k + 1:
            failures.fail(s, "adjoint", times[k + 1])
        return s.problem.views.read(s.x).clone()
