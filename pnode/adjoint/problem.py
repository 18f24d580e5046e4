"""The torch <-> PETSc boundary: the callbacks PETSc calls during TSSolve/TSAdjointSolve.

This is the only module that reads or writes PETSc ``Vec`` memory from torch.
Vectors are viewed zero-copy through DLPack.  Jacobians are never formed for
explicit methods: PETSc's ``MatMultTranspose`` on the state and parameter
Jacobians is answered by one torch vector-Jacobian product at the
linearisation point (shared by both matrices, so a stage costs one backward
pass).  Forward-mode products (Newton's ``J v``) use ``torch.func.jvp``; small
implicit systems get a dense Jacobian and a direct solve, which keeps the
transposed adjoint solves exact.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from petsc4py import PETSc

from . import observers
from .state import StateSpec

__all__ = ["TorchProblem", "vec_view"]


def vec_view(vec: PETSc.Vec, mode: str = "r") -> torch.Tensor:
    """A torch view of a PETSc Vec's local memory (no copy)."""
    return torch.from_dlpack(vec.toDLPack(mode))


@dataclass
class Counters:
    """Evaluation counts of one solve (forward and adjoint)."""

    rhs: int = 0
    jvp: int = 0
    vjp: int = 0
    jacobians: int = 0
    graph_hits: int = 0


def _vec_key(vec: PETSc.Vec) -> tuple[int, int]:
    """Identity of a Vec's current contents: PETSc bumps the state on every write access."""
    return vec.handle, vec.stateGet()


def _engine_grad(out: torch.Tensor, inputs: tuple[torch.Tensor, ...], v: torch.Tensor,
                 retain: bool) -> tuple[torch.Tensor | None, ...]:
    """``torch.autograd.grad(out, inputs, v, retain_graph=retain, allow_unused=True)``.

    Calls the autograd engine directly: the public wrapper re-validates shapes and
    dtypes on every call, which costs about 30 us, as much as the backward pass of a
    small network, on a path taken once per stage.  Shapes and dtypes are checked
    by the engine (``out`` is flat and ``v`` has its shape and dtype).
    """
    return _ENGINE.run_backward((out,), (v,), retain, False, inputs, True, False)


def _public_grad(out, inputs, v, retain):
    return torch.autograd.grad(out, inputs, v, retain_graph=retain, allow_unused=True)


_ENGINE = getattr(torch.autograd.Variable, "_execution_engine", None)
if _ENGINE is None or not hasattr(_ENGINE, "run_backward"):  # a torch without it
    _engine_grad = _public_grad  # noqa: F811


def _all_finite(flat: torch.Tensor) -> bool:
    # One reduction instead of an elementwise isfinite pass (5x cheaper on the hot path);
    # a non-finite sum is re-checked element by element (finite values can overflow it).
    flat = flat.detach()
    return math.isfinite(float(flat.sum())) or bool(torch.isfinite(flat).all())


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
        self.weight: float | None = None  # quadrature weight of the stage (observers only)


@dataclass
class _Part:
    """One right-hand side term (the whole func, or one half of an IMEX split)."""

    func: Callable
    name: str
    point: _LinPoint | None = None
    last_point: _LinPoint | None = field(default=None, repr=False)


