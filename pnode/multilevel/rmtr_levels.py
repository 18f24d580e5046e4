"""Levels, options and the sharded objective of :class:`pnode.multilevel.RMTR`.

The per-level state (network, L-SR1 memory, radius, coarse correction), the
construction of the level hierarchy, the validation of the options, and the
evaluation of loss and gradient over every rank's shard of a batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

from ..errors import SolverError
from .sr1 import LSR1
from .transfer import Transfer


class _NonFinite(Exception):
    """A non-finite loss or gradient at a trial point (on some rank)."""


@dataclass
class _State:
    """A point of one level with its objective value, gradient and batch statistics."""

    x: torch.Tensor
    f: float
    g: torch.Tensor
    correct: float = math.nan  # correctly classified samples of the batch (nan: not classification)
    n: int = 0  # (global) number of samples the state was evaluated on


class _Level:
    """One level: a network, its L-SR1 model, radius and (coarse levels) the correction."""

    def __init__(self, model: nn.Module, factor: float, memory: int, radius: float) -> None:
        self.model = model
        self.params = [p for p in model.parameters()]
        self.factor = factor  # cost relative to the finest level
        self.sr1 = LSR1(memory)
        self.radius = radius
        self.transfer: Transfer | None = None  # to the next finer level
        self.v: torch.Tensor | None = None  # first-order correction R g - grad f(x0)
        self.x0: torch.Tensor | None = None
        self.budget = math.inf  # ||P (x - x0)|| allowed, in the finer level's norm

    def load(self, x: torch.Tensor) -> None:
        """Copy the flat parameter vector ``x`` into the level's network."""
        with torch.no_grad():
            i = 0
            for p in self.params:
                p.copy_(x[i:i + p.numel()].view_as(p))
                i += p.numel()


