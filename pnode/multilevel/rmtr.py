"""RMTR: recursive multilevel trust-region training of forward-Euler ResNets.

References
----------
A. Kopaničáková and R. Krause, "Globally convergent multilevel training of deep
residual networks", SIAM J. Sci. Comput. 45(3), 2023.
S. Gratton, A. Sartenaer and Ph. L. Toint, "Recursive trust-region methods for
multiscale nonlinear optimization", SIAM J. Optim. 19(1), 2008.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector
from tqdm.auto import tqdm

from ..adjoint.distributed import raise_together
from ..errors import SolverError
from .sampling import BatchSchedule
from .sr1 import LSR1
from .transfer import Transfer
from .trust_region import TRSolution, solve_compact, steihaug_cg

__all__ = ["RMTR", "History"]

_DEFAULTS: dict[str, Any] = {
    "radius": 0.5,  # initial trust-region radius (every level)
    "max_radius": 10.0,
    "min_radius": 1e-8,  # stop when the finest radius falls below this
    "eta1": 0.1,  # accept when rho >= eta1
    "eta2": 0.75,  # expand when rho >= eta2 and the step reached the boundary
    "shrink": 0.5,
    "expand": 2.0,
    "pre_smoothing": 1,
    "post_smoothing": 1,
    "coarse_iterations": 3,
    "memory": 5,  # L-SR1 pairs per level
    "subproblem": "compact",  # "compact" (exact, L-SR1 compact form) or "cg" (Steihaug)
    "prolongation": "constant",
    "restriction": "average",
    "kappa_g": 0.1,  # recurse only if ||R g|| >= kappa_g ||g||
    "eps_budget": 0.05,  # leave a coarse level when < eps_budget of its radius budget remains
    "batch_size": None,  # None: full batch (deterministic)
    "batch_growth": 2.0,
    "stall_tol": 0.05,
    "gtol": 1e-10,
    "max_iterations": 100_000,
    "cycle": "F",  # "F": nested iteration from the coarsest level, then V-cycles; "V": V-cycles only
    "nested_tol": 0.05,  # F-cycle: climb when nested_window iterations reduce the loss by less than this
    "nested_window": 10,
    "nested_max": 200,  # F-cycle: at most this many iterations on each coarse level
    "seed": 0,
    "progress": True,
}


class _NonFinite(Exception):
    pass


@dataclass
class History:
    """Per-iteration record of :meth:`RMTR.fit` (one entry per V-cycle).

    Attributes
    ----------
    loss : list of float
        Training loss on the whole training set after the iteration.
    accuracy : list of float
        Training accuracy (classification targets; ``nan`` otherwise).
    radius : list of float
        Trust-region radius of the finest level.
    batch_size : list of int
        Batch size used by the iteration.
    work : list of float
        Cumulative work units: one unit is a gradient evaluation of the finest
        network on the whole training set; a level with half the depth on a
        batch of a quarter of the data costs 1/8.
    time : list of float
        Cumulative wall time in seconds, excluding the monitoring evaluations of
        the full training loss in mini-batch mode.
    accepted : list of int
        Accepted steps (all levels) during the iteration.
    level : list of int
        Level acting as the finest one (``levels - 1`` except during an F-cycle's
        nested iteration, which starts at 0).
    radii : list of list of float
        Trust-region radius of every level (coarsest first) after the iteration.
    reason : str
        Why ``fit`` stopped.
    """

    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    radius: list[float] = field(default_factory=list)
    batch_size: list[int] = field(default_factory=list)
    work: list[float] = field(default_factory=list)
    time: list[float] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    level: list[int] = field(default_factory=list)
    radii: list[list[float]] = field(default_factory=list)
    reason: str = ""

    def __len__(self) -> int:
        return len(self.loss)

    def first_reaching(self, target: float, key: str = "time") -> float | None:
        """The ``time`` (or ``work``) at which the loss first fell to ``target``, else ``None``."""
        values = getattr(self, key)
        for loss, v in zip(self.loss, values, strict=True):
            if loss <= target:
                return v
        return None


@dataclass
class _State:
    x: torch.Tensor
    f: float
    g: torch.Tensor
    correct: float = math.nan  # correctly classified samples of the batch (nan: not classification)
    n: int = 0  # (global) number of samples the state was evaluated on


@dataclass
class _Run:
    """Everything one training run carries from iteration to iteration (see :meth:`RMTR.start`)."""

    X: torch.Tensor
    y: torch.Tensor
    N: int  # samples over all ranks
    lo: int  # global index of this rank's first sample
    classify: bool
    sched: BatchSchedule
    hist: History
    x: torch.Tensor
    st: _State | None = None
    level_losses: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    iteration: int = 0


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
        with torch.no_grad():
            i = 0
            for p in self.params:
                p.copy_(x[i:i + p.numel()].view_as(p))
                i += p.numel()


class RMTR:
    """Recursive multilevel trust-region (RMTR) training of a forward-Euler ResNet.

    The finest level is the given network; level ``l`` below it has
    ``depth / 2**l`` blocks (step ``2**l h``) and shares the input and output layers.
    One iteration is a V-cycle (on the level reached so far, see ``cycle``):
    ``pre_smoothing`` trust-region steps, a coarse
    correction, ``post_smoothing`` steps, recursively; the coarsest level takes
    ``coarse_iterations`` steps.  The coarse model is

    ``h_c(x_c) = f_c(x_c) + <R g - grad f_c(Pi x), x_c - Pi x>``,

    first-order consistent with the fine objective at ``Pi x``, and its steps are
    kept so that ``||P (x_c - Pi x)|| <= radius`` of the finer level.  The coarse
    correction ``P (x_c - Pi x)`` is accepted by the usual ratio of actual to
    predicted (coarse) decrease; the radius of every level is controlled by such
    ratios.  Every level has its own L-SR1 matrix and solves its trust-region
    subproblems exactly in compact form (or by Steihaug-CG).  Mini-batches grow
    when progress stalls, until training is deterministic (full batch).
    ``levels=1`` is the single-level L-SR1 trust-region method; it accepts any
    ``nn.Module``.

    Kopaničáková & Krause, "Globally convergent multilevel training of deep residual
    networks", SIAM J. Sci. Comput. 45(3), 2023; Gratton, Sartenaer & Toint,
    "Recursive trust-region methods for multiscale nonlinear optimization", SIAM J.
    Optim. 19(1), 2008.

    Parameters
    ----------
    model : nn.Module
        For ``levels > 1`` a :class:`pnode.multilevel.ResNet` or
        :class:`~pnode.multilevel.ConvResNet` whose depth is divisible by ``2**(levels - 1)``.
    loss_fn : callable
        ``loss_fn(model(X), y) -> scalar`` (e.g. ``nn.CrossEntropyLoss()``).
    levels : int, default 3
        Number of levels.
    **options
        ``radius`` (0.5), ``max_radius`` (10), ``min_radius`` (1e-8), ``eta1`` (0.1),
        ``eta2`` (0.75), ``shrink`` (0.5), ``expand`` (2), ``pre_smoothing`` (1),
        ``post_smoothing`` (1), ``coarse_iterations`` (3), ``memory`` (5),
        ``subproblem`` ("compact" or "cg"), ``prolongation`` ("constant" or "linear"),
        ``restriction`` ("average" or "injection"), ``kappa_g`` (0.1),
        ``eps_budget`` (0.05), ``batch_size`` (None = full batch), ``batch_growth`` (2),
        ``stall_tol`` (0.05), ``gtol`` (1e-10), ``max_iterations``, ``seed`` (0),
        ``progress`` (True: tqdm bar), ``cycle`` ("F": nested iteration that trains
        the coarsest network first and climbs one level, prolongating the parameters,
        whenever ``nested_window`` (10) iterations reduce its loss by less than a
        fraction ``nested_tol`` (0.05) or after ``nested_max`` (200) iterations, with
        V-cycles on every level it reaches; "V": V-cycles on the finest level from
        the start).  Invalid names or values raise ``ValueError("Invalid ...")``.

    Notes
    -----
    The default is the F-cycle because of measurements (``python -m benchmarks.rmtr``,
    digits and a regression task, depth 16-64): it reached the training-loss targets
    in 0.27-0.92x the wall time of ``levels=1``, while plain V-cycles took 1.3-5x
    longer than ``levels=1``: every coarse correction is confined to the fine
    trust region, so it buys about one fine L-SR1 step's decrease for the price of
    several coarse evaluations.  During the nested phase :attr:`History.loss` is the
    loss of the finest network with the prolongated parameters (monitoring, untimed).

    Examples
    --------
    >>> net = pnode.multilevel.ResNet(64, 32, 32, 10).double()
    >>> history = RMTR(net, nn.CrossEntropyLoss(), levels=3, batch_size=256).fit(X, y, epochs=20)
    >>> history.loss[-1], history.accuracy[-1]
    """

    def __init__(self, model: nn.Module, loss_fn, levels: int = 3, *, comm: Any = None,
                 **options: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if not (isinstance(levels, int) and levels >= 1):
            raise ValueError(f"Invalid levels {levels!r}: pass a positive int")
        unknown = set(options) - set(_DEFAULTS)
        if unknown:
            raise ValueError(f"Invalid options {sorted(unknown)}; valid options: {sorted(_DEFAULTS)}")
        self.options = {**_DEFAULTS, **options}
        self._validate(self.options)
        self.model, self.loss_fn, self.n_levels = model, loss_fn, levels
        o = self.options
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
        self.levels = [_Level(m, getattr(m, "depth", 1) / fine_depth, o["memory"], o["radius"])
                       for m in models]
        for lc, lf in zip(self.levels[:-1], self.levels[1:], strict=True):
            lc.transfer = Transfer.between(lf.model, lc.model, prolongation=o["prolongation"],
                                           restriction=o["restriction"],
                                           dtype=next(model.parameters()).dtype)
            lc.load(lc.transfer.restrict(parameters_to_vector(lf.params).detach()))
        self._comm = comm if comm is not None and comm.Get_size() > 1 else None
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._batch_n = 0  # samples in the batch over all ranks
        self._run: _Run | None = None
        self._batch_fraction = 1.0
        self._work = 0.0
        self._accepted = 0
        self._top = levels - 1  # the level playing the finest one (nested iteration climbs up)

    # -- options ------------------------------------------------------------------------
    @staticmethod
    def _validate(o: dict[str, Any]) -> None:
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

    # -- objective ----------------------------------------------------------------------
    def _local(self, model: nn.Module, params: list[nn.Parameter] | None, X: torch.Tensor,
               y: torch.Tensor) -> tuple[float, torch.Tensor | None, float, bool]:
        """Loss, gradient (when ``params``), correct predictions and a non-finite flag on this batch."""
        try:
            with torch.enable_grad() if params is not None else torch.no_grad():
                out = model(X)
                loss = self.loss_fn(out, y)
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

    def _reduced(self, model: nn.Module, params: list[nn.Parameter] | None, X: torch.Tensor,
                 y: torch.Tensor) -> tuple[float, torch.Tensor | None, float]:
        """:meth:`_local` over every rank's part of the batch (one Allreduce under ``comm``).

        ``loss_fn`` is a mean over samples, so the global loss and gradient are the
        shard means weighted by shard size; a non-finite value on any rank is one
        everywhere (every rank then rejects the same trial point).
        """
        n = X.shape[0]
        if self._comm is None:
            f, g, correct, bad = self._local(model, params, X, y)
            if bad:
                raise _NonFinite
            return f, g, correct
        from mpi4py import MPI

        f, g, correct, bad = self._local(model, params, X, y) if n else (0.0, None, 0.0, False)
        size = 0 if params is None else sum(p.numel() for p in params)
        dtype = params[0].dtype if params else torch.float64
        buf = torch.zeros(4 + size, dtype=torch.float64)
        if not bad:
            buf[0], buf[1], buf[2] = n * f, correct, 0.0
            if g is not None:
                buf[4:] = g.to(torch.float64) * n
        buf[2], buf[3] = float(bad), float(n)
        self._comm.Allreduce(MPI.IN_PLACE, buf.numpy(), op=MPI.SUM)
        if buf[2] > 0 or not bool(torch.isfinite(buf[:2].nan_to_num(0.0)).all()):
            raise _NonFinite
        total = float(buf[3])
        g_all = None if params is None else (buf[4:] / total).to(dtype)
        return float(buf[0]) / total, g_all, float(buf[1])

    def _objective(self, l: int, x: torch.Tensor) -> tuple[float, torch.Tensor, float]:
        """``h_l(x)``, its gradient and the correct predictions on the current batch."""
        lvl = self.levels[l]
        assert self._batch is not None
        X, y = self._batch
        lvl.load(x)
        self._work += lvl.factor * self._batch_fraction
        f, g, correct = self._reduced(lvl.model, lvl.params, X, y)
        if lvl.v is not None:
            f += float(lvl.v @ (x - lvl.x0))
            g = g + lvl.v
        return f, g, correct

    def _solve(self, g: torch.Tensor, B: LSR1, radius: float) -> TRSolution:
        if self.options["subproblem"] == "cg":
            return steihaug_cg(g, B.matvec, radius)
        return solve_compact(g, B, radius)

    # -- trust-region machinery ---------------------------------------------------------
    def _eff_radius(self, l: int, x: torch.Tensor) -> float:
        """Level radius, cut so that the prolongated total step stays in the finer radius."""
        lvl = self.levels[l]
        if l == self._top:
            return lvl.radius
        used = float(lvl.transfer.prolong(x - lvl.x0).norm())
        return min(lvl.radius, (lvl.budget - used) / lvl.transfer.norm)

    def _budget_spent(self, l: int, x: torch.Tensor) -> bool:
        lvl = self.levels[l]
        if l == self._top:
            return False
        return self._eff_radius(l, x) <= self.options["eps_budget"] * lvl.budget / lvl.transfer.norm

    def _update_radius(self, lvl: _Level, rho: float, snorm: float, r: float) -> None:
        o = self.options
        if rho < o["eta1"]:
            # shrink the radius, not the step: a short failed coarse correction says little about
            # the region in which the fine model can be trusted
            lvl.radius = max(o["shrink"] * min(lvl.radius, r), 0.1 * o["min_radius"])
        elif rho >= o["eta2"] and snorm >= 0.9 * r:
            lvl.radius = min(o["expand"] * lvl.radius, o["max_radius"])

    def _try(self, l: int, st: _State, s: torch.Tensor, predicted: float, r: float) -> bool:
        """Evaluate ``x + s``, update L-SR1 and the radius, accept if the ratio allows."""
        lvl = self.levels[l]
        try:
            f_t, g_t, correct = self._objective(l, st.x + s)
            rho = (st.f - f_t) / predicted
        except _NonFinite:
            f_t, g_t, correct, rho = math.inf, None, math.nan, -math.inf
        if g_t is not None:
            lvl.sr1.update(s, g_t - st.g)
        self._update_radius(lvl, rho, float(s.norm()), r)
        if rho >= self.options["eta1"] and f_t < st.f:
            st.x, st.f, st.g, st.correct = st.x + s, f_t, g_t, correct
            self._accepted += 1
            return True
        return False

    def _smooth(self, l: int, st: _State) -> bool:
        """One trust-region iteration at level ``l``; False when nothing can be done."""
        if self._budget_spent(l, st.x) or float(st.g.norm()) <= self.options["gtol"]:
            return False
        r = self._eff_radius(l, st.x)
        if r <= self.options["min_radius"]:
            return False
        sol = self._solve(st.g, self.levels[l].sr1, r)
        if not sol.predicted > 0:
            self.levels[l].sr1.reset()  # a model that predicts no decrease is useless
            return False
        self._try(l, st, sol.step, sol.predicted, r)
        return True

    def _coarse_correction(self, l: int, st: _State) -> None:
        """Recursive step: minimise the coarse model of level ``l`` and prolongate."""
        o, c = self.options, self.levels[l - 1]
        tr = c.transfer
        gc = tr.restrict_gradient(st.g)
        gnorm = float(st.g.norm())
        if gnorm <= o["gtol"] or float(gc.norm()) < o["kappa_g"] * gnorm:
            return
        budget = self._eff_radius(l, st.x)
        if budget <= o["min_radius"]:
            return
        xc0 = tr.restrict(st.x)
        c.v, c.x0 = None, xc0
        try:
            fc0, gfc0, _ = self._objective(l - 1, xc0)
        except _NonFinite:
            return
        c.v, c.budget = gc - gfc0, budget
        cst = _State(xc0, fc0, gc, n=st.n)
        self._cycle(l - 1, cst)
        predicted = fc0 - cst.f
        if not predicted > 0:
            return
        s = tr.prolong(cst.x - xc0)
        self._try(l, st, s, predicted, budget)

    def _cycle(self, l: int, st: _State) -> None:
        o = self.options
        if l == 0:
            n = 1 if l == self._top else o["coarse_iterations"]
            for _ in range(n):
                if not self._smooth(l, st):
                    break
            return
        for _ in range(o["pre_smoothing"]):
            if not self._smooth(l, st):
                break
        if not self._budget_spent(l, st.x):
            self._coarse_correction(l, st)
        for _ in range(o["post_smoothing"]):
            if not self._smooth(l, st):
                break

    # -- training -----------------------------------------------------------------------
    def fit(self, X: torch.Tensor, y: torch.Tensor, max_seconds: float | None = None,
            epochs: int | None = None, target_loss: float | None = None) -> History:
        """Train the model; stop at the first of the limits reached.

        The same as :meth:`start`, :meth:`step` until a limit, then :meth:`finish`.

        Parameters
        ----------
        X, y : Tensor
            Training inputs and targets (first axis: samples); under ``comm``, this
            rank's contiguous shard (ranks in order, as :func:`pnode.parallel.shard_slice`).
        max_seconds : float, optional
            Wall-time budget (training work only, monitoring excluded).
        epochs : int, optional
            Number of passes over the training set (one V-cycle per batch; in
            full-batch mode one V-cycle is one epoch).
        target_loss : float, optional
            Stop when the training loss reaches this value.

        Returns
        -------
        History
            Per-iteration loss, accuracy, radius, batch size, work units, time.

        Raises
        ------
        ValueError
            Empty or mismatched data, NaN/Inf in the data, a non-finite initial loss.
        """
        for name, v in (("max_seconds", max_seconds), ("target_loss", target_loss)):
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise ValueError(f"Invalid {name} {v!r}: pass a finite number")
        if epochs is not None and not (isinstance(epochs, int) and epochs >= 1):
            raise ValueError(f"Invalid epochs {epochs!r}: pass a positive int")
        self.start(X, y)
        run = self._run
        o = self.options
        bar = tqdm(total=epochs, disable=not o["progress"], desc=f"RMTR L={self.n_levels}", unit="it")
        try:
            for _ in range(o["max_iterations"]):
                if (max_seconds is not None and run.elapsed >= max_seconds) or (
                        epochs is not None and run.sched.epoch >= epochs):
                    run.hist.reason = "max_seconds" if max_seconds is not None and \
                        run.elapsed >= max_seconds else "epochs"
                    break
                reason = self.step()
                h = run.hist
                bar.set_postfix(loss=f"{h.loss[-1]:.4g}", radius=f"{h.radius[-1]:.2g}",
                                batch=h.batch_size[-1], level=h.level[-1])
                bar.update(1)
                if target_loss is not None and h.loss[-1] <= target_loss:
                    run.hist.reason = "target_loss"
                    break
                if reason is not None:
                    run.hist.reason = reason
                    break
            else:
                run.hist.reason = "max_iterations"
        finally:
            bar.close()
            hist = self.finish()
        return hist

    @property
    def history(self) -> History:
        """The :class:`History` of the run started by :meth:`start` (empty before)."""
        return self._run.hist if self._run is not None else History()

    @property
    def epoch(self) -> int:
        """Passes over the training set so far in the current run."""
        return 0 if self._run is None else self._run.sched.epoch

    def start(self, X: torch.Tensor, y: torch.Tensor) -> None:
        """Begin a run on ``X, y`` (validated); :meth:`step` then takes one iteration at a time.

        Under ``comm`` every rank calls it with its shard; the batch schedule draws
        global sample indices (the same generator on every rank) and each rank
        evaluates the indices that fall into its shard.

        Raises
        ------
        ValueError
            Empty or mismatched data, NaN/Inf in the data.
        """
        o = self.options
        if not isinstance(X, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError("X and y must be torch Tensors")
        if X.shape[0] != y.shape[0]:
            raise ValueError(f"Invalid data: X has {X.shape[0]} samples, y has {y.shape[0]}; pass "
                             "matching first dimensions")
        dtype = next(self.model.parameters()).dtype
        problem = None
        if X.shape[0] == 0:
            problem = "Invalid X: zero samples (an empty batch); pass at least one sample"
        elif X.is_floating_point() and not bool(torch.isfinite(X).all()):
            problem = "Invalid X: contains NaN or Inf; clean or impute the data first"
        elif y.is_floating_point() and not bool(torch.isfinite(y).all()):
            problem = "Invalid y: contains NaN or Inf; clean or impute the targets first"
        if problem is not None and self._comm is not None and self._comm.Get_size() > 1:
            problem += f" (on rank {self._comm.Get_rank()})"  # the same text on every rank
        error = None if problem is None else ValueError(problem)
        if self._comm is None:
            if error is not None:
                raise error
            counts = [X.shape[0]]
        else:  # every rank learns every rank's verdict: all raise together
            counts = raise_together(self._comm, error, lambda f: ValueError(
                f"{f.text} (on rank {f.rank})"), payload=X.shape[0])
        if X.is_floating_point():
            X = X.to(dtype)
        if y.is_floating_point():
            y = y.to(dtype)
        rank = 0 if self._comm is None else self._comm.Get_rank()
        N = int(sum(counts))
        gen = torch.Generator().manual_seed(int(o["seed"]))
        sched = BatchSchedule(N, o["batch_size"], growth=o["batch_growth"], stall_tol=o["stall_tol"],
                              generator=gen)
        fine = len(self.levels) - 1
        x = parameters_to_vector(self.levels[fine].params).detach().clone()
        # F-cycle: start on the coarsest level with the restricted parameters
        self._top = 0 if o["cycle"] == "F" else fine
        for l in range(fine, self._top, -1):
            x = self.levels[l - 1].transfer.restrict(x)
        self.levels[self._top].v = None
        self._work = 0.0
        self._run = _Run(X=X, y=y, N=N, lo=int(sum(counts[:rank])), classify=not y.is_floating_point(),
                         sched=sched, hist=History(), x=x)

    def _select(self, idx: torch.Tensor | None) -> None:
        """Make the batch of global indices ``idx`` (None: everything) current on this rank."""
        run = self._run
        if idx is None:
            self._batch, self._batch_n = (run.X, run.y), run.N
        else:
            if self._comm is not None:  # this rank's members of the global batch, in batch order
                mine = (idx >= run.lo) & (idx < run.lo + run.X.shape[0])
                local = idx[mine] - run.lo
            else:
                local = idx
            self._batch, self._batch_n = (run.X[local], run.y[local]), int(idx.numel())
        self._batch_fraction = self._batch_n / run.N

    def step(self) -> str | None:
        """One RMTR iteration (a V-cycle on the current level) and its :attr:`history` entry.

        Returns
        -------
        str or None
            ``"min_radius"`` or ``"gtol"`` when the method has converged or cannot
            progress, else ``None``.

        Raises
        ------
        ValueError
            A non-finite loss at the current parameters.
        """
        if self._run is None:
            raise RuntimeError("RMTR.step() before start(X, y)")
        o, run = self.options, self._run
        fine = len(self.levels) - 1
        t0 = time.perf_counter()
        top = self._top
        idx = run.sched.next()
        full = idx is None
        self._select(idx)
        N, x, st = run.N, run.x, run.st
        if st is None or not full or st.n != N:
            # new batch (or level): the objective changed, re-evaluate at the current point
            try:
                f, g, correct = self._objective(top, x)
            except _NonFinite:
                raise ValueError(
                    "Invalid loss: non-finite loss at the current parameters; check the data "
                    "scaling and loss_fn, or lower the initial radius / T") from None
            st = _State(x, f, g, correct, self._batch_n)
        self._accepted = 0
        self._cycle(top, st)
        x = st.x
        run.sched.record(st.f)
        run.level_losses.append(st.f)
        w = o["nested_window"]
        ll = run.level_losses
        stalled = len(ll) > w and (ll[-w - 1] - ll[-1] < o["nested_tol"] * abs(ll[-w - 1]))
        if top < fine and (stalled or len(ll) > o["nested_max"]):
            # nested iteration: prolongate to the next finer level and continue there
            x = self.levels[top].transfer.prolong(x)
            self._top = top + 1
            self.levels[self._top].v = None
            run.level_losses, st = [], None
        run.elapsed += time.perf_counter() - t0
        run.x, run.st = x, st

        if full and top == fine:
            loss, correct = st.f, st.correct
        else:  # monitoring the finest network only: not timed, not counted as work
            xf = x
            for l in range(self._top, fine):
                xf = self.levels[l].transfer.prolong(xf)
            self.levels[fine].load(xf)
            self._batch = (run.X, run.y)
            try:
                loss, _, correct = self._reduced(self.model, None, run.X, run.y)
            except _NonFinite:
                loss, correct = math.nan, math.nan
        acc = correct / N if run.classify else math.nan
        h = run.hist
        h.loss.append(loss)
        h.accuracy.append(acc)
        h.radius.append(self.levels[self._top].radius)
        h.radii.append([lvl.radius for lvl in self.levels])
        h.batch_size.append(self._batch_n)
        h.work.append(self._work)
        h.time.append(run.elapsed)
        h.accepted.append(self._accepted)
        h.level.append(top)
        run.iteration += 1
        if self.levels[self._top].radius < o["min_radius"]:
            return "min_radius"
        if full and st is not None and self._top == fine and float(st.g.norm()) <= o["gtol"]:
            return "gtol"
        return None

    def finish(self) -> History:
        """End the run: load the finest network with the current parameters; return the history.

        Calling it again (or :meth:`step` after it) is an error-free no-op only for
        ``finish``; a finished run can be continued by :meth:`load_state_dict` of a
        state saved before.
        """
        run = self._run
        if run is None:
            return History()
        fine = len(self.levels) - 1
        x = run.x
        for l in range(self._top, fine):
            x = self.levels[l].transfer.prolong(x)
        self.levels[fine].load(x)
        run.x, run.st = x, None if self._top != fine else run.st
        self._top = fine
        self._batch = None
        self._run = None
        return run.hist

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue a run exactly: levels, radii, L-SR1 memories, schedule, RNG.

        Only tensors and primitive containers (loadable with ``torch.load(weights_only=True)``).
        Taken between iterations (after :meth:`start` or any :meth:`step`), it lets
        :meth:`load_state_dict` continue the run bit for bit; outside a run it holds the
        levels only.
        """
        levels = []
        for lvl in self.levels:
            levels.append({
                "params": parameters_to_vector(lvl.params).detach().clone(),
                "radius": lvl.radius, "budget": lvl.budget,
                "v": lvl.v, "x0": lvl.x0, "sr1": lvl.sr1.state_dict()})
        state: dict[str, Any] = {"format": "pnode-rmtr", "version": 1, "n_levels": self.n_levels,
                                 "top": self._top, "work": self._work, "accepted": self._accepted,
                                 "levels": levels, "run": None}
        run = self._run
        if run is not None:
            st = run.st
            state["run"] = {
                "N": run.N, "x": run.x, "elapsed": run.elapsed, "iteration": run.iteration,
                "level_losses": list(run.level_losses), "sched": run.sched.state_dict(),
                "hist": {k: (list(v) if isinstance(v, list) else v) for k, v in vars(run.hist).items()},
                "st": None if st is None else {"x": st.x, "f": st.f, "g": st.g, "correct": st.correct,
                                               "n": st.n}}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a saved run continues in the run begun by :meth:`start`.

        Raises
        ------
        ValueError
            A state of another configuration (levels, sizes, training-set size), or a
            saved run without a started one.
        """
        if not isinstance(state, dict) or state.get("format") != "pnode-rmtr":
            raise ValueError("Invalid state: not an RMTR state_dict")
        if state["n_levels"] != self.n_levels or len(state["levels"]) != len(self.levels):
            raise ValueError(f"Invalid state: {state['n_levels']} levels, this RMTR has {self.n_levels}")
        for lvl, ls in zip(self.levels, state["levels"], strict=True):
            n = sum(p.numel() for p in lvl.params)
            if ls["params"].numel() != n:
                raise ValueError(f"Invalid state: a level with {ls['params'].numel()} parameters, "
                                 f"this one has {n}")
        saved_run = state.get("run")
        if saved_run is not None:
            if self._run is None:
                raise ValueError("Invalid use: the state holds a run in progress; call start(X, y) "
                                 "with the same data first")
            if saved_run["N"] != self._run.N:
                raise ValueError(f"Invalid state: a run on {saved_run['N']} samples, the started one "
                                 f"has {self._run.N}")
        for lvl, ls in zip(self.levels, state["levels"], strict=True):
            lvl.load(ls["params"].to(lvl.params[0].dtype))
            lvl.radius, lvl.budget = float(ls["radius"]), float(ls["budget"])
            lvl.v, lvl.x0 = ls["v"], ls["x0"]
            lvl.sr1.load_state_dict(ls["sr1"])
        self._top, self._work = int(state["top"]), float(state["work"])
        self._accepted = int(state["accepted"])
        if saved_run is None:
            return
        run = self._run
        run.x, run.elapsed = saved_run["x"], float(saved_run["elapsed"])
        run.iteration = int(saved_run["iteration"])
        run.level_losses = list(saved_run["level_losses"])
        run.sched.load_state_dict(saved_run["sched"])
        run.hist = History(**{k: (list(v) if isinstance(v, list) else v)
                              for k, v in saved_run["hist"].items()})
        st = saved_run["st"]
        run.st = None if st is None else _State(st["x"], float(st["f"]), st["g"], float(st["correct"]),
                                                int(st["n"]))
