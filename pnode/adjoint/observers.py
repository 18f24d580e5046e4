"""The engine's one extension point: observers of the adjoint sweep's parameter products.

During ``TSAdjointSolve`` PETSc asks, at every stage of every step, for the
product ``v^T df/dp`` of a cotangent ``v`` with the parameter Jacobian of
``func`` at the stage point, and adds ``weight * v^T df/dp`` to the parameter
gradient.  Subscribers (e.g. :mod:`pnode.control`'s second-order optimizer,
which builds Kronecker factors from the layer activations and output gradients
seen in these products) receive one :class:`VjpEvent` per product.  The
event is delivered right after the backward pass that computed it, so torch
module hooks on ``func``'s layers have just fired for that stage: forward
hooks while the stage graph was built (``checkpoint="stages"``/``"solution"``;
with ``"graph"`` they fired during the forward sweep) and backward hooks
during the product.

The engine never imports its subscribers.

Examples
--------
>>> seen = []
>>> handle = pnode.adjoint.observe_vjps(lambda ev: seen.append((ev.t, ev.weight)))
>>> pnode.odeint(func, y0, t, method="rk4", options={"step_size": 0.1}).sum().backward()
>>> handle.remove()
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.hooks import RemovableHandle

__all__ = ["VjpEvent", "observe_vjps", "stage_weights"]


@dataclass(frozen=True)
class VjpEvent:
    """One parameter vector-Jacobian product of an adjoint sweep.

    Attributes
    ----------
    func : callable
        The right-hand side (the whole ``func``, or one half of an IMEX split).
    t : float
        Stage time.
    y : Tensor or tuple of Tensors
        Stage state, in the state's structure and dtype.
    cotangent : Tensor or tuple of Tensors
        The cotangent ``v`` of the product, in the state's structure.
    weight : float or None
        The factor PETSc applies to this product before adding it to the
        parameter gradient (step size times stage weight ``h * b_i`` for an
        explicit Runge-Kutta stage with ``b_i != 0``, ``h`` for a stage with
        ``b_i = 0``), so that the gradient is ``sum(weight * v^T df/dp)`` over
        events.  ``None`` for implicit and IMEX methods, whose products enter
        through linear solves.
    params : tuple of Tensor
        The parameters differentiated.
    param_grads : tuple of Tensor or None
        ``v^T df/dp`` for each parameter (``None`` where ``func`` does not use it).
    """

    func: Callable
    t: float
    y: torch.Tensor | tuple[torch.Tensor, ...]
    cotangent: torch.Tensor | tuple[torch.Tensor, ...]
    weight: float | None
    params: tuple[torch.Tensor, ...]
    param_grads: tuple[torch.Tensor | None, ...]


# an OrderedDict: RemovableHandle keeps a weak reference to it
_observers: OrderedDict[int, Callable[[VjpEvent], None]] = OrderedDict()


def observe_vjps(callback: Callable[[VjpEvent], None]) -> RemovableHandle:
    """Call ``callback(event)`` for every parameter product of every adjoint sweep.

    Parameters
    ----------
    callback : callable
        Receives a :class:`VjpEvent`; its return value is ignored.  An exception
        it raises fails the backward pass like an exception in ``func``.

    Returns
    -------
    torch.utils.hooks.RemovableHandle
        ``handle.remove()`` unsubscribes.
    """
    if not callable(callback):
        raise TypeError(f"observe_vjps needs a callable, got {type(callback).__name__}")
    handle = RemovableHandle(_observers)
    _observers[handle.id] = callback
    return handle


def active() -> bool:
    """Whether anyone listens (the engine skips building events otherwise)."""
    return bool(_observers)


def notify(event: VjpEvent) -> None:
    for callback in list(_observers.values()):
        callback(event)


def stage_weights(tableau, b: list[float] | None = None
                  ) -> Callable[[float, float, float], float | None]:
    """Weight of an explicit Runge-Kutta stage, from its time in the adjoint sweep.

    PETSc's RK adjoint visits a step from its end: it reports the step's end time
    ``ptime`` and a negative step ``h``, and evaluates stages ``i = s-1, ..., 0``
    in turn at ``ptime + h (1 - c_i)``, skipping the last stage of a
    first-same-as-last tableau; it scales the stage's parameter product by
    ``-h b_i`` (``-h`` when ``b_i = 0``, whose cotangent carries the tableau
    weights itself).  A stage is found from its time; where stages share a node
    ``c_i`` (Verner's 7(6) and 8(7) have two at ``c = 1`` with different
    weights), the visiting order decides: within a step the stage index only
    decreases, so the match is the highest index below the last one visited.

    Parameters
    ----------
    tableau : ButcherTableau or list of list of float
        The scheme's tableau (or, as before, its Runge-Kutta matrix ``A`` with
        ``c_i`` its row sums, together with ``b``).
    b : list of float, optional
        Weights, when ``tableau`` is the matrix ``A``.

    Returns
    -------
    callable
        ``weight(t_stage, ptime, h)``, ``None`` when the time matches no stage.
    """
    from .tableau import ButcherTableau

    if not isinstance(tableau, ButcherTableau):
        tableau = ButcherTableau(A=tableau, b=b, order=1)
    c = list(tableau.c)
    coef = [bi if bi != 0 else 1.0 for bi in tableau.b]
    if tableau.fsal:
        c, coef = c[:-1], coef[:-1]  # first same as last: PETSc's adjoint skips that stage
    n = len(c)
    last: list = [None, n]  # the step (ptime, h) being visited, the last stage index found

    def highest_match(ci: float, below: int) -> int | None:
        for i in range(below - 1, -1, -1):  # (called once per adjoint stage: no list built)
            if abs(c[i] - ci) < 1e-8:
                return i
        return None

    def weight(t_stage: float, ptime: float, h: float) -> float | None:
        if h == 0:
            return None
        ci = 1.0 - (t_stage - ptime) / h
        if last[0] != (ptime, h):
            last[0], last[1] = (ptime, h), n
        i = highest_match(ci, last[1])
        if i is None:  # a new visit of the same step (another adjoint sweep)
            i = highest_match(ci, n)
            if i is None:
                return None
        last[1] = i
        return -h * coef[i]

    return weight
