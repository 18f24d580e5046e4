"""Method-of-lines building blocks for 1-D periodic PDEs (viscous Burgers, reaction-diffusion).

A field ``u`` on ``n`` equispaced points of a periodic interval of length ``L`` is a
tensor ``[..., n]``; every operator acts on the last axis, so a batch of initial
conditions integrates as one state ``[batch, n]`` (and ``options={"jacobian": "blocks"}``
gives implicit methods one small dense block per sample).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["Diffusion", "BurgersAdvection", "StencilClosure", "random_fourier_fields"]


def _d2(u: torch.Tensor, dx: float) -> torch.Tensor:
    return (torch.roll(u, -1, -1) - 2 * u + torch.roll(u, 1, -1)) / (dx * dx)


class Diffusion(nn.Module):
    """``nu * u_xx`` by the second-order central difference (the stiff, linear part).

    Parameters
    ----------
    n : int
        Grid points.
    length : float
        Period of the domain.
    nu : float
        Viscosity / diffusivity.
    """

    def __init__(self, n: int, length: float = 2 * math.pi, nu: float = 0.1) -> None:
        super().__init__()
        self.n, self.dx, self.nu = n, length / n, float(nu)

    def forward(self, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.nu * _d2(u, self.dx)


class BurgersAdvection(nn.Module):
    """``-(u^2/2)_x`` in conservative form, central differences (Burgers' nonlinear flux).

    Parameters
    ----------
    n : int
        Grid points.
    length : float
        Period of the domain.
    """

    def __init__(self, n: int, length: float = 2 * math.pi) -> None:
        super().__init__()
        self.n, self.dx = n, length / n

    def forward(self, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        flux = 0.5 * u * u
        return -(torch.roll(flux, -1, -1) - torch.roll(flux, 1, -1)) / (2 * self.dx)


class StencilClosure(nn.Module):
    """A learned local operator: ``u_i -> g(u_{i-r}, ..., u_{i+r})``, the same at every point.

    A periodic 1-D convolution of width ``2r + 1`` to ``hidden`` channels, ``tanh``,
    and a pointwise linear map back, scaled by ``1/dx``: translation-invariant
    like the flux it replaces.

    Parameters
    ----------
    n : int
        Grid points.
    length : float
        Period of the domain.
    radius : int
        Stencil radius ``r``.
    hidden : int
        Channels of the hidden layer.
    """

    def __init__(self, n: int, length: float = 2 * math.pi, radius: int = 1, hidden: int = 16) -> None:
        super().__init__()
        self.dx = length / n
        self.conv = nn.Conv1d(1, hidden, 2 * radius + 1, padding=radius, padding_mode="circular")
        self.mix = nn.Conv1d(hidden, 1, 1)
        nn.init.zeros_(self.mix.weight)  # start from "no closure"
        nn.init.zeros_(self.mix.bias)

    def forward(self, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        shape = u.shape
        h = torch.tanh(self.conv(u.reshape(-1, 1, shape[-1])))
        return (self.mix(h) / self.dx).reshape(shape)


def random_fourier_fields(batch: int, n: int, *, modes: int = 3, amplitude: float = 1.0,
                          generator: torch.Generator | None = None,
                          dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Smooth random periodic fields ``sum_k a_k sin(k x) + b_k cos(k x)``, ``[batch, n]``.

    Coefficients decay like ``1/k``; each field is scaled to max-abs ``amplitude``.
    """
    x = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
    k = torch.arange(1, modes + 1, dtype=torch.float64)
    a = torch.randn(batch, modes, generator=generator, dtype=torch.float64) / k
    b = torch.randn(batch, modes, generator=generator, dtype=torch.float64) / k
    u = a @ torch.sin(k[:, None] * x) + b @ torch.cos(k[:, None] * x)
    u = amplitude * u / u.abs().amax(dim=1, keepdim=True)
    return u.to(dtype)