class TorchProblem:
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
        self._blocks_checked = False
        self.explicit = _Part(explicit, "func") if explicit is not None else None
        self.implicit = (
            _Part(implicit, "IMEX implicit func" if explicit is not None else "func")
            if implicit is not None
            else None
        )
        self.counters = Counters()
        # weight(t_stage, ptime, h) of an explicit RK stage in the adjoint (set by the solver)
        self.stage_weight: Callable[[float, float, float], float | None] | None = None
        # checkpoint="graph": forward graphs [(t, x, x_leaf, out), ...] keyed by sum(x) (a
        # cheap fingerprint; a hit is confirmed by comparing x).  Not keyed by t: the adjoint
        # computes stage times with different rounding.
        self.graphs: dict[float, list[tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]]] | None \
            = None
        self._graph_budget: float | None = None  # bytes; None: keep every graph
        self._graph_fifo: deque = deque()
        self._graph_bytes = 0
        self._entry_bytes: int | None = None  # memory one kept evaluation holds
        self.error: BaseException | None = None  # first exception raised inside a callback
        self.error_t: float | None = None
        # Collective (MPI) solves: a failing callback must not raise into PETSc while the
        # other ranks wait in a collective; it records the error and returns NaN instead.
        self.collective = False
        self._ijac_shift = 0.0
        self.shells: dict[str, list[_ShellContext]] = {}
        # mass matrix of M y' = f (pnode.adjoint.dae.Mass; None: the identity), bound per call
        self.mass = None
        self._xdot: torch.Tensor | None = None  # y' of the last IJacobianP (trainable mass)

    # -- evaluation helpers -------------------------------------------------------------
    def _t(self, t: float) -> torch.Tensor:
        # A fresh tensor per call: caching them by time saved 3 us per call but scattered
        # thousands of long-lived small blocks through the heap (+60 MiB resident).
        return torch.tensor(t, dtype=self.spec.dtype)

    def _x(self, flat64: torch.Tensor) -> torch.Tensor:
        return flat64 if self.spec.dtype == torch.float64 else flat64.to(self.spec.dtype)

    def _eval(self, part: _Part, t: float, x: torch.Tensor) -> torch.Tensor:
        out = part.func(self._t(t), self.spec.unflatten(self._x(x)))
        flat = self.spec.check_output(out, part.name)
        if not _all_finite(flat):
            raise FloatingPointError(f"{part.name} returned NaN or Inf at t={t:.6g}")
        return flat

    def _guard(self, t: float, fn: Callable[[], None], out: PETSc.Vec | None = None) -> None:
        """Run a callback body; remember the first exception so the solver can re-raise it.

        In a collective solve the exception is not raised into PETSc: ``out`` is filled
        with NaN (and so is every later output) and the solver's agreement step after
        the solve raises it on every rank.
        """
        if self.collective and self.error is not None:
            if out is not None:
                out.set(float("nan"))
            return
        try:
            fn()
        except BaseException as exc:
            if self.error is None:
                self.error, self.error_t = exc, t
            if not self.collective:
                raise
            if out is not None:
                out.set(float("nan"))

    def reset_error(self) -> None:
        self.error = None
        self.error_t = None

    def keep_graphs(self, on: bool, memory_mib: float | None = None) -> None:
        """Start (``on``) or stop keeping the forward sweep's graphs (``"graph"`` policy).

        With ``memory_mib``, the graphs of the earliest evaluations are dropped once the
        kept ones would exceed it; the adjoint re-evaluates those stages.
        """
        self.graphs = {} if on else None
        self._graph_budget = None if memory_mib is None else memory_mib * 2**20
        self._graph_fifo.clear()
        self._graph_bytes = 0

    def _keep_graph(self, t: float, xc: torch.Tensor, xr: torch.Tensor, out: torch.Tensor) -> None:
        key = float(xc.sum())
        entry = (t, xc, xr, out)
        self.graphs.setdefault(key, []).append(entry)
        if self._graph_budget is None:
            return
        self._graph_fifo.append((key, entry))
        self._graph_bytes += self._entry_bytes
        while self._graph_bytes > self._graph_budget and self._graph_fifo:
            k, old = self._graph_fifo.popleft()
            self._graph_bytes -= self._entry_bytes
            entries = self.graphs.get(k, [])
            for i, e in enumerate(entries):
                if e is old:
                    del entries[i]
                    break
            if not entries:
                self.graphs.pop(k, None)

    def _measure_entry(self, t: float, xr: torch.Tensor) -> torch.Tensor:
        """Evaluate f at a kept point, counting the bytes its graph holds (first time only)."""
        storages: dict[int, int] = {}
        skip = {p.untyped_storage().data_ptr() for p in self.params}

        def pack(tensor):
            st = tensor.untyped_storage()
            if st.data_ptr() not in skip:
                storages[st.data_ptr()] = st.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = self._eval(self.explicit, t, xr)
        storages[xr.untyped_storage().data_ptr()] = xr.untyped_storage().nbytes()
        storages.setdefault(out.untyped_storage().data_ptr(), out.untyped_storage().nbytes())
        self._entry_bytes = sum(storages.values())
        return out

    def forget_points(self) -> None:
        """Drop cached linearisation points (their Vec keys are only valid within one sweep)."""
        for part in (self.explicit, self.implicit):
            if part is not None:
                part.point = part.last_point = None

    def _pop_graph(self, x: torch.Tensor):
        """The forward graph of f at x, if the forward kept one (``"graph"`` policy)."""
        key = float(x.sum())
        entries = self.graphs.get(key)
        if entries:
            for i in range(len(entries) - 1, -1, -1):
                if torch.equal(entries[i][1], x):
                    hit = entries.pop(i)
                    if not entries:
                        del self.graphs[key]
                    return hit
        return None

    # -- linearisation points and products ----------------------------------------------
    def _set_point(self, part: _Part, t: float, X: PETSc.Vec) -> _LinPoint:
        key = (t, *_vec_key(X))
        last = part.last_point
        # J and Jp are requested at the same (t, Y) for each stage: share one graph.
        if last is not None and last.key == key:
            part.point = last
            return last
        x = vec_view(X)
        hit = self._pop_graph(x) if self.graphs is not None else None
        if hit is not None:  # the forward evaluated f here: reuse its graph (and its time)
            pt = _LinPoint(hit[0], hit[1], key)
            pt.graph = (hit[2], hit[3])
            self.counters.graph_hits += 1
        else:
            pt = _LinPoint(t, x.clone(), key)
        part.point = part.last_point = pt
        return pt

    def _graph(self, part: _Part, pt: _LinPoint):
        if pt.graph is None:
            with torch.enable_grad():
                xr = self._x(pt.x).detach().requires_grad_(True)
                out = self.spec.check_output(
                    part.func(self._t(pt.t), self.spec.unflatten(xr)), part.name
                )
            pt.graph = (xr, out)
        return pt.graph

    def _vjp(self, part: _Part, v: torch.Tensor, *, want_x: bool, want_p: bool,
             last: bool = False):
        """``v^T df/dx`` and/or ``v^T df/dp`` at the current point, in one backward pass.

        ``last``: no further product is expected at this point, so the graph's buffers are
        freed now (it is rebuilt should PETSc ask again).
        """
        pt = part.point
        xr, out = self._graph(part, pt)
        inputs = ((xr,) if want_x else ()) + (self.params if want_p else ())
        if out.requires_grad:
            grads = _engine_grad(out, inputs, v.to(out.dtype), not last)
        else:  # func depends on neither y nor the parameters: every block is zero
            grads = (None,) * len(inputs)
        if last:
            pt.graph = None
        self.counters.vjp += 1
        gx = grads[0] if want_x else None
        if want_x and gx is None:  # func does not depend on y (e.g. a forcing term)
            gx = torch.zeros_like(xr)
        gps = grads[1:] if want_x else grads
        gp = None
        if want_p and self.n_params:
            gp = torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).reshape(-1).to(torch.float64)
                    for g, p in zip(gps, self.params, strict=True)
                ]
            )
        if want_p and observers.active():
            unflat = self.spec.unflatten
            observers.notify(observers.VjpEvent(
                func=part.func, t=pt.t, y=unflat(self._x(pt.x)),
                cotangent=unflat(v.to(out.dtype).clone()),  # v views PETSc's work vector
                weight=pt.weight, params=self.params, param_grads=tuple(gps)))
        return gx, gp

    def _jvp(self, part: _Part, v: torch.Tensor) -> torch.Tensor:
        pt = part.point
        t = self._t(pt.t)

        def f(z):
            return self.spec.check_output(part.func(t, self.spec.unflatten(z)), part.name)

        _, tangent = torch.func.jvp(f, (self._x(pt.x),), (v.to(self.spec.dtype),))
        self.counters.jvp += 1
        return tangent

    def _dense_jacobian(self, part: _Part, pt: _LinPoint) -> torch.Tensor:
        """df/dx at the point, by one batched backward pass over the identity.

        The forward graph is kept on the point, so the parameter products PETSc
        asks for next at the same stage reuse it.
        """
        xr, out = self._graph(part, pt)
        self.counters.jacobians += 1
        zero = torch.zeros(self.n, self.n, dtype=torch.float64)
        if not out.requires_grad:  # f independent of y: a zero block, not an autograd error
            return zero
        eye = torch.eye(self.n, dtype=out.dtype)
        try:
            (jac,) = torch.autograd.grad(out, xr, eye, retain_graph=True, is_grads_batched=True,
                                         allow_unused=True)
        except RuntimeError:  # an op without a batching rule: one vjp per row
            rows = [torch.autograd.grad(out, xr, e, retain_graph=True, allow_unused=True)[0]
                    for e in eye]
            jac = None if rows[0] is None else torch.stack(rows)
        if jac is None:  # out depends on the parameters or t only
            return zero
        return jac.to(torch.float64)

    def _block_jacobian(self, part: _Part, pt: _LinPoint) -> torch.Tensor:
        """Per-sample blocks ``[B, d, d]`` of df/dx, by d batched backward passes.

        Valid when func treats the samples of the first axis independently (no
        batch statistics); that is checked once per solver against a full vjp.
        """
        xr, out = self._graph(part, pt)
        B, d = self.batch, self.block
        seeds = torch.eye(d, dtype=out.dtype).unsqueeze(1).expand(d, B, d).reshape(d, -1)
        rows = None
        if out.requires_grad:
            (rows,) = torch.autograd.grad(out, xr, seeds, retain_graph=True, is_grads_batched=True,
                                          allow_unused=True)
        if rows is None:  # f independent of y: zero blocks
            self.counters.jacobians += 1
            self._blocks_checked = True
            return torch.zeros(B, d, d, dtype=torch.float64)
        blocks = rows.reshape(d, B, d).transpose(0, 1).to(torch.float64)  # [B, i, j] = df_i/dx_j
        self.counters.jacobians += 1
        if not self._blocks_checked:
            v = torch.randn(self.n, dtype=out.dtype)
            (full,) = torch.autograd.grad(out, xr, v, retain_graph=True)
            approx = torch.einsum("bij,bi->bj", blocks, v.reshape(B, d).to(torch.float64))
            err = float((approx.reshape(-1) - full.to(torch.float64)).norm())
            if err > 1e-8 * max(float(full.norm()), 1e-300):
                raise ValueError(
                    "options['jacobian']='blocks' needs a func that treats the samples of the "
                    "state's first axis independently, but this func couples them (e.g. batch "
                    "statistics); use jacobian='dense' or 'matfree'")
            self._blocks_checked = True
        return blocks

    @property
    def _block_csr(self):
        it = PETSc.IntType
        return np.arange(self.batch + 1, dtype=it), np.arange(self.batch, dtype=it)

    # -- PETSc callbacks: explicit right-hand side ----------------------------------------
    def rhs_function(self, ts, t, X, F):
        def body():
            self.counters.rhs += 1
            x = vec_view(X)
            if self.graphs is None:
                with torch.no_grad():
                    vec_view(F, "w").copy_(self._eval(self.explicit, t, x))
                return
            if self._graph_budget == 0:  # a zero budget keeps nothing: "stages"
                with torch.no_grad():
                    vec_view(F, "w").copy_(self._eval(self.explicit, t, x))
                return
            # keep the graph: the adjoint's vjp at this stage is then a backward pass only
            with torch.enable_grad():
                xc = x.clone()
                xr = self._x(xc).detach().requires_grad_(True)
                if self._graph_budget is not None and self._entry_bytes is None:
                    out = self._measure_entry(t, xr)
                else:
                    out = self._eval(self.explicit, t, xr)
            self._keep_graph(t, xc, xr, out)
            vec_view(F, "w").copy_(out.detach())

        self._guard(t, body, F)

    def rhs_jacobian(self, ts, t, X, J, P):
        self._reset_shells("rhs_x")
        self._guard(t, lambda: self._set_point(self.explicit, t, X))

    def rhs_jacobian_p(self, ts, t, X, Jp):
        self._reset_shells("rhs_p")

        def body():
            pt = self._set_point(self.explicit, t, X)
            if self.stage_weight is not None and observers.active():
                pt.weight = self.stage_weight(t, ts.getTime(), ts.getTimeStep())

        self._guard(t, body)

    def zero_rhs(self, ts, t, X, F):
        F.zeroEntries()

    def noop_jacobian(self, ts, t, X, J, P):
        pass

    # -- PETSc callbacks: implicit form F(t, x, xdot) = xdot - f(t, x) ---------------------
    def ifunction(self, ts, t, X, Xdot, F):
        def body():
            self.counters.rhs += 1
            with torch.no_grad():
                f = self._eval(self.implicit, t, vec_view(X))
                xdot = vec_view(Xdot) if self.mass is None else self.mass.matvec(vec_view(Xdot))
                torch.sub(xdot, f.to(torch.float64), out=vec_view(F, "w"))

        self._guard(t, body, F)

    def ijacobian(self, ts, t, X, Xdot, shift, J, P):
        self._reset_shells("ijac_x")

        def body():
            pt = self._set_point(self.implicit, t, X)
            self._ijac_shift = float(shift)
            if self.dense:
                jac = self._dense_jacobian(self.implicit, pt)
                a = P.getDenseArray()  # column-major view of the local dense block
                A = torch.from_numpy(a)
                A.copy_(-jac)
                if self.mass is None:
                    A.diagonal().add_(float(shift))
                else:
                    self.mass.add_shifted(A, float(shift))
                P.assemble()
            elif self.jacobian == "blocks":
                blocks = -self._block_jacobian(self.implicit, pt)
                blocks.diagonal(dim1=1, dim2=2).add_(float(shift))
                P.setValuesBlockedCSR(self._block_csr[0], self._block_csr[1],
                                      blocks.reshape(-1).numpy())
                P.assemble()

        self._guard(t, body)

    def ijacobian_p(self, ts, t, X, Xdot, shift, Jp):
        self._reset_shells("ijac_p")

        def body():
            self._set_point(self.implicit, t, X)
            if self.mass is not None and self.mass.trainable:
                self._xdot = vec_view(Xdot).clone()

        self._guard(t, body)

    def _shifted(self, v: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``shift * M v`` (``M^T`` with ``transpose``) of the last IJacobian."""
        if self.mass is None:
            return self._ijac_shift * v
        return self._ijac_shift * self.mass.matvec(v, transpose)

    # -- shell matrix contexts ------------------------------------------------------------
    def shell(self, kind: str) -> _ShellContext:
        ctx = _ShellContext(self, kind)
        self.shells.setdefault(kind, []).append(ctx)
        return ctx

    def _reset_shells(self, kind: str) -> None:
        # A Jacobian callback hands PETSc a fresh operator: forget earlier MatScale/MatShift.
        for ctx in self.shells.get(kind, ()):
            ctx.alpha, ctx.beta = 1.0, 0.0


class _ShellContext:
    """Python context of a MATSHELL; ``kind`` names which Jacobian it represents.

    kinds: ``"rhs_x"`` (df/dx of the explicit part), ``"rhs_p"`` (df/dp),
    ``"ijac_x"`` (shift*I - df/dx of the implicit part), ``"ijac_p"`` (-df/dp),
    ``"zero"`` (the zero explicit part of a fully implicit ARK method).
    """

    def __init__(self, prob: TorchProblem, kind: str) -> None:
        self.prob = prob
        self.kind = kind
        self.part = prob.explicit if kind.startswith("rhs") else prob.implicit
        # PETSc may scale and shift an operator in place (e.g. TSTHETA forms
        # shift*I - J from an RHS Jacobian): the shell represents alpha*A + beta*I.
        self.alpha, self.beta = 1.0, 0.0

    def scale(self, mat, a):
        self.alpha *= a
        self.beta *= a

    def shift(self, mat, a):
        self.beta += a

    def _finish(self, x, y):
        if self.alpha != 1.0 or self.beta != 0.0:
            out = vec_view(y, "w")
            out.mul_(self.alpha)
            if self.beta != 0.0:  # only square (state) operators are ever shifted
                out.add_(vec_view(x), alpha=self.beta)

    def mult(self, mat, x, y):
        prob = self.prob
        if self.kind == "zero":
            y.zeroEntries()
            return

        def body():
            v = vec_view(x)
            if self.kind == "rhs_x":
                out = prob._jvp(self.part, v)
            elif self.kind == "ijac_x":
                out = prob._shifted(v) - prob._jvp(self.part, v).to(torch.float64)
            else:
                raise NotImplementedError(f"forward product with the {self.kind} Jacobian")
            vec_view(y, "w").copy_(out)
            self._finish(x, y)

        prob._guard(self.part.point.t if self.part.point else 0.0, body, y)

    def multTranspose(self, mat, x, y):
        prob = self.prob
        part = self.part
        if self.kind == "zero":
            y.zeroEntries()
            return

        def body():
            v = vec_view(x)
            pt = part.point
            if self.kind in ("rhs_x", "ijac_x"):
                # TSRK asks for the parameter product with the same vector right after the
                # state product: compute both in one backward pass and keep the former.
                # (Inside a transposed Krylov solve only the state product is needed.)
                combine = self.kind == "rhs_x" and prob.n_params > 0
                gx, gp = prob._vjp(part, v, want_x=True, want_p=combine,
                                   last=self.kind == "rhs_x")
                if combine:
                    pt.cached_v, pt.cached_gp = _vec_key(x), gp
                gx = gx.to(torch.float64)
                out = vec_view(y, "w")
                if self.kind == "rhs_x":
                    out.copy_(gx)
                else:
                    torch.sub(prob._shifted(v, transpose=True), gx, out=out)
            else:
                if pt.cached_v is not None and pt.cached_v == _vec_key(x):
                    gp = pt.cached_gp
                else:
                    _, gp = prob._vjp(part, v, want_x=False, want_p=True)
                out = vec_view(y, "w")
                if self.kind == "rhs_p":
                    out.copy_(gp)
                else:
                    torch.neg(gp, out=out)
                    if prob.mass is not None and prob.mass.trainable:  # dF/dM = y' (last block)
                        k = prob.params[-1].numel()
                        out[out.numel() - k:].add_(prob.mass.param_grad(v, prob._xdot))
            self._finish(x, y)

        prob._guard(part.point.t if part.point else 0.0, body, y)
