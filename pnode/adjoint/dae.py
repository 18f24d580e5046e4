"""Mass-matrix systems ``M y' = f(t, y)`` and index-1 DAEs.

``pnode.odeint(func, y0, t, mass=M, method=...)`` hands PETSc the implicit form

    F(t, y, y') = M y' - f(t, y) = 0,    dF/dy' = M,   dF/dy = -df/dy,

so the IJacobian is ``shift * M - df/dy`` and the IJacobianP of the parameters of
``f`` is unchanged.  A singular ``M`` makes the system a DAE: the rows (more
generally the left null space ``Q`` of ``M``, ``Q^T M = 0``) are algebraic
equations ``Q^T f(t, y) = 0`` that fix the components of ``y`` along the right
null space ``N`` of ``M`` (``M N = 0``).  The DAE is of index 1 when
``Q^T (df/dy) N`` is nonsingular; that is checked at ``t0``.

PETSc's discrete adjoint of TSTHETA (``implicit_euler``, ``trapezoid``,
``theta``) is written for a general IFunction with a constant mass matrix, so
gradients are exact for these methods.  TSARKIMEX assumes the identity mass
matrix forward and backward (its explicit first stage takes the slope
``-F(t, y, 0)``; ``TSAdjointStep_ARKIMEX`` cancels ``shift * I`` out of the
IJacobian), so ARKIMEX methods, and with them :class:`pnode.IMEX`, are refused
with a mass.  Explicit methods are refused too: an explicit stage needs
``y' = M^{-1} f``, which does not exist for a singular ``M``.  The midpoint form
of ``theta`` extrapolates the algebraic components off the constraint, which
makes adaptive steps collapse: with a singular mass it takes fixed steps only.

A trainable ``M`` (``M.requires_grad``) is one more parameter block of the
IJacobianP: ``dF_i/dM_ij = y'_j`` (``dF_i/dM_i = y'_i`` for a diagonal mass), with
the ``y'`` PETSc passes at each stage (see :func:`solve_options` for the midpoint
form, whose stage-storing trajectory passes a wrong one).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .checkpoint import Checkpoint
from .methods import Method
from .options import SolveOptions
from .state import StateSpec

__all__ = ["Mass", "prepare_mass", "solve_options", "split_options",
           "constraint_residual"]


@dataclass
class Mass:
    """A constant mass matrix as the engine uses it (float64 values, no autograd graph).

    Attributes
    ----------
    kind : str
        ``"diag"`` (a vector of diagonal entries) or ``"dense"`` (an ``[n, n]`` matrix).
    values : Tensor
        float64 ``[n]`` or ``[n, n]``, detached from the caller's graph.
    trainable : bool
        Whether ``M`` requires grad (then it is the last parameter block).
    alg_left, alg_right : Tensor
        ``[n, k]`` orthonormal bases of the left and right null spaces of ``M``
        (``Q`` and ``N``; for a diagonal mass, unit vectors of the zero rows).
    user_shape, state_shape : tuple of int
        Shape of the mass as given, and of the state (a per-sample diagonal is broadcast).
    """

    kind: str
    values: torch.Tensor
    trainable: bool
    alg_left: torch.Tensor
    alg_right: torch.Tensor
    user_shape: tuple[int, ...] = ()
    state_shape: tuple[int, ...] = ()

    @property
    def n_alg(self) -> int:
        """Number of algebraic equations (the nullity of ``M``)."""
        return self.alg_right.shape[1]

    @property
    def layout(self) -> tuple:
        """What a cached TS depends on (not the values: those are bound per call)."""
        return ("mass", self.kind, self.values.shape[0], self.user_shape, self.trainable)

    def matvec(self, v: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``M v`` (or ``M^T v``) of a float64 vector."""
        if self.kind == "diag":
            return self.values * v
        return (self.values.T if transpose else self.values) @ v

    def add_shifted(self, A: torch.Tensor, shift: float) -> None:
        """``A += shift * M`` for a dense ``[n, n]`` float64 Jacobian."""
        if self.kind == "diag":
            A.diagonal().add_(self.values, alpha=shift)
        else:
            A.add_(self.values, alpha=shift)

    def param_grad(self, v: torch.Tensor, xdot: torch.Tensor) -> torch.Tensor:
        """``(dF/dM)^T v`` flattened like ``M``: ``v_i y'_i`` or ``v_i y'_j``."""
        if self.kind == "dense":
            return torch.outer(v, xdot).reshape(-1)
        g = v * xdot
        if math.prod(self.user_shape) == g.numel():
            return g
        g = g.reshape(self.state_shape)
        lead = len(self.state_shape) - len(self.user_shape)
        return (g.sum(dim=tuple(range(lead))) if lead else g).reshape(-1)


