"""torchdiffeq parity under data decomposition (``comm=``): reverse time, closure parameters,
single times and bad times on one rank (run under ``mpiexec -n 2`` and ``-n 3``)."""

import time

import pytest
import torch
from mpi4py import MPI

import pnode
from tests.models import rel_err

pytestmark = pytest.mark.mpi

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()
T = torch.tensor([1.0, 0.6, 0.0], dtype=torch.float64)  # decreasing


def test_reverse_time_closure_parameters_equal_serial():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 3).double()
    n = 2 * SIZE + 1
    y0 = torch.randn(n, 3, dtype=torch.float64)
    w = torch.randn(len(T), n, 3, dtype=torch.float64)

    def f(t, y):  # not a module: its parameters are found from the graph on every rank
        return torch.tanh(lin(y)) * (1 + t)

    y_ref = y0.clone().requires_grad_()
    ys_ref = pnode.odeint(f, y_ref, T, rtol=1e-8)
    g_ref = torch.autograd.grad((ys_ref * w).sum(), [y_ref, lin.weight, lin.bias])
    sizes = [n // SIZE + (1 if r < n % SIZE else 0) for r in range(SIZE)]
    sl = slice(sum(sizes[:RANK]), sum(sizes[:RANK + 1]))
    y_loc = y0[sl].clone().requires_grad_()
    ys = pnode.odeint(f, y_loc, T, rtol=1e-8, comm=COMM)
    g = torch.autograd.grad((ys * w[:, sl]).sum(), [y_loc, lin.weight, lin.bias])
    assert rel_err(ys, ys_ref[:, sl]) < 1e-12
    assert rel_err(g[0], g_ref[0][sl]) < 1e-10
    assert rel_err(g[1], g_ref[1]) < 1e-10 and rel_err(g[2], g_ref[2]) < 1e-10


def test_single_time_with_comm():
    y0 = torch.ones(2, 2, dtype=torch.float64)
    ys = pnode.odeint(lambda t, y: -y, y0, torch.tensor([0.5]), comm=COMM)
    assert torch.equal(ys[0], y0)


def test_bad_times_on_one_rank_raise_on_every_rank():
    t = torch.tensor([0.0, 1.0, 0.5] if RANK == SIZE - 1 else [0.0, 0.5, 1.0],
                     dtype=torch.float64)
    start = time.monotonic()
    with pytest.raises((ValueError, pnode.SolverError), match="direction|rank"):
        pnode.odeint(lambda t, y: -y, torch.ones(2, 2, dtype=torch.float64), t, comm=COMM)
    assert time.monotonic() - start < 10
    # a normal solve works afterwards
    ys = pnode.odeint(lambda t, y: -y, torch.ones(2, 2, dtype=torch.float64), T, comm=COMM)
    assert torch.isfinite(ys).all()


def test_events_with_comm_are_refused_on_every_rank():
    with pytest.raises(ValueError, match="comm"):
        pnode.odeint_event(lambda t, y: -y, torch.ones(2, 2, dtype=torch.float64), 0.0,
                           event_fn=lambda t, y: y.sum() - 1.0, comm=COMM)
