"""Checkpoint policies: what the forward sweep keeps for the adjoint sweep.

- ``"stages"`` (alias ``"all"``): every state and stage value in RAM, no recomputation.
- ``"solution"``: every state in RAM; stage values are recomputed step by step in
  the adjoint (PETSc's solution-only trajectory).
- ``"graph"`` / :meth:`Checkpoint.graph` (explicit methods): states and stages as
  ``"stages"``, and also the torch autograd graph of the forward sweep's
  right-hand side evaluations, so the adjoint's vector-Jacobian products are
  backward passes only (no re-evaluation of ``func``): backpropagation's memory
  for its speed.  With a memory budget, the graphs of the latest evaluations
  are kept within it and the earlier stages are re-evaluated in the adjoint.
- :meth:`Checkpoint.binomial`: at most ``budget`` stored states, following the
  optimal binomial schedule of Griewank & Walther (ACM TOMS 26, 2000); the
  schedule comes from the ``checkpoint-schedules`` package (its multistage
  generator, which yields the same optimal schedule in constant memory).
- :meth:`Checkpoint.disk`: two storage levels, RAM then files on disk, following
  the optimal multistage schedule of Stumm & Walther (SIAM J. Sci. Comput. 31,
  2009) for the given numbers of RAM and disk slots.

For ``binomial`` and ``disk`` the forward solve keeps only its step times; the
adjoint replays the schedule, re-integrating each step with exactly the step
size taken in the forward solve (so adaptive methods replay the same steps).

Each policy is a class that owns its behaviour: what the forward sweep records
(:meth:`Checkpoint.begin_forward`, :meth:`Checkpoint.petsc_defaults`) and how the
adjoint sweep runs (:meth:`Checkpoint.adjoint`).  ``Checkpoint(kind, ...)`` and
the class methods build the subclass of ``kind``; adding a policy means adding
one subclass here.  No other module compares policy names.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .methods import Method
    from .solver import TSSolver

__all__ = ["Checkpoint"]

_NAMES = ("stages", "all", "solution", "graph")


def _positive_int(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"Invalid {what} {value!r}: need an int >= 1")
    return value


@dataclass(frozen=True, repr=False)
class Checkpoint:
    """A checkpoint policy for :func:`pnode.odeint` (``checkpoint=``).

    Build one with the class methods (:meth:`binomial`, :meth:`disk`,
    :meth:`graph`) or pass a policy name (``"stages"``, ``"solution"``,
    ``"graph"``) to ``odeint`` directly.

    Parameters
    ----------
    kind : {"stages", "solution", "graph", "binomial", "disk"}
        The policy.
    budget : int, optional
        ``binomial``: number of states the schedule may store; ``disk``: number
        of states kept in RAM.
    directory : str, optional
        ``disk``: where checkpoint files are written.
    disk_budget : int, optional
        ``disk``: number of states that may be written to disk (``None``: as many
        as the solve has steps, i.e. no recomputation beyond one replay).
    memory_mib : float, optional
        ``graph``: most memory (MiB) the kept forward graphs may hold
        (``None``: no limit).

    Examples
    --------
    >>> ys = pnode.odeint(f, y0, t, method="rk4", options={"step_size": 1e-3},
    ...                   checkpoint=pnode.Checkpoint.binomial(8))
    """

    kind: str
    budget: int | None = None
    directory: str | None = None
    disk_budget: int | None = None
    memory_mib: float | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> Checkpoint:
        # Checkpoint(kind, ...) builds the policy class of that kind (unknown kinds are
        # refused by __post_init__); copy and pickle call __new__ without arguments.
        if cls is Checkpoint:
            kind = args[0] if args else kwargs.get("kind")
            cls = _POLICIES.get(kind, Checkpoint) if isinstance(kind, str) else Checkpoint
        return object.__new__(cls)

    def __repr__(self) -> str:
        fields = ", ".join(f"{f}={getattr(self, f)!r}" for f in
                           ("kind", "budget", "directory", "disk_budget", "memory_mib"))
        return f"Checkpoint({fields})"

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or _POLICIES.get(self.kind) is not type(self):
            raise ValueError(f"unknown checkpoint policy {self.kind!r}; valid: 'stages', "
                             "'solution', 'graph', Checkpoint.binomial(budget), "
                             "Checkpoint.disk(directory, ram_budget), Checkpoint.graph(memory_mib)")
        self._validate()

    def _validate(self) -> None:
        """Check the fields this policy takes (each subclass checks its own)."""
        if self.budget is not None:
            raise ValueError(f"checkpoint policy {self.kind!r} takes no budget")
        if self.memory_mib is not None:
            raise ValueError(f"checkpoint policy {self.kind!r} takes no memory_mib")

    @classmethod
    def binomial(cls, budget: int) -> Checkpoint:
        """Optimal binomial (Revolve) checkpointing with at most ``budget`` stored states."""
        return cls("binomial", budget)

    @classmethod
    def disk(cls, directory: str | os.PathLike, ram_budget: int = 8,
             disk_budget: int | None = None) -> Checkpoint:
        """Two-level checkpointing: ``ram_budget`` states in RAM, more in files under ``directory``.

        The files live in a private subdirectory created for each adjoint sweep and
        removed when the sweep ends, also when it ends with an exception.

        Parameters
        ----------
        directory : str or path
            An existing, writable directory (e.g. node-local scratch on a cluster).
        ram_budget : int, default 8
            States kept in RAM.
        disk_budget : int, optional
            States that may be written to disk; ``None`` allows one per step.

        Raises
        ------
        ValueError
            A budget < 1, or a directory that does not exist or cannot be written.
        """
        return cls("disk", ram_budget, directory=os.fspath(directory), disk_budget=disk_budget)

    @classmethod
    def graph(cls, memory_mib: float | None = None) -> Checkpoint:
        """Keep the forward graphs (``"graph"``), within ``memory_mib`` MiB if given.

        Beyond the budget, the graphs of the earliest evaluations are dropped and
        those stages are re-evaluated by the adjoint, as with ``"stages"``.
        """
        return cls("graph", memory_mib=memory_mib)

    @classmethod
    def parse(cls, spec: str | Checkpoint) -> Checkpoint:
        """Accept a policy name or a :class:`Checkpoint`."""
        if isinstance(spec, Checkpoint):
            return spec
        if isinstance(spec, str) and spec in _NAMES:
            return cls("stages" if spec == "all" else spec)
        raise ValueError(f"unknown checkpoint policy {spec!r}; valid: {', '.join(_NAMES)}, "
                         "pnode.Checkpoint.binomial(budget), pnode.Checkpoint.disk(directory, "
                         "ram_budget) or pnode.Checkpoint.graph(memory_mib)")

    @property
    def replays(self) -> bool:
        """Whether the adjoint re-integrates the forward from a schedule (binomial, disk)."""
        return False

    @property
    def restores_stages(self) -> bool:
        """Whether the adjoint reads the stage values PETSc stored in the forward sweep."""
        return True

    # -- behaviour (the engine calls these; subclasses override) -------------------------
    def check_local(self) -> None:
        """Re-check what may differ between ranks; odeint calls it inside its agreement step."""

    def check_method(self, method: Method, imex: bool) -> None:
        """Refuse a method this policy cannot serve (``ValueError``)."""

    def petsc_defaults(self) -> dict[str, str]:
        """PETSc options the policy needs (the command line may override them)."""
        return {"ts_trajectory_solution_only": "0"}

    def agreement_key(self) -> tuple:
        """What every rank of a collective solve must agree on (not rank-local paths)."""
        return (self.kind, self.budget, self.disk_budget, self.memory_mib)

    def begin_forward(self, solver: TSSolver, y0: torch.Tensor, record: bool) -> None:
        """What the forward sweep records: here, PETSc's trajectory (if ``record``)."""
        if record:
            solver.ts.setSaveTrajectory()
        solver.y0 = None
        solver.problem.keep_graphs(False)

    def adjoint(self, solver: TSSolver, grad_ys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the adjoint sweep of the last forward solve; ``(grad_y0, grad_params)``."""
        from .sweeps import segmented_sweep

        return segmented_sweep(solver, grad_ys)


class _Solution(Checkpoint):
    """``"solution"``: PETSc's solution-only trajectory, stages recomputed by the adjoint."""

    @property
    def restores_stages(self) -> bool:
        return False

    def petsc_defaults(self) -> dict[str, str]:
        return {"ts_trajectory_solution_only": "1"}


class _Graph(Checkpoint):
    """``"graph"``: the trajectory and the autograd graphs of the forward evaluations."""

    def _validate(self) -> None:
        if self.budget is not None:
            raise ValueError(f"checkpoint policy {self.kind!r} takes no budget")
        m = self.memory_mib
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float))
                              or not m >= 0 or m == float("inf")):
            raise ValueError(f"Invalid memory_mib {m!r}: need a finite number >= 0")

    def check_method(self, method: Method, imex: bool) -> None:
        if method.implicit or imex:
            raise ValueError("checkpoint='graph' is available for explicit methods; implicit "
                             "stages are Newton iterates, use 'stages' or 'solution'")

    def begin_forward(self, solver: TSSolver, y0: torch.Tensor, record: bool) -> None:
        super().begin_forward(solver, y0, record)
        solver.problem.keep_graphs(record, self.memory_mib)


