"""Assembled Jacobians of an implicit ``func``: dense, or per-sample diagonal blocks.

Small implicit systems get their Jacobian ``df/dx`` assembled from batched
backward passes, and PETSc solves with it directly (LU), which keeps the
transposed adjoint solves exact.  A state whose first axis is a batch of
independent samples can instead assemble only the ``[B, d, d]`` diagonal blocks.
"""

from __future__ import annotations

import numpy as np
import torch
from petsc4py import PETSc

__all__ = ["Assembly", "DoubleVjp", "dense_jacobian", "block_jacobian", "engine_grad", "fill_dense",
           "fill_blocks"]


def engine_grad(out: torch.Tensor, inputs: tuple[torch.Tensor, ...], v: torch.Tensor,
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
    engine_grad = _public_grad  # noqa: F811


#: up to this many rows, one backward pass per row beats a batched (vmapped) backward,
#: whose set-up costs about as much as 30 small backward passes
ROW_LOOP_MAX = 24


def dense_jacobian(xr: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """df/dx of the graph ``out = f(xr)``, by backward passes over the identity.

    One pass per row for small systems, else one batched pass.  The graph is
    retained, so the parameter products PETSc asks for next at the same stage
    reuse it.
    """
    if not out.requires_grad:  # f independent of y (and the parameters): a zero block
        return torch.zeros(out.numel(), xr.numel(), dtype=torch.float64)
    eye = torch.eye(out.numel(), dtype=out.dtype)
    if out.numel() <= ROW_LOOP_MAX:
        return torch.stack([_row(out, xr, e) for e in eye]).to(torch.float64)
    try:
        (jac,) = torch.autograd.grad(out, xr, eye, retain_graph=True, is_grads_batched=True,
                                     allow_unused=True)
    except RuntimeError:  # an op without a batching rule: one vjp per row
        jac = torch.stack([_row(out, xr, e) for e in eye])
    if jac is None:  # out depends on t or the parameters only
        return torch.zeros(out.numel(), xr.numel(), dtype=torch.float64)
    return jac.to(torch.float64)


def _row(out: torch.Tensor, xr: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    (g,) = engine_grad(out, (xr,), e, True)
    return torch.zeros_like(xr) if g is None else g


def block_jacobian(xr: torch.Tensor, out: torch.Tensor, batch: int, check: bool) -> torch.Tensor:
    """Per-sample blocks ``[B, d, d]`` of df/dx, by d batched backward passes.

    Valid when func treats the samples of the first axis independently (no batch
    statistics); with ``check`` that is verified against one full vjp.

    Raises
    ------
    ValueError
        ``check`` found the samples coupled.
    """
    d = out.numel() // batch
    seeds = torch.eye(d, dtype=out.dtype).unsqueeze(1).expand(d, batch, d).reshape(d, -1)
    rows = None
    if out.requires_grad:
        (rows,) = torch.autograd.grad(out, xr, seeds, retain_graph=True, is_grads_batched=True,
                                      allow_unused=True)
    if rows is None:  # f independent of y: zero blocks (nothing to couple the samples)
        return torch.zeros(batch, d, d, dtype=torch.float64)
    blocks = rows.reshape(d, batch, d).transpose(0, 1).to(torch.float64)  # [B, i, j] = df_i/dx_j
    if check:
        v = torch.randn(out.numel(), dtype=out.dtype)
        (full,) = torch.autograd.grad(out, xr, v, retain_graph=True)
        approx = torch.einsum("bij,bi->bj", blocks, v.reshape(batch, d).to(torch.float64))
        err = float((approx.reshape(-1) - full.to(torch.float64)).norm())
        if err > 1e-8 * max(float(full.norm()), 1e-300):
            raise ValueError(
                "options['jacobian']='blocks' needs a func that treats the samples of the "
                "state's first axis independently, but this func couples them (e.g. batch "
                "statistics); use jacobian='dense' or 'matfree'")
    return blocks


def fill_dense(P: PETSc.Mat, jac: torch.Tensor, shift: float, mass=None) -> None:
    """Assemble ``shift * M - df/dx`` (``M``: the identity, or a ``dae.Mass``) into dense ``P``."""
    A = torch.from_numpy(P.getDenseArray())  # column-major view of the local dense block
    A.copy_(-jac)
    if mass is None:
        A.diagonal().add_(shift)
    else:
        mass.add_shifted(A, shift)
    P.assemble()


def fill_blocks(P: PETSc.Mat, blocks: torch.Tensor, shift: float) -> None:
    """Assemble ``shift * I - blocks`` into the block-diagonal BAIJ matrix ``P``."""
    batch = blocks.shape[0]
    blocks = -blocks
    blocks.diagonal(dim1=1, dim2=2).add_(shift)
    it = PETSc.IntType
    P.setValuesBlockedCSR(np.arange(batch + 1, dtype=it), np.arange(batch, dtype=it),
                          blocks.reshape(-1).numpy())
    P.assemble()


class Assembly:
    """When the assembled implicit Jacobian ``P = shift * M - df/dx`` is computed again.

    - **The same point again** (``(t, x)`` bit for bit that of the last computed
      Jacobian): its Jacobian and graph are reused, ``P`` refilled with the new shift.
      PETSc's theta adjoints ask twice per step at a point asked before (the
      Crank-Nicolson one at both ends of every step), so this halves their Jacobians,
      with the same gradients bit for bit.  (An ARK step's end and the next step's
      first stage coincide only where PETSc's update reproduces the last stage exactly.)
    - **A new stage of the same forward step** (``reuse_stages``, i.e. a
      ``jacobian_lag`` above 1): the stage solves of one step share the shift
      ``1 / (h a_ii)`` (ESDIRK), so the Jacobian the last stage solve used serves the
      next one too (modified Newton across the stages, as ``jacobian_lag`` already does
      within each stage) if that solve converged quickly with it (at most
      ``KEEP_MAX_EVALS`` residuals, i.e. four Newton iterations): a Jacobian gone stale
      is replaced before it slows Newton down or makes it fail.  Newton still converges
      to its tolerances, and the adjoint, whose time step PETSc makes negative, always
      gets the exact Jacobian of each stage.  A new step attempt (other time, step size
      or shift) computes a fresh one.  The matrix-free operator follows the same rule
      (it stays at its linearisation point), so dense and Krylov solves take the same
      Newton iterations.

    Parameters
    ----------
    dense : bool
        Dense (else per-sample diagonal blocks, :func:`block_jacobian`).
    batch : int
        Samples of the state's first axis (blocks).
    reuse_stages : bool
        Pass a forward step's Jacobian on from one stage solve to the next.
    """

    #: a stage solve that evaluated at most this many residuals (the first one and four
    #: Newton iterations) passes its Jacobian on to the next stage.  ROBER, Van der Pol
    #: (mu = 1000) and MLP fields, adaptive and fixed steps, kencarp3/4/5, sdirk2, trbdf2:
    #: no solve fails that did not before, steps and rejections within a few, 2-10x fewer
    #: forward Jacobians (measured against recomputing at every stage).
    KEEP_MAX_EVALS = 5

    def __init__(self, dense: bool, batch: int, reuse_stages: bool) -> None:
        self.dense, self.batch, self.reuse_stages = dense, batch, reuse_stages
        self.checked = False  # blocks: the samples were found independent once
        self.reset()

    def reset(self) -> None:
        """Forget everything held (a new sweep; the parameters may have changed)."""
        self.held = None  # (point, Jacobian) of the last computed Jacobian
        self.step: tuple[float, float, float] | None = None  # step attempt P holds
        self.stage_t: float | None = None  # stage time of the last request
        self.evals = 0  # residual evaluations since the last request

    def keeps(self, ts, t: float, shift: float) -> bool:
        """Whether ``P`` stays as it is for this request (a new stage of the same step)."""
        h = ts.getTimeStep()
        step = (ts.getTime(), h, shift)
        # within one stage solve SNES's own lag decides; h < 0: an adjoint step
        keep = (self.reuse_stages and h > 0 and step == self.step and t != self.stage_t
                and self.evals <= self.KEEP_MAX_EVALS)
        self.stage_t = t
        self.step = step
        self.evals = 0
        return keep

    def same_point(self, pt) -> torch.Tensor | None:
        """The held Jacobian if ``pt`` is its point again (its graph then moves to ``pt``)."""
        held = self.held
        if held is None or held[0].t != pt.t or not torch.equal(held[0].x, pt.x):
            return None
        if pt.graph is None:
            pt.graph = held[0].graph
        return held[1]

    def request(self, ts, t: float, pt, shift: float, P: PETSc.Mat, graph, mass=None) -> bool:
        """Fill ``P`` for PETSc's request at ``pt``: kept, refilled or computed (``True``).

        ``graph()`` gives the graph ``(xr, out)`` of ``out = f(xr)`` at ``pt``.
        """
        if self.keeps(ts, t, shift):
            return False
        jac = self.same_point(pt)
        computed = jac is None
        if computed:
            xr, out = graph()
            if self.dense:
                jac = dense_jacobian(xr, out)
            else:
                jac = block_jacobian(xr, out, self.batch, not self.checked)
                self.checked = True
            self.held = (pt, jac)
        self.fill(P, jac, shift, mass)
        return computed

    def fill(self, P: PETSc.Mat, jac: torch.Tensor, shift: float, mass=None) -> None:
        """Assemble ``shift * M - jac`` into ``P``."""
        if self.dense:
            fill_dense(P, jac, shift, mass)
        else:
            fill_blocks(P, jac, shift)


class DoubleVjp:
    """Jacobian-vector products ``J v`` at one linearisation point by two reverse passes.

    ``g(u) = J^T u`` is built once per point, as a graph (a backward pass with
    ``create_graph``); then ``J v`` is the gradient of ``g . v`` with respect to ``u``,
    one small backward pass per product.  On small systems that is some 20x cheaper
    than ``torch.func.jvp`` (whose functorch set-up costs ~0.5 ms a call): the
    matrix-free Newton-Krylov products of small DAEs and stiff systems.  The product is
    the same Jacobian-vector product (in the tests, bit for bit that of forward mode).
    A ``func`` whose backward is not differentiable again (``once_differentiable``) makes
    :meth:`product` answer ``None`` from then on: the caller then uses forward mode.
    """

    def __init__(self) -> None:
        self.broken = False
        self.reset()

    def reset(self) -> None:
        """Drop the graph of ``g`` (the point it belongs to is gone)."""
        self.point, self.u, self.g = None, None, None

    def product(self, point, graph, v: torch.Tensor) -> torch.Tensor | None:
        """``J v`` at ``point`` (``graph()`` gives its graph ``(xr, out)``), or ``None``."""
        if self.broken:
            return None
        jv = None
        try:
            if self.point is not point:
                self._build(point, graph)
            if self.g is None:  # f does not depend on y: J = 0
                return torch.zeros_like(v)
            # the graph may be in the state's shape (the explicit part's) while v is flat
            (jv,) = engine_grad(self.g, (self.u,), v.view(self.g.shape), True)
            jv = jv.reshape(v.shape) if jv is not None else None
        except RuntimeError:  # e.g. an op whose backward is once_differentiable
            pass
        if jv is None:  # a backward that is not differentiable in its seed: forward mode
            self.broken = True
            self.reset()
        return jv

    def _build(self, point, graph) -> None:
        self.reset()
        xr, out = graph()
        g = None
        if out.requires_grad:
            with torch.enable_grad():
                u = torch.zeros_like(out, requires_grad=True)  # g is linear in u: any value
                (g,) = torch.autograd.grad(out, xr, u, create_graph=True, allow_unused=True)
            if g is not None and not g.requires_grad:
                raise RuntimeError("the backward of func is not differentiable")
            self.u = u
        self.point, self.g = point, g
