"""Data decomposition (``odeint(..., comm=)``): gradients equal the serial solve of the whole batch.

Run under ``mpiexec -n 2`` and ``-n 3`` (test.sh).  Every rank builds the same
full batch and model (same seeds), solves the whole batch serially on
COMM_SELF as the reference, and its uneven shard with ``comm=COMM_WORLD``.
"""

import time

import pytest
import torch
from mpi4py import MPI

import pnode
from tests.models import TimeMLP, rel_err

pytestmark = pytest.mark.mpi

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()
T = torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64)


def _shards(n):
    """Uneven contiguous shards: rank r gets n // size items, plus one for the first n % size."""
    sizes = [n // SIZE + (1 if r < n % SIZE else 0) for r in range(SIZE)]
    start = sum(sizes[:RANK])
    return slice(start, start + sizes[RANK])


def _problem(n=2 * SIZE + 1):
    torch.manual_seed(0)
    func = TimeMLP().double()
    y0 = torch.randn(n, 3, dtype=torch.float64)
    w = torch.randn(len(T), n, 3, dtype=torch.float64)
    return func, y0, w


@pytest.mark.parametrize("method,kw", [
    ("rk4", {"options": {"step_size": 0.05}}),
    ("dopri5", {"rtol": 1e-8}),
    ("trapezoid", {"options": {"step_size": 0.1}}),
    ("kencarp4", {"rtol": 1e-6}),
])
def test_gradients_equal_serial(method, kw):
    func, y0, w = _problem()
    params = list(func.parameters())
    # serial reference: the whole batch on this rank alone
    y_ref = y0.clone().requires_grad_()
    ys_ref = pnode.odeint(func, y_ref, T, method=method, **kw)
    steps_ref = pnode.last_stats().steps
    g_ref = torch.autograd.grad((ys_ref * w).sum(), [y_ref, *params])
    # distributed: this rank's shard
    sl = _shards(y0.shape[0])
    y_loc = y0[sl].clone().requires_grad_()
    ys = pnode.odeint(func, y_loc, T, method=method, comm=COMM, **kw)
    assert pnode.last_stats().steps == steps_ref  # global error norms: the same steps
    g = torch.autograd.grad((ys * w[:, sl]).sum(), [y_loc, *params])
    assert rel_err(ys, ys_ref[:, sl]) < 1e-12
    assert rel_err(g[0], g_ref[0][sl]) < 1e-10
    for a, b in zip(g[1:], g_ref[1:], strict=True):
        assert rel_err(a, b) < 1e-10
    # identical on every rank
    flat = torch.cat([a.reshape(-1) for a in g[1:]])
    assert all(torch.equal(flat, other) for other in COMM.allgather(flat))


def test_time_gradient_sums_over_ranks():
    func, y0, w = _problem()
    t_ref = T.clone().requires_grad_()
    ys_ref = pnode.odeint(func, y0, t_ref, method="dopri5", rtol=1e-8)
    (gt_ref,) = torch.autograd.grad((ys_ref * w).sum(), [t_ref])
    sl = _shards(y0.shape[0])
    t_loc = T.clone().requires_grad_()
    ys = pnode.odeint(func, y0[sl], t_loc, method="dopri5", rtol=1e-8, comm=COMM)
    (gt,) = torch.autograd.grad((ys * w[:, sl]).sum(), [t_loc])
    assert rel_err(gt, gt_ref) < 1e-10


def test_disagreeing_shapes_raise_on_every_rank():
    func, y0, _ = _problem()
    bad = torch.randn(2, 3 if RANK == 0 else 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="ranks disagree on the state trailing shape"):
        pnode.odeint(func, bad, T, method="rk4", options={"step_size": 0.1}, comm=COMM)


def test_bad_input_on_one_rank_raises_on_every_rank():
    func, y0, _ = _problem()
    y = y0[_shards(y0.shape[0])].clone()
    if RANK == SIZE - 1:
        y[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pnode.odeint(func, y, T, method="rk4", options={"step_size": 0.1}, comm=COMM)


class _FailOn(torch.nn.Module):
    """A field that raises on one rank once time passes ``t_fail`` (forward or adjoint)."""

    def __init__(self, rank, t_fail):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3).double()
        self.rank, self.t_fail, self.armed = rank, t_fail, True

    def forward(self, t, y):
        if self.armed and RANK == self.rank and float(t) >= self.t_fail:
            raise RuntimeError("injected failure")
        return torch.tanh(self.lin(y))


@pytest.mark.parametrize("method,kw", [
    ("rk4", {"options": {"step_size": 0.01}}),
    ("dopri5", {"rtol": 1e-7}),
    ("trapezoid", {"options": {"step_size": 0.05}}),
])
def test_forward_failure_on_one_rank_ends_every_rank_promptly(method, kw):
    func = _FailOn(SIZE - 1, 0.5)
    y0 = torch.randn(2, 3, dtype=torch.float64)
    start = time.perf_counter()
    if RANK == SIZE - 1:
        with pytest.raises(RuntimeError, match="injected failure"):
            pnode.odeint(func, y0, T, method=method, comm=COMM, **kw)
    else:
        with pytest.raises(pnode.SolverError, match=f"rank {SIZE - 1} failed with RuntimeError: "
                                                    "injected failure") as info:
            pnode.odeint(func, y0, T, method=method, comm=COMM, **kw)
        assert info.value.reason == "RANK_FAILED"
    assert time.perf_counter() - start < 30
    func.armed = False  # every rank's solver is usable again
    ys = pnode.odeint(func, y0, T, method=method, comm=COMM, **kw)
    assert torch.isfinite(ys).all()


def test_adjoint_failure_on_one_rank_ends_every_rank():
    func = _FailOn(0, 2.0)  # never fails in the forward (t <= 1)
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    ys = pnode.odeint(func, y0, T, method="rk4", options={"step_size": 0.05}, comm=COMM)
    func.t_fail = 0.0  # now fails on rank 0 as soon as the adjoint evaluates func
    if RANK == 0:
        with pytest.raises(RuntimeError, match="injected failure"):
            ys.sum().backward()
    else:
        with pytest.raises(pnode.SolverError, match="rank 0 failed"):
            ys.sum().backward()


def test_data_parallel_training_step_equals_serial():
    from pnode.parallel import DataParallel

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4).double()

        def forward(self, t, y):
            return torch.tanh(self.lin(y))

    def build(comm):
        torch.manual_seed(1)
        return torch.nn.Sequential(
            torch.nn.Linear(3, 4).double(),
            pnode.NeuralODE(Field(), method="rk4", options={"step_size": 0.1}, comm=comm),
            torch.nn.Linear(4, 2).double())

    torch.manual_seed(2)
    X, Y = torch.randn(2 * SIZE + 1, 3, dtype=torch.float64), torch.randn(2 * SIZE + 1, 2,
                                                                            dtype=torch.float64)
    serial = build(None)
    ((serial(X) - Y) ** 2).sum().div(len(X)).backward()
    model = build(COMM)
    dp = DataParallel(model, COMM)
    x, y = dp.shard(X), dp.shard(Y)
    ((model(x) - y) ** 2).sum().div(dp.global_count(len(x))).backward()
    dp.reduce_gradients()
    for p, q in zip(model.parameters(), serial.parameters(), strict=True):
        assert rel_err(p.grad, q.grad) < 1e-10


