"""The engine: torch <-> PETSc TS/TSAdjoint.

Public names: :func:`odeint`, :func:`odeint_event`, :class:`IMEX`, :func:`methods`, :class:`Method`,
:class:`Checkpoint`, :class:`SolveStats`, :func:`last_stats`, :func:`clear_cache`,
and the observer extension point :func:`observe_vjps` / :class:`VjpEvent`.
"""

from .checkpoint import Checkpoint
from .events import odeint_event
from .methods import Method, methods
from .observers import VjpEvent, observe_vjps
from .odeint import IMEX, clear_cache, last_stats, odeint
from .solver import SolveStats

__all__ = ["odeint", "odeint_event", "IMEX", "Checkpoint", "methods", "Method", "SolveStats", "last_stats",
           "clear_cache", "observe_vjps", "VjpEvent"]
