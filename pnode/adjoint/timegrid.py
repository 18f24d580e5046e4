"""Output times: validation, direction (reverse-time solves) and extra step-end times.

PETSc integrates forward in time.  A decreasing ``t`` is solved, as torchdiffeq
does, in the variable ``s = -t`` with the field ``g(s, y) = -f(-s, y)``: the
discrete scheme is the same scheme applied to ``g``, so its adjoint stays exact,
and autograd carries gradients through the negation of the times.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Times", "check_times", "Reversed", "merge_times"]


@dataclass
class Times:
    """Checked output times.

    Attributes
    ----------
    t : Tensor
        1-D floating-point times as given (``float64`` if given as a sequence).
    reverse : bool
        ``t`` decreases: the solve runs in ``s = -t``.
    """

    t: torch.Tensor
    reverse: bool = False

    @property
    def solver_t(self) -> torch.Tensor:
        """The increasing times the engine integrates through (``-t`` in reverse)."""
        return -self.t if self.reverse else self.t


def _finite(t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError("t contains NaN or Inf")


def _ordered(vals: list[float]) -> bool | None:
    """``False`` for finite strictly increasing times, ``True`` for decreasing, else ``None``."""
    if not all(map(math.isfinite, vals)):
        return None
    pairs = list(zip(vals, vals[1:], strict=False))
    if all(a < b for a, b in pairs):
        return False
    if all(a > b for a, b in pairs):
        return True
    return None


def check_times(t: Any, *, event: bool = False) -> Times:
    """Validate ``t`` and find its direction.

    Parameters
    ----------
    t : Tensor or sequence of float
        Output times: strictly increasing or strictly decreasing (one time is
        allowed: the solution is ``y0`` itself).  With ``event``: ``[t0]`` or
        ``[t0, t1]``, where only the sign of ``t1 - t0`` matters (the direction).
    event : bool
        Event mode (``odeint(..., event_fn=...)``).

    Raises
    ------
    ValueError
        Not 1-D, empty, NaN/Inf, repeated times, or a change of direction.
    """
    if not isinstance(t, torch.Tensor):
        try:
            t = torch.as_tensor(t, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"t must be a 1-D tensor or sequence of floats: {exc}") from None
    if t.dim() == 0 and event:
        t = t.reshape(1)
    if t.dim() != 1:
        raise ValueError(f"t must be 1-D, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError("t is empty; pass at least one time")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    if not event and t.numel() <= 64:
        # the common short t on the per-call path: one conversion instead of several
        # tensor reductions (anything unusual takes the general path and its messages)
        order = _ordered(t.detach().tolist())
        if order is not None:
            return Times(t, order)
    _finite(t.detach())
    if event:
        if t.numel() > 2:
            raise ValueError("with event_fn, t must be [t0] or [t0, t1] (t1 only gives the "
                             f"direction of integration), got {t.numel()} times")
        reverse = t.numel() == 2 and float(t[1].detach()) < float(t[0].detach())
        if t.numel() == 2 and float(t[1].detach()) == float(t[0].detach()):
            raise ValueError("with event_fn, t = [t0, t1] needs t1 != t0 (the direction)")
        return Times(t, reverse)
    d = (t[1:] - t[:-1]).detach()
    if t.numel() < 2 or bool((d > 0).all()):
        return Times(t, False)
    if bool((d < 0).all()):
        return Times(t, True)
    zero = (d == 0).nonzero()
    if zero.numel():
        i = int(zero[0])
        raise ValueError(f"t must be strictly increasing or strictly decreasing, but t[{i}] == "
                         f"t[{i + 1}] == {float(t[i]):g}; remove repeated times")
    i = int((d * d[0] < 0).nonzero()[0])
    raise ValueError(
        "t must be strictly increasing or strictly decreasing (one direction per solve), but "
        f"it changes direction at t[{i + 1}] = {float(t[i + 1]):g} (t = {t.tolist()})")


class Reversed:
    """``g(s, y) = mul * f(-s, y)``: a field (``mul=-1``) or event function (``mul=1``) in ``s = -t``.

    The solver cache keys on the wrapped callable (see ``odeint._owner``), so a
    reverse solve reuses its TS across calls like a forward one.
    """

    def __init__(self, base: Callable, mul: float = -1.0) -> None:
        self.base = base
        self.mul = mul

    def __call__(self, s: torch.Tensor, y: Any) -> Any:
        out = self.base(-s, y)
        if self.mul == 1.0:
            return out
        if isinstance(out, (tuple, list)):
            return tuple(-o for o in out)
        return -out

    def __getattr__(self, name: str) -> Any:
        # torchdiffeq-style callbacks (callback_step, ...) are looked up on the user's func
        if name.startswith("callback_"):
            return getattr(self.base, name)
        raise AttributeError(name)


def _as_times(value: Any, name: str) -> list[float]:
    if isinstance(value, torch.Tensor):
        value = value.detach().reshape(-1).tolist()
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a 1-D tensor or sequence of times, got "
                         f"{type(value).__name__}") from None
    if any(v != v or abs(v) == float("inf") for v in out):
        raise ValueError(f"{name} contains NaN or Inf")
    return out


_POSITIONS: dict[int, torch.Tensor] = {}


def _positions(n: int) -> torch.Tensor:
    """``torch.arange(n)``, made once per ``n`` (the engine only reads it)."""
    index = _POSITIONS.get(n)
    if index is None:
        if len(_POSITIONS) >= 64:
            _POSITIONS.clear()
        index = _POSITIONS[n] = torch.arange(n)
    return index


def merge_times(t: torch.Tensor, extra: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge step-end times into increasing output times.

    Parameters
    ----------
    t : Tensor
        Increasing output times (may require grad).
    extra : sequence of float
        Times where a step must end (``jump_t``, ``step_t``, a fixed grid); those
        outside ``(t[0], t[-1])`` or equal to an output time are dropped.

    Returns
    -------
    merged : Tensor
        The increasing union (differentiable in the entries that come from ``t``).
    index : Tensor
        Position of each output time in ``merged``.
    """
    if not extra:  # the usual call: nothing to merge
        return t, _positions(t.shape[0])
    tl = t.detach().tolist()
    lo, hi, have = tl[0], tl[-1], set(tl)
    add = sorted({x for x in extra if lo < x < hi and x not in have})
    if not add:
        return t, _positions(len(tl))
    allt = sorted([(x, i) for i, x in enumerate(tl)] + [(x, -1) for x in add])
    index = torch.tensor([k for k, (_, i) in enumerate(allt) if i >= 0])
    fill = torch.tensor([x for x, _ in allt], dtype=t.dtype)
    # the output entries are t itself, so gradients with respect to t flow through
    merged = fill.index_put((index,), t)
    return merged, index
