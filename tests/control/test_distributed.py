"""SNOpt under data decomposition: factors combined over ranks, inversion shared out.

Size-agnostic: in the ordinary test run the communicator has one rank; launched as
``mpiexec -n 2 python -m pytest tests/control/test_distributed.py`` each rank holds a
shard of the batch and the factors and updates must equal the serial full-batch ones,
both with gradients averaged by hand (``reduction="mean"``, equal shards) and with the
engine's own decomposition (``NeuralODE(comm=)`` + :class:`pnode.parallel.DataParallel`,
``reduction="sum"``, uneven shards).
"""

import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI

from pnode.control import SNOpt
from pnode.parallel import DataParallel
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


@pytest.mark.parametrize("inverse,base,method", [("eig", "sgd", "rk4"), ("cholesky", "adam", "rk4"),
                                                 ("eig", "sgd", "dopri5")])
def test_engine_data_decomposition_gives_the_serial_factors_and_updates(inverse, base, method):
    comm = MPI.COMM_WORLD
    size = comm.Get_size()
    kw = {"rtol": 1e-6} if method == "dopri5" else {}
    serial, sharded = make_model(method, **kw), make_model(method, comm=comm, **kw)
    dp = DataParallel(sharded, comm)  # sums the encoder's and head's gradients; the engine the field's
    opts = dict(inv_freq=1, update_freq=1, inverse=inverse, base=base, momentum=0.5 if base == "sgd" else 0)
    o_serial = SNOpt(serial, **opts)
    o_sharded = SNOpt(sharded, comm=comm, reduction="sum", **opts)
    n = 7 * size + 2  # uneven shards for size > 2
    for step in range(3):
        x, y = data(n=n, seed=40 + step)
        o_serial.zero_grad()
        F.cross_entropy(serial(x), y).backward()
        o_serial.step()
        o_sharded.zero_grad()
        # each rank: its share of the global mean loss (sum over the shard / global batch size)
        (F.cross_entropy(sharded(dp.shard(x)), dp.shard(y), reduction="sum") / n).backward()
        dp.reduce_gradients()
        o_sharded.step()
        for p, q in zip(serial.parameters(), sharded.parameters(), strict=True):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-13)
    for m, k in zip(o_serial.layers, o_sharded.layers, strict=True):
        a, b = o_serial.factors[id(m)], o_sharded.factors[id(k)]
        torch.testing.assert_close(b.A, a.A, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(b.G, a.G, rtol=1e-10, atol=1e-13)
        for key in a.inverse:
            torch.testing.assert_close(b.inverse[key], a.inverse[key], rtol=1e-9, atol=1e-11)
    for p, q in zip(serial.parameters(), sharded.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12)
    # every rank holds the same replica
    for q in sharded.parameters():
        assert all(torch.equal(g, q.detach()) for g in comm.allgather(q.detach()))
