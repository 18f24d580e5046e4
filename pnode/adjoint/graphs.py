"""Autograd graphs of the forward sweep, kept for the adjoint (the ``"graph"`` checkpoint policy).

With ``checkpoint="graph"`` the forward evaluations of an explicit method keep
their autograd graphs, so each adjoint stage is one backward pass and no
re-evaluation of ``func``.  A graph is found again by the state it was
evaluated at: PETSc restores the stage states bit for bit from its trajectory,
but recomputes stage *times* with different rounding, so time is no key.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

import torch

__all__ = ["GraphStore", "graph_bytes"]

#: one kept evaluation: (time, state copy, state leaf of the graph, flat output)
Entry = tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]


class GraphStore:
    """Kept forward graphs, found by the sum of their input state (confirmed by comparison).

    Parameters
    ----------
    budget_bytes : float or None
        Memory the kept graphs may hold; beyond it the earliest are dropped (the
        adjoint re-evaluates those stages).  ``None``: keep every graph.
    entry_bytes : int or None
        Bytes one kept evaluation holds (see :func:`graph_bytes`); needed with a budget.
    """

    def __init__(self, budget_bytes: float | None = None, entry_bytes: int | None = None) -> None:
        self.budget = budget_bytes
        self.entry_bytes = entry_bytes
        self._by_sum: dict[float, list[Entry]] = {}
        self._fifo: deque[tuple[float, Entry]] = deque()
        self._bytes = 0

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_sum.values())

    def keep(self, t: float, xc: torch.Tensor, xr: torch.Tensor, out: torch.Tensor) -> None:
        """Keep the graph of ``out = f(t, xr)``; ``xc`` is the state's (unchanging) copy."""
        key = float(xc.sum())
        entry = (t, xc, xr, out)
        self._by_sum.setdefault(key, []).append(entry)
        if self.budget is None:
            return
        self._fifo.append((key, entry))
        self._bytes += self.entry_bytes
        while self._bytes > self.budget and self._fifo:
            old_key, old = self._fifo.popleft()
            self._bytes -= self.entry_bytes
            self._remove(old_key, old)

    def _remove(self, key: float, entry: Entry) -> None:
        entries = self._by_sum.get(key, [])
        for i, e in enumerate(entries):
            if e is entry:
                del entries[i]
                break
        if not entries:
            self._by_sum.pop(key, None)

    def pop(self, x: torch.Tensor) -> Entry | None:
        """The kept evaluation at state ``x`` (removed from the store), or ``None``."""
        key = float(x.sum())
        entries = self._by_sum.get(key)
        if entries:
            # the latest first: within a step the adjoint visits stages in reverse order
            for i in range(len(entries) - 1, -1, -1):
                if torch.equal(entries[i][1], x):
                    hit = entries.pop(i)
                    if not entries:
                        del self._by_sum[key]
                    return hit
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
