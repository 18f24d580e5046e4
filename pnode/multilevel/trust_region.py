"""Trust-region subproblem ``min_s g^T s + s^T B s / 2`` subject to ``||s|| <= radius``.

Two solvers:

- :func:`solve_compact`: exact solution for the compact L-SR1 matrix
  ``B = gamma I + U diag(c) U^T`` by a thin QR of ``U`` and the spectral
  decomposition of ``R diag(c) R^T`` (the "OBS" approach of Brust, Erway & Marcia,
  "On solving L-SR1 trust-region subproblems", Comput. Optim. Appl. 66, 2017), and
  a safeguarded Newton iteration on the secular equation ``1/||s(sigma)|| = 1/radius``
  (Moré & Sorensen 1983), including the hard case.  The result satisfies
  ``(B + sigma I) s = -g``, ``sigma (radius - ||s||) = 0``, ``B + sigma I`` PSD.
- :func:`steihaug_cg`: truncated conjugate gradients (Steihaug 1983), matrix-free,
  which stops on the boundary along negative curvature; it reduces the model at
  least as much as the Cauchy point.

Both are used by :class:`pnode.multilevel.RMTR` on every level (Kopaničáková &
Krause, SIAM J. Sci. Comput., 2023).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .sr1 import LSR1

__all__ = ["TRSolution", "solve_compact", "steihaug_cg"]


@dataclass
class TRSolution:
    """A trust-region step.

    Attributes
    ----------
    step : Tensor
        The step ``s``.
    multiplier : float
        Lagrange multiplier ``sigma`` (``nan`` for Steihaug-CG, which does not compute one).
    predicted : float
        Model decrease ``-(g^T s + s^T B s / 2)``.
    on_boundary : bool
        Whether ``||s|| = radius``.
    hard_case : bool
        The hard case of the exact solver was taken.
    iterations : int
        Newton (secular equation) or CG iterations.
    """

    step: torch.Tensor
    multiplier: float
    predicted: float
    on_boundary: bool
    hard_case: bool = False
    iterations: int = 0


def _boundary_root(p: torch.Tensor, d: torch.Tensor, radius: float) -> float:
    """tau >= 0 with ||p + tau d|| = radius."""
    a, b, c = float(d @ d), 2.0 * float(p @ d), float(p @ p) - radius ** 2
    return (-b + math.sqrt(max(b * b - 4 * a * c, 0.0))) / (2 * a)


def solve_compact(g: torch.Tensor, B: LSR1, radius: float, *, tol: float = 1e-12,
                  max_iter: int = 100) -> TRSolution:
    """Exact trust-region step for an L-SR1 matrix in compact form.

    Parameters
    ----------
    g : Tensor
        Gradient (1-D).
    B : LSR1
        Curvature ``gamma I + U diag(c) U^T``.
    radius : float
        Trust-region radius (Euclidean norm).
    tol : float
        Relative tolerance on ``||s|| = radius`` in the secular equation.

    Returns
    -------
    TRSolution
    """
    if not radius > 0:
        raise ValueError(f"Invalid radius {radius!r}: must be positive")
    n, gamma = g.numel(), B.gamma
    gnorm = float(g.norm())
    if B.U is None:
        lam = torch.tensor([gamma], dtype=g.dtype)
        a = torch.tensor([gnorm ** 2], dtype=g.dtype)
        Ppar = None
    else:
        Q, R = torch.linalg.qr(B.U)
        lam_hat, V = torch.linalg.eigh(R @ torch.diag(B.c) @ R.T)
        Ppar = Q @ V
        gpar = Ppar.T @ g
        perp2 = max(gnorm ** 2 - float(gpar @ gpar), 0.0)
        lam = gamma + lam_hat
        a = gpar ** 2
        if Ppar.shape[1] < n:  # the complement of range(U) has eigenvalue gamma
            lam = torch.cat([lam, lam.new_tensor([gamma])])
            a = torch.cat([a, a.new_tensor([perp2])])

    def norm2(sig: float, mask=None) -> float:
        den = (lam + sig) ** 2
        terms = torch.where(den > 0, a / torch.where(den > 0, den, 1.0), torch.zeros_like(a))
        if mask is not None:
            terms = terms * mask
        return float(terms.sum())

    lmin = float(lam.min())
    sigma, hard, it = 0.0, False, 0
    if lmin > 0 and math.sqrt(norm2(0.0)) <= radius:
        sigma = 0.0
    else:
        lo = max(0.0, -lmin)
        near = (lam - lmin).abs() <= 1e-10 * max(1.0, abs(lmin))
        small = float(a[near].sum()) <= (1e-14 * max(gnorm, 1e-300)) ** 2
        if small and math.sqrt(norm2(lo, (~near).to(a.dtype))) <= radius:
            hard, sigma = True, lo
        else:
            hi = max(lo, gnorm / radius - lmin) + 1e-12 * (1 + abs(lo))
            sigma = hi
            while it < max_iter:
                it += 1
                w = norm2(sigma)
                phi = 1.0 / math.sqrt(w) - 1.0 / radius
                if abs(math.sqrt(w) - radius) <= tol * radius:
                    break
                if phi < 0:
                    lo = sigma
                else:
                    hi = sigma
                dw = -2.0 * float((a / (lam + sigma) ** 3).sum())
                dphi = -0.5 * w ** -1.5 * dw
                new = sigma - phi / dphi if dphi != 0 else 0.5 * (lo + hi)
                sigma = new if lo < new < hi else 0.5 * (lo + hi)
    # assemble s = -(B + sigma I)^{-1} g in the eigenbasis
    if Ppar is None:
        s = -g / (gamma + sigma) if gamma + sigma > 0 else torch.zeros_like(g)
    else:
        d = lam[:Ppar.shape[1]] + sigma
        coef = torch.where(d.abs() > 0, gpar / torch.where(d.abs() > 0, d, 1.0), torch.zeros_like(d))
        s = -(Ppar @ coef)
        if gamma + sigma > 0:
            s = s - (g - Ppar @ gpar) / (gamma + sigma)
    if hard:
        # add the eigenvector of the smallest eigenvalue to reach the boundary
        j = int(torch.argmin(lam))
        if Ppar is not None and j < Ppar.shape[1]:
            z = Ppar[:, j]
        else:
            gen = torch.Generator().manual_seed(0)
            z = torch.randn(n, dtype=g.dtype, generator=gen)
            if Ppar is not None:
                z = z - Ppar @ (Ppar.T @ z)
            z = z / z.norm()
        s = s + _boundary_root(s, z, radius) * z
    Bs = B.matvec(s)
    pred = -float(g @ s + 0.5 * (s @ Bs))
    return TRSolution(s, sigma, pred, sigma > 0 or hard, hard, it)


def steihaug_cg(g: torch.Tensor, matvec: Callable[[torch.Tensor], torch.Tensor], radius: float, *,
                rtol: float = 1e-6, max_iter: int | None = None) -> TRSolution:
    """Steihaug–Toint truncated CG for the trust-region subproblem.

    Stops at the boundary on negative curvature or when the iterate leaves the
    region, or when ``||r|| <= rtol ||g||``.  The first iterate is the Cauchy
    point, so the model decrease is at least the Cauchy decrease.

    Parameters
    ----------
    g : Tensor
        Gradient.
    matvec : callable
        ``v -> B v``.
    radius : float
        Trust-region radius.
    rtol : float
        Relative residual tolerance.
    max_iter : int, optional
        Default ``min(n, 50)``.
    """
    if not radius > 0:
        raise ValueError(f"Invalid radius {radius!r}: must be positive")
    max_iter = max_iter or min(g.numel(), 50)
    s = torch.zeros_like(g)
    r = g.clone()
    d = -r
    gnorm = float(g.norm())
    boundary, it = False, 0
    if gnorm == 0.0:
        return TRSolution(s, float("nan"), 0.0, False)
    while it < max_iter:
        it += 1
        Bd = matvec(d)
        dBd = float(d @ Bd)
        if dBd <= 0:
            s = s + _boundary_root(s, d, radius) * d
            boundary = True
            break
        alpha = float(r @ r) / dBd
        s_next = s + alpha * d
        if float(s_next.norm()) >= radius:
            s = s + _boundary_root(s, d, radius) * d
            boundary = True
            break
        s = s_next
        r_next = r + alpha * Bd
        if float(r_next.norm()) <= rtol * gnorm:
            break
        beta = float(r_next @ r_next) / float(r @ r)
        d = -r_next + beta * d
        r = r_next
    pred = -float(g @ s + 0.5 * (s @ matvec(s)))
    return TRSolution(s, float("nan"), pred, boundary, False, it)