def build_levels(model: nn.Module, levels: int, o: dict[str, Any]) -> list[_Level]:
    """The level hierarchy, coarsest first, with transfers and restricted parameters.

    Raises
    ------
    TypeError
        ``levels > 1`` for a network without ``with_depth``.
    ValueError
        A depth not divisible by ``2**(levels - 1)``.
    """
    models = [model]
    if levels > 1:
        if not (hasattr(model, "with_depth") and hasattr(model, "time_parameter_flags")):
            raise TypeError("levels > 1 needs a pnode.multilevel.ResNet or ConvResNet (a network "
                            "with with_depth() and time_parameter_flags()); use levels=1 otherwise")
        depth, div = model.depth, 2 ** (levels - 1)
        if depth % div:
            raise ValueError(f"Invalid levels={levels} for depth {depth}: the depth must be divisible "
                             f"by 2**(levels-1) = {div}; use a depth that is a multiple of {div} "
                             f"or fewer levels")
        for _ in range(levels - 1):
            models.append(models[-1].with_depth(models[-1].depth // 2))
    models.reverse()  # index 0 = coarsest
    fine_depth = getattr(model, "depth", 1)
    out = [_Level(m, getattr(m, "depth", 1) / fine_depth, o["memory"], o["radius"]) for m in models]
    for lc, lf in zip(out[:-1], out[1:], strict=True):
        lc.transfer = Transfer.between(lf.model, lc.model, prolongation=o["prolongation"],
                                       restriction=o["restriction"],
                                       dtype=next(model.parameters()).dtype)
        lc.load(lc.transfer.restrict(parameters_to_vector(lf.params).detach()))
    return out


def validate_options(o: dict[str, Any]) -> None:
    """Check the values of RMTR's options (names are checked by the caller).

    Raises
    ------
    ValueError
        An invalid value, named in the message.
    """
    def positive(name, integer=False, zero=False):
        v = o[name]
        ok = isinstance(v, int) and not isinstance(v, bool) if integer else isinstance(v, (int, float))
        if not ok or not (v >= 0 if zero else v > 0) or not math.isfinite(v):
            kind = "int" if integer else "number"
            raise ValueError(f"Invalid {name} {v!r}: pass a {'non-negative' if zero else 'positive'} "
                             f"{kind}")

    for name in ("radius", "max_radius", "min_radius", "expand", "batch_growth"):
        positive(name)
    for name in ("pre_smoothing", "post_smoothing"):
        positive(name, integer=True, zero=True)
    for name in ("coarse_iterations", "memory", "max_iterations"):
        positive(name, integer=True)
    for name in ("gtol", "stall_tol", "kappa_g", "eps_budget"):
        positive(name, zero=True)
    if not 0 < o["eta1"] <= o["eta2"] < 1:
        raise ValueError(f"Invalid eta1={o['eta1']!r}, eta2={o['eta2']!r}: need 0 < eta1 <= eta2 < 1")
    if not 0 < o["shrink"] < 1:
        raise ValueError(f"Invalid shrink {o['shrink']!r}: pass a number in (0, 1)")
    if o["expand"] < 1 or o["batch_growth"] <= 1:
        raise ValueError("Invalid expand/batch_growth: expand must be >= 1 and batch_growth > 1")
    if o["radius"] > o["max_radius"] or o["min_radius"] >= o["radius"]:
        raise ValueError("Invalid radii: need min_radius < radius <= max_radius")
    if o["cycle"] not in ("V", "F"):
        raise ValueError(f"Invalid cycle {o['cycle']!r}; choose 'V' or 'F'")
    if not (isinstance(o["nested_window"], int) and o["nested_window"] >= 1):
        raise ValueError(f"Invalid nested_window {o['nested_window']!r}: pass a positive int")
    if not (isinstance(o["nested_max"], int) and o["nested_max"] >= 0):
        raise ValueError(f"Invalid nested_max {o['nested_max']!r}: pass a non-negative int")
    if not 0 <= o["nested_tol"] < 1:
        raise ValueError(f"Invalid nested_tol {o['nested_tol']!r}: pass a number in [0, 1)")
    if o["subproblem"] not in ("compact", "cg"):
        raise ValueError(f"Invalid subproblem {o['subproblem']!r}; choose 'compact' or 'cg'")
    if o["prolongation"] not in ("constant", "linear"):
        raise ValueError(f"Invalid prolongation {o['prolongation']!r}; choose 'constant' or 'linear'")
    if o["restriction"] not in ("average", "injection"):
        raise ValueError(f"Invalid restriction {o['restriction']!r}; choose 'average' or 'injection'")
    b = o["batch_size"]
    if b is not None and not (isinstance(b, int) and not isinstance(b, bool) and b >= 1):
        raise ValueError(f"Invalid batch_size {b!r}: a batch needs at least one sample; pass a "
                         "positive int, or None for full batch")


def local_eval(loss_fn: Callable, model: nn.Module, params: list[nn.Parameter] | None,
               X: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor | None, float, bool]:
    """Loss, gradient (when ``params``), correct predictions and a non-finite flag on this batch."""
    try:
        with torch.enable_grad() if params is not None else torch.no_grad():
            out = model(X)
            loss = loss_fn(out, y)
            if not bool(torch.isfinite(loss)):
                return math.nan, None, math.nan, True
            grads = None if params is None else torch.autograd.grad(loss, params, allow_unused=True)
    except SolverError:  # the forward Euler solve overflowed at this trial point
        return math.nan, None, math.nan, True
    g = None if grads is None else torch.cat(
        [(torch.zeros_like(p) if gi is None else gi).reshape(-1) for p, gi in zip(params, grads,
                                                                                     strict=True)])
    correct = float((out.argmax(dim=1) == y).sum()) if not y.is_floating_point() and out.dim() == 2 \
        else math.nan
    return float(loss.detach()), g, correct, False


def reduced_eval(loss_fn: Callable, comm: Any, model: nn.Module, params: list[nn.Parameter] | None,
                 X: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor | None, float]:
    """:func:`local_eval` over every rank's part of the batch (one Allreduce under ``comm``).

    ``loss_fn`` is a mean over samples, so the global loss and gradient are the
    shard means weighted by shard size; a non-finite value on any rank is one
    everywhere (every rank then rejects the same trial point).
    """
    n = X.shape[0]
    if comm is None:
        f, g, correct, bad = local_eval(loss_fn, model, params, X, y)
        if bad:
            raise _NonFinite
        return f, g, correct
    from mpi4py import MPI

    f, g, correct, bad = local_eval(loss_fn, model, params, X, y) if n else (0.0, None, 0.0, False)
    size = 0 if params is None else sum(p.numel() for p in params)
    dtype = params[0].dtype if params else torch.float64
    buf = torch.zeros(4 + size, dtype=torch.float64)
    if not bad:
        buf[0], buf[1], buf[2] = n * f, correct, 0.0
        if g is not None:
            buf[4:] = g.to(torch.float64) * n
    buf[2], buf[3] = float(bad), float(n)
    comm.Allreduce(MPI.IN_PLACE, buf.numpy(), op=MPI.SUM)
    if buf[2] > 0 or not bool(torch.isfinite(buf[:2].nan_to_num(0.0)).all()):
        raise _NonFinite
    total = float(buf[3])
    g_all = None if params is None else (buf[4:] / total).to(dtype)
    return float(buf[0]) / total, g_all, float(buf[1])
