"""torch.autograd.Function whose forward is TSSolve and whose backward is TSAdjointSolve."""

from __future__ import annotations

from typing import Any

import torch

from .cache import Lease

__all__ = ["OdeintFunction", "Lease"]


_NO_DOUBLE_BACKWARD = (
    "pnode.odeint does not support double backward (create_graph=True, "
    "torch.autograd.functional.hvp/hessian, gradgradcheck): PETSc's TSAdjoint gives exact "
    "first-order gradients only, and a second derivative through it would silently be zero. "
    "For second-order products backpropagate twice through the same scheme in plain torch "
    "(pnode.adjoint.reference.odeint_reference, with the steps of pnode.last_stats()), or take "
    "finite differences of pnode's gradients; SNOpt (pnode.control) needs no Hessian."
)


class OdeintFunction(torch.autograd.Function):
    """Differentiable map ``(y0, t, *params) -> ys`` (flat states, one solve).

    The first backward pass consumes the recorded trajectory; a later one through the
    same output (``retain_graph=True``, ``gradcheck``, ``autograd.functional.jacobian``)
    re-runs the forward solve from the same inputs (the same steps, bit for bit) and
    then the adjoint, so every backward pass gets the same exact gradient.
    """

    @staticmethod
    def forward(ctx: Any, call: Any, y0: torch.Tensor, t: torch.Tensor,
                *params: torch.Tensor) -> torch.Tensor:
        record = call.record and any(ctx.needs_input_grad[1:])
        lease = call.acquire(record)
        lease.solver.log.hooks = list(call.step_hooks)  # this forward only, not replays
        y0, t_ = y0.detach(), t.detach()
        try:
            ys64 = lease.solver.forward(_f64(y0), _f64(t_), record=record)
        except BaseException:
            lease.release()
            raise
        finally:
            lease.solver.log.hooks = []
        if not record:
            lease.release()
        ctx.call, ctx.lease = call, lease
        # inputs for a replay; their version counters tell whether they changed in place since
        ctx.inputs = (y0, t_)
        ctx.versions = [x._version for x in (y0, *params)]  # (a detached alias shares it)
        ys = ys64 if y0.dtype == torch.float64 else ys64.to(y0.dtype)
        ctx.save_for_backward(t, ys)
        return ys

    @staticmethod
    def backward(ctx: Any, grad_ys: torch.Tensor):
        # create_graph=True runs backward with grad mode on: refuse instead of returning a
        # gradient whose own derivative would silently be zero
        if torch.is_grad_enabled():
            raise RuntimeError(_NO_DOUBLE_BACKWARD)
        call, lease = ctx.call, ctx.lease
        t, ys = ctx.saved_tensors
        if not lease.active:  # a previous backward used the trajectory: record it again
            lease = _replay(ctx)
        g = _f64(grad_ys.detach())
        lease.solver.adjoint_callbacks = call.adjoint_callbacks
        try:
            grad_y0, grad_p = lease.solver.adjoint(g)
            grad_t = None
            if ctx.needs_input_grad[2]:
                grad_t = call.time_gradient(t, ys, g, grad_y0)
        finally:
            lease.solver.adjoint_callbacks = None
            lease.release()
        grads_p = call.split_param_grads(grad_p)
        return (None, grad_y0 if grad_y0.dtype == ys.dtype else grad_y0.to(ys.dtype), grad_t,
                *grads_p)


def _f64(x: torch.Tensor) -> torch.Tensor:
    # (``to`` dispatches an operator even when it has nothing to do)
    return x if x.dtype == torch.float64 else x.to(torch.float64)


def _replay(ctx: Any) -> Lease:
    """Re-run the forward solve of ``ctx`` with a trajectory, for another backward pass."""
    call = ctx.call
    y0, t = ctx.inputs
    if [x._version for x in (y0, *call.params)] != ctx.versions:
        raise RuntimeError(
            "pnode.odeint: a second backward pass through this solve needs its inputs, but y0 "
            "or a parameter of func was modified in place since the forward; run the forward "
            "again")
    lease = call.acquire(True)
    try:
        lease.solver.forward(y0.to(torch.float64), t.to(torch.float64), record=True)
    except BaseException:
        lease.release()
        raise
    return lease
