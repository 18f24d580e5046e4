"""Data-parallel training: every rank holds a shard of the data and a replica of the model."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..neural_ode import NeuralODE

__all__ = ["DataParallel", "shard_slice"]


def shard_slice(n: int, rank: int, size: int) -> slice:
    """Contiguous shard of ``n`` items for ``rank`` of ``size`` (the first ``n % size`` get one more)."""
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"Invalid rank {rank} of size {size}")
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


class DataParallel:
    """Data-parallel training of a model whose ODE blocks solve on ``comm``.

    The ODE blocks (:class:`pnode.NeuralODE` with ``comm=comm``, found
    automatically, or the parameters of direct ``pnode.odeint(..., comm=comm)``
    calls, passed as ``reduced``) already return their parameter gradients
    summed over ranks; this helper sums the gradients of every other parameter
    with one allreduce, so after :meth:`reduce_gradients` every rank
    holds the gradient of the sum of the ranks' losses: the serial gradient when
    each rank's loss is its share of the global loss (divide by
    :attr:`global_count`, not by the local batch size).

    Parameters
    ----------
    model : nn.Module
        The replica on this rank.
    comm : mpi4py.MPI.Comm, optional
        Default ``MPI.COMM_WORLD``.
    seed : int, default 0
        Seeds torch identically on every rank (model initialisation), then the
        parameters are broadcast from rank 0 anyway.
    reduced : iterable of Tensor, optional
        Parameters whose gradients the engine already sums (those of a func
        passed to ``pnode.odeint(..., comm=comm)`` outside a NeuralODE); summing
        them again would multiply them by the number of ranks.

    Examples
    --------
    >>> dp = pnode.parallel.DataParallel(model)           # model holds NeuralODE(..., comm=dp.comm)
    >>> X, y = dp.shard(X_all), dp.shard(y_all)
    >>> loss = loss_fn(model(X), y, reduction="sum") / dp.global_count(len(X))
    >>> loss.backward(); dp.reduce_gradients(); opt.step()
    """

    def __init__(self, model: nn.Module, comm: Any = None, *, seed: int = 0,
                 reduced: Iterable[torch.Tensor] = ()) -> None:
        from mpi4py import MPI

        self.model = model
        self._reduced = {id(p) for p in reduced}
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        torch.manual_seed(seed)
        self._check_ode_blocks()
        self.broadcast_parameters()

    # -- set-up -----------------------------------------------------------------------
    def _ode_parameters(self) -> set[int]:
        """ids of parameters whose gradients the engine already sums (ODE blocks on comm)."""
        ids = set(self._reduced)
        for mod in self.model.modules():
            if isinstance(mod, NeuralODE) and mod.odeint_kwargs.get("comm") is not None:
                ids.update(id(p) for p in mod.func.parameters())
        return ids

    def _check_ode_blocks(self) -> None:
        for name, mod in self.model.named_modules():
            if isinstance(mod, NeuralODE) and self.size > 1 and mod.odeint_kwargs.get("comm") is None:
                raise ValueError(
                    f"the ODE block {name or 'model'!r} solves without comm=: build it with "
                    "NeuralODE(..., comm=dp.comm) so its gradient is reduced across ranks")

    def broadcast_parameters(self) -> None:
        """Copy rank 0's parameters and buffers to every rank (identical replicas)."""
        for tensor in list(self.model.parameters()) + list(self.model.buffers()):
            data = self.comm.bcast(tensor.detach().cpu().numpy() if self.rank == 0 else None, root=0)
            with torch.no_grad():
                tensor.copy_(torch.as_tensor(data, dtype=tensor.dtype))

    # -- data -------------------------------------------------------------------------
    def shard(self, data: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous shard of ``data`` along its first axis (uneven allowed)."""
        return data[shard_slice(data.shape[0], self.rank, self.size)]

    def global_count(self, n_local: int) -> int:
        """Number of samples over all ranks."""
        return int(self.comm.allreduce(int(n_local)))

    # -- gradients --------------------------------------------------------------------
    def reduce_gradients(self) -> None:
        """Sum the gradients of the parameters outside ODE blocks over ranks (one allreduce).

        Parameters without a gradient on this rank count as zero; a non-finite
        gradient on any rank raises ``FloatingPointError`` on every rank.
        """
        from mpi4py import MPI

        skip = self._ode_parameters()
        params = [p for p in self.model.parameters() if p.requires_grad and id(p) not in skip]
        if not params or self.size == 1:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          .to(torch.float64) for p in params])
        buf = flat.numpy().copy()
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        total = torch.from_numpy(buf)
        if not bool(torch.isfinite(total).all()):
            raise FloatingPointError("a gradient is NaN or Inf on some rank")
        i = 0
        for p in params:
            g = total[i:i + p.numel()].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
            i += p.numel()

    # -- output -----------------------------------------------------------------------
    def log(self, *args: Iterable[Any], **kwargs: Any) -> None:
        """``print`` on rank 0 only."""
        if self.rank == 0:
            print(*args, **kwargs)
