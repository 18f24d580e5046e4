"""The parameter gradient of explicit RK adjoint sweeps, accumulated on the torch side."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["ParamGradient"]


class ParamGradient:
    """The parameter gradient of explicit RK adjoint sweeps, accumulated on the torch side.

    PETSc's RK adjoint adds, per stage, its parameter product scaled by ``-h b_i``
    (``-h`` where ``b_i = 0``) to the parameter cost gradient.  With that scale known
    (the solver's ``stage_weight``), the same two floating-point operations (scale,
    then add) are done here, bit for bit, on the product that the state product's
    backward pass yields anyway; the solver then leaves the parameter gradient out
    of PETSc, which saves a JacobianP and a parameter-product callback per stage.
    The sum lives in one flat float64 buffer (kept across sweeps), seen per
    parameter through views.

    Float64 products of consecutive stages are batched (up to :data:`BATCH` stages,
    :data:`PENDING_ENTRIES` entries): stacked, scaled by their weights in one
    product, and added in stage order by one cumulative sum (a sequential sum along
    the stages: each entry sees the same additions, in the same order, as stage by
    stage).  A few operators per batch instead of several per stage.
    """

    BATCH = 16
    PENDING_ENTRIES = 2**14  # at most this many held entries (stages x parameters): past
    # that, batches run out of cache and cost more than they save (an MLP 32-128-32: 1.1x)

    def __init__(self) -> None:
        self._flat: torch.Tensor | None = None
        self._views: list[torch.Tensor] = []
        self._fast = False  # every parameter float64: no conversion before adding
        self._pending: list[Sequence[torch.Tensor]] = []  # products not added yet
        self._weights: list[float] = []
        self._batch = 1

    def reset(self) -> None:
        """Start from zero (each adjoint)."""
        self._pending.clear()
        self._weights.clear()
        if self._flat is not None:
            self._flat.zero_()

    def _allocate(self, params: Sequence[torch.Tensor]) -> None:
        self._flat = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
        sizes = [p.numel() for p in params]
        self._views = [v.view(p.shape) for v, p in zip(self._flat.split(sizes), params, strict=True)]
        self._fast = all(p.dtype == torch.float64 for p in params)
        self._batch = max(1, min(self.BATCH, self.PENDING_ENTRIES // max(1, self._flat.numel())))

    def add(self, grads: Sequence[torch.Tensor | None], weight: float | None,
            params: Sequence[torch.Tensor], cotangent: torch.Tensor | None = None) -> None:
        """Add ``weight * grads`` (per-parameter gradients, ``None``: unused).

        ``cotangent``: the vector of the product (PETSc's work vector, overwritten
        later); a product held for a batch must not share its memory.
        """
        if weight is None:
            raise AssertionError("internal: an RK adjoint stage whose weight is unknown")
        if self._flat is None or len(self._views) != len(grads):
            self._flush()
            self._allocate(params)
        # (identity tests: `None in grads` would call Tensor.__eq__, tens of microseconds)
        if self._fast and self._batch > 1 and all(g is not None for g in grads):
            if cotangent is not None and not _shares(grads, cotangent):
                self._pending.append(grads)
                self._weights.append(weight)
                if len(self._pending) >= self._batch:
                    self._flush()
                return
            self._flush()
            self._add_one(grads, weight)
            return
        self._flush()
        acc, used = self._views, grads
        if not self._fast or any(g is None for g in grads):
            pairs = [(a, g.to(torch.float64)) for a, g in zip(acc, grads, strict=True) if g is not None]
            acc, used = [a for a, _ in pairs], [g for _, g in pairs]
        if acc:
            # two rounding steps, as PETSc's VecScale then VecAXPY(1): bit for bit the same
            torch._foreach_add_(acc, torch._foreach_mul(used, weight))

    def _add_one(self, grads: Sequence[torch.Tensor], weight: float) -> None:
        # one flat product and one flat sum; elementwise, so each entry is rounded as below
        if len(grads) > 1:
            scaled = torch.cat([g.reshape(-1) for g in grads]).mul_(weight)
        else:
            scaled = grads[0].reshape(-1) * weight
        self._flat.add_(scaled)

    def _flush(self) -> None:
        """Add the held products: ``acc + w_1 g_1 + w_2 g_2 + ...``, left to right."""
        pending, k = self._pending, len(self._pending)
        if not k:
            return
        if k == 1:  # (a short sweep, or a check between segments)
            self._add_one(pending[0], self._weights[0])
            pending.clear()
            self._weights.clear()
            return
        cols = [torch.stack([g[j] for g in pending]).view(k, -1) for j in range(len(self._views))]
        scaled = (torch.cat(cols, dim=1) if len(cols) > 1 else cols[0]).mul_(
            torch.tensor(self._weights, dtype=torch.float64).view(k, 1))
        rows = torch.cat([self._flat.view(1, -1), scaled])
        self._flat.copy_(rows.cumsum(0)[-1])
        pending.clear()
        self._weights.clear()

    def finite(self) -> bool:
        """Whether every accumulated entry is finite."""
        self._flush()
        flat = self._flat
        return flat is None or math.isfinite(float(flat.sum())) or bool(torch.isfinite(flat).all())

    def value(self, n_params: int) -> torch.Tensor:
        """The accumulated gradient, flat float64 (zeros if nothing was added)."""
        self._flush()
        if self._flat is None:
            return torch.zeros(n_params, dtype=torch.float64)
        return self._flat.clone()


def _shares(grads: Sequence[torch.Tensor], v: torch.Tensor) -> bool:
    """Whether a gradient is (a view of) ``v``: autograd passes an incoming gradient on as it is.

    A view's first element lies in ``v``'s memory (``v``, a view of a PETSc work vector,
    spans its storage; torch has no negative strides); comparing addresses costs a tenth
    of building each tensor's storage object.
    """
    lo = v.data_ptr()
    hi = lo + v.numel() * v.element_size()
    for g in grads:  # (a loop, not a generator: this runs once per adjoint stage)
        if lo <= g.data_ptr() < hi:
            return True
    return False
