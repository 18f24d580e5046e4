"""Validated solver options: what :func:`pnode.odeint` hands the solver."""

from __future__ import annotations

from dataclasses import dataclass

from .checkpoint import Checkpoint

__all__ = ["SolveOptions"]


@dataclass(frozen=True)
class SolveOptions:
    """Validated solver options (built by :func:`pnode.odeint`)."""

    rtol: float = 1e-7
    atol: float = 1e-9
    step_size: float | None = None
    first_step: float | None = None
    max_num_steps: int = 1_000_000
    checkpoint: Checkpoint = Checkpoint("stages")
    jacobian: str = "auto"  # "auto" | "dense" | "matfree"
    theta: float | None = None
    endpoint: bool | None = None
    ksp_rtol: float = 1e-12
    snes_rtol: float = 1e-10
    jacobian_lag: int = 100
    petsc_options: tuple[tuple[str, str], ...] = ()
    options_prefix: str = "pnode_"
