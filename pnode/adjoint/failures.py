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

import math
import time as _time
from typing import TYPE_CHECKING, NoReturn

from petsc4py import PETSc

from ..errors import Reason, SolverError
from .distributed import gather_failures
from .stats import SolveStats

if TYPE_CHECKING:
    from .solver import TSSolver

__all__ = ["petsc_reason", "reason_name", "sync", "fail", "nonfinite_adjoint",
           "too_many_fixed_steps", "describe_petsc_error", "options_error", "OptionsError"]

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
    if phase == "forward":
        _failed_stats(solver)
    _stop(solver, petsc_error)
    for f in bad:
        if f.kind == "KeyboardInterrupt":  # an interrupt on one rank ends every rank
            raise KeyboardInterrupt(f"{phase} solve: rank {f.rank} was interrupted")
    raise SolverError(f"{phase} solve stopped: rank {bad[0].rank} failed with {bad[0].message}",
                      t=bad[0].detail, reason=Reason.RANK_FAILED, steps=solver.ts.getStepNumber(),
                      phase=phase)


def fail(solver: TSSolver, phase: str, t_target: float,
         petsc_error: Exception | None = None) -> NoReturn:
    """Raise the exception explaining why the last PETSc solve of ``solver`` stopped."""
    prob, ts = solver.problem, solver.ts
    err, err_t = prob.error, prob.error_t
    if err is None and petsc_error is not None and isinstance(petsc_error.__cause__, BaseException):
        # raised in a callback that records nothing (petsc4py chains it): e.g. Ctrl-C in a
        # matrix-shell method; the user must see it, not "PETSC_ERR_PYTHON"
        err, err_t = petsc_error.__cause__, ts.getTime()
    prob.reset_error()
    diagnosis = solver.guard.diagnosis if phase == "forward" else None
    solver.guard.diagnosis = None
    if phase == "forward":
        _failed_stats(solver)
    _stop(solver, petsc_error)
    steps = ts.getStepNumber()
    if isinstance(err, FloatingPointError):
        raise SolverError(f"{phase} solve produced NaN/Inf: {err}", t=err_t,
                          reason=Reason.DIVERGED_NONFINITE, steps=steps, phase=phase) from None
    if err is not None:
        raise err
    if diagnosis is not None:
        raise SolverError(f"{phase} solve stopped: {diagnosis.message}", t=diagnosis.t,
                          reason=diagnosis.reason, steps=diagnosis.steps, phase=phase)
    code, t_now = ts.getConvergedReason(), ts.getTime()
    if petsc_error is not None and code >= 0:
        raise SolverError(f"{phase} solve stopped by a PETSc error: {describe_petsc_error(petsc_error)}",
                          t=t_now, reason=Reason.PETSC_ERROR, steps=steps, phase=phase) from None
    if code >= 0:
        msg = (f"stopped before reaching t={t_target:.6g}: the step budget of {ts.getMaxSteps()} "
               "steps (options['max_num_steps'] or ts_max_steps) was used up; raise it or loosen "
               "rtol/atol")
        reason = Reason.MAX_STEPS if code == PETSc.TS.ConvergedReason.CONVERGED_ITS else \
            petsc_reason(code)
    else:
        reason = petsc_reason(code)
        msg = f"{phase} solve failed: {_hint(solver, reason)}"
    raise SolverError(msg, t=t_now, reason=reason, steps=steps, phase=phase)


def _hint(solver: TSSolver, reason: Reason) -> str:
    hint = _HINTS.get(reason, "PETSc reported divergence")
    if reason == Reason.DIVERGED_STEP_REJECTED:
        hint = (f"{solver.ts.getMaxStepRejections()} consecutive attempts of one step were "
                f"rejected (ts_max_reject); {hint}")
    snes = solver.ts.getSNES() if solver.problem.implicit is not None else None
    code = snes.getConvergedReason() if snes is not None else 0
    if code < 0:
        hint += f" (last Newton solve: {_snes_reason(code)})"
    return hint


def _snes_reason(code: int) -> str:
    enum = PETSc.SNES.ConvergedReason
    for k in dir(enum):
        if not k.startswith("_") and getattr(enum, k) == code:
            return k
    return str(code)


def _failed_stats(solver: TSSolver) -> None:
    """``last_stats()`` after a failed forward solve: the steps actually taken."""
    ts, log = solver.ts, solver.log
    st = solver.stats = SolveStats(solver.method.name)
    st.step_times = [time for _, time in log.steps]
    st.steps = len(st.step_times) - 1
    st.rejected = ts.getStepRejections()
    st.newton_iters, st.ksp_iters = ts.getSNESIterations(), ts.getKSPIterations()
    st.forward_seconds = _time.perf_counter() - log.start_time


