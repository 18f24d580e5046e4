"""Exceptions raised by pnode."""

from __future__ import annotations

__all__ = ["PnodeError", "SolverError", "CheckpointError"]


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
    reason : str
        PETSc's converged reason as a readable name (e.g. ``"DIVERGED_STEP_REJECTED"``),
        or pnode's own (``"DIVERGED_NONFINITE"``, ``"MAX_STEPS"``).
    steps : int
        Number of accepted steps taken before the failure.
    phase : str
        ``"forward"`` or ``"adjoint"``.
    """

    def __init__(self, message: str, *, t: float, reason: str, steps: int = 0,
                 phase: str = "forward") -> None:
        super().__init__(f"{message} (t={t:.6g}, reason={reason}, steps={steps}, phase={phase})")
        self.t = float(t)
        self.reason = reason
        self.steps = int(steps)
        self.phase = phase


class CheckpointError(PnodeError, OSError):
    """Checkpoints could not be written (e.g. a full disk during ``Checkpoint.disk``).

    The files already written are removed and the solver stays usable.

    Parameters
    ----------
    message : str
        What happened and what to try.
    directory : str
        The checkpoint directory.
    """

    def __init__(self, message: str, *, directory: str) -> None:
        super().__init__(message)
        self.directory = directory
