"""MPI smoke tests, launched by test.sh as `mpiexec -n 2 python -m pytest -m mpi tests/mpi`.

They check that the PETSc pnode runs on has real MPI (COMM_WORLD spans the
launched ranks) and that pnode's engine works on every rank of an mpiexec job.
"""

import pytest
import torch
from mpi4py import MPI
from petsc4py import PETSc

import pnode
from tests.models import TimeMLP

pytestmark = pytest.mark.mpi


def test_petsc_comm_world_is_the_mpi_job():
    comm = PETSc.COMM_WORLD
    assert comm.getSize() == MPI.COMM_WORLD.Get_size() >= 2
    assert comm.getRank() == MPI.COMM_WORLD.Get_rank()


def test_distributed_vec_reduction():
    comm = PETSc.COMM_WORLD
    rank, size = comm.getRank(), comm.getSize()
    v = PETSc.Vec().createMPI((rank + 2, PETSc.DECIDE), comm=comm)
    v.set(rank + 1.0)
    expected = sum((r + 1.0) * (r + 2) for r in range(size))
    assert v.sum() == pytest.approx(expected)
    assert v.getSize() == sum(r + 2 for r in range(size))
    v.destroy()


def test_engine_on_every_rank_and_gradient_allreduce():
    """Each rank solves its own shard with a replicated model; summed gradients agree."""
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    torch.manual_seed(0)
    func = TimeMLP().double()
    torch.manual_seed(100 + rank)
    y_all = [torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(r))
             for r in range(size)]
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    ys = pnode.odeint(func, y_all[rank], t, method="dopri5", rtol=1e-9)
    ys.pow(2).sum().backward()
    local = torch.cat([p.grad.reshape(-1) for p in func.parameters()])
    summed = torch.from_numpy(comm.allreduce(local.numpy()))
    # serial reference on rank 0's view: the same sum computed locally over all shards
    func.zero_grad()
    total = sum(pnode.odeint(func, y, t, method="dopri5", rtol=1e-9).pow(2).sum() for y in y_all)
    total.backward()
    serial = torch.cat([p.grad.reshape(-1) for p in func.parameters()])
    assert torch.allclose(summed, serial, rtol=1e-12, atol=1e-14)