def too_many_fixed_steps(solver: TSSolver, tt: list[float], h: float) -> NoReturn:
    """A fixed-step solve that needs more steps than the budget: refused before it starts."""
    need = math.ceil((tt[-1] - tt[0]) / h)
    solver.busy = False
    raise SolverError(f"step_size={h:.6g} needs {need} steps to reach t={tt[-1]:.6g}, more than "
                      f"the step budget of {solver.ts.getMaxSteps()} (options['max_num_steps'] or "
                      "ts_max_steps); raise the budget or the step size", t=tt[0],
                      reason=Reason.MAX_STEPS, steps=0, phase="forward")


# PETSc's error codes (petscsystypes.h, PetscErrorCode) that users meet, with advice.
_PETSC_CODES = {
    55: ("PETSC_ERR_MEM", "out of memory; use a smaller batch or a checkpoint policy that "
         "stores less (pnode.Checkpoint.binomial)"),
    56: ("PETSC_ERR_SUP", "the operation is not supported for this configuration"),
    59: ("PETSC_ERR_SIG", "a signal was received"),
    60: ("PETSC_ERR_ARG_SIZ", "nonconforming object sizes"),
    62: ("PETSC_ERR_ARG_WRONG", "a wrong argument or option value"),
    63: ("PETSC_ERR_ARG_OUTOFRANGE", "an option or argument out of range; check the values in "
         "petsc_options and the -pnode_ command-line options"),
    71: ("PETSC_ERR_MAT_LU_ZRPVT", "zero pivot in LU: a singular Jacobian (shift*I - df/dy); "
         "try smaller steps"),
    72: ("PETSC_ERR_FP", "floating-point overflow or NaN inside PETSc: the solution is blowing "
         "up; check func, or try smaller steps or tighter tolerances"),
    73: ("PETSC_ERR_ARG_WRONGSTATE", "a PETSc object in the wrong state"),
    75: ("PETSC_ERR_ARG_INCOMP", "incompatible options or arguments"),
    76: ("PETSC_ERR_LIB", "an error in a library PETSc called"),
    82: ("PETSC_ERR_CONV_FAILED", "a linear or nonlinear solver failed to converge"),
    86: ("PETSC_ERR_ARG_UNKNOWN_TYPE", "an unknown type name (e.g. ts_type, ksp_type, pc_type); "
         "check the spelling in petsc_options or on the command line"),
    91: ("PETSC_ERR_NOT_CONVERGED", "a solver did not converge"),
    98: ("PETSC_ERR_MPI", "an MPI error"),
    101: ("PETSC_ERR_PYTHON", "an exception in a Python callback"),
}


def describe_petsc_error(exc: Exception) -> str:
    """PETSc's error name, its own message and advice, instead of ``error code N``."""
    code = getattr(exc, "ierr", None)
    # petsc4py's text: "error code N" then "[rank] Function() at file:line" frames and the
    # message lines; the message lines are PETSc's own explanation
    lines = [ln.split("] ", 1)[-1] for ln in str(exc).splitlines()[1:]]
    said = "; ".join(ln for ln in lines if ln and "() at " not in ln)
    name, advice = _PETSC_CODES.get(code, (f"PETSc error code {code}", ""))
    text = name + (f" ({said})" if said else "")
    return f"{text}: {advice}" if advice else text


def nonfinite_adjoint(t: float, steps: int, hint: str = "") -> SolverError:
    """The error of an adjoint sweep whose adjoint variables became NaN or Inf."""
    return SolverError(f"adjoint solve produced NaN/Inf{hint}", t=t,
                       reason=Reason.DIVERGED_NONFINITE, steps=steps, phase="adjoint")


class OptionsError(ValueError, PETSc.Error):
    """Options PETSc refused: bad input (a ``ValueError``), and still the ``PETSc.Error`` it was.

    Code that catches ``PETSc.Error`` (e.g. ``pnode run``'s error report) keeps working;
    ``ierr`` is PETSc's error code.
    """

    def __init__(self, message: str, ierr: int | None) -> None:
        ValueError.__init__(self, message)
        self.ierr = ierr

    def __str__(self) -> str:
        return str(self.args[0])

    def __repr__(self) -> str:
        return f"OptionsError({self.args[0]!r})"


def options_error(exc: Exception) -> ValueError:
    """A PETSc error while applying options (``setFromOptions``): bad input, said plainly."""
    return OptionsError("PETSc refused this solve's options (petsc_options, or -pnode_ options "
                        f"on the command line): {describe_petsc_error(exc)}", getattr(exc, "ierr", None))
