"""The torch <-> PETSc boundary: the callbacks PETSc calls during TSSolve/TSAdjointSolve.

The callbacks read and write PETSc ``Vec`` memory through zero-copy DLPack views
made once per Vec (:class:`.vecs.VecViews`).  Jacobians are never formed for
explicit methods: PETSc's ``MatMultTranspose`` on the state and parameter
Jacobians is answered by one torch vector-Jacobian product at the linearisation
point (shared by both matrices, so a stage costs one backward pass; see
:mod:`.shells`).  For explicit Runge-Kutta methods the parameter gradient can be
accumulated on the torch side, with PETSc's own stage weights, instead of in a
PETSc vector (:class:`.param_gradient.ParamGradient`): PETSc then makes two
callbacks per adjoint stage instead of four.  Forward-mode products (Newton's
``J v``) are two reverse passes (:class:`.jacobians.DoubleVjp`); small implicit
systems get a dense Jacobian and a direct solve, which keeps the transposed
adjoint solves exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from petsc4py import PETSc

from . import jacobians, observers
from .graphs import GraphStore, graph_bytes
from .jacobians import engine_grad as _engine_grad
from .param_gradient import ParamGradient
from .shells import ShellContext
from .state import StateSpec
from .vecs import VECSUM_MAX, VecViews, all_finite, vec_key

__all__ = ["TorchProblem"]


@dataclass
class Counters:
    """Evaluation counts of one solve (forward and adjoint)."""

    rhs: int = 0
    jvp: int = 0
    vjp: int = 0
    jacobians: int = 0
    graph_hits: int = 0


def _grad_on() -> bool:
    """Switch grad mode on (as ``torch.enable_grad()``, without a context manager object per
    stage); returns the previous mode for :func:`_set_grad`."""
    was = torch.is_grad_enabled()
    if not was:
        _set_grad(True)
    return was


_set_grad = torch._C._set_grad_enabled


class _LinPoint:
    """A linearisation point (t, x) and, lazily, the autograd graph of f there.

    ``key`` identifies the request: the time PETSc asked at and the PETSc Vec contents
    the point was read from, so repeated requests at the same stage (state and
    parameter Jacobians) are recognised without comparing the data.
    """

    __slots__ = ("t", "x", "key", "graph", "cached_v", "cached_gp", "weight")

    def __init__(self, t: float, x: torch.Tensor, key: tuple | None = None) -> None:
        self.t = t
        self.x = x
        self.key = key
        self.graph = None
        self.cached_v: tuple[int, int] | None = None  # _vec_key of the vector of cached_gp
        self.cached_gp: torch.Tensor | None = None
        self.weight: float | None = None  # PETSc's scale of the stage's parameter product


@dataclass
class _Part:
    """One right-hand side term (the whole func, or one half of an IMEX split)."""

    func: Callable
    name: str
    point: _LinPoint | None = None
    last_point: _LinPoint | None = field(default=None, repr=False)


class _CallbackErrors:
    """Exceptions raised inside PETSc callbacks: remembered for the solver to re-raise.

    Collective (MPI) solves: a failing callback must not raise into PETSc while the
    other ranks wait in a collective; it records the error and returns NaN instead.
    """

    error: BaseException | None = None  # first exception raised inside a callback
    error_t: float | None = None
    collective: bool = False

    def skip(self, out: PETSc.Vec | None) -> bool:
        """Whether a callback must not run: a collective solve after a failure on this rank.

        ``out`` is then filled with NaN (so is every later output) and the solver's
        agreement step after the solve raises on every rank.
        """
        if self.collective and self.error is not None:
            if out is not None:
                out.set(float("nan"))
            return True
        return False

    def failed(self, exc: BaseException, t: float, out: PETSc.Vec | None) -> None:
        """Handle an exception of a callback body (call from its ``except`` clause).

        The first exception is remembered for the solver to re-raise; a serial solve
        re-raises it into PETSc at once, a collective one fills ``out`` with NaN.
        """
        if self.error is None:
            self.error, self.error_t = exc, t
        if not self.collective:
            raise exc
        if out is not None:
            out.set(float("nan"))

    def reset_error(self) -> None:
        self.error = None
        self.error_t = None


class TorchProblem(_CallbackErrors):
    """Callbacks binding a torch ``func(t, y)`` to a PETSc TS.

    Parameters
    ----------
    spec : StateSpec
        Structure and dtype of the state.
    params : sequence of Tensor
        Tensors whose gradients the adjoint computes (the JacobianP columns).
    explicit : callable or None
        Right-hand side integrated explicitly (TSRK, or the explicit half of IMEX).
    implicit : callable or None
        Right-hand side integrated implicitly (IFunction ``ydot - f(t, y)``).
    jacobian : str
        ``"dense"``: assemble the implicit Jacobian (direct LU); ``"blocks"``:
        assemble its per-sample diagonal blocks (the state's first axis is a batch
        of independent samples; block LU); ``"matfree"``: shell operator (Krylov).
    """

    def __init__(
        self,
        spec: StateSpec,
        params: Sequence[torch.Tensor],
        *,
        explicit: Callable | None,
        implicit: Callable | None,
        jacobian: str,
    ) -> None:
        self.spec = spec
        self.params = tuple(params)
        self.n = spec.size
        self.n_params = sum(p.numel() for p in self.params)
        self.jacobian = jacobian
        self.dense = jacobian == "dense"
        self.batch = spec.shapes[0][0] if jacobian == "blocks" else 1
        self.block = self.n // self.batch
        # the assembled implicit Jacobian (dense or blocks); the solver may turn on the
        # reuse across a forward step's stages (jacobians.Assembly)
        self.assembly = jacobians.Assembly(self.dense, self.batch, reuse_stages=False)
        self._jvps = jacobians.DoubleVjp()  # matrix-free J v
        self.explicit = _Part(explicit, "func") if explicit is not None else None
        self.implicit = (
            _Part(implicit, "IMEX implicit func" if explicit is not None else "func")
            if implicit is not None
            else None
        )
        self.counters = Counters()
        # weight(t_stage, ptime, h) of an explicit RK stage in the adjoint (set by the solver)
        self.stage_weight: Callable[[float, float, float], float | None] | None = None
        self.graphs: GraphStore | None = None  # checkpoint="graph": the forward's graphs
        self._entry_bytes: int | None = None  # memory one kept evaluation holds
        self.error, self.error_t, self.collective = None, None, False  # see _CallbackErrors
        self._ijac_shift = 0.0
        self.shells: dict[str, list[ShellContext]] = {}
        # mass matrix of M y' = f (pnode.adjoint.dae.Mass; None: the identity), bound per call
        self.mass = None
        self.xdot: torch.Tensor | None = None  # y' of the last IJacobianP (trainable mass)
        # the parameter gradient of an explicit RK adjoint, accumulated here (None: by PETSc)
        self.param_grad: ParamGradient | None = None
        # fast paths: a single state tensor in float64, and the time of the last evaluation
        self._shape = None if spec.is_tuple else spec.shapes[0]
        self._flat1 = self._shape is not None and len(self._shape) == 1  # a 1-D state
        # A single state tensor that is not 1-D: the explicit part's evaluations take and
        # give tensors in its shape (views of PETSc's Vecs, made once), so no view or
        # reshape runs per stage, nor a node for one in each kept graph's backward pass.
        self._shaped = self._shape is not None and not self._flat1
        self.views = VecViews(self._shape if self._shaped else None)
        self._is64 = spec.dtype == torch.float64
        self._t_value: float | None = None
        self._t_tensor: torch.Tensor | None = None

    # -- evaluation helpers -------------------------------------------------------------
    def _t(self, t: float) -> torch.Tensor:
        # Consecutive evaluations often share a time (RK stages with equal nodes, the
        # adjoint's re-evaluation at the point it linearised at): reuse the last tensor.
        # One entry only: a cache of every time scattered small blocks through the heap.
        if t != self._t_value:
            self._t_tensor = torch.scalar_tensor(t, dtype=self.spec.dtype)
            self._t_value = t
        return self._t_tensor

    def _x(self, flat64: torch.Tensor) -> torch.Tensor:
        return flat64 if self._is64 else flat64.to(self.spec.dtype)

    def _y(self, x: torch.Tensor):
        """The state in the user's structure, from a flat tensor of the state's dtype.

        A tensor already in a shaped state's shape (never 1-D) is passed as it is.
        """
        if self._flat1 or x.dim() != 1:  # already in shape: no view, no backward node
            return x
        return x.view(self._shape) if self._shape is not None else self.spec.unflatten(x)

    def _flat(self, out: object, name: str) -> torch.Tensor:
        """func's output checked against the state and flattened (fast path: one tensor)."""
        if (self._shape is not None and type(out) is torch.Tensor and out.shape == self._shape
                and out.dtype == self.spec.dtype):
            return out if self._flat1 else out.reshape(-1)
        return self.spec.check_output(out, name)

    def _shaped_out(self, out: object, name: str) -> torch.Tensor:
        """func's output checked against the state, in a shaped state's shape (else flat)."""
        if not self._shaped:
            return self._flat(out, name)
        if (type(out) is torch.Tensor and out.shape == self._shape
                and out.dtype == self.spec.dtype):
            return out
        return self.spec.check_output(out, name).reshape(self._shape)

    def _value(self, part: _Part, t: float, x: torch.Tensor) -> torch.Tensor:
        """func at ``(t, x)``, checked against the state and flattened (not for finiteness)."""
        return self._flat(part.func(self._t(t), self._y(self._x(x))), part.name)

    def _explicit_view(self, vec: PETSc.Vec) -> torch.Tensor:
        """A Vec as the explicit part's evaluations take it: in a shaped state's shape, else flat."""
        return self.views.state(vec) if self._shaped else self.views.read(vec)

    def _explicit_value(self, t: float, x: torch.Tensor) -> torch.Tensor:
        """The explicit part at ``(t, x)``, checked, in the layout of :meth:`_shaped_out`."""
        return self._shaped_out(self.explicit.func(self._t(t), self._y(self._x(x))),
                                self.explicit.name)

    def _eval(self, part: _Part, t: float, x: torch.Tensor) -> torch.Tensor:
        flat = self._value(part, t, x)
        if not all_finite(flat):
            raise FloatingPointError(f"{part.name} returned NaN or Inf at t={t:.6g}")
        return flat

    def _write_checked(self, part: _Part, t: float, out: torch.Tensor, F: PETSc.Vec) -> None:
        """Write func's output (:meth:`_shaped_out`) into ``F``; ``FloatingPointError`` if NaN/Inf.

        Small serial solves check ``F`` by one VecSum (no torch operator; PETSc's sum is
        a scalar loop, so large states use torch's); a collective one checks the local
        output (a VecSum would be a collective call that a rank which failed earlier does
        not make).  A non-finite sum is re-checked element by element (finite values can
        overflow it).
        """
        by_vecsum = not self.collective and self.n <= VECSUM_MAX
        write = self.views.write_state if self._shaped else self.views.write
        if by_vecsum:
            write(F).copy_(out.detach() if torch.is_grad_enabled() else out)
            ok = math.isfinite(F.sum()) or bool(torch.isfinite(out.detach()).all())
        else:
            ok = all_finite(out)
        if not ok:
            raise FloatingPointError(f"{part.name} returned NaN or Inf at t={t:.6g}")
        if not by_vecsum:
            write(F).copy_(out.detach() if torch.is_grad_enabled() else out)

    # -- call lifetime --------------------------------------------------------------------
    def keep_graphs(self, on: bool, memory_mib: float | None = None) -> None:
        """Start (``on``) or stop keeping the forward sweep's graphs (``"graph"`` policy).

        With ``memory_mib``, the graphs of the earliest evaluations are dropped once the
        kept ones would exceed it; the adjoint re-evaluates those stages.
        """
        budget = None if memory_mib is None else memory_mib * 2**20
        self.graphs = GraphStore(budget, self._entry_bytes) if on else None

    def forget_points(self) -> None:
        """Drop cached linearisation points (their Vec keys are only valid within one sweep)."""
        for part in (self.explicit, self.implicit):
            if part is not None:
                part.point = part.last_point = None
        self.assembly.reset()
        self._jvps.reset()

    # -- linearisation points and products ----------------------------------------------
    def _set_point(self, part: _Part, t: float, X: PETSc.Vec) -> _LinPoint:
        key = (t, *vec_key(X))
        last = part.last_point
        # J and Jp are requested at the same (t, Y) for each stage: share one graph.
        if last is not None and last.key == key:
            part.point = last
            return last
        # the explicit part's points (and kept graphs) are in its layout (_explicit_view)
        x = self._explicit_view(X) if part is self.explicit else self.views.read(X)
        hit = self.graphs.pop(x) if self.graphs is not None else None
        if hit is not None:  # the forward evaluated f here: reuse its graph (and its time)
            pt = _LinPoint(hit[0], hit[1], key)
            pt.graph = (hit[2], hit[3])
            self.counters.graph_hits += 1
        else:
            pt = _LinPoint(t, x.clone(), key)
        part.point = part.last_point = pt
        return pt

    def _graph(self, part: _Part, pt: _LinPoint):
        """The graph ``(xr, out)`` of func at the point, in the layout of the point's state
        (the explicit part's: :meth:`_explicit_view`; the implicit part's: flat, as the
        Jacobian assembly wants it)."""
        if pt.graph is None:
            was = _grad_on()
            try:
                x = self._x(pt.x)  # the point's own copy: it can be the leaf itself
                shaped = self._shaped and part is self.explicit
                xr = x.detach().requires_grad_(True) if x.requires_grad else x.requires_grad_(True)
                out = part.func(self._t(pt.t), self._y(xr))
                out = self._shaped_out(out, part.name) if shaped else self._flat(out, part.name)
            finally:
                _set_grad(was)
            pt.graph = (xr, out)
        return pt.graph

    def vjp(self, part: _Part, v: torch.Tensor, *, want_x: bool, want_p: bool,
            last: bool = False) -> tuple[torch.Tensor | None, tuple | None]:
        """``v^T df/dx`` and/or ``v^T df/dp`` (one tensor per parameter) in one backward pass.

        ``last``: no further product is expected at this point, so the graph's buffers are
        freed now (it is rebuilt should PETSc ask again).
        """
        pt = part.point
        xr, out = self._graph(part, pt)
        if v.dtype != out.dtype:
            v = v.to(out.dtype)
        inputs = ((xr,) if want_x else ()) + (self.params if want_p else ())
        if out.requires_grad:
            grads = _engine_grad(out, inputs, v if v.shape == out.shape else v.view(out.shape),
                                 not last)
        else:  # func depends on neither y nor the parameters: every block is zero
            grads = (None,) * len(inputs)
        if last:
            pt.graph = None
        self.counters.vjp += 1
        gx = grads[0] if want_x else None
        if want_x and gx is None:  # func does not depend on y (e.g. a forcing term)
            gx = torch.zeros_like(xr)
        if gx is not None and gx.dim() != 1:  # a shaped graph
            gx = gx.reshape(-1)
        gps = (grads[1:] if want_x else grads) if want_p else None
        if want_p and observers.active():
            observers.notify(observers.VjpEvent(
                func=part.func, t=pt.t, y=self._y(self._x(pt.x.detach())),
                cotangent=self._y(v.clone()),  # v views PETSc's work vector
                weight=pt.weight, params=self.params, param_grads=tuple(gps)))
        return gx, gps

    def _flat_params(self, gps: tuple) -> torch.Tensor:
        """Per-parameter gradients (``None``: unused) as one float64 vector."""
        parts = [(g if g is not None else torch.zeros_like(p)).reshape(-1)
                 for g, p in zip(gps, self.params, strict=True)]
        flat = torch.cat(parts) if len(parts) > 1 else parts[0]
        return flat if flat.dtype == torch.float64 else flat.to(torch.float64)

    def rhs_state_product(self, part: _Part, v: torch.Tensor, x: PETSc.Vec) -> torch.Tensor:
        """``v^T df/dx`` of the explicit part; the parameter product comes with it.

        The parameter product is either accumulated into the gradient with the stage's
        weight (:meth:`accumulate_params`) or kept for PETSc's parameter product with
        the same vector ``x``, which follows.  The product is flat or, for a shaped
        state, may be in its shape.
        """
        if self._shaped:  # v in the layout of the explicit part's graphs
            v = self.views.state(x)
        pg = self.param_grad
        if pg is not None and not observers.active():  # explicit RK: the common stage
            return self._rk_state_product(part, v, pg)
        want_p = self.n_params > 0
        gx, gps = self.vjp(part, v, want_x=True, want_p=want_p, last=True)
        if want_p:
            pt = part.point
            if self.param_grad is not None:
                self.param_grad.add(gps, pt.weight, self.params, v)
            else:
                pt.cached_v, pt.cached_gp = vec_key(x), self._flat_params(gps)
        return gx if gx.dtype == torch.float64 else gx.to(torch.float64)

    def _rk_state_product(self, part: _Part, v: torch.Tensor, pg: ParamGradient) -> torch.Tensor:
        """:meth:`vjp` for state and parameters at the last product of a point, inlined
        (the parameter product goes to ``pg`` with the stage's weight)."""
        pt = part.point
        xr, out = pt.graph if pt.graph is not None else self._graph(part, pt)
        if v.dtype != out.dtype:
            v = v.to(out.dtype)
        if out.requires_grad:  # (v and the graph are in the same layout)
            grads = _engine_grad(out, (xr, *self.params), v, False)
        else:  # func depends on neither y nor the parameters: every block is zero
            grads = (None,) * (1 + len(self.params))
        pt.graph = None  # the last product at this point: its graph's buffers go now
        self.counters.vjp += 1
        pg.add(grads[1:], pt.weight, self.params, v)
        gx = grads[0]
        if gx is None:  # func does not depend on y (e.g. a forcing term)
            gx = torch.zeros_like(xr)
        return gx if gx.dtype == torch.float64 else gx.to(torch.float64)

    def param_product(self, part: _Part, x: PETSc.Vec) -> torch.Tensor:
        """``v^T df/dp`` for the vector in ``x`` (the one kept from the state product if same)."""
        pt = part.point
        if pt.cached_v is not None and pt.cached_v == vec_key(x):
            return pt.cached_gp
        _, gps = self.vjp(part, self.views.read(x), want_x=False, want_p=True)
        return self._flat_params(gps)

    def jvp(self, part: _Part, v: torch.Tensor) -> torch.Tensor:
        """``J v`` at the part's linearisation point (two reverse passes, else forward mode)."""
        pt, v = part.point, v.to(self.spec.dtype)
        self.counters.jvp += 1
        tangent = self._jvps.product(pt, lambda: self._graph(part, pt), v)
        if tangent is not None:
            return tangent
        t = self._t(pt.t)

        def f(z):
            return self._flat(part.func(t, self._y(z)), part.name)

        x = self._x(pt.x)
        return torch.func.jvp(f, (x,), (v if v.shape == x.shape else v.view(x.shape),))[1]

    # -- parameter gradient accumulated on the torch side (explicit RK) ------------------
    def accumulate_params(self, on: bool) -> None:
        """Accumulate the parameter gradient here (:class:`ParamGradient`), not in PETSc."""
        if on and self.stage_weight is None:
            raise AssertionError("internal: accumulating parameters needs the RK stage weights")
        self.param_grad = ParamGradient() if on else None

    # -- PETSc callbacks: explicit right-hand side ----------------------------------------
    def rhs_function(self, ts, t, X, F):
        if self.skip(F):
            return
        try:
            self.counters.rhs += 1
            graphs = self.graphs
            if graphs is None or graphs.budget == 0:  # a zero budget keeps nothing: "stages"
                x = self.views.state(X) if self._shaped else self.views.read(X)
                if torch.is_grad_enabled():
                    with torch.no_grad():
                        out = self._explicit_value(t, x)
                else:  # as inside autograd's forward and backward
                    out = self._explicit_value(t, x)
                self._write_checked(self.explicit, t, out, F)
                return
            # keep the graph: the adjoint's vjp at this stage is then a backward pass only
            was = _grad_on()
            try:
                xc = self._explicit_view(X).clone()  # the state's copy the store compares
                # for float64 the graph's leaf is that copy itself
                xr = (xc if self._is64 else self._x(xc)).requires_grad_(True)
                if graphs.budget is not None and self._entry_bytes is None:
                    out, self._entry_bytes = graph_bytes(
                        lambda: self._explicit_value(t, xr), xr, self.params)
                    graphs.entry_bytes = self._entry_bytes
                else:
                    out = self._explicit_value(t, xr)
            finally:
                _set_grad(was)
            self._write_checked(self.explicit, t, out, F)
            graphs.keep(t, xc, xr, out)
        except BaseException as exc:
            self.failed(exc, t, F)

    def rhs_jacobian(self, ts, t, X, J, P):
        self._reset_shells("rhs_x")
        if self.skip(None):
            return
        try:
            pt = self._set_point(self.explicit, t, X)
            if self.param_grad is not None:  # the stage's weight scales its parameter product
                pt.weight = self.stage_weight(t, ts.getTime(), ts.getTimeStep())
        except BaseException as exc:
            self.failed(exc, t, None)

    def rhs_jacobian_p(self, ts, t, X, Jp):
        self._reset_shells("rhs_p")
        if self.skip(None):
            return
        try:
            pt = self._set_point(self.explicit, t, X)
            if self.stage_weight is not None and observers.active():
                pt.weight = self.stage_weight(t, ts.getTime(), ts.getTimeStep())
        except BaseException as exc:
            self.failed(exc, t, None)

    def zero_rhs(self, ts, t, X, F):
        F.zeroEntries()

    def noop_jacobian(self, ts, t, X, J, P):
        pass

    # -- PETSc callbacks: implicit form F(t, x, xdot) = xdot - f(t, x) ---------------------
    def ifunction(self, ts, t, X, Xdot, F):
        if self.skip(F):
            return
        try:
            self.counters.rhs += 1
            self.assembly.evals += 1
            if torch.is_grad_enabled():
                with torch.no_grad():
                    self._residual(t, X, Xdot, F)
            else:  # as inside autograd's forward and backward (saves a context, ~1 us)
                self._residual(t, X, Xdot, F)
        except BaseException as exc:
            self.failed(exc, t, F)

    def _residual(self, t: float, X: PETSc.Vec, Xdot: PETSc.Vec, F: PETSc.Vec) -> None:
        views = self.views
        f = self._eval(self.implicit, t, views.read(X))
        xdot = views.read(Xdot) if self.mass is None else self.mass.matvec(views.read(Xdot))
        torch.sub(xdot, f if self._is64 else f.to(torch.float64), out=views.write(F))

    def ijacobian(self, ts, t, X, Xdot, shift, J, P):
        self._reset_shells("ijac_x")
        if self.skip(None):
            return
        try:
            prev = self.implicit.point
            pt = self._set_point(self.implicit, t, X)
            self._ijac_shift = float(shift)
            if self.dense or self.jacobian == "blocks":
                # the graph is built only if a Jacobian is computed
                if self.assembly.request(ts, t, pt, float(shift), P,
                                         lambda: self._graph(self.implicit, pt), self.mass):
                    self.counters.jacobians += 1
            elif self.assembly.keeps(ts, t, float(shift)) and prev is not None:
                self.implicit.point = prev  # matrix-free: the operator stays where it was
        except BaseException as exc:
            self.failed(exc, t, None)

    def ijacobian_p(self, ts, t, X, Xdot, shift, Jp):
        self._reset_shells("ijac_p")
        if self.skip(None):
            return
        try:
            self._set_point(self.implicit, t, X)
            if self.mass is not None and self.mass.trainable:
                self.xdot = self.views.read(Xdot).clone()
        except BaseException as exc:
            self.failed(exc, t, None)

    def shifted(self, v: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``shift * M v`` (``M^T`` with ``transpose``) of the last IJacobian."""
        if self.mass is None:
            return self._ijac_shift * v
        return self._ijac_shift * self.mass.matvec(v, transpose)

    # -- shell matrix contexts ------------------------------------------------------------
    def shell(self, kind: str) -> ShellContext:
        ctx = ShellContext(self, kind)
        self.shells.setdefault(kind, []).append(ctx)
        return ctx

    def _reset_shells(self, kind: str) -> None:
        # A Jacobian callback hands PETSc a fresh operator: forget earlier MatScale/MatShift.
        for ctx in self.shells.get(kind, ()):
            ctx.alpha, ctx.beta = 1.0, 0.0
