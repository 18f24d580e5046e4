"""Layer decomposition: the integration interval split into contiguous pieces, one per rank.

Rank ``r`` holds only its piece of a time-dependent model (for instance the ODE
block on ``[T_r, T_{r+1}]``, or the residual blocks of those times in a ResNet)
and integrates it.  A training step runs a micro-batched pipeline (GPipe): the
forward sends each micro-batch's state from rank ``r`` to ``r + 1`` as soon as
it is computed, the last rank evaluates the loss, and the backward sends the
adjoint state ``dL/dy(T_r)`` back from ``r`` to ``r - 1``; each rank's
gradients are those of the serial run for its own parameters (of a serial run
over the same micro-batches when the method is adaptive, since each
micro-batch then takes its own steps).

Failures cannot deadlock the pipeline: every rank performs the same sequence
of sends and receives whatever happens; a rank that failed sends an error
token instead of a tensor, and an agreement step at the end raises on every
rank (the failing rank with its own exception).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..adjoint.distributed import raise_together
from ..errors import PnodeError

__all__ = ["LayerParallel"]

_ERROR = "pnode-layer-parallel-error"


class LayerParallel:
    """A pipeline over time sub-intervals (one piece of the model per rank).

    Parameters
    ----------
    stage : nn.Module
        This rank's piece: maps the state at ``T_r`` to the state at ``T_{r+1}``
        (e.g. ``pnode.NeuralODE(field_r, t=(T_r, T_{r+1}), ...)``).
    comm : mpi4py.MPI.Comm
        The ranks of the pipeline, in time order.
    micro_batches : int, default 4
        Pieces each batch is split into (along the first axis); more pieces fill
        the pipeline better, at the price of smaller solves.

    Examples
    --------
    >>> lp = LayerParallel(pnode.NeuralODE(field, t=(r / p, (r + 1) / p), method="rk4"), comm)
    >>> loss = lp.train_step(x if r == 0 else None, y if r == p - 1 else None, F.mse_loss)
    >>> opt.step()       # each rank updates its own piece
    """

    def __init__(self, stage: nn.Module, comm: Any, *, micro_batches: int = 4) -> None:
        if not isinstance(micro_batches, int) or isinstance(micro_batches, bool) or micro_batches < 1:
            raise ValueError(f"Invalid micro_batches {micro_batches!r}: need an int >= 1")
        self.stage = stage
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.micro_batches = micro_batches
        #: bytes sent by this rank in the last step (states forward, adjoint states back)
        self.sent_bytes = 0

    # -- messages: a tensor, or the error token --------------------------------------------
    def _send(self, dest: int, tensor: torch.Tensor | None, error: str | None, tag: int) -> None:
        if error is not None:
            self.comm.send((_ERROR, error), dest=dest, tag=tag)
            return
        data = tensor.detach().contiguous().numpy()
        self.sent_bytes += data.nbytes
        self.comm.send(data, dest=dest, tag=tag)

    def _recv(self, source: int, tag: int, dtype: torch.dtype) -> tuple[torch.Tensor | None, str | None]:
        msg = self.comm.recv(source=source, tag=tag)
        if isinstance(msg, tuple) and len(msg) == 2 and msg[0] == _ERROR:
            return None, msg[1]
        return torch.from_numpy(msg).to(dtype), None

    # -- one training step ------------------------------------------------------------------
    def train_step(self, x: torch.Tensor | None, y: Any, loss_fn: Callable[..., torch.Tensor],
                   *, dtype: torch.dtype = torch.float64) -> float:
        """Forward and backward of one batch through the pipeline; returns the loss.

        Parameters
        ----------
        x : Tensor or None
            The batch on rank 0 (ignored elsewhere).
        y : Tensor or None
            The targets on the last rank (ignored elsewhere); split like ``x``.
        loss_fn : callable
            ``loss_fn(output, target)``, a mean over the samples (the micro-batch
            losses are weighted by their share of the batch, so the gradient is
            that of the whole batch).
        dtype : torch.dtype, default float64
            dtype of the states passed between ranks.

        Returns
        -------
        float
            The batch loss (the same on every rank).  Gradients accumulate into
            the ``.grad`` of this rank's parameters; call ``optimizer.zero_grad()``
            before, ``optimizer.step()`` after.

        Raises
        ------
        PnodeError
            On every rank, when any rank failed (the failing rank re-raises its
            own exception).
        """
        r, p, k = self.rank, self.size, self.micro_batches
        first, last = r == 0, r == p - 1
        self.sent_bytes = 0
        error: str | None = None
        own: BaseException | None = None
        # rank 0 knows the micro-batch sizes; everyone learns them (and any input error)
        sizes = None
        if first:
            try:
                if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] < 1:
                    raise ValueError("LayerParallel.train_step needs a batch tensor x on rank 0")
                n = x.shape[0]
                sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
                sizes = [s for s in sizes if s > 0]
            except BaseException as exc:  # reported on every rank below
                own, error = exc, f"{type(exc).__name__}: {exc}"
        sizes, first_error = self.comm.bcast((sizes, error), root=0)
        if first_error is not None:
            if own is not None:
                raise own
            raise PnodeError(f"layer-parallel step stopped: rank 0 failed with {first_error}")
        n_total = sum(sizes)
        if first:
            xs = list(x.split(sizes))
        if last:
            ys = list(y.split(sizes)) if isinstance(y, torch.Tensor) else [None] * len(sizes)

        # forward (GPipe: every micro-batch, keeping the graphs)
        kept: list[tuple[torch.Tensor | None, torch.Tensor | None]] = []
        losses = []
        for m in range(len(sizes)):
            inp = None
            if not first:
                inp, err = self._recv(r - 1, tag=m, dtype=dtype)
                error = error or err
            elif error is None:
                inp = xs[m]
            out = None
            if error is None:
                try:
                    if not first:
                        inp.requires_grad_(True)
                    out = self.stage(inp)
                    if last:
                        out = loss_fn(out, ys[m]) * (sizes[m] / n_total)
                        losses.append(float(out.detach()))
                except BaseException as exc:  # passed down the pipeline
                    own, error = exc, f"{type(exc).__name__}: {exc}"
            if not last:
                self._send(r + 1, out, error, tag=m)
            kept.append((inp, out))

        # backward, micro-batches in reverse: dL/dy(T_{r+1}) in, dL/dy(T_r) out
        for m in reversed(range(len(sizes))):
            inp, out = kept[m]
            g = None
            if not last:
                g, err = self._recv(r + 1, tag=len(sizes) + m, dtype=dtype)
                error = error or err
            if error is None:
                try:
                    if last:
                        out.backward()
                    else:
                        out.backward(g.to(out.dtype))
                except BaseException as exc:  # passed up the pipeline
                    own, error = exc, f"{type(exc).__name__}: {exc}"
            if not first:
                grad = inp.grad if (error is None and inp is not None) else None
                if error is None and grad is None:
                    grad = torch.zeros_like(inp)
                self._send(r - 1, grad, error, tag=len(sizes) + m)
            kept[m] = (None, None)

        # agreement: every rank learns whether any failed, and the loss
        raise_together(self.comm, own, lambda f: PnodeError(
            f"layer-parallel step stopped: rank {f.rank} failed with {f.message}"))
        return float(self.comm.bcast(sum(losses) if last else None, root=p - 1))
