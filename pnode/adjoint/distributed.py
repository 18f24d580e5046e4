"""Data decomposition: one solve spread over the ranks of a communicator.

Each rank passes its shard of the batch (the first axis of every state tensor;
shards may be uneven).  The TS runs on the communicator with a distributed
state Vec, so adaptive error norms are global and every rank takes the same
steps as a serial solve of the whole batch.  The parameter cost-gradient Vec
holds one full parameter block per rank: each rank accumulates its shard's
stage contributions locally, and one allreduce after the adjoint sweep gives
every rank the summed gradient (a constant number of reductions per backward
pass, not one per stage).

Failures must not deadlock: a rank whose callback fails does not raise into
PETSc (the other ranks would wait in the next collective); it records the
exception and returns NaN, the solve ends on every rank, and an agreement step
after each solve raises on every rank, the failing rank with its own exception
and the others with a :class:`pnode.SolverError` quoting it.  That agreement is
:func:`raise_together` (one allgather), used by every "a failure on one rank
raises on every rank" in pnode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from petsc4py import PETSc

__all__ = ["Distributed", "as_comm", "agree", "raise_together", "gather_failures", "RankFailure"]


def as_comm(comm: Any):
    """An mpi4py communicator from an mpi4py or petsc4py one (``None``: no distribution)."""
    if comm is None:
        return None
    if isinstance(comm, PETSc.Comm):
        return comm.tompi4py()
    from mpi4py import MPI

    if not isinstance(comm, MPI.Comm):
        raise TypeError(f"comm must be an mpi4py or petsc4py communicator, got {type(comm).__name__}")
    return comm


@dataclass(frozen=True)
class RankFailure:
    """What one rank reported as its failure (see :func:`raise_together`).

    Attributes
    ----------
    rank : int
        The failing rank.
    kind : str
        Its exception's class name.
    text : str
        Its exception's message.
    detail : object
        Whatever the failing rank attached (e.g. the time a solve reached).
    """

    rank: int
    kind: str
    text: str
    detail: Any = None

    @property
    def message(self) -> str:
        return f"{self.kind}: {self.text}"


def gather_failures(comm, error: BaseException | None, *, detail: Any = None,
                    payload: Any = None) -> tuple[list[RankFailure], list[Any]]:
    """One allgather: every rank learns which ranks failed, and every rank's ``payload``."""
    mine = None if error is None else (type(error).__name__, str(error), detail)
    reports = comm.allgather((mine, payload))
    failed = [RankFailure(r, *f) for r, (f, _) in enumerate(reports) if f is not None]
    return failed, [p for _, p in reports]


def raise_together(comm, error: BaseException | None,
                   others: Callable[[RankFailure], BaseException], *, detail: Any = None,
                   payload: Any = None) -> list[Any]:
    """A failure on one rank raises on every rank (call it on every rank of ``comm``).

    After one allgather, a rank whose ``error`` is set raises it; the others raise
    ``others(failure)`` for the lowest failing rank.  Without failures every rank
    gets all ranks' ``payload``.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm
        The ranks that must agree.
    error : BaseException or None
        This rank's failure.
    others : callable
        Builds the exception of a rank that did not fail.
    detail, payload : object, optional
        Sent with the failure, and with every report.

    Returns
    -------
    list
        Every rank's ``payload``, in rank order.
    """
    failed, payloads = gather_failures(comm, error, detail=detail, payload=payload)
    if failed:
        if error is not None:
            raise error
        raise others(failed[0])
    return payloads


def agree(comm, fn: Callable[[], Any], *, gather: bool = False) -> Any:
    """Run ``fn`` on every rank; if it raises on any rank, raise on every rank.

    Used for input checks before collective work: a ``ValueError`` on one rank
    (say a NaN in its shard) becomes the same ``ValueError`` on all ranks,
    naming the rank, instead of leaving the others waiting in a collective.
    With ``gather``, ``fn`` returns ``(result, payload)`` and every rank also
    receives all ranks' payloads, in the same single allgather.
    """
    try:
        out, error = fn(), None
    except (ValueError, TypeError) as exc:
        out, error = (None, None) if gather else None, exc
    result, payload = out if gather else (out, None)

    def elsewhere(f: RankFailure) -> BaseException:
        return (TypeError if f.kind == "TypeError" else ValueError)(f"on rank {f.rank}: {f.text}")

    payloads = raise_together(comm, error, elsewhere, payload=payload)
    return (result, payloads) if gather else result


class Distributed:
    """The communicator of a data-parallel solve and the collectives the engine needs.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm
        Communicator of the solve (size > 1).
    """

    def __init__(self, comm) -> None:
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.petsc = PETSc.Comm(comm)

    @staticmethod
    def layout(spec, t: torch.Tensor, method: str, params, opts_key) -> tuple[dict, int]:
        """This rank's description of the solve (no communication) and its shard size."""
        if any(len(s) == 0 for s in spec.shapes):
            raise ValueError("with comm=, every state tensor needs a leading batch axis to shard")
        return {
            "state structure": (spec.is_tuple, len(spec.shapes)),
            "state trailing shape": tuple(tuple(s[1:]) for s in spec.shapes),
            "state dtype": str(spec.dtype),
            "output times": tuple(t.tolist()),
            "method": method,
            "options": repr(opts_key),
            "parameter shapes": tuple((tuple(p.shape), str(p.dtype)) for p in params),
        }, spec.size

    @staticmethod
    def shard_sizes(layouts: list[tuple[dict, int]]) -> tuple[int, ...]:
        """Every rank's shard size, once all ranks' layouts agree but for them.

        Runs on the gathered layouts, so every rank reaches the same verdict.

        Raises
        ------
        ValueError
            On every rank, when ranks disagree on the state's trailing shape,
            dtype or structure, the output times, the method, the options or the
            parameter shapes.
        """
        ref = layouts[0][0]
        for r, (other, _) in enumerate(layouts):
            for key, value in ref.items():
                if other[key] != value:
                    raise ValueError(
                        f"ranks disagree on the {key}: rank 0 has {value!r}, rank {r} has "
                        f"{other[key]!r}; only the first (batch) axis may differ between ranks")
        return tuple(n for _, n in layouts)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum a float64 tensor over the ranks (one allreduce)."""
        from mpi4py import MPI

        buf = x.detach().to(torch.float64).contiguous().numpy().copy()
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        return torch.from_numpy(buf)

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank."""
        return all(self.comm.allgather(bool(flag)))
