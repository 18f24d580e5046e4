"""Stiff benchmark systems as ``nn.Module`` right-hand sides: Robertson kinetics and Van der Pol."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["Robertson", "VanDerPol"]


class Robertson(nn.Module):
    """Robertson's chemical kinetics (ROBER), with log rate constants as parameters.

    ``y1' = -k1 y1 + k3 y2 y3``, ``y2' = k1 y1 - k2 y2^2 - k3 y2 y3``,
    ``y3' = k2 y2^2``, classically ``k = (0.04, 3e7, 1e4)``.  The state may carry
    leading batch dimensions: ``y[..., 0:3]``.

    Parameters
    ----------
    k : sequence of float
        Rate constants ``(k1, k2, k3)``; stored as ``log_k`` (trainable).
    """

    def __init__(self, k: tuple[float, float, float] = (0.04, 3e7, 1e4)) -> None:
        super().__init__()
        self.log_k = nn.Parameter(torch.tensor([math.log(v) for v in k], dtype=torch.float64))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        k1, k2, k3 = torch.exp(self.log_k).to(y.dtype)
        y1, y2, y3 = y[..., 0], y[..., 1], y[..., 2]
        r1, r2, r3 = k1 * y1, k2 * y2 * y2, k3 * y2 * y3
        return torch.stack([-r1 + r3, r1 - r2 - r3, r2], dim=-1)


class VanDerPol(nn.Module):
    """The Van der Pol oscillator ``x'' = mu ((1 - x^2) x' - x)``, first-order form.

    ``y1' = y2``, ``y2' = mu ((1 - y1^2) y2 - y1)``, stiff for large ``mu``
    (relaxation oscillations).  ``log_mu`` is trainable.

    Parameters
    ----------
    mu : float
        Stiffness parameter (1000 is the classic stiff case).
    """

    def __init__(self, mu: float = 1000.0) -> None:
        super().__init__()
        self.log_mu = nn.Parameter(torch.tensor(math.log(mu), dtype=torch.float64))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mu = torch.exp(self.log_mu).to(y.dtype)
        y1, y2 = y[..., 0], y[..., 1]
        return torch.stack([y2, mu * ((1 - y1 * y1) * y2 - y1)], dim=-1)
