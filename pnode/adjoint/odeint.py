"""``pnode.odeint``: the one entry point that integrates an ODE."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._petsc import is_number
from . import compat, dae
from .cache import CACHE, Lease
from .callbacks import AdjointCallbacks, StepCallbacks
from .checkpoint import Checkpoint
from .distributed import Distributed, agree, as_comm
from .function import OdeintFunction
from .methods import Method, resolve_method
from .problem import TorchProblem
from .solver import DENSE_JACOBIAN_MAX, SolveOptions, SolveStats, TSSolver
from .state import StateSpec
from .timegrid import Reversed, check_times, merge_times

__all__ = ["odeint", "IMEX", "last_stats", "clear_cache"]

_KNOWN_OPTIONS = {"step_size", "first_step", "max_num_steps", "jacobian", "theta", "endpoint",
                  "ksp_rtol", "snes_rtol", "jacobian_lag"}


@dataclass(frozen=True)
class IMEX:
    """An implicit-explicit split ``dy/dt = implicit(t, y) + explicit(t, y)``.

    Pass it as ``func`` with an ARKIMEX method (``kencarp3/4/5`` or
    ``"arkimex:<type>"``): the stiff ``implicit`` part is solved by Newton,
    the ``explicit`` part is evaluated explicitly.

    Parameters
    ----------
    implicit : callable
        Stiff part ``f_I(t, y)``.
    explicit : callable
        Non-stiff part ``f_E(t, y)``.

    Examples
    --------
    >>> ys = pnode.odeint(pnode.IMEX(implicit=diffusion, explicit=net), u0, t, method="kencarp4")
    """

    implicit: Callable
    explicit: Callable

    def __call__(self, t, y):
        fi, fe = self.implicit(t, y), self.explicit(t, y)
        if isinstance(fi, tuple):
            return tuple(a + b for a, b in zip(fi, fe, strict=True))
        return fi + fe


def _owner(func: Callable) -> tuple[Any, Any]:
    """Object whose lifetime scopes the cache entry, and a key part naming the function."""
    base = func.base if isinstance(func, (Reversed, _ReversedIMEX)) else None
    if base is not None:  # a reverse-time solve: cached with the user's func, keyed apart
        owner, key = _owner(base)
        return owner, ("reversed", key)
    if hasattr(func, "__self__") and hasattr(func, "__func__"):  # bound method
        return func.__self__, func.__func__
    return func, None


def clear_cache() -> None:
    """Destroy every cached PETSc solver (they are rebuilt on demand).

    Solvers are cached per ``func`` and layout, at most
    :data:`~pnode.adjoint.cache.MAX_SOLVERS_PER_FUNC` (16) per ``func``, the least
    recently used evicted first; an idle one holds no trajectory.  Clearing is only
    needed to free their (small) PETSc objects early.
    """
    CACHE.clear()


def last_stats() -> SolveStats | None:
    """Statistics of the most recent solve in this process (see :class:`SolveStats`)."""
    solver = CACHE.last
    return None if solver is None else solver.stats


class _Call:
    """Everything one odeint call needs, shared by its forward and backward."""

    def __init__(self, func, spec: StateSpec, params: list[torch.Tensor], method: Method,
                 opts: SolveOptions, n_times: int, dist: Distributed | None = None,
                 shard_sizes: tuple[int, ...] = (), mass: dae.Mass | None = None) -> None:
        self.func, self.spec, self.params, self.method, self.opts = func, spec, params, method, opts
        self.mass = mass
        self.dist = dist
        self.step_hooks: list = []  # hook(ts, step, t, u) at each step of the forward solve
        self.adjoint_callbacks = None  # callbacks.AdjointCallbacks (func.callback_*_adjoint)
        self.record = True  # a backward pass may follow (set by odeint)
        self.imex = isinstance(func, IMEX)
        if opts.jacobian == "auto":
            # dense LU is serial; a distributed solve uses Krylov (GMRES)
            small = spec.size <= DENSE_JACOBIAN_MAX and dist is None
            self.jacobian = "dense" if small else "matfree"
        else:
            self.jacobian = opts.jacobian
        if dist is not None and self.jacobian != "matfree" and (method.implicit or self.imex):
            raise ValueError(f"options['jacobian']={self.jacobian!r} is serial; with comm= use "
                             "'matfree' (the default)")
        if self.jacobian == "blocks" and (spec.is_tuple or len(spec.shapes[0]) < 2):
            raise ValueError("options['jacobian']='blocks' needs a single state tensor of shape "
                             "[batch, ...]; got " + ", ".join(str(tuple(s)) for s in spec.shapes))
        self.key = (
            method, spec.shapes, spec.is_tuple, spec.dtype,
            tuple((tuple(p.shape), p.dtype) for p in params), opts, self.jacobian, self.imex,
            # PETSc 3.26's TSSetEvaluationTimes frees and does not reallocate its arrays when
            # the number of times changes (a crash), so each count gets its own TS.
            n_times,
            # collective solves: every rank must hit or miss the cache together (creating a
            # TS is collective), so the key holds all ranks' shard sizes
            None if dist is None else (dist.comm.py2f(), shard_sizes),
            None if mass is None else mass.layout,
        )

    def _parts(self):
        m = self.method
        if self.imex:
            return self.func.explicit, self.func.implicit
        if m.implicit:
            return None, self.func
        return self.func, None

    def _new_solver(self) -> TSSolver:
        explicit, implicit = self._parts()
        prob = TorchProblem(self.spec, self.params, explicit=explicit, implicit=implicit,
                            jacobian=self.jacobian)
        return TSSolver(prob, self.method, self.opts, self.dist)

    def _bind(self, solver: TSSolver) -> None:
        explicit, implicit = self._parts()
        prob = solver.problem
        if prob.explicit is not None:
            prob.explicit.func = explicit
        if prob.implicit is not None:
            prob.implicit.func = implicit
        prob.params = tuple(self.params)
        prob.mass = self.mass

    def acquire(self, record: bool) -> Lease:
        """Lease a solver for this call from the cache (built on a miss)."""
        owner, fkey = _owner(self.func)
        lease = CACHE.acquire(owner, (fkey, *self.key), self._new_solver)
        self._bind(lease.solver)
        return lease

    def solver_stats(self) -> SolveStats | None:
        solver = CACHE.last
        return None if solver is None else solver.stats

    def time_gradient(self, t: torch.Tensor, ys: torch.Tensor, g: torch.Tensor,
                      grad_y0: torch.Tensor) -> torch.Tensor:
        """dL/dt_k = g_k . f(t_k, y_k) for k >= 1 and -lambda(t_0+) . f(t_0, y_0).

        ``lambda(t_0+)`` is the adjoint just after ``t_0``: the gradient of ``y0``
        without the direct term ``g_0`` (the output at ``t_0`` is ``y0`` itself).

        The continuous-time sensitivity of each output time, evaluated on the
        discrete solution (it differs from the derivative of the discrete map by
        the scheme's truncation error, since moving an output time moves a step).
        """
        def local():
            with torch.no_grad():
                f = torch.stack([
                    self.spec.flatten(self.func(tk.to(self.spec.dtype), self.spec.unflatten(yk)))
                    .to(torch.float64)
                    for tk, yk in zip(t, ys, strict=True)
                ])
                gt = (g * f).sum(dim=1)
                gt[0] = -((grad_y0 - g[0]) * f[0]).sum()
            return gt

        if self.dist is None:
            return local().to(t.dtype)
        # each rank holds its shard's share of the dot products: one reduction
        return self.dist.sum(agree(self.dist.comm, local)).to(t.dtype)

    def split_param_grads(self, flat: torch.Tensor) -> list[torch.Tensor]:
        if not self.params:
            return []
        # (split_with_sizes: Tensor.split's Python wrapper costs microseconds per call)
        parts = flat.split_with_sizes([p.numel() for p in self.params])
        return [g.view(p.shape) if p.dtype == g.dtype else g.view(p.shape).to(p.dtype)
                for g, p in zip(parts, self.params, strict=True)]


# ---------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------
def _check_finite(x: torch.Tensor, what: str) -> None:
    # one reduction on the per-call path; a non-finite sum is re-checked element by element
    # (finite values can overflow it)
    if x.is_floating_point() and not math.isfinite(float(x.detach().sum())) \
            and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} contains NaN or Inf")


def _check_state(y0) -> tuple[torch.Tensor, ...]:
    tensors = tuple(y0) if isinstance(y0, (tuple, list)) else (y0,)
    if not tensors:
        raise ValueError("y0 is an empty tuple; pass a Tensor or a tuple of Tensors")
    for i, y in enumerate(tensors):
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"y0{'' if len(tensors) == 1 else f'[{i}]'} must be a torch.Tensor, "
                            f"got {type(y).__name__}")
        if not y.is_floating_point():
            raise ValueError(f"y0 must be floating point, got {y.dtype}")
        if y.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"y0 dtype {y.dtype} is not supported; use float32 or float64")
        if y.device.type != "cpu":
            raise ValueError(f"y0 is on {y.device}; pnode's PETSc build runs on the CPU")
        _check_finite(y, "y0")
    return tensors


def _collect_params(func, adjoint_params,
                    probe: Callable[[], tuple] | None = None) -> list[torch.Tensor]:
    """The tensors to differentiate: ``adjoint_params``, the parameters of an ``nn.Module``
    func, or, for any other callable, the leaf tensors its output depends on.

    ``probe()`` gives ``(t0, y0)``: a func that is not a module (a lambda or closure over a
    network, the pattern torchdiffeq's adjoint refuses) is evaluated there once and its
    autograd graph searched for the leaves that require grad, so they are not silently
    missed.  ``None`` (no backward can follow): no probe.
    """
    if adjoint_params is not None:
        if isinstance(adjoint_params, torch.Tensor):
            adjoint_params = (adjoint_params,)
        params = list(adjoint_params)
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"adjoint_params must be Tensors, got {type(p).__name__}")
    else:
        mods = [m for m in ((func.implicit, func.explicit) if isinstance(func, IMEX) else (func,))]
        params, seen = [], set()
        for m in mods:
            owner = m.__self__ if hasattr(m, "__self__") else m
            found = owner.parameters() if isinstance(owner, nn.Module) else \
                _closure_leaves(m, probe()) if probe is not None else ()
            for p in found:
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
    params = [p for p in params if p.requires_grad]
    for p in params:
        _check_finite(p, "a parameter of func")
    return params


def _closure_leaves(func, probe: tuple) -> list[torch.Tensor]:
    """Leaf tensors requiring grad that ``func(t0, y0)`` reaches (in a fixed graph order)."""
    t0, y0 = probe
    is_tuple = isinstance(y0, (tuple, list))
    ys = tuple(y.detach().requires_grad_(True) for y in (y0 if is_tuple else (y0,)))
    mine = {id(y) for y in ys}
    with torch.enable_grad():
        out = func(t0.detach(), ys if is_tuple else ys[0])
    outs = out if isinstance(out, (tuple, list)) else (out,)
    stack = [o.grad_fn for o in reversed(outs) if isinstance(o, torch.Tensor) and o.grad_fn]
    seen, leaves = set(), []
    for o in outs:  # func may return a leaf parameter itself
        if isinstance(o, torch.Tensor) and o.requires_grad and o.grad_fn is None \
                and id(o) not in mine:
            leaves.append(o)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)  # AccumulateGrad: a leaf
        if var is not None:
            if id(var) not in mine:
                leaves.append(var)
            continue
        stack.extend(nxt for nxt, _ in reversed(node.next_functions))
    return leaves


def _build_options(method: Method, rtol, atol, options, checkpoint, petsc_options,
                   imex: bool) -> SolveOptions:
    if not (isinstance(rtol, (int, float)) and rtol > 0 and math.isfinite(rtol)):
        raise ValueError(f"rtol must be a positive number, got {rtol!r}")
    if not (isinstance(atol, (int, float)) and atol > 0 and math.isfinite(atol)):
        raise ValueError(f"atol must be a positive number, got {atol!r}")
    options = dict(options or {})
    unknown = set(options) - _KNOWN_OPTIONS
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)}; valid keys: "
                         f"{sorted(_KNOWN_OPTIONS | compat.TORCHDIFFEQ_OPTIONS)}")
    step = options.get("step_size")
    if step is not None and not (isinstance(step, (int, float)) and step > 0 and math.isfinite(step)):
        raise ValueError(f"options['step_size'] must be a positive number, got {step!r}")
    first = options.get("first_step")
    if first is not None and not (isinstance(first, (int, float)) and first > 0):
        raise ValueError(f"options['first_step'] must be a positive number, got {first!r}")
    max_steps = options.get("max_num_steps", 1_000_000)
    if not (isinstance(max_steps, int) and max_steps > 0):
        raise ValueError(f"options['max_num_steps'] must be a positive int, got {max_steps!r}")
    jac = options.get("jacobian", "auto")
    if jac not in ("auto", "dense", "blocks", "matfree"):
        raise ValueError("options['jacobian'] must be 'auto', 'dense', 'blocks' or 'matfree', "
                         f"got {jac!r}")
    theta = options.get("theta")
    if theta is not None:
        if method.ts_type != "theta":
            raise ValueError("options['theta'] applies to method='theta' only")
        if not (0 < theta <= 1):
            raise ValueError(f"options['theta'] must be in (0, 1], got {theta!r}")
    if "endpoint" in options and method.ts_type != "theta":
        raise ValueError("options['endpoint'] applies to method='theta' only")
    lag = options.get("jacobian_lag", 100)
    if not (isinstance(lag, int) and lag >= 1):
        raise ValueError(f"options['jacobian_lag'] must be an int >= 1, got {lag!r}")
    for key in ("ksp_rtol", "snes_rtol"):
        v = options.get(key)
        if v is not None and not (isinstance(v, (int, float)) and 0 < v < 1):
            raise ValueError(f"options[{key!r}] must be a number in (0, 1), got {v!r}")
    if imex and not method.imex:
        raise ValueError(
            f"func is a pnode.IMEX split, but method {method.name!r} is not an IMEX method; "
            "use kencarp3, kencarp4, kencarp5 or 'arkimex:<type>'"
        )
    policy = Checkpoint.parse(checkpoint)
    policy.check_method(method, imex)
    popts: tuple[tuple[str, str], ...] = ()
    if petsc_options is not None:
        if not isinstance(petsc_options, Mapping):
            raise TypeError("petsc_options must be a dict of PETSc option names to values")
        popts = tuple(sorted(
            (str(k).lstrip("-"), "" if v is None else
             ("1" if v is True else "0" if v is False else str(v)))
            for k, v in petsc_options.items()
        ))
    for k, v in popts:
        # PETSc reads a negative tolerance as "use the default" (rtol 1e-5 for KSP): silently
        # inexact gradients
        if k.endswith(("_rtol", "_atol", "_stol")) and is_number(v) and float(v) < 0:
            raise ValueError(f"petsc_options[{k!r}] = {v} is negative; PETSc would silently use "
                             "its default tolerance instead: give a positive value")
    return SolveOptions(
        rtol=float(rtol), atol=float(atol), step_size=None if step is None else float(step),
        first_step=None if first is None else float(first), max_num_steps=max_steps,
        checkpoint=policy, jacobian=jac, theta=theta, endpoint=options.get("endpoint"),
        ksp_rtol=float(options.get("ksp_rtol", 1e-12)),
        snes_rtol=float(options.get("snes_rtol", 1e-10)), petsc_options=popts,
        jacobian_lag=lag,
    )


def _prepare_collective(dist: Distributed, prepare: Callable[[], tuple | None]
                        ) -> tuple[tuple | None, tuple]:
    """``prepare()`` on every rank of a collective call, and the agreement that follows.

    One allgather carries every rank's verdict (an input error on one rank raises on
    all), its layout (every rank's shard size) and its solver cache's collective
    state (the collective solvers every rank has given up are destroyed here).
    ``prepare()`` returns ``None`` for a single output time (nothing to solve).
    """
    def prepare_and_describe():
        prepared = prepare()
        if prepared is None:
            return prepared, (None, CACHE.collective_state())
        m, opts, params, spec, _, t_out, _ = prepared
        # the checkpoint directory may differ between ranks (node-local scratch)
        ck = opts.checkpoint
        same = (dataclasses.replace(opts, checkpoint=Checkpoint("stages")), ck.agreement_key())
        return prepared, (dist.layout(spec, t_out, m.name, params, same), CACHE.collective_state())

    prepared, payloads = agree(dist.comm, prepare_and_describe, gather=True)
    CACHE.agree(state for _, state in payloads)
    if any(layout is None for layout, _ in payloads):
        if prepared is not None:
            raise ValueError("t holds one time on some ranks but not on others; every rank "
                             "of comm must pass the same times")
        return prepared, ()
    return prepared, dist.shard_sizes([layout for layout, _ in payloads])


def odeint(
    func: Callable,
    y0: torch.Tensor | Sequence[torch.Tensor],
    t: torch.Tensor | Sequence[float],
    *,
    rtol: float | torch.Tensor = 1e-7,
    atol: float | torch.Tensor = 1e-9,
    method: str | None = None,
    options: Mapping[str, Any] | None = None,
    event_fn: Callable | None = None,
    adjoint_rtol: float | torch.Tensor | None = None,
    adjoint_atol: float | torch.Tensor | None = None,
    adjoint_method: str | None = None,
    adjoint_options: Mapping[str, Any] | None = None,
    adjoint_params: Sequence[torch.Tensor] | None = None,
    checkpoint: str | Checkpoint = "stages",
    petsc_options: Mapping[str, Any] | None = None,
    comm: Any = None,
    mass: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Integrate ``dy/dt = func(t, y)`` with a PETSc TS; gradients by PETSc TSAdjoint.

    The gradient is the exact derivative of the discrete scheme (the discrete
    adjoint), for ``y0``, the parameters of ``func`` and the output times.

    Parameters
    ----------
    func : callable or IMEX
        ``func(t, y) -> dy/dt`` (an ``nn.Module`` or any callable), or a
        :class:`IMEX` split for ARKIMEX methods.  ``t`` is a 0-d tensor of the
        state's dtype; ``y`` has the structure of ``y0``.
    y0 : Tensor or tuple of Tensors
        Initial state (float32 or float64, CPU).
    t : Tensor or sequence of float
        1-D strictly increasing or strictly decreasing output times (a decreasing
        ``t`` integrates backwards, solved in ``s = -t``); every one is hit exactly by
        a step.  A single time returns ``y0[None]``.
    method : str or None, default None (``"dopri5"``)
        See :func:`pnode.methods`; also ``"rk:<TSRKType>"``, ``"arkimex:<type>"``.
    rtol, atol : float or one-element Tensor
        Tolerances of adaptive methods (PETSc TSAdapt).
    options : dict, optional
        ``step_size`` (fixed steps), ``first_step``, ``max_num_steps``,
        ``jacobian`` (``"auto"``: dense LU up to 256 unknowns, else ``"matfree"``
        GMRES; ``"blocks"``: per-sample dense blocks with block LU, for a state of
        shape ``[batch, ...]`` whose samples func treats independently),
        ``theta``/``endpoint`` (method ``"theta"``), ``ksp_rtol``
        (matrix-free linear solves, default 1e-12), ``snes_rtol`` (default 1e-10),
        ``jacobian_lag`` (forward Newton recomputes the Jacobian every that many
        iterations of a stage solve; default 100, i.e. at most once per stage, and
        above 1 a step's stage solves pass it on while each converges in at most
        four iterations; 1: full Newton; the adjoint always uses exact stage
        Jacobians).  torchdiffeq's options (``min_step``,
        ``max_step``, ``safety``, ``ifactor``, ``dfactor``, ``jump_t``, ``step_t``,
        ``grid_constructor``, ``max_iters``, ...) map onto PETSc as the migration
        guide's table says.
    event_fn : callable, optional
        ``event_fn(t, y) -> Tensor``: integrate until it changes sign and return
        ``(event_t, solution)`` (``t = [t0]`` or ``[t0, t1]``, ``t1`` giving the
        direction); see :func:`pnode.odeint_event`.
    adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options
        torchdiffeq's backward-solve settings: accepted, no effect (the gradient is the
        exact adjoint of the forward scheme); a one-time warning where torchdiffeq's
        result would differ.
    adjoint_params : sequence of Tensor, optional
        Tensors to differentiate; by default the parameters of ``func`` if it
        is (or is bound to) an ``nn.Module``, otherwise the leaf tensors requiring
        grad that ``func(t[0], y0)`` depends on (found from its autograd graph).
    checkpoint : str or Checkpoint, default "stages"
        ``"stages"``/``"all"``: keep states and stage values; ``"solution"``:
        keep states, recompute stages in the adjoint; ``"graph"`` (explicit methods):
        also keep the autograd graphs of the forward evaluations, so the adjoint
        only runs backward passes (``Checkpoint.graph(memory_mib)`` caps their memory);
        ``Checkpoint.binomial(k)``: store at most ``k`` states (optimal Revolve
        schedule), recompute the rest; ``Checkpoint.disk(directory, ram_budget)``: RAM
        then files on disk (removed afterwards), optimal two-level schedule.
    petsc_options : dict, optional
        PETSc options for this solve, without prefix (e.g. ``{"ts_adapt_type": "dsp"}``).
        Command-line options with prefix ``-pnode_`` take precedence.
    comm : mpi4py or petsc4py communicator, optional
        Data decomposition: every rank of ``comm`` calls ``odeint`` together with its
        shard of the batch (the first axis of each state tensor; shards may be
        uneven, trailing shapes, dtypes, times, method and options must agree).
        The TS runs on ``comm``, so adaptive steps are the same as a serial solve of
        the whole batch; each rank gets its shard's solution and gradient with
        respect to its ``y0``, and the parameter gradients summed over ranks
        (identical on every rank; one allreduce per backward pass).  A failure on
        one rank raises on every rank.  Implicit methods use matrix-free Krylov.
    mass : Tensor, optional
        Solve ``M y' = func(t, y)`` with a constant mass matrix ``M``: a vector of
        diagonal entries (zeros mark algebraic rows) or an ``[n, n]`` matrix (``n``
        state elements; may be singular: an index-1 DAE).  Implicit TSTHETA methods
        only (``implicit_euler``, ``trapezoid``, ``theta``; the midpoint form of
        ``theta`` takes a singular mass with fixed steps only).  ``y0`` must satisfy the
        algebraic equations at ``t[0]`` to within ``rtol``/``atol``, or set
        ``options={"consistent_init": True}`` to solve them for its algebraic
        components (Newton).  ``M`` is differentiated if it requires grad.  See
        the "DAEs and mass matrices" page of the documentation.

    Returns
    -------
    Tensor or tuple of Tensors
        ``[len(t), *y0.shape]`` (a tuple for a tuple ``y0``); with ``event_fn``,
        ``(event_t, solution)``.

    Raises
    ------
    ValueError
        Bad input: NaN/Inf, wrong shapes, repeated times or a change of direction
        in ``t``, unknown method or option (torchdiffeq's options are translated, see
        the migration guide), IMEX with a non-IMEX method, ``func`` returning a wrong
        shape, an ``event_fn`` with the wrong signature.
    pnode.SolverError
        The forward or adjoint solve failed (divergence, NaN, step-size
        underflow, max steps, Newton failure); carries ``.t`` and ``.reason``.

    Examples
    --------
    >>> func = torch.nn.Linear(2, 2).double()
    >>> y0 = torch.randn(8, 2, dtype=torch.float64)
    >>> ys = pnode.odeint(lambda t, y: func(y), y0, torch.linspace(0, 1, 5),
    ...                   method="rk4", options={"step_size": 0.05})
    >>> ys.shape
    torch.Size([5, 8, 2])
    """
    if event_fn is not None:
        from .events import odeint_until_event

        return odeint_until_event(
            func, y0, t, event_fn=event_fn, rtol=rtol, atol=atol, method=method, options=options,
            adjoint_rtol=adjoint_rtol, adjoint_atol=adjoint_atol, adjoint_method=adjoint_method,
            adjoint_options=adjoint_options, adjoint_params=adjoint_params, checkpoint=checkpoint,
            petsc_options=petsc_options, comm=comm, mass=mass)
    return _odeint(func, y0, t, rtol=rtol, atol=atol, method=method, options=options,
                   adjoint_rtol=adjoint_rtol, adjoint_atol=adjoint_atol,
                   adjoint_method=adjoint_method, adjoint_options=adjoint_options,
                   adjoint_params=adjoint_params, checkpoint=checkpoint,
                   petsc_options=petsc_options, comm=comm, mass=mass)


@dataclass
class _Front:
    """The checked, normalised arguments of one odeint call (the input stage)."""

    field: Callable  # func, or func in s = -t for a decreasing t
    tensors: tuple[torch.Tensor, ...]
    times: Any  # timegrid.Times
    method: Method
    rtol: float
    atol: float
    translated: compat.Translated
    petsc_options: Any
    key: tuple | None = None  # the memo key of the non-tensor arguments (None: not memoised)


# The non-tensor input stage (method, tolerances, options, PETSc options, checkpoint) of
# recent calls, by their hashable arguments: a training loop passes the same ones every
# call, and checking and translating them again costs tens of microseconds per solve.  Only
# arguments that passed every check are kept; anything unusual takes the general path.
_MEMO: dict[tuple, tuple] = {}
_MEMO_MAX = 128
_PLAIN = (int, str, bool, type(None))


def _items_key(d: Any) -> tuple | None:
    """``d`` (None or a dict of plain values) as a key that tells apart what the checks do."""
    if d is None:
        return None
    if type(d) is not dict:
        raise TypeError
    out = []
    for k, v in d.items():
        tv = type(v)
        if type(k) is not str or not (tv in _PLAIN or tv is float):
            raise TypeError
        # repr: -0.0 and 0.0 are equal but would be passed on as different option strings
        out.append((k, tv, repr(v) if tv is float else v))
    return tuple(out)


def _memo_key(method, rtol, atol, options, petsc_options, reverse: bool,
              adjoint: tuple) -> tuple | None:
    """The memo key of a call's non-tensor arguments, or ``None`` (general path)."""
    if adjoint != (None, None, None, None) or not (method is None or type(method) is str) \
            or type(rtol) not in (int, float) or type(atol) not in (int, float):
        return None
    try:
        return (method, type(rtol), repr(rtol), type(atol), repr(atol), _items_key(options),
                _items_key(petsc_options), reverse)
    except TypeError:
        return None


def _remember(key: tuple, value: tuple) -> None:
    if len(_MEMO) >= _MEMO_MAX:
        _MEMO.clear()
    _MEMO[key] = value


def _front(func, y0, t, *, rtol, atol, method, options, adjoint_rtol, adjoint_atol,
           adjoint_method, adjoint_options, petsc_options, event: bool = False) -> _Front:
    """Check every argument and translate torchdiffeq's keywords (no solve)."""
    if not callable(func):
        raise TypeError(f"func must be callable, got {type(func).__name__}")
    tensors = _check_state(y0)
    times = check_times(t, event=event)
    key = _memo_key(method, rtol, atol, options, petsc_options, times.reverse,
                    (adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options))
    hit = _MEMO.get(key) if key is not None else None
    # the method registry may have changed since (unregister_method, register_method)
    if hit is not None and resolve_method(method) is hit[0]:
        m, rtol, atol, tr, petsc_options = hit
        return _Front(reverse_field(func) if times.reverse else func, tensors, times, m, rtol,
                      atol, tr, petsc_options, key)
    m = resolve_method(method)
    rtol, atol = compat.tolerance(rtol, "rtol"), compat.tolerance(atol, "atol")
    compat.check_adjoint_keywords(method=m, rtol=rtol, atol=atol, adjoint_rtol=adjoint_rtol,
                                  adjoint_atol=adjoint_atol, adjoint_method=adjoint_method,
                                  adjoint_options=adjoint_options)
    tr = compat.translate_options(options, m, reverse=times.reverse)
    if tr.petsc and (petsc_options is None or isinstance(petsc_options, Mapping)):
        petsc_options = {**tr.petsc, **(petsc_options or {})}  # the caller's values win
    if key is not None:
        _remember(key, (m, rtol, atol, tr, petsc_options))
    return _Front(reverse_field(func) if times.reverse else func, tensors, times, m, rtol, atol,
                  tr, petsc_options, key)


def reverse_field(func: Callable) -> Callable:
    """``func`` in ``s = -t``: ``g(s, y) = -func(-s, y)`` (both parts of an IMEX split)."""
    if isinstance(func, IMEX):
        return _ReversedIMEX(implicit=Reversed(func.implicit), explicit=Reversed(func.explicit),
                             base=func)
    return Reversed(func)


@dataclass(frozen=True)
class _ReversedIMEX(IMEX):
    base: Any = None


def _extra_times(front: _Front, func, y0) -> list[float]:
    """Times where steps must end besides the outputs (jump_t, step_t, a fixed grid)."""
    extra = list(front.translated.step_ends)
    grid = front.translated.grid
    if grid is not None:
        g = grid(func, y0, front.times.t)
        if not isinstance(g, torch.Tensor) or g.dim() != 1:
            raise ValueError("options['grid_constructor'] must return a 1-D tensor of times")
        g = g.detach().to(torch.float64)
        extra.extend((-g if front.times.reverse else g).tolist())
    return extra


def _odeint(func, y0, t, *, adjoint_params, checkpoint, comm, mass, step_hooks=(), **front_kw):
    """odeint without events (see :func:`odeint`): check, normalise, solve."""
    mpi = as_comm(comm)
    dist = Distributed(mpi) if mpi is not None and mpi.Get_size() > 1 else None
    fronts: list[_Front] = []

    def prepare():
        fronts.append(_front(func, y0, t, **front_kw))
        if fronts[-1].times.t.numel() == 1:
            return None
        return _prepare(fronts[-1], func, y0, adjoint_params, checkpoint, mass, dist)

    if dist is None:
        prepared, shards = prepare(), ()
    else:  # every rank checks; one allgather shares the verdicts and the layouts
        prepared, shards = _prepare_collective(dist, prepare)
    if prepared is None:  # as torchdiffeq: the solution at a single time t[0] is y0
        tensors = fronts[-1].tensors
        if isinstance(y0, (tuple, list)):
            return tuple(torch.stack([y]) for y in tensors)
        return torch.stack([tensors[0]])

    m, opts, params, spec, flat, t_out, (mass_obj, index) = prepared
    call = _Call(fronts[-1].field, spec, params, m, opts, len(t_out), dist, shards, mass=mass_obj)
    call.step_hooks = list(step_hooks)
    reverse, user_func = fronts[-1].times.reverse, func
    fwd = StepCallbacks.of(user_func, spec, reverse, m.adaptive and opts.step_size is None,
                           t_out)
    if fwd is not None:
        call.step_hooks.append(fwd.hook)
    call.adjoint_callbacks = AdjointCallbacks.of(user_func, spec, reverse, params)
    if call.adjoint_callbacks is not None:
        if opts.checkpoint.replays:
            raise ValueError("func defines callback_*_adjoint, which runs with checkpoint "
                             "'stages', 'all' or 'solution'; a binomial or disk schedule "
                             "replays steps out of order")
        call.step_hooks.append(call.adjoint_callbacks.record)
    # Inside autograd.Function.forward grad mode is off and needs_input_grad ignores
    # torch.no_grad(), so whether a backward can follow is decided here: under no_grad
    # no trajectory is kept (it would cost memory in proportion to the steps).
    call.record = torch.is_grad_enabled() and (
        flat.requires_grad or t_out.requires_grad or any(p.requires_grad for p in params))
    ys = OdeintFunction.apply(call, flat, t_out, *params)
    if fwd is not None and fwd.error is not None:
        raise fwd.error
    if len(index) != len(t_out):  # drop the rows of step-end times that are not outputs
        ys = ys[index]
        stats = call.solver_stats()
        if stats is not None:  # last_stats() describes the caller's outputs
            stats.output_steps = [stats.output_steps[i] for i in index.tolist()]
    if not spec.is_tuple and len(spec.shapes[0]) == 1:
        return ys  # already [len(t), n]: no view (and no autograd node) in between
    return spec.unflatten(ys)


def _prepare(front: _Front, func, y0, adjoint_params, checkpoint, mass, dist):
    """Options, parameters, flat state and engine times of a checked call."""
    m, tensors = front.method, front.tensors
    opts, dae_init = _solve_options(front, checkpoint, isinstance(func, IMEX))
    # a policy validated where it was built, on that rank only, checks again here, inside the
    # collective agreement: a directory missing on one rank (node-local scratch) fails every rank
    opts.checkpoint.check_local()
    spec = StateSpec.from_state(y0 if isinstance(y0, (tuple, list)) else tensors[0])
    tt = front.times.t
    probe = None
    if torch.is_grad_enabled():  # a backward may follow: find a closure's parameters
        # (made only for a func that is not a module: the time's select costs operators)
        def probe():
            return tt[0].detach().to(spec.dtype), tuple(tensors) if spec.is_tuple else tensors[0]
    params = _collect_params(func, adjoint_params, probe)

    # normalise: flat state, increasing times in the state's dtype, extra step ends
    if not spec.is_tuple and tensors[0].dim() == 1:
        flat = tensors[0]  # already flat: no view (and no autograd node) in between
    else:
        flat = spec.flatten(tuple(tensors) if spec.is_tuple else tensors[0])
    ts_ = front.times.solver_t
    t_out = ts_.to(spec.dtype) if ts_.dtype != spec.dtype else ts_
    t_out, index = merge_times(t_out, _extra_times(front, func, y0))
    # DAE: validate the mass, check (or make) y0 consistent (pnode/adjoint/dae.py)
    mass_obj, flat, params = dae.prepare_mass(
        mass, front.field, spec, flat, t_out, m, opts, imex=isinstance(func, IMEX),
        consistent_init=dae_init, params=params, collective=dist is not None)
    opts = dae.solve_options(mass_obj, m, opts)
    return m, opts, params, spec, flat, t_out, (mass_obj, index)


def _solve_options(front: _Front, checkpoint, imex: bool) -> tuple[SolveOptions, bool]:
    """:func:`_build_options` of a checked call (memoised with the input stage)."""
    key = None
    if front.key is not None and (type(checkpoint) is str or isinstance(checkpoint, Checkpoint)):
        # a policy object by identity (the memo holds it, so its id is not reused)
        key = ("options", front.key, checkpoint if type(checkpoint) is str else id(checkpoint),
               imex)
        hit = _MEMO.get(key)
        if hit is not None and hit[0] is front.method:
            return hit[1], hit[2]
    options, dae_init = dae.split_options(front.translated.options)
    opts = _build_options(front.method, front.rtol, front.atol, options, checkpoint,
                          front.petsc_options, imex)
    if key is not None:
        _remember(key, (front.method, opts, dae_init, checkpoint))
    return opts, dae_init
