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
from . import dae
from .cache import CACHE, Lease
from .checkpoint import Checkpoint, check_directory
from .distributed import Distributed, agree, as_comm
from .function import OdeintFunction
from .methods import Method, resolve_method
from .problem import TorchProblem
from .solver import DENSE_JACOBIAN_MAX, SolveOptions, SolveStats, TSSolver
from .state import StateSpec

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
        out, i = [], 0
        for p in self.params:
            out.append(flat[i:i + p.numel()].view_as(p).to(p.dtype))
            i += p.numel()
        return out


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


def _check_times(t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t, dtype=torch.float64)
    if t.dim() != 1:
        raise ValueError(f"t must be 1-D, got shape {tuple(t.shape)}")
    if t.numel() < 2:
        raise ValueError("t must hold at least two times (start and end)")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    _check_finite(t, "t")
    if not bool((t[1:] > t[:-1]).all()):
        raise ValueError(f"t must be strictly increasing, got {t.tolist()}")
    return t


def _collect_params(func, adjoint_params) -> list[torch.Tensor]:
    if adjoint_params is not None:
        params = list(adjoint_params)
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"adjoint_params must be Tensors, got {type(p).__name__}")
    else:
        mods = [m for m in ((func.implicit, func.explicit) if isinstance(func, IMEX) else (func,))]
        params, seen = [], set()
        for m in mods:
            owner = m.__self__ if hasattr(m, "__self__") else m
            if isinstance(owner, nn.Module):
                for p in owner.parameters():
                    if id(p) not in seen:
                        seen.add(id(p))
                        params.append(p)
    params = [p for p in params if p.requires_grad]
    for p in params:
        _check_finite(p.detach(), "a parameter of func")
    return params


def _build_options(method: Method, rtol, atol, options, checkpoint, petsc_options,
                   imex: bool) -> SolveOptions:
    if not (isinstance(rtol, (int, float)) and rtol > 0 and math.isfinite(rtol)):
        raise ValueError(f"rtol must be a positive number, got {rtol!r}")
    if not (isinstance(atol, (int, float)) and atol > 0 and math.isfinite(atol)):
        raise ValueError(f"atol must be a positive number, got {atol!r}")
    options = dict(options or {})
    unknown = set(options) - _KNOWN_OPTIONS
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)}; valid keys: {sorted(_KNOWN_OPTIONS)}")
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


def _prepare_collective(dist: Distributed, prepare: Callable[[], tuple]) -> tuple[tuple, tuple]:
    """``prepare()`` on every rank of a collective call, and the agreement that follows.

    One allgather carries every rank's verdict (an input error on one rank raises on
    all), its layout (every rank's shard size) and its solver cache's collective
    state (the collective solvers every rank has given up are destroyed here).
    """
    def prepare_and_describe():
        prepared = prepare()
        m, opts, params, spec, _, t_out = prepared
        # the checkpoint directory may differ between ranks (node-local scratch)
        ck = opts.checkpoint
        same = (dataclasses.replace(opts, checkpoint=Checkpoint("stages")), ck.agreement_key())
        return prepared, (dist.layout(spec, t_out, m.name, params, same), CACHE.collective_state())

    prepared, payloads = agree(dist.comm, prepare_and_describe, gather=True)
    shards = dist.shard_sizes([layout for layout, _ in payloads])
    CACHE.agree(state for _, state in payloads)
    return prepared, shards


