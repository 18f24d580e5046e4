"""Vector fields for neural ODEs."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TimeMLP"]


class TimeMLP(nn.Module):
    """A time-dependent one-hidden-layer field ``f(t, y) = W2 tanh(W1 y + b1 + t c) + b2``.

    Parameters
    ----------
    dim : int
        State dimension (the last axis of ``y``).
    width : int
        Hidden width.

    Examples
    --------
    >>> f = TimeMLP(2, 64).double()
    >>> ys = pnode.odeint(f, torch.randn(16, 2, dtype=torch.float64), torch.linspace(0, 1, 3))
    """

    def __init__(self, dim: int = 3, width: int = 16) -> None:
        super().__init__()
        self.l1 = nn.Linear(dim, width)
        self.c = nn.Parameter(torch.randn(width) * 0.5)
        self.l2 = nn.Linear(width, dim)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(y) + t * self.c))
