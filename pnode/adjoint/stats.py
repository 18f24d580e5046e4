"""Statistics of a solve (:func:`pnode.last_stats`)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["SolveStats"]


@dataclass
class SolveStats:
    """Statistics of the last forward (and adjoint) solve.

    Attributes
    ----------
    method : str
        Method name.
    steps : int
        Accepted steps.
    rejected : int
        Rejected steps (adaptive methods).
    step_times : list of float
        All step boundaries ``t_0 < ... < t_M``; replaying them with
        :func:`pnode.adjoint.reference.odeint_reference` reproduces the scheme.
    output_steps : list of int
        Index into ``step_times`` of each output time.
    rhs_evals, jvps, vjps, jacobians : int
        Right-hand side evaluations, Jacobian-vector products, vector-Jacobian
        products and dense Jacobian assemblies.
    newton_iters, ksp_iters : int
        Nonlinear and linear iterations of the forward solve.
    forward_seconds, adjoint_seconds : float
        Wall time of the sweeps.
    recomputed_steps : int
        Steps re-integrated by the adjoint sweep (binomial and disk checkpointing).
    graph_hits : int
        Adjoint stage linearisations served by a forward graph (``"graph"`` policy).
    max_stored_states : int
        Largest number of states held at once by a binomial or disk schedule (RAM and disk).
    disk_writes : int
        States written to disk (disk checkpointing).
    """

    method: str
    steps: int = 0
    rejected: int = 0
    step_times: list[float] = field(default_factory=list)
    output_steps: list[int] = field(default_factory=list)
    rhs_evals: int = 0
    jvps: int = 0
    vjps: int = 0
    jacobians: int = 0
    newton_iters: int = 0
    ksp_iters: int = 0
    forward_seconds: float = 0.0
    adjoint_seconds: float = 0.0
    recomputed_steps: int = 0
    graph_hits: int = 0
    max_stored_states: int = 0
    disk_writes: int = 0
