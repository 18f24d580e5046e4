"""Integration-time control: a learnable end time with SNOpt's second-order feedback rule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["IntegrationTime"]


class IntegrationTime(nn.Module):
    r"""A learnable end time ``T`` of a neural ODE, updated by a second-order feedback policy.

    Liu, Chen & Theodorou, "Second-Order Neural ODE Optimizer", NeurIPS 2021, sec. 3.3:
    treating ``T`` as a control, the quadratic model of the loss in ``(δθ, δT)``
    is minimised over ``δT`` for the parameter update ``δθ`` the optimizer takes,
    giving the feedback policy

    .. math::

        δT^\star = -L_{TT}^{-1}\,(L_T + L_{Tθ}\, δθ).

    ``L_T = dL/dT`` is the engine's gradient with respect to the output time
    (``g(T) · f(T, y(T))``, see :func:`pnode.odeint`).  The second-order terms use
    a Gauss-Newton approximation, as the Kronecker factors of :class:`SNOpt` do,
    viewing the loss as half a squared residual ``L = r^2 / 2`` (``r = sqrt(2L)``,
    the loss's minimum taken as 0):
    ``L_TT ≈ r_T^2 = L_T^2 / (2L)`` and ``L_Tθ δθ ≈ r_T (r_θ · δθ) = L_T (L_θ·δθ) / (2L)``.
    With damping added to ``L_TT``,

    .. math::

        δT = -\mathrm{lr}\, \frac{L_T\,(1 + L_θ·δθ / (2L))}{L_T^2 / (2L) + \mathrm{damping}},

    where ``L_θ · δθ`` (the predicted first-order change of the loss from the
    parameter step, usually negative: the feedback shortens the time step by what
    the parameter step already achieves) is read from the optimizer passed to
    :meth:`step`.  For a loss that can reach zero and depends on ``T`` through one
    residual direction this is Newton's method on ``r``.  A step is capped at
    ``max_step * T`` and ``T`` is kept in ``[min_t1, max_t1]``.

    Parameters
    ----------
    t1 : float, default 1.0
        Initial end time.
    t0 : float, default 0.0
        Start time (fixed).
    lr : float, default 1.0
        Scale of the feedback step.
    damping : float, default 1e-4
        Added to ``L_TT`` (> 0).
    max_step : float, default 0.1
        Largest relative change of ``T`` per step.
    min_t1, max_t1 : float, optional
        Bounds of ``T`` (default ``t0 + 1e-3`` and no upper bound).

    Examples
    --------
    >>> tc = pnode.control.IntegrationTime(1.0)
    >>> y1 = pnode.odeint(func, y0, tc.span(), method="rk4", options={"step_size": 0.1})[-1]
    >>> L = loss(y1); L.backward(); opt.step(); tc.step(L, opt); tc.zero_grad()
    """

    def __init__(self, t1: float = 1.0, *, t0: float = 0.0, lr: float = 1.0, damping: float = 1e-4,
                 max_step: float = 0.1, min_t1: float | None = None, max_t1: float | None = None) -> None:
        super().__init__()
        if not (math.isfinite(t0) and math.isfinite(t1) and t1 > t0):
            raise ValueError(f"Invalid times: need finite t1 > t0, got t0={t0!r}, t1={t1!r}")
        for name, v in (("lr", lr), ("damping", damping), ("max_step", max_step)):
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"Invalid {name}: {v!r}")
        self.min_t1 = t0 + 1e-3 if min_t1 is None else float(min_t1)
        self.max_t1 = math.inf if max_t1 is None else float(max_t1)
        if not (t0 < self.min_t1 <= t1 <= self.max_t1):
            raise ValueError(f"Invalid bounds: need t0 < min_t1 <= t1 <= max_t1, got {self.min_t1!r}, "
                             f"{t1!r}, {self.max_t1!r}")
        self.t0 = float(t0)
        self.lr, self.damping, self.max_step = float(lr), float(damping), float(max_step)
        self.t1 = nn.Parameter(torch.tensor(float(t1), dtype=torch.float64))

    def span(self) -> torch.Tensor:
        """``[t0, T]`` for :func:`pnode.odeint`; differentiable in ``T``."""
        return torch.stack([self.t1.new_tensor(self.t0), self.t1])

    @property
    def value(self) -> float:
        return float(self.t1.detach())

    @torch.no_grad()
    def step(self, loss: float | torch.Tensor, optimizer: Any = None) -> float:
        """Update ``T`` from its gradient; returns the change taken.

        Parameters
        ----------
        loss : float or Tensor
            The loss value whose gradient ``T`` holds (>= 0).
        optimizer : SNOpt or None
            The optimizer that just updated the parameters; its
            ``last_directional_derivative`` (``L_θ · δθ``) is the feedback term.
            Without it the rule is the open-loop ``-L_TT^{-1} L_T``.
        """
        g = self.t1.grad
        if g is None:
            raise RuntimeError("IntegrationTime.step: T has no gradient; integrate over span() and "
                               "call backward first")
        LT = float(g)
        if not math.isfinite(LT):
            raise FloatingPointError("IntegrationTime.step: dL/dT is NaN or Inf; T was not changed")
        L = float(loss)
        if not (math.isfinite(L) and L >= 0):
            raise ValueError(f"Invalid loss {L!r}: the feedback rule needs a finite loss >= 0")
        fb = 0.0 if optimizer is None else float(getattr(optimizer, "last_directional_derivative", 0.0))
        two_l = max(2.0 * L, 1e-300)
        delta = -self.lr * LT * (1.0 + fb / two_l) / (LT * LT / two_l + self.damping)
        cap = self.max_step * abs(float(self.t1))
        delta = max(-cap, min(cap, delta))
        new = min(self.max_t1, max(self.min_t1, float(self.t1) + delta))
        delta = new - float(self.t1)
        self.t1.fill_(new)
        return delta
