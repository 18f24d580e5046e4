"""``mass=`` under ``comm=``: a distributed DAE equals the serial one; refusals on every rank.

Run by test.sh under ``mpiexec -n 2`` and ``-n 3``.
"""

import pytest
import torch
from mpi4py import MPI

import pnode
from tests.adjoint.test_dae import DIAG, SemiExplicit

pytestmark = pytest.mark.mpi

T = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)


def _batch(func, n):
    """n consistent initial states (differential parts random, algebraic part solved)."""
    g = torch.Generator().manual_seed(5)
    y = torch.cat([0.5 * torch.randn(n, 2, generator=g, dtype=torch.float64),
                   torch.zeros(n, 1, dtype=torch.float64)], dim=1)
    with torch.no_grad():
        return pnode.odeint(func, y, T[:2], method="implicit_euler", mass=DIAG,
                            options={"consistent_init": True, "step_size": 0.1})[0]


def _shard(rank, size):
    # uneven shards: rank r holds r + 1 samples
    start = sum(range(1, rank + 1))
    return slice(start, start + rank + 1), sum(range(1, size + 1))


@pytest.mark.parametrize("method", ["implicit_euler", "trapezoid"])
def test_distributed_dae_equals_serial(method):
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    func = SemiExplicit()
    shard, n = _shard(rank, size)
    y_all = _batch(func, n)
    opts = {"step_size": 0.05}
    wrt_all = y_all.clone().requires_grad_(True)
    ys = pnode.odeint(func, wrt_all, T, method=method, mass=DIAG, options=opts)
    serial = torch.autograd.grad(ys.pow(2).sum(), [wrt_all, *func.parameters()])
    y0 = y_all[shard].clone().requires_grad_(True)
    yd = pnode.odeint(func, y0, T, method=method, mass=DIAG, options=opts, comm=comm)
    dist = torch.autograd.grad(yd.pow(2).sum(), [y0, *func.parameters()])
    assert float((yd - ys[:, shard]).detach().abs().max()) < 1e-12
    # matrix-free GMRES (ksp_rtol 1e-12) against the serial dense LU
    assert float((dist[0] - serial[0][shard]).abs().max()) < 1e-9
    for got, want in zip(dist[1:], serial[1:], strict=True):
        assert float((got - want).abs().max()) <= 1e-9 * max(1.0, float(want.abs().max()))


def test_refusals_raise_on_every_rank():
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    func = SemiExplicit()
    shard, n = _shard(rank, size)
    y0 = _batch(func, n)[shard].clone()
    dense = torch.eye(3 * y0.shape[0], dtype=torch.float64)
    with pytest.raises(ValueError, match="diagonal mass"):
        pnode.odeint(func, y0, T, method="implicit_euler", mass=dense, comm=comm,
                     options={"step_size": 0.1})
    with pytest.raises(ValueError, match="requires grad"):
        pnode.odeint(func, y0, T, method="implicit_euler", mass=DIAG.clone().requires_grad_(True),
                     comm=comm, options={"step_size": 0.1})
    with pytest.raises(ValueError, match="consistent_init"):
        pnode.odeint(func, y0, T, method="implicit_euler", mass=DIAG, comm=comm,
                     options={"step_size": 0.1, "consistent_init": True})
    # an inconsistent y0 on the last rank only: every rank raises
    bad = y0.clone()
    if rank == size - 1:
        bad[0, 2] += 1.0
    with pytest.raises(ValueError, match="inconsistent"):
        pnode.odeint(func, bad, T, method="implicit_euler", mass=DIAG, comm=comm,
                     options={"step_size": 0.1})
    # the communicator still works afterwards
    ys = pnode.odeint(func, y0, T, method="implicit_euler", mass=DIAG, comm=comm,
                      options={"step_size": 0.1})
    assert torch.isfinite(ys).all()
