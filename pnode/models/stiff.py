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
        # Reactions r = (k a) b with a = (y1, y2, y2) and b = (1, y2, y3) = e1 + m y, then
        # f = S r (stoichiometry S): five ops on the state's path instead of thirteen
        # (each costs a few us in every one of a stiff solve's many small Jacobian passes).
        self.register_buffer("_a", torch.tensor([0, 1, 1]), persistent=False)
        self.register_buffer("_e1", torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64),
                             persistent=False)
        self.register_buffer("_m", torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64),
                             persistent=False)
        # S^T, contiguous: the products below then sum in the written order (bit for bit)
        self.register_buffer("_stoich_t", torch.tensor(
            [[-1.0, 1.0, 0.0], [0.0, -1.0, 1.0], [1.0, -1.0, 0.0]], dtype=torch.float64),
            persistent=False)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        k, e1, m, st = torch.exp(self.log_k), self._e1, self._m, self._stoich_t
        if y.dtype != k.dtype or y.dtype != st.dtype:
            k, e1, m, st = (v.to(y.dtype) for v in (k, e1, m, st))
        # for finite y, bit for bit -r1 + r3, (r1 - r2) - r3, r2 with r1 = k1 y1,
        # r2 = (k2 y2) y2, r3 = (k3 y2) y3: the exact 0/1 factors add no rounding
        r = k * y.index_select(-1, self._a) * torch.addcmul(e1, y, m)
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
