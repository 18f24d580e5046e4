"""The failure detector shared by every method: checks after each accepted forward step.

PETSc's own limits stop a solve that cannot take a step (consecutive rejections,
``ts_max_reject``) or that runs out of steps (``ts_max_steps``), but an adaptive
solve heading into a singularity keeps taking ever smaller *accepted* steps,
and an explicit method on a stiff problem takes a million tiny ones; both look
like a hang.  :class:`StepGuard` runs as the TS post-step hook (so it sees every
accepted step of every method) and stops the solve, with a diagnosis that
:mod:`.failures` turns into a :class:`pnode.SolverError`, when

- the state is no longer finite (``DIVERGED_NONFINITE``);
- an adaptive step falls below the floor ``STEP_FLOOR * |t|`` (about 1000 units
  in the last place of ``t``: below it ``t + dt`` no longer resolves the step),
  the signature of a finite-time blow-up (``DIVERGED_STEP_UNDERFLOW``);
- after ``PROJECTION_MIN_STEPS`` accepted steps, the largest of the last
  ``WINDOW`` steps would still need more steps to reach the final time than the
  step budget has left, for ``PROJECTION_WINDOWS`` windows in a row in which
  that step size did not grow by more than 10% (``MAX_STEPS``, ahead of time):
  an explicit method on a stiff problem (explicit methods only: the small steps
  of an implicit method in a stiff transient are legitimate and grow later);
- for ``BLOW_UP_WINDOWS`` windows in a row, the step size shrank by the same
  ratio while the state grew, so that the steps to come add up to less than
  the rest of the interval: a finite-time blow-up (``DIVERGED_STEP_UNDERFLOW``).

Every decision is taken from quantities that are identical on every rank of a
collective solve (the step size, the step number, a ``VecSum`` of the state),
so all ranks stop at the same step and no rank is left in a collective.  The
hook is also where a pending Python signal (Ctrl-C) surfaces between steps:
the exception is recorded for :mod:`.failures` instead of being lost inside
PETSc.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from petsc4py import PETSc

from ..errors import Reason
from .vecs import VECSUM_MAX, vec_view

if TYPE_CHECKING:
    from .solver import TSSolver

__all__ = ["STEP_FLOOR", "MAX_REJECTIONS", "WINDOW", "PROJECTION_MIN_STEPS", "PROJECTION_WINDOWS",
           "BLOW_UP_WINDOWS",
           "Diagnosis",
           "StepGuard", "record_exception"]

#: Smallest adaptive step, relative to ``|t|`` (1000 units in the last place of float64).
STEP_FLOOR = 1000 * 2.0 ** -52
#: Consecutive rejected attempts (error test or Newton failure) of one step (``ts_max_reject``).
MAX_REJECTIONS = 50
#: Accepted steps whose largest size is the rate of the step-budget projection.
WINDOW = 100
#: Accepted steps before the step-budget projection starts.
PROJECTION_MIN_STEPS = 200
#: Consecutive windows over the step budget, with steps not growing, that stop a solve early.
PROJECTION_WINDOWS = 3
#: Consecutive windows of shrinking steps and a growing state that make a blow-up.
BLOW_UP_WINDOWS = 4
_IMPLICIT_ADVICE = "try an implicit method (method='kencarp4', 'implicit_euler' or 'trapezoid')"


@dataclass(frozen=True)
class Diagnosis:
    """Why the detector stopped a solve."""

    reason: Reason
    message: str
    t: float
    steps: int


def record_exception(solver: TSSolver, exc: BaseException, t: float) -> None:
    """Remember the first exception of a solve (re-raised by :func:`.failures.fail`)."""
    prob = solver.problem
    if prob.error is None:
        prob.error, prob.error_t = exc, t


class StepGuard:
    """Post-step checks of one forward sweep (see the module docstring).

    Parameters
    ----------
    solver : TSSolver
        The solver whose TS calls :meth:`post_step`.
    """

    def __init__(self, solver: TSSolver) -> None:
        self.solver = solver
        self.armed = False
        self.diagnosis: Diagnosis | None = None
        self.recent: deque[float] = deque(maxlen=WINDOW)
        self.t_prev = self.t_end = 0.0
        self.max_steps = 0
        self.adaptive = False

    def arm(self, t0: float, t_end: float) -> None:
        """Start watching a forward sweep from ``t0`` to ``t_end``."""
        s = self.solver
        self.t_prev, self.t_end = t0, t_end
        self.max_steps = s.ts.getMaxSteps()  # the command line (-pnode_ts_max_steps) included
        self.adaptive = not s.fixed
        # the projection is for explicit methods (stability-limited steps); an implicit
        # method's small steps in a stiff transient are legitimate and grow later
        self.explicit = s.problem.implicit is None
        self.recent.clear()
        self.over_budget, self.last_rate = 0, math.inf
        # (largest step, |y|, step ratio to the window before) of the recent windows
        self.windows: list[tuple[float, float, float | None]] = []
        self.diagnosis = None
        self.armed = True

    def disarm(self) -> None:
        """Stop watching (the adjoint's replays re-take recorded steps unchecked)."""
        self.armed = False

    def monitor(self, ts: PETSc.TS, step: int, t: float, u: PETSc.Vec) -> None:
        """TS monitor: record the step (:class:`.forward.StepLog`), exceptions kept."""
        try:
            self.solver.log.monitor(ts, step, t, u)
        except BaseException as exc:
            self._interrupted(ts, exc)

    def post_step(self, ts: PETSc.TS) -> None:
        """TS post-step hook: the fixed-grid step rule, then the checks."""
        try:
            if not self.armed:
                return
            self.solver.log.to_next_output(ts)
            diagnosis = self._check(ts)
        except BaseException as exc:  # e.g. KeyboardInterrupt from a signal between steps
            self._interrupted(ts, exc)
            return
        if diagnosis is not None:
            self.diagnosis = diagnosis
            self.armed = False
            ts.setConvergedReason(PETSc.TS.ConvergedReason.DIVERGED_STEP_REJECTED)

    def _interrupted(self, ts: PETSc.TS, exc: BaseException) -> None:
        """An exception inside a hook: keep it for :func:`.failures.fail`, stop the solve."""
        record_exception(self.solver, exc, ts.getTime())
        if not self.solver.problem.collective:
            raise exc  # PETSc stops; failures.fail re-raises the recorded exception
        # collective: this rank's NaN state stops every rank at the next step's check
        ts.getSolution().set(float("nan"))

    # -- the checks (collective quantities only) -------------------------------------------
    def _check(self, ts: PETSc.TS) -> Diagnosis | None:
        t, n, u = ts.getTime(), ts.getStepNumber(), ts.getSolution()
        taken, self.t_prev = abs(t - self.t_prev), t
        if not self._finite(u):
            return Diagnosis(Reason.DIVERGED_NONFINITE, "the state became NaN or Inf: the "
                             "solution blew up (or func overflowed); check func and y0, or use "
                             "smaller steps", t, n)
        if not self.adaptive:
            return None
        step = max(taken, abs(ts.getTimeStep()))
        floor = STEP_FLOOR * abs(t)
        if step < floor:
            return Diagnosis(Reason.DIVERGED_STEP_UNDERFLOW, (
                f"the step size ({step:.3g}) fell below the floor {floor:.3g} = "
                f"{STEP_FLOOR:.3g} * |t| after {n} steps, with |y| = {self._size(u):.3g}: the "
                f"solution probably blows up near t = {t:.6g} (a singularity of the ODE)"), t, n)
        self.recent.append(taken)
        if len(self.recent) < WINDOW or n % WINDOW:
            return None
        # once per window of accepted steps: the budget projection, then the blow-up test
        rate = max(self.recent)
        need = abs(self.t_end - t) / rate if rate > 0 else math.inf
        # over budget at a rate that is not picking up (a stiff transient's steps grow fast)
        stalled = n + need > self.max_steps and rate <= 1.1 * self.last_rate
        self.over_budget = self.over_budget + 1 if stalled else 0
        self.last_rate = rate
        if self.explicit and n >= PROJECTION_MIN_STEPS and self.over_budget >= PROJECTION_WINDOWS:
            return Diagnosis(Reason.MAX_STEPS, self._projection_message(t, n, rate, need), t, n)
        return self._blow_up(t, n, rate, self._size(u))

    def _blow_up(self, t: float, n: int, rate: float, size: float) -> Diagnosis | None:
        """Steps shrinking geometrically while the state grows, toward a t short of the end.

        The largest step of each window shrinks by a ratio ``q < 1`` from one window to
        the next; the windows to come then add up to ``WINDOW * rate * q / (1 - q)``, so
        the solve would stall at ``t_inf``.  A finite-time blow-up: ``BLOW_UP_WINDOWS``
        windows in a row with a growing state, ``t_inf`` before the final time and the
        same ratio (``1 - q`` within 10%: a fixed ``t_inf``, not a transient that slows
        the steps for a while).
        """
        prev = self.windows[-1] if self.windows else None
        q = rate / prev[0] if prev is not None and prev[0] > 0 else 1.0
        ahead = 1.0 if self.t_end >= t else -1.0  # the direction of integration
        t_inf = t + ahead * WINDOW * rate * q / (1 - q) if q < 1 else math.inf
        steady = prev is None or prev[2] is None or abs(prev[2] - q) <= 0.1 * (1 - q)
        if prev is None or not (q < 1 and size > prev[1] and steady
                                and (t_inf - self.t_end) * ahead < 0):
            self.windows = [(rate, size, None) if prev is None or q >= 1 else (rate, size, q)]
            return None
        self.windows.append((rate, size, q))
        if len(self.windows) <= BLOW_UP_WINDOWS:
            return None
        return Diagnosis(Reason.DIVERGED_STEP_UNDERFLOW, (
            f"the solution blows up near t = {t_inf:.6g}: over the last "
            f"{BLOW_UP_WINDOWS * WINDOW} steps the step size shrank geometrically (now "
            f"{rate:.3g}) while |y| grew to {size:.3g}, so the steps cannot reach "
            f"t={self.t_end:.6g} ({n} steps taken); check func and the time span"), t, n)

    def _projection_message(self, t: float, n: int, rate: float, need: float) -> str:
        head = (f"at the step size of the last {WINDOW} steps (at most {rate:.3g}), reaching "
                f"t={self.t_end:.6g} needs about {need:.3g} more steps, more than the "
                f"{self.max_steps - n} left of the step budget ({self.max_steps}, "
                "options['max_num_steps'] or ts_max_steps)")
        return (f"{head}: the problem looks stiff for the explicit method "
                f"{self.solver.method.name!r}; {_IMPLICIT_ADVICE}, or raise the budget")

    def _finite(self, u: PETSc.Vec) -> bool:
        # One VecSum (collective, the same value on every rank); a non-finite sum of finite
        # huge entries is told apart by an exact check, agreed over the ranks.  A large
        # serial state is summed by torch (PETSc's VecSum is a scalar loop).
        dist = self.solver.dist
        if dist is None and u.getLocalSize() > VECSUM_MAX:
            if math.isfinite(float(self.solver.problem.views.read(u).sum())):
                return True
        elif math.isfinite(u.sum()):
            return True
        ok = bool(torch.isfinite(vec_view(u)).all())
        return ok if dist is None else dist.all_true(ok)

    @staticmethod
    def _size(u: PETSc.Vec) -> float:
        return u.norm(PETSc.NormType.NORM_INFINITY)
