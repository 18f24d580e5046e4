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

import torch

from .methods import resolve_method
from .state import StateSpec
from .tableau import ButcherTableau

__all__ = ["odeint_reference", "gradient_errors", "finite_difference_errors"]


def _rk_step(f, t, y, h, tab: ButcherTableau):
    """One step of an explicit or diagonally implicit Runge-Kutta scheme.

    Slopes ``k_i = f(t + c_i h, Y_i)`` with ``Y_i = y + h sum_j A_ij k_j``; a stage
    with ``A_ii != 0`` solves for ``Y_i`` by Newton's method (as PETSc's ARKIMEX does)
    and differentiates through the solution by the implicit-function theorem.
    """
    A, b, c = tab.A, tab.b, tab.c
    ks: list[torch.Tensor] = []
    for i in range(tab.stages):
        yi = y
        for j in range(i):
            if A[i][j] != 0.0:
                yi = yi + (h * A[i][j]) * ks[j]
        ti = t + c[i] * h
        if A[i][i] != 0.0:
            z, gamma = yi, h * A[i][i]

            def residual(x, z=z, gamma=gamma, ti=ti):
                return x - z - gamma * f(ti, x)

            yi = _newton(residual, z.detach())
        ks.append(f(ti, yi))
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
        A pnode method with a Butcher tableau in the registry (every explicit RK
        method, ``sdirk2``, ``trbdf2``) or a theta scheme.
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

    tab = m.tableau
    if tab is not None:  # explicit RK, or a diagonally implicit tableau run by ARKIMEX

        def step(tn, yn, h):
            return _rk_step(f, tn, yn, h, tab)
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


def gradient_errors(func, y0: torch.Tensor, t: torch.Tensor, *, method: str,
                    params: Sequence[torch.Tensor] | None = None,
                    **odeint_kwargs) -> tuple[float, list[float]]:
    """Compare :func:`pnode.odeint`'s adjoint gradient with backprop through the same scheme.

    Solves with pnode, replays the recorded steps in plain torch, and compares the
    gradients of a random weighted sum of the outputs with respect to ``y0`` and ``params``.

    Parameters
    ----------
    func, y0, t, method
        As for :func:`pnode.odeint` (``y0`` a Tensor that requires grad).
    params : sequence of Tensor, optional
        Parameters to compare (default: those of ``func`` if it is an ``nn.Module``).
    **odeint_kwargs
        Further options of :func:`pnode.odeint` (``options``, ``rtol``, ...).

    Returns
    -------
    solution_error : float
        Relative error of pnode's solution against the reference.
    gradient_errors : list of float
        Relative error of each gradient (``y0`` first, then ``params``).

    Examples
    --------
    >>> err_y, (err_y0, *err_p) = gradient_errors(f, y0, t, method="rk4",
    ...                                           options={"step_size": 0.1})
    """
    from .odeint import last_stats, odeint

    params = list(func.parameters()) if params is None else list(params)
    ys = odeint(func, y0, t, method=method, **odeint_kwargs)
    st = last_stats()
    w = torch.randn_like(ys)
    got = torch.autograd.grad((ys * w).sum(), [y0, *params])
    ref = odeint_reference(func, y0, t, method=method, step_times=st.step_times,
                           output_steps=st.output_steps,
                           theta=(odeint_kwargs.get("options") or {}).get("theta"),
                           endpoint=(odeint_kwargs.get("options") or {}).get("endpoint"))
    want = torch.autograd.grad((ref * w).sum(), [y0, *params])
    return _rel(ys, ref), [_rel(a, b) for a, b in zip(got, want, strict=True)]


def finite_difference_errors(loss: Callable[[], torch.Tensor],
                             variables: Sequence[torch.Tensor], *, eps: float = 1e-6,
                             generator: torch.Generator | None = None) -> list[float]:
    """Relative error of autograd gradients against central differences along random directions.

    Parameters
    ----------
    loss : callable
        ``loss() -> scalar Tensor``; evaluated once with gradients, then twice per variable.
    variables : sequence of Tensor
        Leaf tensors to check (perturbed in place and restored).
    eps : float
        Step of the central difference (its own error is ~``eps**2`` plus round-off).
    generator : torch.Generator, optional
        Source of the random directions.

    Returns
    -------
    list of float
        ``|g.d - fd| / max(|fd|, 1)`` for each variable.
    """
    grads = torch.autograd.grad(loss(), list(variables))
    errs = []
    for var, g in zip(variables, grads, strict=True):
        d = torch.randn(var.shape, dtype=var.dtype, generator=generator)
        with torch.no_grad():
            var.add_(d, alpha=eps)
            fp = float(loss())
            var.add_(d, alpha=-2 * eps)
            fm = float(loss())
            var.add_(d, alpha=eps)
        fd = (fp - fm) / (2 * eps)
        errs.append(abs(float((g * d).sum()) - fd) / max(abs(fd), 1.0))
    return errs


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / max(float(b.norm()), 1e-300))
