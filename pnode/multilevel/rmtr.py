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
from .rmtr_cycle import _VCycle
from .rmtr_levels import _NonFinite, _State, build_levels, reduced_eval, validate_options
from .rmtr_state import load_state, save_state
from .sampling import BatchSchedule

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


class RMTR(_VCycle):
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
        validate_options(self.options)
        self.model, self.loss_fn, self.n_levels = model, loss_fn, levels
        self.levels = build_levels(model, levels, self.options)
        self._comm = comm if comm is not None and comm.Get_size() > 1 else None
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._batch_n = 0  # samples in the batch over all ranks
        self._run: _Run | None = None
        self._batch_fraction = 1.0
        self._work = 0.0
        self._accepted = 0
        self._top = levels - 1  # the level playing the finest one (nested iteration climbs up)

    # -- objective ----------------------------------------------------------------------
    def _objective(self, l: int, x: torch.Tensor) -> tuple[float, torch.Tensor, float]:
        """``h_l(x)``, its gradient and the correct predictions on the current batch."""
        lvl = self.levels[l]
        assert self._batch is not None
        X, y = self._batch
        lvl.load(x)
        self._work += lvl.factor * self._batch_fraction
        f, g, correct = reduced_eval(self.loss_fn, self._comm, lvl.model, lvl.params, X, y)
        if lvl.v is not None:
            f += float(lvl.v @ (x - lvl.x0))
            g = g + lvl.v
        return f, g, correct

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
        _check_limits(max_seconds, epochs, target_loss)
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
        dtype = next(self.model.parameters()).dtype
        counts = _check_data(X, y, self._comm)
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
                loss, _, correct = reduced_eval(self.loss_fn, self._comm, self.model, None, run.X, run.y)
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
        return save_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a saved run continues in the run begun by :meth:`start`.

        Raises
        ------
        ValueError
            A state of another configuration (levels, sizes, training-set size), or a
            saved run without a started one.
        """
        load_state(self, state)


def _check_data(X: torch.Tensor, y: torch.Tensor, comm: Any) -> list[int]:
    """Validate this rank's shard ``X, y``; return every rank's sample count.

    Under ``comm`` every rank learns every rank's verdict, so all raise together
    (the message names the failing rank).

    Raises
    ------
    TypeError
        ``X`` or ``y`` is not a Tensor.
    ValueError
        Mismatched or empty data, or NaN/Inf in it.
    """
    if not isinstance(X, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("X and y must be torch Tensors")
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"Invalid data: X has {X.shape[0]} samples, y has {y.shape[0]}; pass "
                         "matching first dimensions")
    problem = None
    if X.shape[0] == 0:
        problem = "Invalid X: zero samples (an empty batch); pass at least one sample"
    elif X.is_floating_point() and not bool(torch.isfinite(X).all()):
        problem = "Invalid X: contains NaN or Inf; clean or impute the data first"
    elif y.is_floating_point() and not bool(torch.isfinite(y).all()):
        problem = "Invalid y: contains NaN or Inf; clean or impute the targets first"
    if problem is not None and comm is not None and comm.Get_size() > 1:
        problem += f" (on rank {comm.Get_rank()})"  # the same text on every rank
    error = None if problem is None else ValueError(problem)
    if comm is None:
        if error is not None:
            raise error
        counts = [X.shape[0]]
    else:  # every rank learns every rank's verdict: all raise together
        # the text already names the failing rank: quote it as it is
        counts = raise_together(comm, error, lambda f: ValueError(f.text),
                                payload=X.shape[0])
    return counts


def _check_limits(max_seconds: Any, epochs: Any, target_loss: Any) -> None:
    """Validate the stopping limits of :meth:`RMTR.fit`."""
    for name, v in (("max_seconds", max_seconds), ("target_loss", target_loss)):
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
            raise ValueError(f"Invalid {name} {v!r}: pass a finite number")
    if epochs is not None and not (isinstance(epochs, int) and epochs >= 1):
        raise ValueError(f"Invalid epochs {epochs!r}: pass a positive int")
