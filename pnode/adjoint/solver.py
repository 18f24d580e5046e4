"""The solver: one PETSc TS per (func, state layout, method, options), forward and adjoint.

:class:`TSSolver` ties the parts together; each part has its own module:

- :mod:`.build`: the TS, its Vecs and Jacobian matrices, and the PETSc options
  around them (:class:`~pnode.adjoint.build.TSObjects`, the one owner of the
  PETSc objects, destroyed explicitly);
- :mod:`.forward`: the forward sweep, one ``TSSolve`` through every output time
  (each output time is a step boundary: PETSc evaluation times with
  ``MATCHSTEP``, no tolerance-based matching);
- :mod:`.sweeps`: the adjoint sweeps (segmented through PETSc's trajectory, or
  driven by a checkpoint schedule), with one shared set-up and tear-down;
- :mod:`.failures`: turning a failed solve into :class:`pnode.SolverError`
  with a :class:`pnode.errors.Reason`, on every rank of a collective solve;
- :mod:`.initial_step`: the starting-step heuristic of adaptive solves;
- :mod:`.store`: the states a checkpoint schedule keeps in RAM or on disk.
"""

from __future__ import annotations

import torch
from petsc4py import PETSc

from .build import DENSE_JACOBIAN_MAX, TSObjects
from .detector import StepGuard
from .distributed import Distributed
from .failures import reason_name
from .forward import StepLog, forward_sweep
from .methods import Method
from .options import SolveOptions
from .problem import TorchProblem
from .stats import SolveStats
from .store import StateStore

__all__ = ["SolveOptions", "SolveStats", "TSSolver", "StateStore", "reason_name",
           "DENSE_JACOBIAN_MAX"]


class TSSolver:
    """One PETSc TS bound to a :class:`TorchProblem`.

    Parameters
    ----------
    problem : TorchProblem
        The callbacks.
    method : Method
        The scheme.
    opts : SolveOptions
        Tolerances, step control, checkpointing and PETSc options.
    dist : Distributed, optional
        The communicator of a data-parallel solve (``None``: serial, ``COMM_SELF``).

    Attributes
    ----------
    busy : bool
        A forward trajectory waits for its adjoint (the solver is leased).
    broken : bool
        A PETSc error left the objects unusable: the cache replaces the solver.
    stats : SolveStats
        Statistics of the last solve.
    """

    def __init__(self, problem: TorchProblem, method: Method, opts: SolveOptions,
                 dist: Distributed | None = None) -> None:
        self.problem, self.method, self.opts, self.dist = problem, method, opts, dist
        self.comm = dist.petsc if dist is not None else PETSc.COMM_SELF
        problem.collective = dist is not None
        self.fixed = opts.step_size is not None or not method.adaptive
        self.busy = False
        self.broken = False
        self.pool = None  # the cache pool holding this solver (pnode.adjoint.cache)
        self.cache_key = None  # its key there
        self.seq: int | None = None  # creation number of a collective solver (the graveyard)
        self.stats = SolveStats(method.name)
        self.n, self.n_params = problem.n, problem.n_params
        self.log = StepLog()
        self.guard = StepGuard(self)  # the failure detector (post-step hook, guarded monitor)
        self.seg_steps: list[int] = []  # step index of each output time (last forward)
        self.eval_times: list[float] = []  # the output times of the last forward
        self.y0: torch.Tensor | None = None  # initial state kept for a schedule's replay
        self.adjoint_callbacks = None  # callbacks.AdjointCallbacks of the running backward
        self.petsc = TSObjects(problem, method, opts, self.comm, fixed=self.fixed,
                               monitor=self.guard.monitor)
        self.ts, self.x, self.lam, self.mu = self.petsc.ts, self.petsc.x, self.petsc.lam, \
            self.petsc.mu

    def destroy(self) -> None:
        """Destroy the PETSc objects (one owner, explicit destruction)."""
        self.petsc.destroy()

    def drop_trajectory(self) -> None:
        """Free the stored trajectory of the last forward solve (no adjoint will follow)."""
        self.y0 = None
        if not self.broken and not self.petsc.destroyed:
            self.ts.removeTrajectory()

    def forward(self, y0: torch.Tensor, t: torch.Tensor, *, record: bool) -> torch.Tensor:
        """Integrate from ``t[0]`` through every output time.

        Parameters
        ----------
        y0 : Tensor
            Flat float64 initial state.
        t : Tensor
            Output times (float64, strictly increasing).
        record : bool
            Keep the trajectory for a following :meth:`adjoint`.

        Returns
        -------
        Tensor
            ``[len(t), n]`` float64 solutions.
        """
        return forward_sweep(self, y0, t, record=record)

    def adjoint(self, grad_ys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the adjoint sweep backwards through the last forward solve.

        Parameters
        ----------
        grad_ys : Tensor
            ``[len(t), n]`` float64 gradients of the loss with respect to each output.

        Returns
        -------
        grad_y0 : Tensor
            ``[n]`` gradient with respect to the initial state.
        grad_params : Tensor
            ``[n_params]`` gradient with respect to the parameters.
        """
        return self.opts.checkpoint.adjoint(self, grad_ys)