def test_data_parallel_refuses_ode_blocks_without_comm():
    from pnode.parallel import DataParallel

    field = torch.nn.Linear(2, 2).double()
    model = torch.nn.Sequential(pnode.NeuralODE(lambda t, y: field(y), method="rk4"))
    with pytest.raises(ValueError, match="comm=dp.comm"):
        DataParallel(model, COMM)


def test_mpi_example_trains_with_identical_replicas():
    import runpy
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "mpi_data_parallel.py"
    main = runpy.run_path(str(path))["main"]
    out = main(["--epochs", "3"])
    assert out["last_loss"] < out["first_loss"]
    assert all(o == out for o in COMM.allgather(out))  # every rank agrees


@pytest.mark.parametrize("policy", ["graph", "solution", "binomial", "disk"])
def test_checkpoint_policies_under_mpi_equal_serial(policy, tmp_path):
    func, y0, w = _problem()
    params = list(func.parameters())
    ck = {"binomial": pnode.Checkpoint.binomial(3),
          "disk": pnode.Checkpoint.disk(tmp_path, ram_budget=1)}.get(policy, policy)
    kw = {"method": "rk4", "options": {"step_size": 0.1}}
    y_ref = y0.clone().requires_grad_()
    g_ref = torch.autograd.grad((pnode.odeint(func, y_ref, T, **kw) * w).sum(), [y_ref, *params])
    sl = _shards(y0.shape[0])
    y_loc = y0[sl].clone().requires_grad_()
    ys = pnode.odeint(func, y_loc, T, checkpoint=ck, comm=COMM, **kw)
    g = torch.autograd.grad((ys * w[:, sl]).sum(), [y_loc, *params])
    assert rel_err(g[0], g_ref[0][sl]) < 1e-10
    for a, b in zip(g[1:], g_ref[1:], strict=True):
        assert rel_err(a, b) < 1e-10
    assert list(tmp_path.iterdir()) == []


