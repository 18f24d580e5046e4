"""Small right-hand sides used across the tests."""

import torch
from torch import nn


class TimeMLP(nn.Module):
    """A time-dependent MLP f(t, y) = W2 tanh(W1 y + b1 + t c) + b2."""

    def __init__(self, dim: int = 3, width: int = 16) -> None:
        super().__init__()
        self.l1 = nn.Linear(dim, width)
        self.c = nn.Parameter(torch.randn(width) * 0.5)
        self.l2 = nn.Linear(width, dim)

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(y) + t * self.c))


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
