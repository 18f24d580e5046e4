"""Autograd graphs of the forward sweep, kept for the adjoint (the ``"graph"`` checkpoint policy).

With ``checkpoint="graph"`` the forward evaluations of an explicit method keep
their autograd graphs, so each adjoint stage is one backward pass and no
re-evaluation of ``func``.  A graph is found again by the state it was
evaluated at: PETSc restores the stage states bit for bit from its trajectory,
but recomputes stage *times* with different rounding, so time is no key.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["GraphStore", "graph_bytes"]

#: one kept evaluation: (time, state copy, state leaf of the graph, flat output)
Entry = tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]


class GraphStore:
    """Kept forward graphs, found again by the state they were evaluated at.

    :meth:`pop` returns the latest kept evaluation whose state equals the requested
    one (``torch.equal``).  The adjoint visits evaluations in the reverse order of
    the forward, so that is almost always the latest live entry (or the one below a
    stage PETSc's adjoint skips, such as a first-same-as-last stage): the newest
    :data:`SCAN` live entries are compared first, and only when none matches is an
    index by the sum of each state built (once) and searched, as before, among the
    entries with the requested state's sum (equal states have equal sums).

    Parameters
    ----------
    budget_bytes : float or None
        Memory the kept graphs may hold; beyond it the earliest are dropped (the
        adjoint re-evaluates those stages).  ``None``: keep every graph.
    entry_bytes : int or None
        Bytes one kept evaluation holds (see :func:`graph_bytes`); needed with a budget.
    """

    #: live entries compared from the newest down before the sum index is used
    SCAN = 2

    def __init__(self, budget_bytes: float | None = None, entry_bytes: int | None = None) -> None:
        self.budget = budget_bytes
        self.entry_bytes = entry_bytes
        self._slots: list[Entry | None] = []  # evaluation order; None: popped or dropped
        self._live = 0
        self._first = 0  # the slots before it were dropped (or looked at) by the budget
        self._top = 0  # one past the newest slot that may be live
        self._bytes = 0
        self._index: dict[float, list[int]] | None = None  # state sum -> slots (built lazily)
        self._scan = self.SCAN

    def __len__(self) -> int:
        return self._live

    def keep(self, t: float, xc: torch.Tensor, xr: torch.Tensor, out: torch.Tensor) -> None:
        """Keep the graph of ``out = f(t, xr)``; ``xc`` is the state's (unchanging) copy."""
        slots = self._slots
        slots.append((t, xc, xr, out))
        self._live += 1
        self._top = len(slots)
        if self._index is not None:
            self._index.setdefault(float(xc.sum()), []).append(len(slots) - 1)
        if self.budget is None:
            return
        self._bytes += self.entry_bytes
        # the earliest evaluations go first (popped ones still count, as they always did)
        while self._bytes > self.budget and self._first < len(slots):
            if slots[self._first] is not None:
                self._take(self._first)
            self._first += 1
            self._bytes -= self.entry_bytes

    def _take(self, i: int) -> Entry:
        entry = self._slots[i]
        self._slots[i] = None
        self._live -= 1
        if self._index is not None:
            self._index[float(entry[1].sum())].remove(i)
        return entry

    def pop(self, x: torch.Tensor) -> Entry | None:
        """The latest kept evaluation at state ``x`` (removed from the store), or ``None``."""
        slots, i, seen = self._slots, self._top, 0
        while i > self._first and seen < self._scan:
            i -= 1
            entry = slots[i]
            if entry is None:
                if i == self._top - 1:
                    self._top = i  # nothing live above it any more
                continue
            seen += 1
            if torch.equal(entry[1], x):
                return self._take(i)
        if self._live == 0:
            return None
        # not among the newest: every entry by its state's sum (computed once each)
        if self._index is None:
            self._index = {}
            for j in range(self._first, len(slots)):
                if slots[j] is not None:
                    self._index.setdefault(float(slots[j][1].sum()), []).append(j)
        self._scan = 1  # the order is broken (e.g. a rejected step's stages): look less
        bucket = self._index.get(float(x.sum()), ())
        for j in reversed(bucket):  # the latest first
            if torch.equal(slots[j][1], x):
                return self._take(j)
        return None


def graph_bytes(evaluate: Callable[[], torch.Tensor], xr: torch.Tensor,
                params: Sequence[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Evaluate ``f`` at a kept point and count the bytes its graph holds (parameters excluded).

    Returns the output and the byte count: the storages autograd saved for the
    backward pass, the state leaf and the output.
    """
    storages: dict[int, int] = {}
    skip = {p.untyped_storage().data_ptr() for p in params}

    def pack(tensor):
        st = tensor.untyped_storage()
        if st.data_ptr() not in skip:
            storages[st.data_ptr()] = st.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = evaluate()
    storages[xr.untyped_storage().data_ptr()] = xr.untyped_storage().nbytes()
    storages.setdefault(out.untyped_storage().data_ptr(), out.untyped_storage().nbytes())
    return out, sum(storages.values())
