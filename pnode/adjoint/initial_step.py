"""The starting step of adaptive solves, as a free function (no PETSc needed).

Hairer, Norsett & Wanner, *Solving Ordinary Differential Equations I*, Sec. II.4:
two right-hand side evaluations estimate the scale of the solution and of its
second derivative.  Schemes whose error estimate needs a previous step
(TSTHETA) would otherwise accept a first step too large for a stiff transient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["initial_step"]


def initial_step(f: Callable[[float, torch.Tensor], torch.Tensor], t0: float, y0: torch.Tensor,
                 span: float, *, order: int, rtol: float, atol: float,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 after_eval: Callable[[], None] | None = None) -> float:
    """Starting step size for integrating ``dy/dt = f(t, y)`` from ``(t0, y0)``.

    Parameters
    ----------
    f : callable
        ``f(t, y) -> dy/dt`` as a float64 tensor shaped like ``y0``.
    t0 : float
        Initial time.
    y0 : Tensor
        Initial state (flat float64; a shard of it in a distributed solve).
    span : float
        Length of the integration interval (the step never exceeds it).
    order : int
        Order of the scheme.
    rtol, atol : float
        Tolerances: the norms are RMS norms weighted by ``atol + rtol |y0|``.
    reduce : callable, optional
        Sum of a float64 tensor over the ranks of a distributed state (``None``:
        serial).  Called once per evaluation, on every rank, even after a failure.
    after_eval : callable, optional
        Called after each evaluation and its reduction (the solver's cross-rank
        failure check).

    Returns
    -------
    float
        The step, in ``(0, span]``.

    Examples
    --------
    >>> h = initial_step(lambda t, y: -y, 0.0, torch.ones(3, dtype=torch.float64), 1.0,
    ...                  order=5, rtol=1e-6, atol=1e-9)
    >>> 0 < h <= 1.0
    True
    """
    scale = atol + rtol * y0.abs()

    def norms(*vs: torch.Tensor) -> list[float]:
        # RMS norms over the whole (possibly distributed) state: one reduction
        sq = torch.stack([((v / scale) ** 2).sum() for v in vs]
                         + [torch.tensor(float(y0.numel()), dtype=torch.float64)])
        sq = reduce(sq) if reduce is not None else sq.to(torch.float64)
        count = float(sq[-1])
        return [float(torch.sqrt(x / count)) if count else 0.0 for x in sq[:-1]]

    def checked() -> None:
        if after_eval is not None:
            after_eval()

    with torch.no_grad():
        f0 = f(t0, y0)
        d0, d1 = norms(y0, f0)
        checked()
        h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
        h0 = min(h0, span)
        f1 = f(t0 + h0, y0 + h0 * f0)
        (d2,) = norms(f1 - f0)
        checked()
        d2 /= h0
        order = max(order, 1)
        if max(d1, d2) <= 1e-15:
            h1 = max(1e-6, h0 * 1e-3)
        else:
            h1 = (0.01 / max(d1, d2)) ** (1.0 / (order + 1))
        return min(100 * h0, h1, span)
