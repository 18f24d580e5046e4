"""Python contexts of the MATSHELL operators PETSc multiplies with (the Jacobians of ``func``).

No Jacobian of an explicit method is ever formed: PETSc's ``MatMultTranspose``
is answered by a torch vector-Jacobian product at the linearisation point that
the last Jacobian callback of :class:`~pnode.adjoint.problem.TorchProblem` set,
``MatMult`` by a Jacobian-vector product.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .problem import TorchProblem

__all__ = ["ShellContext"]


class ShellContext:
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

    def _finish(self, x, out: torch.Tensor) -> None:
        if self.alpha != 1.0 or self.beta != 0.0:
            out.mul_(self.alpha)
            if self.beta != 0.0:  # only square (state) operators are ever shifted
                views = self.prob.views
                out.add_(views.read(x) if out.dim() == 1 else views.state(x), alpha=self.beta)

    def _time(self) -> float:
        return self.part.point.t if self.part.point else 0.0

    def _apply(self, product, x, y) -> None:
        """Write one operator product into ``y``.

        The zero operator writes zeros; after a failure recorded earlier in this
        solve nothing is evaluated; an exception is recorded for the solver.
        """
        prob = self.prob
        if self.kind == "zero":
            y.zeroEntries()
            return
        if prob.skip(y):
            return
        try:
            product(x, y)
        except BaseException as exc:
            prob.failed(exc, self._time(), y)

    def mult(self, mat, x, y):
        self._apply(self._forward_product, x, y)

    def multTranspose(self, mat, x, y):
        self._apply(self._state_product if self.kind in ("rhs_x", "ijac_x") else self._param_product,
                    x, y)

    def _forward_product(self, x, y) -> None:
        prob = self.prob
        v = prob.views.read(x)
        if self.kind == "rhs_x":
            out = prob.jvp(self.part, v)
        elif self.kind == "ijac_x":
            out = prob.shifted(v) - prob.jvp(self.part, v).to(torch.float64)
        else:
            raise NotImplementedError(f"forward product with the {self.kind} Jacobian")
        res = prob.views.write(y)
        res.copy_(out)
        self._finish(x, res)

    def _state_product(self, x, y) -> None:
        prob, part = self.prob, self.part
        v = prob.views.read(x)
        if self.kind == "rhs_x":
            # TSRK asks for the parameter product with the same vector right after the state
            # product: both come from one backward pass (with the stage weight known, the
            # problem accumulates the parameter gradient itself and PETSc does not ask).
            gx = prob.rhs_state_product(part, v, x)
            # (a shaped state's product may come in its shape: no reshape per stage)
            out = prob.views.write(y) if gx.dim() == 1 else prob.views.write_state(y)
            out.copy_(gx)
        else:
            # inside a transposed Krylov solve only the state product is needed
            gx, _ = prob.vjp(part, v, want_x=True, want_p=False)
            out = prob.views.write(y)
            torch.sub(prob.shifted(v, transpose=True), gx.to(torch.float64), out=out)
        self._finish(x, out)

    def _param_product(self, x, y) -> None:
        prob, part = self.prob, self.part
        gp = prob.param_product(part, x)
        out = prob.views.write(y)
        if self.kind == "rhs_p":
            out.copy_(gp)
        else:
            torch.neg(gp, out=out)
            if prob.mass is not None and prob.mass.trainable:  # dF/dM = y' (last block)
                k = prob.params[-1].numel()
                out[out.numel() - k:].add_(prob.mass.param_grad(prob.views.read(x), prob.xdot))
        self._finish(x, out)