def test_data_parallel_with_a_direct_odeint_call_and_reduced_parameters():
    from pnode.parallel import DataParallel

    class Model(torch.nn.Module):
        def __init__(self, comm):
            super().__init__()
            torch.manual_seed(5)
            self.enc = torch.nn.Linear(3, 3).double()
            self.field = torch.nn.Linear(3, 3).double()
            self.comm = comm

        def forward(self, x):
            h = self.enc(x)
            ys = pnode.odeint(lambda t, y: torch.tanh(self.field(y)), h, T, method="rk4",
                              options={"step_size": 0.1}, adjoint_params=list(self.field.parameters()),
                              comm=self.comm)
            return ys[-1]

    torch.manual_seed(6)
    X = torch.randn(2 * SIZE + 1, 3, dtype=torch.float64)
    serial = Model(None)
    serial(X).pow(2).sum().backward()
    model = Model(COMM)
    dp = DataParallel(model, COMM, reduced=model.field.parameters())
    model(dp.shard(X)).pow(2).sum().backward()
    dp.reduce_gradients()
    for p, q in zip(model.parameters(), serial.parameters(), strict=True):
        assert rel_err(p.grad, q.grad) < 1e-10


def test_collective_solvers_are_destroyed_only_where_every_rank_agrees():
    # Destroying PETSc objects on a multi-rank communicator is collective, but funcs die (and
    # their solver pools with them) at different moments on different ranks: those solvers
    # wait until every rank has given them up, then go at the same collective call.
    import gc
    import sys

    engine = sys.modules["pnode.adjoint.odeint"]  # the module (pnode.adjoint.odeint is the function)

    class Lin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3).double()

        def forward(self, t, y):
            return self.lin(y)

    kw = {"method": "rk4", "options": {"step_size": 0.25}, "comm": COMM}
    y0 = torch.randn(2, 3, dtype=torch.float64)
    keeper, doomed = Lin(), Lin()
    with torch.no_grad():
        pnode.odeint(doomed, y0, T, **kw)
    seq = engine.CACHE.last.seq
    box = [doomed] if RANK != 0 else []  # rank 0 lets its func die first
    del doomed
    gc.collect()
    with torch.no_grad():
        pnode.odeint(keeper, y0, T, **kw)
    assert (seq in engine.CACHE.graveyard) == (RANK == 0)  # scheduled on rank 0, not destroyed yet
    box.clear()
    gc.collect()
    with torch.no_grad():
        pnode.odeint(keeper, y0, T, **kw)  # every rank has given it up: destroyed everywhere
    assert seq not in engine.CACHE.graveyard


def test_collective_pool_bound_evicts_collectively():
    # More distinct layouts than a pool holds: evicted collective solvers wait in the
    # graveyard and go at the next collective call on every rank; idle ones drop their
    # trajectories there too.  A deadlock here would hang (the test's timeout guards).
    import gc

    from pnode.adjoint.cache import CACHE, MAX_SOLVERS_PER_FUNC

    gc.collect()
    func = TimeMLP().double()
    kw = {"method": "rk4", "options": {"step_size": 0.25}, "comm": COMM}
    solvers = []
    for b in range(1, 3 + MAX_SOLVERS_PER_FUNC):
        y0 = torch.randn(b + RANK, 3, dtype=torch.float64, requires_grad=True)
        pnode.odeint(func, y0, T, **kw).sum().backward()
        assert torch.isfinite(y0.grad).all()
        solvers.append(CACHE.last)
    assert CACHE.live(func) == MAX_SOLVERS_PER_FUNC
    first, second = solvers[0], solvers[1]  # least recently used: evicted by the last two calls
    assert first.petsc.destroyed and second.seq in CACHE.graveyard and not second.petsc.destroyed
    with torch.no_grad():
        pnode.odeint(func, torch.randn(2 + MAX_SOLVERS_PER_FUNC + RANK, 3, dtype=torch.float64), T,
                     **kw)
    assert second.seq not in CACHE.graveyard and second.petsc.destroyed
    assert CACHE.last.seq in CACHE.stale  # its trajectory goes at the next collective call
    assert COMM.allgather(sorted(CACHE.stale)) == [sorted(CACHE.stale)] * SIZE
