"""Torch views of PETSc Vec memory, and the checks the engine makes on them.

The only place that turns a PETSc ``Vec`` into a torch tensor: zero-copy DLPack
views, made once per Vec and reused (:class:`VecViews`), the identity of a Vec's
current contents (:func:`vec_key`) and the finiteness test of the hot path.
"""

from __future__ import annotations

import math

import torch
from petsc4py import PETSc

__all__ = ["VECSUM_MAX", "VecViews", "all_finite", "vec_key", "vec_view"]


def vec_view(vec: PETSc.Vec, mode: str = "r") -> torch.Tensor:
    """A torch view of a PETSc Vec's local memory (no copy)."""
    return torch.from_dlpack(vec.toDLPack(mode))


class VecViews:
    """Torch views of PETSc Vecs, made once per Vec and reused by every later callback.

    A host Vec's array does not move (PETSc's TS, SNES and KSP work vectors are
    never given other arrays), so one DLPack view serves for the Vec's life; a
    DLPack view holds a PETSc reference to its Vec, so the handle cannot be reused by
    another Vec while the view is cached.  Writes through a view bump the Vec's PETSc
    state (:meth:`write`), as a write access would: PETSc keys cached norms and
    reuse checks on it.  :meth:`clear` drops the views and references (the solver does,
    before destroying its PETSc objects: a collective Vec may only be destroyed
    collectively, not whenever the garbage collector frees a view).  A Vec PETSc
    gives up stays referenced until then; a bounded cache keeps that from growing.
    """

    MAX_VIEWS = 256

    __slots__ = ("_by_handle", "_shape", "_shaped")

    def __init__(self, shape: tuple[int, ...] | None = None) -> None:
        self._by_handle: dict[int, torch.Tensor] = {}
        self._shape = shape  # the state's shape, for :meth:`state` (None: flat only)
        self._shaped: dict[int, torch.Tensor] = {}

    def read(self, vec: PETSc.Vec) -> torch.Tensor:
        """The view of ``vec`` (not to be written)."""
        hit = self._by_handle.get(vec.handle)
        if hit is None:
            if len(self._by_handle) >= self.MAX_VIEWS:
                self._by_handle.clear()
            # read access: Vecs PETSc passes as inputs are locked against write access
            hit = self._by_handle[vec.handle] = torch.from_dlpack(vec.toDLPack("r"))
        return hit

    def write(self, vec: PETSc.Vec) -> torch.Tensor:
        """The view of ``vec``, for writing its whole contents."""
        view = self.read(vec)
        vec.stateIncrease()
        return view

    def state(self, vec: PETSc.Vec) -> torch.Tensor:
        """The view of ``vec`` in the state's shape (not to be written).

        Made once per Vec, as :meth:`read`: a torch ``view`` per callback costs about
        as much as a small network's layer, and one of a tensor that requires grad
        adds a node to the graph that every backward pass then runs.
        """
        hit = self._shaped.get(vec.handle)
        if hit is None:
            if len(self._shaped) >= self.MAX_VIEWS:
                self._shaped.clear()
            hit = self._shaped[vec.handle] = self.read(vec).view(self._shape)
        return hit

    def write_state(self, vec: PETSc.Vec) -> torch.Tensor:
        """The view of ``vec`` in the state's shape, for writing its whole contents."""
        view = self.state(vec)
        vec.stateIncrease()
        return view

    def clear(self) -> None:
        self._by_handle.clear()
        self._shaped.clear()


def vec_key(vec: PETSc.Vec) -> tuple[int, int]:
    """Identity of a Vec's current contents: PETSc bumps the state on every write access."""
    return vec.handle, vec.stateGet()


def all_finite(flat: torch.Tensor) -> bool:
    # One reduction instead of an elementwise isfinite pass (5x cheaper on the hot path);
    # a non-finite sum is re-checked element by element (finite values can overflow it).
    flat = flat.detach()
    return math.isfinite(float(flat.sum())) or bool(torch.isfinite(flat).all())


#: largest state whose finiteness checks use PETSc's VecSum rather than a torch reduction
VECSUM_MAX = 2048
