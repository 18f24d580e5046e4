"""GraphStore (checkpoint="graph"): pop returns the latest kept evaluation at a state."""

import random

import torch

from pnode.adjoint.graphs import GraphStore


class _Reference:
    """The specification: the latest live entry whose state equals the request."""

    def __init__(self, budget=None, entry_bytes=None):
        self.entries, self.budget, self.entry_bytes, self.kept = [], budget, entry_bytes, 0

    def keep(self, t, xc, xr, out):
        self.entries.append((t, xc, xr, out))
        self.kept += 1
        if self.budget is not None:
            # the earliest kept evaluations are dropped beyond the budget (popped ones count)
            n_drop = self.kept - int(self.budget // self.entry_bytes)
            self.dropped = getattr(self, "dropped", 0)
            while self.dropped < n_drop:
                self.dropped += 1
                self.entries = [e for e in self.entries if e[0] != self.dropped - 1]

    def pop(self, x):
        for i in range(len(self.entries) - 1, -1, -1):
            if torch.equal(self.entries[i][1], x):
                return self.entries.pop(i)
        return None


def _run(seed, budget=None):
    rng = random.Random(seed)
    states = [torch.tensor([float(rng.randint(0, 3)), 1.0]) for _ in range(12)]
    store, ref = GraphStore(budget, 1 if budget else None), _Reference(budget, 1)
    for t, x in enumerate(states):  # time = evaluation number: tells the entries apart
        entry = (t, x.clone(), x.clone(), x.clone())
        store.keep(*entry)
        ref.keep(*entry)
    # mostly the reverse order (the adjoint's), with skips, repeats and unknown states
    order = list(reversed(states)) + [torch.tensor([9.0, 1.0])] + states
    rng.shuffle(order[len(states) // 2:])
    for x in order:
        got, want = store.pop(x), ref.pop(x)
        assert (got is None) == (want is None)
        if got is not None:
            assert got[0] == want[0]
    assert len(store) == len(ref.entries)


def test_pop_returns_the_latest_equal_state():
    for seed in range(40):
        _run(seed)


def test_pop_with_a_memory_budget():
    for seed in range(20):
        _run(seed, budget=5)


def test_skipped_newest_entry_does_not_hide_the_next():
    store = GraphStore()
    xs = [torch.tensor([float(i)]) for i in range(4)]
    for i, x in enumerate(xs):
        store.keep(i, x, x, x)
    # an adjoint that never asks for the newest evaluation (a first-same-as-last stage)
    assert [store.pop(x)[0] for x in reversed(xs[:3])] == [2, 1, 0]
    assert len(store) == 1 and store.pop(xs[3])[0] == 3 and store.pop(xs[3]) is None
