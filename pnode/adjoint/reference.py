"""Plain-torch versions of pnode's schemes, for verification only.

A discrete adjoint is exact for its discrete scheme, so the engine's gradients
are checked against backpropagation through the *same* scheme written here in
plain torch, on the *same* step sequence (recorded from the PETSc solve, see
:attr:`pnode.adjoint.SolveStats.step_times`).  Nothing in pnode integrates with
this module; it exists so that tests (and sceptical users) can reproduce the
exact discrete gradient independently of PETSc.

Implicit stages are solved by Newton's method to machine precision without
gradient tracking, then differentiated with the implicit-function theorem by
one graph-carrying Newton correction at the converged point.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fractions import Fraction as F

import torch

from .methods import resolve_method
from .state import StateSpec

__all__ = ["TABLEAUX", "odeint_reference"]


def _tab(rows, b):
    A = [[float(x) for x in r] + [0.0] * (len(b) - len(r)) for r in rows]
    return A, [float(x) for x in b]


# Butcher tableaux of PETSc's TSRK types (A strictly lower triangular; c = row sums).
TABLEAUX: dict[str, tuple[list[list[float]], list[float]]] = {
    "1fe": _tab([[]], [1]),
    "2a": _tab([[], [1]], [F(1, 2), F(1, 2)]),
    "2b": _tab([[], [F(1, 2)]], [0, 1]),
    "3": _tab([[], [F(2, 3)], [F(-1, 3), 1]], [F(1, 4), F(1, 2), F(1, 4)]),
    "3bs": _tab(
        [[], [F(1, 2)], [0, F(3, 4)], [F(2, 9), F(1, 3), F(4, 9)]],
        [F(2, 9), F(1, 3), F(4, 9), 0],
    ),
    "4": _tab([[], [F(1, 2)], [0, F(1, 2)], [0, 0, 1]], [F(1, 6), F(1, 3), F(1, 3), F(1, 6)]),
    "5f": _tab(
        [
            [],
            [F(1, 4)],
            [F(3, 32), F(9, 32)],
            [F(1932, 2197), F(-7200, 2197), F(7296, 2197)],
            [F(439, 216), -8, F(3680, 513), F(-845, 4104)],
            [F(-8, 27), 2, F(-3544, 2565), F(1859, 4104), F(-11, 40)],
        ],
        [F(16, 135), 0, F(6656, 12825), F(28561, 56430), F(-9, 50), F(2, 55)],
    ),
    "5dp": _tab(
        [
            [],
            [F(1, 5)],
            [F(3, 40), F(9, 40)],
            [F(44, 45), F(-56, 15), F(32, 9)],
            [F(19372, 6561), F(-25360, 2187), F(64448, 6561), F(-212, 729)],
            [F(9017, 3168), F(-355, 33), F(46732, 5247), F(49, 176), F(-5103, 18656)],
            [F(35, 384), 0, F(500, 1113), F(125, 192), F(-2187, 6784), F(11, 84)],
        ],
        [F(35, 384), 0, F(500, 1113), F(125, 192), F(-2187, 6784), F(11, 84), 0],
    ),
}


def _rk_step(f, t, y, h, A, b):
    c = [sum(row) for row in A]
    ks = []
    for i in range(len(b)):
        yi = y
        for j in range(i):
            if A[i][j] != 0.0:
                yi = yi + (h * A[i][j]) * ks[j]
        ks.append(f(t + c[i] * h, yi))
    out = y
    for bi, k in zip(b, ks, strict=True):
        if bi != 0.0:
            out = out + (h * bi) * k
    return out


def _newton(residual: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor) -> torch.Tensor:
    """Solve residual(x) = 0 to machine precision, then attach IFT gradients."""
    x = x0.detach().clone()
    for _ in range(100):
        with torch.no_grad():
            r = residual(x)
        if r.abs().max() <= 1e-15 * (1.0 + x.abs().max()):
            break
        J = torch.autograd.functional.jacobian(residual, x).detach()
        dx = torch.linalg.solve(J, -r)
        x = x + dx
        if dx.abs().max() <= 4e-16 * (1.0 + x.abs().max()):
            break
    x = x.detach()
    J = torch.autograd.functional.jacobian(residual, x).detach()
    # One Newton correction carrying the graph: d x / d inputs = -J^{-1} dR/d inputs.
    return x - torch.linalg.solve(J, residual(x))


def _theta_step(f, t, y, h, theta, endpoint):
    if endpoint:
        f0 = f(t, y) if theta != 1.0 else None

        def res(z):
            r = z - y - (h * theta) * f(t + h, z)
            return r if f0 is None else r - (h * (1 - theta)) * f0

        y_guess = y if f0 is None else y + h * f0
        return _newton(res, y_guess)

    def res_mid(x):
        return x - y - (h * theta) * f(t + theta * h, x)

    x = _newton(res_mid, y)
    return y + (x - y) / theta


def odeint_reference(
    func: Callable,
    y0: torch.Tensor | Sequence[torch.Tensor],
    t: torch.Tensor,
    *,
    method: str,
    step_times: torch.Tensor | Sequence[float],
    output_steps: Sequence[int] | None = None,
    theta: float | None = None,
    endpoint: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Integrate with plain torch on a given step sequence, differentiably.

    Parameters
    ----------
    func : callable
        ``func(t, y) -> dy/dt``, as for :func:`pnode.odeint`.
    y0 : Tensor or tuple of Tensors
        Initial state.
    t : Tensor
        Output times; each must appear in ``step_times``.
    method : str
        A pnode method name with a tableau here (explicit RK) or a theta scheme.
    step_times : sequence of float
        All step boundaries ``t_0 < t_1 < ... < t_M`` (e.g. ``stats.step_times``).
    output_steps : sequence of int, optional
        Index in ``step_times`` of each output (``stats.output_steps``); by default
        each output time must equal a step time.
    theta, endpoint : optional
        Override the theta and the form of ``"theta"`` (as ``options`` of :func:`pnode.odeint`).

    Returns
    -------
    Tensor or tuple of Tensors
        Solutions at ``t``, stacked along a new first dimension.

    Examples
    --------
    >>> ys = pnode.odeint(f, y0, t, method="rk4", options={"step_size": 0.1})
    >>> st = pnode.last_stats()
    >>> ref = odeint_reference(f, y0, t, method="rk4", step_times=st.step_times,
    ...                        output_steps=st.output_steps)
    """
    m = resolve_method(method)
    spec = StateSpec.from_state(y0)
    times = [float(s) for s in step_times]
    outs = [float(s) for s in t]
    y = spec.flatten(y0)

    def f(tt, yy):
        tt = torch.as_tensor(tt, dtype=spec.dtype)
        return spec.check_output(func(tt, spec.unflatten(yy)), "func")

    if m.ts_type == "rk":
        if m.subtype not in TABLEAUX:
            raise ValueError(f"no reference tableau for {method!r}")
        A, b = TABLEAUX[m.subtype]

        def step(tn, yn, h):
            return _rk_step(f, tn, yn, h, A, b)
    elif m.ts_type in ("beuler", "cn", "theta"):
        th = m.theta if theta is None else theta
        ep = m.endpoint if endpoint is None else endpoint

        def step(tn, yn, h):
            return _theta_step(f, tn, yn, h, th, ep)
    else:
        raise ValueError(f"no reference implementation for {method!r} ({m.petsc})")

    if output_steps is None:
        index = {tn: i for i, tn in enumerate(times)}
        missing = [tk for tk in outs if tk not in index]
        if missing:
            raise ValueError(f"output times {missing} are not among the step times; "
                             "pass output_steps")
        output_steps = [index[tk] for tk in outs]
    wanted = {}
    for k, i in enumerate(output_steps):
        wanted.setdefault(int(i), []).append(k)
    ys: list = [None] * len(outs)
    for i, tn in enumerate(times):
        for k in wanted.get(i, ()):
            ys[k] = y
        if i + 1 < len(times):
            y = step(tn, y, times[i + 1] - tn)
    return spec.unflatten(torch.stack(ys))
