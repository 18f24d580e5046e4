"""Error translation: a failed PETSc solve or callback becomes the right Python exception.

Every :class:`pnode.SolverError` of the engine is raised here, with a
:class:`pnode.errors.Reason`.  Two entry points, both taking the solver whose
sweep failed:

- :func:`sync`: collective solves, after every PETSc solve: if a callback
  failed on any rank, raise on every rank (no-op in a serial solve).
- :func:`fail`: raise the exception that explains why the last PETSc solve
  stopped (the callback's own exception, NaN/Inf, max steps, divergence).

Both leave the solver reusable: after a PETSc error the solver is marked
``broken`` (its objects may be half-way, e.g. vectors still locked) and its pool
replaces it; otherwise its options are re-applied, dropping the partial
trajectory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NoReturn

from petsc4py import PETSc

from ..errors import Reason, SolverError
from .distributed import gather_failures

if TYPE_CHECKING:
    from .solver import TSSolver

__all__ = ["petsc_reason", "reason_name", "sync", "fail", "nonfinite_adjoint"]

_HINTS = {
    Reason.DIVERGED_NONLINEAR_SOLVE: "Newton failed; try smaller steps, an implicit method with "
    "adaptivity, or snes_* options",
    Reason.DIVERGED_STEP_REJECTED: "step size underflow: the problem may be stiff (try an implicit "
    "method) or blow up",
}


def petsc_reason(code: int) -> Reason:
    """The :class:`Reason` of a PETSc ``TSConvergedReason`` value."""
    enum = PETSc.TS.ConvergedReason
    for k in dir(enum):
        if not k.startswith("_") and getattr(enum, k) == code and k in Reason.__members__:
            return Reason[k]
    return Reason.PETSC_ERROR


def reason_name(code: int) -> str:
    """Readable name of a PETSc ``TSConvergedReason`` value."""
    return str(petsc_reason(code))


def _stop(solver: TSSolver, petsc_error: Exception | None) -> None:
    """The solve is over: free the solver, and mark it broken after a PETSc error."""
    solver.busy = False
    if petsc_error is not None:
        solver.broken = True
    else:
        solver.petsc.configure()  # drop the partial trajectory; the solver stays usable


def sync(solver: TSSolver, phase: str, t_target: float,
         petsc_error: Exception | None = None) -> None:
    """Collective solves: raise on every rank if a callback failed on any rank.

    The failing rank raises its own exception (through :func:`fail`); the
    others raise a :class:`SolverError` quoting it.  Serial solves: no-op.
    (A NaN returned by the failing rank may also make a collective PETSc
    operation fail on every rank: ``petsc_error``.)
    """
    if solver.dist is None:
        return
    prob = solver.problem
    t_err = float("nan") if prob.error_t is None else float(prob.error_t)
    bad, _ = gather_failures(solver.dist.comm, prob.error, detail=t_err)
    if not bad:
        return
    if prob.error is not None:
        fail(solver, phase, t_target, petsc_error)
    _stop(solver, petsc_error)
    raise SolverError(f"{phase} solve stopped: rank {bad[0].rank} failed with {bad[0].message}",
                      t=bad[0].detail, reason=Reason.RANK_FAILED, steps=solver.ts.getStepNumber(),
                      phase=phase)


def fail(solver: TSSolver, phase: str, t_target: float,
         petsc_error: Exception | None = None) -> NoReturn:
    """Raise the exception explaining why the last PETSc solve of ``solver`` stopped."""
    prob, ts = solver.problem, solver.ts
    err, err_t = prob.error, prob.error_t
    prob.reset_error()
    _stop(solver, petsc_error)
    steps = ts.getStepNumber()
    if isinstance(err, FloatingPointError):
        raise SolverError(f"{phase} solve produced NaN/Inf: {err}", t=err_t,
                          reason=Reason.DIVERGED_NONFINITE, steps=steps, phase=phase) from None
    if err is not None:
        raise err
    code, t_now = ts.getConvergedReason(), ts.getTime()
    if petsc_error is not None and code >= 0:
        raise SolverError(f"{phase} solve stopped by a PETSc error: {petsc_error}", t=t_now,
                          reason=Reason.PETSC_ERROR, steps=steps, phase=phase) from None
    if code >= 0:
        msg = (f"stopped before reaching t={t_target:.6g}: max_num_steps="
               f"{solver.opts.max_num_steps} reached; raise options['max_num_steps'] or loosen "
               "rtol/atol")
        reason = Reason.MAX_STEPS if code == PETSc.TS.ConvergedReason.CONVERGED_ITS else \
            petsc_reason(code)
    else:
        reason = petsc_reason(code)
        msg = f"{phase} solve failed: {_HINTS.get(reason, 'PETSc reported divergence')}"
    raise SolverError(msg, t=t_now, reason=reason, steps=steps, phase=phase)


def nonfinite_adjoint(t: float, steps: int, hint: str = "") -> SolverError:
    """The error of an adjoint sweep whose adjoint variables became NaN or Inf."""
    return SolverError(f"adjoint solve produced NaN/Inf{hint}", t=t,
                       reason=Reason.DIVERGED_NONFINITE, steps=steps, phase="adjoint")
