"""torch.autograd.Function whose forward is TSSolve and whose backward is TSAdjointSolve."""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from .cache import Lease

__all__ = ["OdeintFunction", "Lease"]


class OdeintFunction(torch.autograd.Function):
    """Differentiable map ``(y0, t, *params) -> ys`` (flat states, one solve)."""

    @staticmethod
    def forward(ctx: Any, call: Any, y0: torch.Tensor, t: torch.Tensor,
                *params: torch.Tensor) -> torch.Tensor:
        record = call.record and any(ctx.needs_input_grad[1:])
        lease = call.acquire(record)
        try:
            ys64 = lease.solver.forward(
                y0.detach().to(torch.float64), t.detach().to(torch.float64), record=record
            )
        except BaseException:
            lease.release()
            raise
        if not record:
            lease.release()
        ctx.call, ctx.lease = call, lease
        ys = ys64.to(y0.dtype)
        ctx.save_for_backward(t, ys)
        return ys

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_ys: torch.Tensor):
        call, lease = ctx.call, ctx.lease
        if not lease.active:
            raise RuntimeError(
                "pnode.odeint: the trajectory of this solve was already used by a previous "
                "backward pass; run the forward again instead of retain_graph=True"
            )
        t, ys = ctx.saved_tensors
        g = grad_ys.detach().to(torch.float64)
        try:
            grad_y0, grad_p = lease.solver.adjoint(g)
            grad_t = None
            if ctx.needs_input_grad[2]:
                grad_t = call.time_gradient(t, ys, g, grad_y0)
        finally:
            lease.release()
        grads_p = call.split_param_grads(grad_p)
        return (None, grad_y0.to(ys.dtype), grad_t, *grads_p)
