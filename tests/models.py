"""Small right-hand sides used across the tests."""

import torch
from torch import nn

from pnode.models import TimeMLP

__all__ = ["TimeMLP", "TupleField", "rel_err"]


class TupleField(nn.Module):
    """A coupled two-part state (x, v): x' = v, v' = -k x + tanh(A v)."""

    def __init__(self, dim: int = 2) -> None:
        super().__init__()
        self.k = nn.Parameter(torch.tensor(1.3))
        self.A = nn.Linear(dim, dim)

    def forward(self, t, state):
        x, v = state
        return v, -self.k * x + torch.tanh(self.A(v)) * (1 + 0.1 * t)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / max(float(b.norm()), 1e-300))
