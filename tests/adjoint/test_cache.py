"""The solver cache (pnode/adjoint/cache.py): bounded pools, leases that free trajectories."""

import ctypes
import gc

import torch

import pnode
from pnode.adjoint.cache import CACHE, MAX_SOLVERS_PER_FUNC
from pnode.adjoint.solver import TSSolver

T = torch.tensor([0.0, 0.5], dtype=torch.float64)
RK4 = {"method": "rk4", "options": {"step_size": 0.25}}


class Field(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2).double()

    def forward(self, t, y):
        return self.lin(y)


def _live_solvers() -> int:
    """TSSolver objects whose PETSc objects are alive (wherever they are referenced)."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is TSSolver and not o.petsc.destroyed)


def test_200_batch_sizes_keep_the_number_of_solvers_flat():
    pnode.clear_cache()
    func = Field()
    counts = []
    for b in range(1, 201):
        y0 = torch.randn(b, 2, dtype=torch.float64, requires_grad=True)
        pnode.odeint(func, y0, T, **RK4).sum().backward()
        if b % 50 == 0:
            counts.append((CACHE.live(func), _live_solvers()))
    assert all(n == MAX_SOLVERS_PER_FUNC for n, _ in counts), counts
    assert len({live for _, live in counts}) == 1 and counts[0][1] <= MAX_SOLVERS_PER_FUNC + 1
    # least recently used goes first: the latest batch size is still cached, the first is not
    last = CACHE.last
    pnode.odeint(func, torch.randn(200, 2, dtype=torch.float64), T, **RK4)
    assert CACHE.last is last
    pnode.odeint(func, torch.randn(1, 2, dtype=torch.float64), T, **RK4)
    assert CACHE.last is not last and CACHE.live(func) == MAX_SOLVERS_PER_FUNC


def test_many_lengths_of_t_keep_the_number_of_solvers_flat():
    func = Field()
    y0 = torch.randn(3, 2, dtype=torch.float64)
    for n in range(2, 2 + 3 * MAX_SOLVERS_PER_FUNC):
        with torch.no_grad():
            pnode.odeint(func, y0, torch.linspace(0, 1, n, dtype=torch.float64), **RK4)
    assert CACHE.live(func) == MAX_SOLVERS_PER_FUNC


def test_an_evicted_leased_solver_is_destroyed_when_its_lease_ends():
    func = Field()
    y0 = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    ys = pnode.odeint(func, y0, T, **RK4)  # leased: waits for its backward
    held = CACHE.last
    for b in range(3, 4 + MAX_SOLVERS_PER_FUNC):
        with torch.no_grad():
            pnode.odeint(func, torch.randn(b, 2, dtype=torch.float64), T, **RK4)
    assert held.pool is None and not held.petsc.destroyed  # out of the pool, still in use
    ys.sum().backward()
    assert torch.isfinite(y0.grad).all() and held.petsc.destroyed


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks",
                                               "keepcost")]


def _heap_in_use() -> int:
    """Bytes the C heap has handed out (glibc's mallinfo2: exact, unlike the RSS)."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def test_an_idle_solver_keeps_no_trajectory_after_del_and_gc():
    func = Field()
    y0 = torch.randn(10_000, 2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    kw = {"method": "rk4", "options": {"step_size": 0.05}}  # 20 steps of a 20000-vector
    trajectory = 20 * 4 * 20_000 * 8  # 4 stage vectors per step (PETSc keeps one state less)
    with torch.no_grad():
        pnode.odeint(func, y0, t, **kw)  # builds and caches the solver, records nothing
    gc.collect()
    base = _heap_in_use()
    for backward in (False, True):
        ys = pnode.odeint(func, y0, t, **kw)
        assert _heap_in_use() - base > trajectory / 2  # the trajectory is held while ys lives
        if backward:
            ys.sum().backward()
        del ys
        gc.collect()
        assert _heap_in_use() - base < trajectory / 8, backward
