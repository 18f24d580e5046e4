"""Terminal events: integrate until ``event_fn(t, y)`` changes sign, with a differentiable event time.

How the root is found (and why on the torch side, not with PETSc's TSEvent):
the returned state must be the discrete scheme's own solution at the event
time, so that the exact adjoint of an ordinary solve to ``t_e`` differentiates
it.  The search therefore runs in three stages:

1. *bracket*: solves over growing windows, with a step hook that evaluates
   ``event_fn`` after every accepted step, find the first step across which a
   component changes sign (torchdiffeq also checks at step ends);
2. *root*: the Illinois method on ``G(tau) = event_fn(tau, y(tau))``, where
   ``y(tau)`` is the full solve from ``t0`` with output time ``tau``: the very
   map the final solve differentiates, so ``event_fn`` vanishes at the
   returned state to round-off (TSEvent would stop at a step end within its
   own tolerance of an interpolated root, inside a trajectory the adjoint does
   not replay that way);
3. *gradient*: one ordinary differentiable solve to ``t_e``; by the implicit
   function theorem ``dt_e = -(dg/dy . dy(t_e)) / (dg/dt + dg/dy . f)``, with
   ``dy(t_e)`` from the exact discrete adjoint (with respect to ``y0``, the
   parameters and ``t0``) and ``f`` the field at the event, as torchdiffeq does.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch

from ..errors import SolverError
from .state import StateSpec
from .vecs import vec_view

__all__ = ["odeint_until_event", "odeint_event"]


def _check_event_fn(event_fn: Any, t0: torch.Tensor, y0: Any) -> int:
    """Validate ``event_fn(t, y)``; return the number of event components."""
    if not callable(event_fn):
        raise ValueError(f"event_fn must be callable as event_fn(t, y), got "
                         f"{type(event_fn).__name__}")
    try:
        inspect.signature(event_fn).bind(t0, y0)
    except TypeError as exc:
        raise ValueError(f"event_fn must take two arguments (t, y) and return a tensor: {exc}") \
            from None
    except ValueError:  # no signature to inspect (a builtin): the call below checks
        pass
    with torch.no_grad():
        g = event_fn(t0, y0)
    if not isinstance(g, torch.Tensor) or not g.is_floating_point() or g.numel() == 0:
        raise ValueError("event_fn(t, y) must return a floating-point tensor (one value per "
                         f"event), got {type(g).__name__ if not isinstance(g, torch.Tensor) else g}")
    g = g.reshape(-1)
    if not bool(torch.isfinite(g).all()):
        raise ValueError("event_fn(t0, y0) is NaN or Inf")
    if bool((g == 0).any()):
        raise ValueError("event_fn(t0, y0) is zero: the search needs a start off the event "
                         "surface (move y0 or t0 slightly, as torchdiffeq's bouncing ball does)")
    return g.numel()


def _structure(y0: Any) -> Any:
    return tuple(y.detach() for y in y0) if isinstance(y0, (tuple, list)) else y0.detach()


def _bracket(solve: Callable, spec: StateSpec, event_fn: Callable, t0: float, y0: Any,
             span: float, sign0: torch.Tensor, reverse: bool):
    """First step ``(t_a, t_b)`` across which a component of event_fn changes sign."""
    a, ya, ga = t0, y0, None
    direction = -1.0 if reverse else 1.0
    for _ in range(64):
        seen: list = []

        def hook(ts, step, t, u, seen=seen):  # t is the solver's time (s = -t in reverse)
            if step == 0:
                return
            tk = -t if reverse else t
            yk = spec.unflatten(vec_view(u).to(spec.dtype).clone())
            seen.append((tk, yk, event_fn(torch.tensor(tk, dtype=spec.dtype), yk).reshape(-1)))

        b = a + direction * span
        ys = solve(ya, [a, b], [hook])
        prev = (a, ga)
        for tk, _yk, gk in seen:
            changed = torch.sign(gk) != sign0
            if bool(changed.any()):
                return prev[0], tk, changed.nonzero().reshape(-1).tolist()
            prev = (tk, gk)
        a, ya = b, tuple(y[-1] for y in ys) if spec.is_tuple else ys[-1]
        span *= 2.0
    raise SolverError(f"no event: event_fn did not change sign up to t={a:.6g}", t=a,
                      reason="NO_EVENT", steps=0, phase="forward")


def _illinois(G: Callable[[float], float], lo: float, hi: float, glo: float, ghi: float) -> float:
    """Root of ``G`` in a bracket ``(lo, hi)`` (Illinois variant of regula falsi).

    Returns the end of the final bracket on the far side of the root (where the sign
    has changed), to round-off of the time.
    """
    side = 0
    for _ in range(200):
        if abs(hi - lo) <= 4 * 2.0**-52 * max(abs(lo), abs(hi), 1e-300):
            break
        tau = (lo * ghi - hi * glo) / (ghi - glo)
        if not min(lo, hi) < tau < max(lo, hi):
            tau = 0.5 * (lo + hi)
        g = G(tau)
        if g == 0.0:
            return tau
        if math.copysign(1.0, g) == math.copysign(1.0, glo):
            lo, glo = tau, g
            if side == -1:
                ghi *= 0.5
            side = -1
        else:
            hi, ghi = tau, g
            if side == 1:
                glo *= 0.5
            side = 1
    return hi


def _root(G: Callable[[float], torch.Tensor], lo: float, hi: float, comps: list[int]) -> tuple[float, int]:
    """Earliest root among the components that changed sign in ``(lo, hi)``."""
    g_lo, g_hi = G(lo), G(hi)
    best: tuple[float, int] | None = None
    for c in comps:
        a, b = float(g_lo[c]), float(g_hi[c])
        if a == 0.0 or math.copysign(1.0, a) == math.copysign(1.0, b):
            continue  # the full solve from t0 does not confirm this crossing
        tau = _illinois(lambda s, c=c: float(G(s)[c]), lo, hi, a, b)
        if best is None or abs(tau - lo) < abs(best[0] - lo):
            best = (tau, c)
    if best is None:  # the windows' bracket and the full solve disagree at round-off
        best = (hi, comps[0])
    return best


def _implicit_time(func: Callable, event_fn: Callable, tau: torch.Tensor, comp: int,
                   y_end: Any, spec: StateSpec) -> tuple[torch.Tensor, Any]:
    """Event time and state with implicit-function-theorem gradients (values unchanged)."""
    parts = y_end if spec.is_tuple else (y_end,)
    with torch.enable_grad():
        tv = tau.detach().clone().requires_grad_(True)
        yv = tuple(y.detach().requires_grad_(True) for y in parts)
        gv = event_fn(tv, yv if spec.is_tuple else yv[0]).reshape(-1)[comp]
        grads = torch.autograd.grad(gv, (tv, *yv), allow_unused=True) if gv.requires_grad \
            else (None,) * (1 + len(yv))
    with torch.no_grad():
        f = func(tau.detach().to(spec.dtype), tuple(y.detach() for y in parts) if spec.is_tuple
                 else parts[0].detach())
        fs = f if spec.is_tuple else (f,)
        dphi = float(grads[0]) if grads[0] is not None else 0.0
        dphi += sum(float((g * fi).sum()) for g, fi in zip(grads[1:], fs, strict=True)
                    if g is not None)
    if dphi == 0.0 or not math.isfinite(dphi):
        raise SolverError("event_fn crosses zero tangentially at the event (d event_fn/dt = 0 "
                          "along the solution), so the event time has no derivative",
                          t=float(tau), reason="EVENT_TANGENTIAL", steps=0, phase="forward")
    phi = event_fn(tau.detach(), y_end).reshape(-1)[comp]  # carries the graph to y0, params, t0
    event_t = tau.detach() - ((phi - phi.detach()) / dphi).to(tau.dtype)
    shift = (event_t - tau.detach()).to(spec.dtype)
    state = tuple(y + fi.detach() * shift for y, fi in zip(parts, fs, strict=True))
    return event_t, state if spec.is_tuple else state[0]


def odeint_until_event(func: Callable, y0: Any, t: Any, *, event_fn: Callable,
                       **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """``odeint(func, y0, t, event_fn=...)``: see :func:`odeint_event` (``t = [t0]`` or ``[t0, t1]``)."""
    from .distributed import as_comm
    from .odeint import _front, _odeint

    comm = as_comm(kwargs.get("comm"))
    if comm is not None and comm.Get_size() > 1:
        raise ValueError("event_fn is not supported with comm= (a data-parallel solve has one "
                         "event time per sample); solve each shard's events without comm")
    front_kw = {k: kwargs[k] for k in ("rtol", "atol", "method", "options", "adjoint_rtol",
                                       "adjoint_atol", "adjoint_method", "adjoint_options",
                                       "petsc_options")}
    front = _front(func, y0, t, event=True, **front_kw)
    times, tensors = front.times, front.tensors
    spec = StateSpec.from_state(y0 if isinstance(y0, (tuple, list)) else tensors[0])
    # event times in at least the state's precision (a float32 t0 beside a float64 state
    # would round the located root to 1e-7)
    t0 = times.t[0].to(torch.promote_types(times.t.dtype, spec.dtype))
    y_struct = tuple(tensors) if spec.is_tuple else tensors[0]
    t0c = t0.detach().to(spec.dtype)
    _check_event_fn(event_fn, t0c, _structure(y_struct))
    with torch.no_grad():
        sign0 = torch.sign(event_fn(t0c, _structure(y_struct)).reshape(-1))
    rest = kwargs

    def solve(ya, tt, hooks=()):
        return _odeint(func, ya, torch.tensor(tt, dtype=t0.dtype), step_hooks=hooks,
                       **rest)

    t0f = float(t0.detach())

    def G(tau: float) -> torch.Tensor:
        ys = solve(_structure(y_struct), [t0f, tau] if tau != t0f else [tau])
        end = tuple(y[-1] for y in ys) if spec.is_tuple else ys[-1]
        return event_fn(torch.tensor(tau, dtype=spec.dtype), end).reshape(-1)

    span = abs(float((times.t[1] - times.t[0]).detach())) if times.t.numel() == 2 else 1.0
    with torch.no_grad():
        lo, hi, comps = _bracket(solve, spec, event_fn, t0f, _structure(y_struct), span,
                                 sign0, times.reverse)
        tau, comp = _root(G, lo, hi, comps)
    # the differentiable solve to the event, then the implicit-function-theorem reroute
    tt = torch.stack([t0, torch.tensor(tau, dtype=t0.dtype)])
    ys = _odeint(func, y0, tt, **rest)
    end = tuple(y[-1] for y in ys) if spec.is_tuple else ys[-1]
    event_t, state = _implicit_time(func, event_fn, tt[1], comp, end, spec)
    if spec.is_tuple:
        return event_t, tuple(torch.stack([y[0], s]) for y, s in zip(ys, state, strict=True))
    return event_t, torch.stack([ys[0], state])


def odeint_event(func: Callable, y0: Any, t0: Any, *, event_fn: Callable,
                 reverse_time: bool = False, odeint_interface: Callable | None = None,
                 **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """Integrate from ``t0`` until ``event_fn(t, y)`` changes sign (torchdiffeq's ``odeint_event``).

    Parameters
    ----------
    func : callable
        ``func(t, y) -> dy/dt``, as for :func:`pnode.odeint`.
    y0 : Tensor or tuple of Tensors
        State at ``t0``.
    t0 : Tensor or float
        Start time (differentiable).
    event_fn : callable
        ``event_fn(t, y) -> Tensor``; the event is the first time a component changes sign
        (checked after every step, then located to round-off).  Must not be zero at ``t0``.
    reverse_time : bool, default False
        Integrate towards decreasing times.
    odeint_interface : callable, optional
        The ``odeint`` to call (default :func:`pnode.odeint`).
    **kwargs
        Further :func:`pnode.odeint` keywords (``method``, ``rtol``, ``atol``, ``options``, ...).

    Returns
    -------
    event_t : Tensor
        The event time; differentiable with respect to ``y0``, ``t0`` and the parameters of
        ``func`` and ``event_fn`` (implicit function theorem at the root).
    solution : Tensor or tuple of Tensors
        ``[y(t0), y(event_t)]`` stacked along a new first axis.

    Raises
    ------
    ValueError
        ``event_fn`` not callable as ``event_fn(t, y)``, not returning a float tensor, or zero
        at ``t0``.
    pnode.SolverError
        No sign change before the solver's step limit (``reason="NO_EVENT"``), or any solver failure.

    Examples
    --------
    >>> event_t, sol = pnode.odeint_event(ball, (pos, vel), torch.tensor(0.0),
    ...                                   event_fn=lambda t, s: s[0])
    """
    if odeint_interface is None:
        from .odeint import odeint as odeint_interface
    t0 = torch.as_tensor(t0, dtype=torch.float64) if not isinstance(t0, torch.Tensor) else t0
    t0 = t0.reshape(-1)
    if t0.numel() != 1:
        raise ValueError(f"t0 must be a single time, got {t0.numel()} values")
    t = torch.cat([t0, t0.detach() + (-1.0 if reverse_time else 1.0)])
    return odeint_interface(func, y0, t, event_fn=event_fn, **kwargs)
