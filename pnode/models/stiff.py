"""Stiff benchmark systems as ``nn.Module`` right-hand sides: Robertson kinetics and Van der Pol."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

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
        # reactions r = k * a * b with a = (y1, y2, y2), b = (1, y2, y3), picked from
        # (1, y1, y2, y3); f = S r with the stoichiometry S.  Written as few torch ops
        # (each op costs a few us in every stiff solve's many small Jacobian passes).
        self.register_buffer("_a", torch.tensor([1, 2, 2]), persistent=False)
        self.register_buffer("_b", torch.tensor([0, 2, 3]), persistent=False)
        # S^T, contiguous: these products then sum in the written order (bit for bit)
        self.register_buffer("_stoich_t", torch.tensor(
            [[-1.0, 1.0, 0.0], [0.0, -1.0, 1.0], [1.0, -1.0, 0.0]], dtype=torch.float64),
            persistent=False)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        k = torch.exp(self.log_k).to(y.dtype)
        ext = F.pad(y, (1, 0), value=1.0)  # (1, y1, y2, y3)
        # (k a) b: the same roundings as k1*y1, (k2*y2)*y2, (k3*y2)*y3
        r = k * ext.index_select(-1, self._a) * ext.index_select(-1, self._b)
        st = self._stoich_t.to(y.dtype)
        # f = S r: -r1 + r3, (r1 - r2) - r3 and r2, bit for bit as written out
        return torch.mv(st.T, r) if r.dim() == 1 else r @ st


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
