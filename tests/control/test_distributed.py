"""SNOpt under data decomposition: factors averaged over ranks, inversion shared out.

Size-agnostic: in the ordinary test run the communicator has one rank; launched as
``mpiexec -n 2 python -m pytest tests/control/test_distributed.py`` each rank holds a
shard of the batch and the updates must equal the serial full-batch ones.
"""

import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI

from pnode.control import SNOpt
from tests.control.test_snopt import data, make_model


@pytest.mark.parametrize("inverse", ["eig", "cholesky"])
def test_sharded_factors_and_updates_equal_the_serial_ones(inverse):
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    serial, sharded = make_model(), make_model()
    o_serial = SNOpt(serial, inv_freq=1, update_freq=1, inverse=inverse)
    o_sharded = SNOpt(sharded, inv_freq=1, update_freq=1, inverse=inverse, comm=comm)
    for step in range(3):
        x, y = data(n=8 * size, seed=30 + step)
        o_serial.zero_grad()
        F.cross_entropy(serial(x), y).backward()
        o_serial.step()
        o_sharded.zero_grad()
        shard = slice(8 * rank, 8 * rank + 8)
        F.cross_entropy(sharded(x[shard]), y[shard]).backward()
        for p in sharded.parameters():  # the gradient reduction of data decomposition
            buf = p.grad.numpy()
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            p.grad.div_(size)
        o_sharded.step()
    for m, n in zip(o_serial.layers, o_sharded.layers, strict=True):
        a, b = o_serial.factors[id(m)], o_sharded.factors[id(n)]
        torch.testing.assert_close(b.A, a.A, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(b.G, a.G, rtol=1e-10, atol=1e-13)
    for p, q in zip(serial.parameters(), sharded.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-12)