def odeint(
    func: Callable,
    y0: torch.Tensor | Sequence[torch.Tensor],
    t: torch.Tensor | Sequence[float],
    *,
    method: str = "dopri5",
    rtol: float = 1e-7,
    atol: float = 1e-9,
    options: Mapping[str, Any] | None = None,
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
        1-D strictly increasing output times; every one is hit exactly by a step.
    method : str, default "dopri5"
        See :func:`pnode.methods`; also ``"rk:<TSRKType>"``, ``"arkimex:<type>"``.
    rtol, atol : float
        Tolerances of adaptive methods (PETSc TSAdapt).
    options : dict, optional
        ``step_size`` (fixed steps), ``first_step``, ``max_num_steps``,
        ``jacobian`` (``"auto"``: dense LU up to 256 unknowns, else ``"matfree"``
        GMRES; ``"blocks"``: per-sample dense blocks with block LU, for a state of
        shape ``[batch, ...]`` whose samples func treats independently),
        ``theta``/``endpoint`` (method ``"theta"``), ``ksp_rtol``
        (matrix-free linear solves, default 1e-12), ``snes_rtol`` (default 1e-10),
        ``jacobian_lag`` (forward Newton recomputes the Jacobian every that many
        iterations of a stage solve; default 100, i.e. once per stage; the adjoint
        always uses exact stage Jacobians).
    adjoint_params : sequence of Tensor, optional
        Tensors to differentiate; by default the parameters of ``func`` if it
        is (or is bound to) an ``nn.Module``.
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
        only (``implicit_euler``, ``trapezoid``, ``theta``).  ``y0`` must satisfy the
        algebraic equations at ``t[0]`` to within ``rtol``/``atol``, or set
        ``options={"consistent_init": True}`` to solve them for its algebraic
        components (Newton).  ``M`` is differentiated if it requires grad.  See
        the "DAEs and mass matrices" page of the documentation.

    Returns
    -------
    Tensor or tuple of Tensors
        ``[len(t), *y0.shape]`` (a tuple for a tuple ``y0``).

    Raises
    ------
    ValueError
        Bad input: NaN/Inf, wrong shapes, non-increasing times, unknown method
        or option, IMEX with a non-IMEX method, ``func`` returning a wrong shape.
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
    mpi = as_comm(comm)
    dist = Distributed(mpi) if mpi is not None and mpi.Get_size() > 1 else None
    (options, dae_init), mass_info = dae.split_options(options), [None]

    def prepare():
        # 1. check inputs
        if not callable(func):
            raise TypeError(f"func must be callable, got {type(func).__name__}")
        tensors = _check_state(y0)
        tt = _check_times(t)
        m = resolve_method(method)
        opts = _build_options(m, rtol, atol, options, checkpoint, petsc_options,
                              isinstance(func, IMEX))
        params = _collect_params(func, adjoint_params)
        if opts.checkpoint.kind == "disk":
            # checked when the policy was built, on this rank only; checked again here,
            # where a directory missing on one rank (node-local scratch) fails every rank
            check_directory(opts.checkpoint.directory)

        # 2. normalise: flat state, times in the state's dtype for func
        spec = StateSpec.from_state(y0 if isinstance(y0, (tuple, list)) else tensors[0])
        flat = spec.flatten(tuple(tensors) if spec.is_tuple else tensors[0])
        t_out = tt.to(spec.dtype) if tt.dtype != spec.dtype else tt
        # DAE: validate the mass, check (or make) y0 consistent (pnode/adjoint/dae.py)
        mass_info[0], flat, params = dae.prepare_mass(
            mass, func, spec, flat, t_out, m, opts, imex=isinstance(func, IMEX),
            consistent_init=dae_init, params=params, collective=dist is not None)
        opts = dae.solve_options(mass_info[0], m, opts)
        return m, opts, params, spec, flat, t_out

    if dist is None:
        (m, opts, params, spec, flat, t_out), shards = prepare(), ()
    else:  # every rank checks; one allgather shares the verdicts and the layouts
        (m, opts, params, spec, flat, t_out), shards = _prepare_collective(dist, prepare)

    # 3. solve
    call = _Call(func, spec, params, m, opts, len(t_out), dist, shards, mass=mass_info[0])
    # Inside autograd.Function.forward grad mode is off and needs_input_grad ignores
    # torch.no_grad(), so whether a backward can follow is decided here: under no_grad
    # no trajectory is kept (it would cost memory in proportion to the steps).
    call.record = torch.is_grad_enabled() and (
        flat.requires_grad or t_out.requires_grad or any(p.requires_grad for p in params))
    ys = OdeintFunction.apply(call, flat, t_out, *params)
    return spec.unflatten(ys)
