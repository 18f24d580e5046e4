"""Exceptions raised by pnode, and the one enum of solver failure reasons."""

from __future__ import annotations

from enum import Enum

__all__ = ["PnodeError", "SolverError", "CheckpointError", "Reason"]


class Reason(str, Enum):
    """Why a solve stopped: the value of every :attr:`SolverError.reason`.

    A ``str`` enum, so ``err.reason == "MAX_STEPS"`` holds.  The first group are
    PETSc's ``TSConvergedReason`` names (``CONVERGED_*`` ones appear when a solve
    stopped early without diverging); the second group are pnode's own.
    """

    # PETSc TSConvergedReason
    CONVERGED_ITERATING = "CONVERGED_ITERATING"
    CONVERGED_TIME = "CONVERGED_TIME"
    CONVERGED_ITS = "CONVERGED_ITS"
    CONVERGED_USER = "CONVERGED_USER"
    CONVERGED_EVENT = "CONVERGED_EVENT"
    CONVERGED_PSEUDO_FATOL = "CONVERGED_PSEUDO_FATOL"
    CONVERGED_PSEUDO_FRTOL = "CONVERGED_PSEUDO_FRTOL"
    DIVERGED_NONLINEAR_SOLVE = "DIVERGED_NONLINEAR_SOLVE"
    DIVERGED_STEP_REJECTED = "DIVERGED_STEP_REJECTED"
    # pnode's own
    MAX_STEPS = "MAX_STEPS"  #: the step limit was reached before the last output time
    DIVERGED_NONFINITE = "DIVERGED_NONFINITE"  #: a NaN or Inf in func's output or the adjoint
    PETSC_ERROR = "PETSC_ERROR"  #: a PETSc call raised an error
    RANK_FAILED = "RANK_FAILED"  #: another rank of a collective solve failed
    #: an adaptive step fell below the floor relative to ``|t|`` (a blow-up; see pnode.adjoint.detector)
    DIVERGED_STEP_UNDERFLOW = "DIVERGED_STEP_UNDERFLOW"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class PnodeError(Exception):
    """Base class of pnode's own exceptions (bad input raises ``ValueError``/``TypeError``)."""


class SolverError(PnodeError):
    """A time integration or adjoint solve failed.

    Parameters
    ----------
    message : str
        What happened and what to try.
    t : float
        The time the solver reached before failing.
    reason : Reason or str
        Why, as a :class:`Reason` (a ``str``): PETSc's converged reason as a
        readable name (e.g. ``"DIVERGED_STEP_REJECTED"``), or pnode's own
        (``"DIVERGED_NONFINITE"``, ``"MAX_STEPS"``, ...).
    steps : int
        Number of accepted steps taken before the failure.
    phase : str
        ``"forward"`` or ``"adjoint"``.
    """

    def __init__(self, message: str, *, t: float, reason: Reason | str, steps: int = 0,
                 phase: str = "forward") -> None:
        reason = Reason(reason)  # an unknown name is a bug at the raise site: ValueError
        super().__init__(f"{message} (t={t:.6g}, reason={reason}, steps={steps}, phase={phase})")
        self.t = float(t)
        self.reason = reason
        self.steps = int(steps)
        self.phase = phase


class CheckpointError(PnodeError, OSError):
    """A checkpoint could not be written or used.

    The one checkpoint exception of pnode: adjoint checkpoints that could not be
    written (e.g. a full disk during ``Checkpoint.disk``: the files already
    written are removed and the solver stays usable), and, as its subclass
    ``pnode.examples.runner.ResumeError``, a training checkpoint ``pnode run
    --resume`` cannot use.

    Parameters
    ----------
    message : str
        What happened and what to try.
    directory : str, optional
        The checkpoint directory.
    """

    def __init__(self, message: str, *, directory: str | None = None) -> None:
        super().__init__(message)
        self.directory = directory