class _Scheduled(Checkpoint):
    """Schedule-driven policies: the forward keeps step times and ``y0``, the adjoint replays."""

    @property
    def replays(self) -> bool:
        return True

    @property
    def restores_stages(self) -> bool:
        return False  # the schedule re-integrates each step before its adjoint

    def begin_forward(self, solver: TSSolver, y0: torch.Tensor, record: bool) -> None:
        solver.y0 = y0.clone()  # no PETSc trajectory: the schedule re-integrates from y0
        solver.problem.keep_graphs(False)

    def _validate(self) -> None:
        if self.memory_mib is not None:
            raise ValueError(f"checkpoint policy {self.kind!r} takes no memory_mib")

    def schedule(self, n: int):
        """The ``checkpoint-schedules`` schedule of an adjoint over ``n`` steps."""
        raise NotImplementedError

    def adjoint(self, solver: TSSolver, grad_ys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from .sweeps import ScheduledSweep

        n = solver.seg_steps[-1]
        return ScheduledSweep(solver, self.schedule(n) if n else (), self.directory).run(grad_ys)


class _Binomial(_Scheduled):
    """:meth:`Checkpoint.binomial`: the optimal binomial (Revolve) schedule, RAM only."""

    def _validate(self) -> None:
        _positive_int(self.budget, "checkpoint budget")
        super()._validate()

    def schedule(self, n: int):
        import checkpoint_schedules as cs

        # The multistage generator with no disk slots yields the optimal binomial (Revolve)
        # schedule lazily; cs.Revolve precomputes every action (5.8 MiB for 2000 steps).
        return cs.MultistageCheckpointSchedule(n, self.budget, 0)


class _Disk(_Scheduled):
    """:meth:`Checkpoint.disk`: the optimal two-level (RAM, then disk) schedule."""

    def _validate(self) -> None:
        _positive_int(self.budget, "RAM budget")
        if self.disk_budget is not None:
            _positive_int(self.disk_budget, "disk budget")
        check_directory(self.directory)
        super()._validate()

    def check_local(self) -> None:
        check_directory(self.directory)

    def schedule(self, n: int):
        import checkpoint_schedules as cs

        disk = n if self.disk_budget is None else self.disk_budget
        return cs.MultistageCheckpointSchedule(n, self.budget, disk)


# the policy class of each kind ("stages" is the base class itself)
_POLICIES: dict[str, type[Checkpoint]] = {"stages": Checkpoint, "solution": _Solution,
                                          "graph": _Graph, "binomial": _Binomial, "disk": _Disk}


def check_directory(directory: str | None) -> None:
    """Refuse a checkpoint directory that does not exist or cannot take a file."""
    if not directory:
        raise ValueError("Checkpoint.disk needs a directory")
    if not os.path.isdir(directory):
        raise ValueError(f"checkpoint directory {directory!r} does not exist or is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".pnode-probe-", dir=directory)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise ValueError(f"checkpoint directory {directory!r} is not writable: {exc.strerror}") \
            from None