def _null_spaces(kind: str, m64: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = m64.shape[0]
    if kind == "diag":
        idx = torch.nonzero(m64 == 0).reshape(-1)
        basis = torch.zeros(n, idx.numel(), dtype=torch.float64)
        basis[idx, torch.arange(idx.numel())] = 1.0
        return basis, basis
    u, s, vh = torch.linalg.svd(m64)
    smax = float(s[0]) if s.numel() else 0.0
    rank = int((s > n * torch.finfo(torch.float64).eps * smax).sum()) if smax > 0 else 0
    return u[:, rank:].contiguous(), vh[rank:].T.contiguous()


def _as_mass(mass, spec: StateSpec) -> tuple[str, torch.Tensor]:
    """Classify ``mass``; a diagonal mass is returned as a flat ``[n]`` view/expansion."""
    if not isinstance(mass, torch.Tensor):
        raise TypeError(f"mass must be a torch.Tensor (a vector or an [n, n] matrix), "
                        f"got {type(mass).__name__}")
    if not mass.is_floating_point():
        raise ValueError(f"mass must be floating point, got {mass.dtype}")
    if mass.device.type != "cpu":
        raise ValueError(f"mass is on {mass.device}; pnode's PETSc build runs on the CPU")
    if not bool(torch.isfinite(mass.detach()).all()):
        raise ValueError("mass contains NaN or Inf")
    n = spec.size
    if mass.dim() == 2 and tuple(mass.shape) == (n, n) and n > 1:
        return "dense", mass
    if mass.dim() == 1 and mass.numel() == n:
        return "diag", mass
    shape = tuple(spec.shapes[0])
    if not spec.is_tuple and 1 <= mass.dim() <= len(shape) and \
            tuple(mass.shape) == shape[len(shape) - mass.dim():]:
        # the diagonal of one sample, the same for every sample of the leading axes
        return "diag", mass.expand(shape).reshape(-1)
    raise ValueError(
        f"mass has shape {tuple(mass.shape)}, but the state has {n} elements; pass a vector of "
        f"{n} diagonal entries, a tensor shaped like y0 or like its trailing dimensions "
        f"(the same diagonal for every sample), or an [{n}, {n}] matrix")


def _midpoint(method: Method, opts: SolveOptions) -> bool:
    """Whether the scheme is TSTHETA's one-stage (midpoint) form with theta < 1."""
    if method.ts_type != "theta":
        return False
    endpoint = method.endpoint if opts.endpoint is None else opts.endpoint
    theta = method.theta if opts.theta is None else opts.theta
    return not endpoint and theta != 1.0


def _check_method(method: Method, opts: SolveOptions, imex: bool, singular: bool) -> None:
    if imex or method.ts_type == "arkimex":
        raise ValueError(
            f"method {method.name!r} cannot take mass=: PETSc's ARKIMEX is written for the "
            "identity mass matrix, forward and adjoint: its explicit first stage takes the "
            "slope -F(t, y, 0) = f(t, y) (not M^-1 f), and TSAdjointStep_ARKIMEX cancels "
            "shift * I out of the IJacobian, so solutions and gradients are wrong for any "
            "other M, singular or not; use implicit_euler, trapezoid or theta (and a plain "
            "func instead of pnode.IMEX)")
    if not method.implicit:
        if singular:
            raise ValueError(
                f"method {method.name!r} is explicit, but mass is singular: the algebraic "
                "rows of M y' = f(t, y) have no y' for an explicit stage to step; use an "
                "implicit method (implicit_euler, trapezoid, theta)")
        raise ValueError(
            f"method {method.name!r} is explicit; mass= is supported by the implicit methods "
            "implicit_euler, trapezoid and theta (for a nonsingular M, an explicit method can "
            "integrate func(t, y) = solve(M, f(t, y)) instead)")
    if opts.jacobian == "blocks":
        raise ValueError("options['jacobian']='blocks' does not take mass=; use 'dense' or "
                         "'matfree'")
    if singular and opts.step_size is None and _midpoint(method, opts):
        # The step extrapolates y + (Y - y) / theta from the stage Y, so the algebraic
        # components of the steps miss the constraint by an error that alternates in sign
        # and does not shrink with the step: TSTHETA's error estimate (differences of the
        # steps) never passes, and the step size collapses to round-off (a hang).
        raise ValueError(
            "the midpoint form of method='theta' takes a singular mass with fixed steps only "
            "(options['step_size']): its steps extrapolate the algebraic components off the "
            "constraint, and adaptive steps shrink without end; use trapezoid, "
            "implicit_euler or theta with options['endpoint']=True for adaptive steps")


def solve_options(mass: Mass | None, method: Method, opts: SolveOptions) -> SolveOptions:
    """The options a DAE solves with (``opts`` itself for an ODE).

    - A trainable mass with the midpoint form recomputes stages in the adjoint:
      PETSc's memory trajectory restores only the stage ``Y`` of a midpoint step, not
      the solution after it, so ``TSAdjointStep_Theta`` rebuilds the step's start
      ``(Y - theta y_{n+1}) / (1 - theta)`` from a stale ``y_{n+1}`` and hands the
      IJacobianP a wrong ``y'``.  Only the mass block ``dF/dM = y'`` reads it;
      ``checkpoint="solution"`` restores both and gives the exact gradient.
    """
    if mass is None:
        return opts
    # (past an impasse point every attempt of a step fails: the engine's bound on consecutive
    # rejections, pnode.adjoint.detector.MAX_REJECTIONS, ends such a solve for ODEs and DAEs)
    if mass.trainable and _midpoint(method, opts) and opts.checkpoint.restores_stages:
        opts = dataclasses.replace(opts, checkpoint=Checkpoint("solution"))
    return opts


def _check_collective(kind: str, trainable: bool, consistent_init: bool) -> None:
    """What ``mass=`` supports under ``comm=`` (each rank passes its shard's mass)."""
    if kind == "dense":
        raise ValueError("mass= with comm= takes a diagonal mass (a vector shaped like y0's "
                         "shard or like its trailing dimensions): an [n, n] matrix would only "
                         "couple the unknowns of one rank")
    if trainable:
        raise ValueError("a mass that requires grad is not supported with comm= (each rank's "
                         "mass is its local block); pass a mass without requires_grad")
    if consistent_init:
        # the implicit-function graph of the consistent y0 runs outside the solve, so its
        # share of the parameter gradient would be this rank's alone, not summed over ranks
        raise ValueError("options['consistent_init'] is not supported with comm=: make y0 "
                         "consistent before the collective call (e.g. a serial odeint of "
                         "t[:2] with consistent_init=True on each rank's shard under "
                         "torch.no_grad(), then ys[0])")


def split_options(options) -> tuple[dict | None, bool]:
    """Take the DAE keys out of ``options`` (the rest goes to the solver options)."""
    if options is None or not hasattr(options, "keys") or "consistent_init" not in options:
        return options, False
    rest = {k: v for k, v in options.items() if k != "consistent_init"}
    flag = options["consistent_init"]
    if not isinstance(flag, bool):
        raise ValueError(f"options['consistent_init'] must be True or False, got {flag!r}")
    return rest, flag


def _weights(y: torch.Tensor, rtol: float, atol: float) -> torch.Tensor:
    # tolerance of each component: the integrator's, but never below round-off of the dtype
    eps = torch.finfo(y.dtype).eps
    yy = y.detach().abs().to(torch.float64)
    return torch.maximum(atol + rtol * yy, 100 * eps * (1.0 + yy))


class _Residual:
    """``z -> Q^T f(t0, y0 + N z)`` and its Jacobian ``Q^T (df/dy) N`` (k vjps)."""

    def __init__(self, func: Callable, spec: StateSpec, t0: torch.Tensor, mass: Mass) -> None:
        self.func, self.spec, self.t0, self.mass = func, spec, t0, mass
        self.Q = mass.alg_left.to(spec.dtype)
        self.N = mass.alg_right.to(spec.dtype)

    def f(self, y: torch.Tensor) -> torch.Tensor:
        out = self.spec.check_output(self.func(self.t0, self.spec.unflatten(y)), "func")
        return out

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        return self.Q.T @ self.f(y)

    def jacobian(self, y: torch.Tensor) -> torch.Tensor:
        # rows q_i^T (df/dy) by k backward passes through one graph (a torch.func.jvp per
        # column costs ~0.5 ms of functorch set-up each), then times N
        with torch.enable_grad():
            yr = y.detach().requires_grad_(True)
            out = self.f(yr)
        k = self.Q.shape[1]
        if not out.requires_grad:  # f independent of y
            return torch.zeros(k, k, dtype=torch.float64)
        rows = [torch.autograd.grad(out, yr, self.Q[:, i], retain_graph=True,
                                    allow_unused=True)[0] for i in range(k)]
        rows = [torch.zeros_like(yr) if r is None else r for r in rows]
        return (torch.stack(rows) @ self.N).to(torch.float64)


def _solve_k(K: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``K^{-1} r``, or a ValueError when ``K`` is singular (the DAE is not index 1)."""
    k = K.shape[0]
    s = torch.linalg.svdvals(K)
    smax = float(s[0]) if k else 0.0
    if k and (not math.isfinite(smax) or float(s[-1]) <= 1e3 * k * 2.2e-16 * max(smax, 1e-300)):
        raise ValueError(
            "the algebraic equations do not determine the algebraic variables at t0: "
            "Q^T (df/dy) N is singular (Q, N: left and right null spaces of mass), so the DAE "
            "is not of index 1 there (e.g. a constraint that does not involve the algebraic "
            "variables, as in an index-3 pendulum); reduce the index (differentiate the "
            "constraint) before integrating")
    return torch.linalg.solve(K, r.to(torch.float64))


def prepare_mass(mass, func: Callable, spec: StateSpec, flat: torch.Tensor, t: torch.Tensor,
                 method: Method, opts: SolveOptions, *, imex: bool, consistent_init: bool,
                 params: list[torch.Tensor], collective: bool
                 ) -> tuple[Mass | None, torch.Tensor, list[torch.Tensor]]:
    """Validate ``mass=``, check (or make) ``y0`` consistent, and place a trainable ``M``.

    Parameters
    ----------
    mass : Tensor or None
        The user's mass (``None``: an ODE; then ``consistent_init`` must be off).
    func, spec, flat, t
        The right-hand side, the state layout, the flat ``y0`` and the output times.
    method : Method
        The scheme (implicit TSTHETA schemes only).
    opts : SolveOptions
        The validated options; ``y0`` counts as consistent when the Newton correction
        that would make it so is below ``rtol``/``atol`` (componentwise).
    imex : bool
        Whether ``func`` is a :class:`pnode.IMEX` split.
    consistent_init : bool
        Solve the algebraic equations at ``t0`` for the algebraic components of
        ``y0`` (Newton; differentiable by the implicit-function theorem).
    params : list of Tensor
        The parameters to differentiate; a trainable ``M`` is appended (last).
    collective : bool
        Whether the call is collective (``comm=``): a trainable ``M`` is refused
        there (it is rank-local) and failures of ``func`` here become ``ValueError``
        so that every rank raises.

    Returns
    -------
    mass : Mass or None
    flat : Tensor
        ``y0``, made consistent if asked.
    params : list of Tensor
    """
    if mass is None:
        if consistent_init:
            raise ValueError("options['consistent_init'] needs mass= (a DAE M y' = f(t, y))")
        return None, flat, params
    kind, m_flat = _as_mass(mass, spec)
    m_user = mass
    if t.requires_grad:
        raise ValueError("gradients with respect to the output times are not available with "
                         "mass= (they need y' = M^{-1} f); pass t without requires_grad")
    m64 = m_flat.detach().to(torch.float64).contiguous()
    alg_left, alg_right = _null_spaces(kind, m64)
    trainable = bool(m_user.requires_grad)
    if collective:
        _check_collective(kind, trainable, consistent_init)
    _check_method(method, opts, imex, alg_right.shape[1] > 0)
    info = Mass(kind, m64, trainable, alg_left, alg_right, tuple(mass.shape),
                tuple(spec.shapes[0]) if not spec.is_tuple else (spec.size,))
    if trainable:
        params = [p for p in params if p is not m_user] + [m_user]
    if info.n_alg == 0:
        if consistent_init:
            raise ValueError("options['consistent_init'] has nothing to do: mass is nonsingular "
                             "(no algebraic equations)")
        return info, flat, params
    try:
        flat = _consistent(func, spec, flat, t[0].detach(), info, opts.rtol, opts.atol,
                          consistent_init)
    except (ValueError, TypeError):
        raise
    except Exception as exc:
        if not collective:
            raise
        raise ValueError(f"func failed at t0 while checking the algebraic equations: "
                         f"{type(exc).__name__}: {exc}") from exc
    return info, flat, params


def _consistent(func, spec, flat, t0, mass: Mass, rtol, atol, fix: bool) -> torch.Tensor:
    res = _Residual(func, spec, t0, mass)
    N64 = mass.alg_right
    w = _weights(flat, rtol, atol)
    with torch.no_grad():
        y = flat.detach().clone()
        r = res(y)
    if not bool(torch.isfinite(r).all()):
        raise ValueError("func returned NaN or Inf at (t0, y0)")
    K = res.jacobian(y)
    dz = _solve_k(K, -r)
    step = N64 @ dz
    err = float((step.abs() / w).max())
    if not fix:
        if err > 1.0:
            raise ValueError(
                f"y0 is inconsistent: the algebraic equations of mass= are violated at t0 "
                f"(max |residual| {float(r.abs().max()):.3g}; the Newton correction to the "
                f"algebraic components is {err:.3g} times the tolerance atol + rtol*|y0|); pass "
                "a consistent y0 or options={'consistent_init': True}")
        return flat
    # Newton on the algebraic components, without a graph
    for _ in range(50):
        y = y + step.to(y.dtype)
        with torch.no_grad():
            r = res(y)
        if not bool(torch.isfinite(r).all()):
            break
        K = res.jacobian(y)
        dz = _solve_k(K, -r)
        step = N64 @ dz
        tiny = 4 * torch.finfo(spec.dtype).eps * (1.0 + y.detach().abs().to(torch.float64))
        if bool((step.abs() <= tiny).all()):
            break
    else:
        r = None
    if r is None or not bool(torch.isfinite(r).all()) or \
            float((step.abs() / _weights(y, rtol, atol)).max()) > 1e-3:
        raise ValueError("options['consistent_init']: Newton did not find consistent algebraic "
                         "components of y0 at t0 (50 iterations); start from a better guess")
    # One graph-carrying Newton correction at the converged point: the derivative of the
    # consistent y0 with respect to y0 and the parameters is the implicit-function one
    # (the projector I - N K^{-1} Q^T df/dy: zero along the algebraic directions).
    Kinv = torch.linalg.inv(K).to(spec.dtype)
    N = N64.to(spec.dtype)
    y_graph = flat + (y.detach() - flat.detach())
    return y_graph - N @ (Kinv @ res(y_graph))


def constraint_residual(func: Callable, mass: torch.Tensor, t: torch.Tensor,
                        ys: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Residual of the algebraic equations ``Q^T f(t_k, y_k)`` at each output.

    Parameters
    ----------
    func : callable
        The right-hand side ``f(t, y)`` of ``M y' = f(t, y)``.
    mass : Tensor
        The mass given to :func:`pnode.odeint`.
    t : Tensor
        Output times.
    ys : Tensor or tuple of Tensors
        The outputs of :func:`pnode.odeint` (``[len(t), *y0.shape]``).

    Returns
    -------
    Tensor
        ``[len(t), k]``: the algebraic rows of ``f`` (diagonal mass) or ``Q^T f``.

    Examples
    --------
    >>> ys = pnode.odeint(f, y0, t, mass=m, method="implicit_euler")
    >>> constraint_residual(f, m, t, ys).abs().max()
    """
    is_tuple = isinstance(ys, (tuple, list))
    first = [y[0] for y in ys] if is_tuple else ys[0]
    spec = StateSpec.from_state(tuple(first) if is_tuple else first)
    kind, m = _as_mass(mass, spec)
    m64 = m.detach().to(torch.float64)
    Q, _ = _null_spaces(kind, m64)
    flat = torch.cat([y.reshape(len(t), -1) for y in ys], dim=1) if is_tuple else \
        ys.reshape(len(t), -1)
    out = []
    with torch.no_grad():
        for tk, yk in zip(t, flat, strict=True):
            f = spec.check_output(func(tk.to(spec.dtype), spec.unflatten(yk)), "func")
            out.append(Q.T @ f.to(torch.float64))
    return torch.stack(out)
