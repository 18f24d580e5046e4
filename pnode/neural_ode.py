"""``pnode.NeuralODE``: an ``nn.Module`` wrapper around :func:`pnode.odeint`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .adjoint import odeint

__all__ = ["NeuralODE"]


class NeuralODE(nn.Module):
    """A neural ODE block ``y0 -> y(t1)`` (or the states at all of ``t``).

    Parameters
    ----------
    func : nn.Module
        ``func(t, y) -> dy/dt``; its parameters are trained.
    t : sequence of float or Tensor, default (0.0, 1.0)
        Integration times.  A 2-element ``t`` returns the final state only;
        longer ``t`` returns all outputs, ``[len(t), *y0.shape]``.
    return_all : bool, optional
        Force returning all outputs (default: only when ``len(t) > 2``).
    **odeint_kwargs
        Keyword options of :func:`pnode.odeint` (``method``, ``rtol``, ``options``, ...).

    Examples
    --------
    >>> block = pnode.NeuralODE(nn.Sequential(...), t=(0.0, 1.0), method="rk4",
    ...                         options={"step_size": 0.1})
    >>> y1 = block(y0)
    """

    def __init__(self, func: nn.Module, t: Sequence[float] | torch.Tensor = (0.0, 1.0), *,
                 return_all: bool | None = None, **odeint_kwargs: Any) -> None:
        super().__init__()
        if not callable(func):
            raise TypeError(f"func must be callable, got {type(func).__name__}")
        self.func = func
        t = torch.as_tensor(t, dtype=torch.float64)
        self.register_buffer("t", t, persistent=False)
        self.return_all = len(t) > 2 if return_all is None else return_all
        self.odeint_kwargs = odeint_kwargs

    def forward(self, y0: torch.Tensor) -> torch.Tensor:
        ys = odeint(self.func, y0, self.t, **self.odeint_kwargs)
        if self.return_all:
            return ys
        return tuple(y[-1] for y in ys) if isinstance(ys, tuple) else ys[-1]
