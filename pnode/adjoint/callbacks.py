"""torchdiffeq's step callbacks, called from PETSc's step monitor.

torchdiffeq calls ``func.callback_step(t0, y0, dt)`` before each step,
``func.callback_accept_step(t0, y0, dt)`` / ``callback_reject_step(t0, y0, dt)``
after each accepted / rejected step of an adaptive solver, and the
``*_adjoint`` versions during the backward pass.  pnode calls them with the same
arguments from the TS monitor (forward) and between single TSAdjoint steps
(backward), with these differences, documented in the migration guide:

- PETSc retries a rejected step inside one TSStep and does not report the
  attempted sizes: after the step, each rejection is reported as
  ``callback_reject_step`` with the step size proposed at the start of the step,
  followed by ``callback_step`` with the size finally taken (so each attempt gets
  one ``callback_step``, as in torchdiffeq);
- in a reverse-time solve ``t0`` is the user's time and ``dt`` the (positive)
  step in ``s = -t``, as torchdiffeq passes them;
- ``callback_step_adjoint(t, (y, adj_y, *adj_params), dt)``: ``t`` and ``y`` at
  the later end of the step the adjoint is about to cross, the adjoint state
  there, and the parameter gradients accumulated so far;
  ``callback_accept_step_adjoint`` follows each adjoint step with the same
  arguments, ``callback_reject_step_adjoint`` is never called (a discrete adjoint
  step is not rejected).  Adjoint callbacks run with the default checkpointing
  (``"stages"``/``"all"``/``"solution"``), whose sweep then crosses one step at a time.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .state import StateSpec
from .vecs import vec_view

__all__ = ["StepCallbacks", "AdjointCallbacks"]

_FORWARD = ("callback_step", "callback_accept_step", "callback_reject_step")
_ADJOINT = tuple(name + "_adjoint" for name in _FORWARD)


def _none_defined(func: Any, names: tuple[str, ...]) -> bool:
    """Whether ``func`` surely has none of ``names`` (no attribute look-up that can fail).

    A failed ``getattr`` on an ``nn.Module`` goes through its ``__getattr__`` and raises,
    which costs microseconds per name on every call; the class, the instance dict and a
    module's parameters, buffers and submodules are where such an attribute can live.
    """
    cls = type(func)
    if cls.__getattribute__ is not object.__getattribute__:
        return False
    d = getattr(func, "__dict__", None)
    if type(d) is not dict or any(hasattr(cls, name) or name in d for name in names):
        return False
    getter = getattr(cls, "__getattr__", None)
    if getter is None:
        return True
    if getter is not nn.Module.__getattr__:  # attributes made on demand: look them up
        return False
    # an nn.Module: its registered members are what its __getattr__ finds
    for slot in ("_parameters", "_buffers", "_modules"):
        members = d.get(slot)
        if type(members) is not dict or any(name in members for name in names):
            return False
    return True


def _find(func: Any, names: tuple[str, ...]) -> dict[str, Callable]:
    if _none_defined(func, names):
        return {}
    found = {}
    for name in names:
        cb = getattr(func, name, None)
        if callable(cb):
            found[name] = cb
    return found


class StepCallbacks:
    """Forward callbacks of one solve, as a step hook (see :class:`pnode.adjoint.forward.StepLog`).

    Parameters
    ----------
    found : dict
        The callbacks func defines.
    spec : StateSpec
        State structure (callbacks get ``y0`` in the user's structure and dtype).
    reverse : bool
        The solve runs in ``s = -t``.
    adaptive : bool
        Accept/reject callbacks are called (adaptive step control only, as torchdiffeq).
    times : list of float
        The solver's output times (a step never crosses one).
    """

    def __init__(self, found: dict[str, Callable], spec: StateSpec, reverse: bool,
                 adaptive: bool, times: list[float]) -> None:
        self.found, self.spec, self.reverse, self.adaptive = found, spec, reverse, adaptive
        self.times = times
        self.pending: tuple | None = None  # (t0 tensor, y0, dt tensor, solver t0) of the step
        self.rejections = 0
        self.error: BaseException | None = None

    @classmethod
    def of(cls, func: Any, spec: StateSpec, reverse: bool, adaptive: bool,
           times: list[float] | torch.Tensor) -> StepCallbacks | None:
        """The callbacks of ``func``, or ``None`` if it defines none."""
        found = _find(func, _FORWARD)
        if not found:
            return None
        if isinstance(times, torch.Tensor):
            times = times.detach().tolist()
        return cls(found, spec, reverse, adaptive, times)

    def _t(self, s: float) -> torch.Tensor:
        return torch.tensor(-s if self.reverse else s, dtype=self.spec.dtype)

    def hook(self, ts, step: int, t: float, u) -> None:
        if self.error is not None:
            return
        try:
            self._hook(ts, step, t, u)
        except BaseException as exc:  # raised after the solve (PETSc must not unwind Python)
            self.error = exc

    def _hook(self, ts, step: int, t: float, u) -> None:
        f, dtype = self.found, self.spec.dtype
        if step == 0:
            self.rejections = ts.getStepRejections()
        elif self.pending is not None:
            t0, y0, dt0, s0 = self.pending
            rejected = ts.getStepRejections() - self.rejections
            self.rejections += rejected
            taken = torch.tensor(t - s0, dtype=dtype)
            if self.adaptive:
                for _ in range(rejected):  # the retry: torchdiffeq calls callback_step again
                    if "callback_reject_step" in f:
                        f["callback_reject_step"](t0, y0, dt0)
                    if "callback_step" in f:
                        f["callback_step"](t0, y0, taken)
                if "callback_accept_step" in f:
                    f["callback_accept_step"](t0, y0, taken)
            self.pending = None
        k = bisect.bisect_right(self.times, t)
        if k >= len(self.times):
            return  # the last step is done
        # the step PETSc proposes, shortened to end at the next output time as TSSolve does
        dt = min(ts.getTimeStep(), self.times[k] - t)
        y = self.spec.unflatten(vec_view(u).to(dtype).clone())
        self.pending = (self._t(t), y, torch.tensor(dt, dtype=dtype), t)
        if "callback_step" in f:
            f["callback_step"](*self.pending[:3])


class AdjointCallbacks:
    """Backward callbacks (``callback_*_adjoint``), called between single TSAdjoint steps."""

    def __init__(self, found: dict[str, Callable], spec: StateSpec, reverse: bool,
                 params: list[torch.Tensor]) -> None:
        self.found, self.spec, self.reverse, self.params = found, spec, reverse, params
        self.states: list[torch.Tensor] = []  # the forward state after each step
        self.current: tuple | None = None

    @classmethod
    def of(cls, func: Any, spec: StateSpec, reverse: bool,
           params: list[torch.Tensor]) -> AdjointCallbacks | None:
        found = _find(func, _ADJOINT)
        return cls(found, spec, reverse, params) if found else None

    def record(self, ts, step: int, t: float, u) -> None:
        """Forward step hook: keep the state of each step (PETSc's trajectory is not readable)."""
        if step == 0:
            self.states = []
        self.states.append(vec_view(u).to(self.spec.dtype).clone())

    def before_step(self, solver, j: int, t_hi: float, t_lo: float) -> None:
        """Called before the adjoint crosses step ``j`` (``[t_lo, t_hi]``, from ``t_hi``)."""
        dtype, unflat = self.spec.dtype, self.spec.unflatten
        y = unflat(self.states[j].clone())
        lam = unflat(vec_view(solver.lam).to(dtype).clone())
        mu = vec_view(solver.mu).clone() if solver.n_params else torch.zeros(0)
        grads, i = [], 0
        for p in self.params:
            grads.append(mu[i:i + p.numel()].view_as(p).to(p.dtype))
            i += p.numel()
        t = torch.tensor(-t_hi if self.reverse else t_hi, dtype=dtype)
        self.current = (t, (y, lam, *grads), torch.tensor(t_hi - t_lo, dtype=dtype))
        if "callback_step_adjoint" in self.found:
            self.found["callback_step_adjoint"](*self.current)

    def after_step(self) -> None:
        """A discrete adjoint step is never rejected: every step is accepted."""
        if "callback_accept_step_adjoint" in self.found:
            self.found["callback_accept_step_adjoint"](*self.current)
