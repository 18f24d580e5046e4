"""pnode: neural ODEs with exact PETSc discrete-adjoint gradients.

Public API::

    pnode.odeint(func, y0, t, *, method="dopri5", ...)   # also pnode.odeint_adjoint
    pnode.odeint_event(func, y0, t0, *, event_fn, ...)   # (event_t, solution)
    pnode.NeuralODE(func, t=(0.0, 1.0), **odeint_kwargs)
    pnode.IMEX(implicit=..., explicit=...)
    pnode.methods(), pnode.last_stats()
    pnode.PnodeError, pnode.SolverError, pnode.CheckpointError
"""

from ._petsc import init_petsc as _init_petsc

_init_petsc()

from .adjoint import (  # noqa: E402
    IMEX,
    Checkpoint,
    Method,
    SolveStats,
    clear_cache,
    last_stats,
    methods,
    odeint,
    odeint_event,
)
from .errors import CheckpointError, PnodeError, SolverError  # noqa: E402
from .neural_ode import NeuralODE  # noqa: E402

odeint_adjoint = odeint
__version__ = "0.1.0"

__all__ = [
    "odeint", "odeint_adjoint", "odeint_event", "NeuralODE", "IMEX", "Checkpoint", "methods",
    "Method", "SolveStats", "last_stats", "clear_cache", "PnodeError", "SolverError",
    "CheckpointError", "__version__",
]
