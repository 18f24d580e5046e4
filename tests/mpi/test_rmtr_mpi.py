"""RMTR under mpiexec: every rank holds a shard, the run equals a serial one over the full batch.

Launched by test.sh as ``mpiexec -n 2`` and ``-n 3`` (the 50 samples give uneven
shards on 3 ranks).  The serial reference is the same RMTR on ``comm=None`` with
the whole training set, run by every rank.  Shard losses and gradients are summed
in one Allreduce, so only the rounding of the sums differs from the serial run:
the decisions (accepted steps, radii of every level, batch sizes, the level
acting as finest) must be identical and the losses and parameters agree to 1e-10.
"""

import math

import pytest
import torch
from mpi4py import MPI
from torch import nn
from torch.nn.utils import parameters_to_vector

from pnode.multilevel import RMTR, ResNet
from pnode.parallel import shard_slice

pytestmark = pytest.mark.mpi
COMM = MPI.COMM_WORLD
N = 50


def _data(n=N):
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(n, 4, dtype=torch.float64, generator=gen)
    y = ((X[:, 0] + 0.5 * X[:, 1] > 0).long() + (X[:, 2] > 1).long()).clamp(max=2)
    return X, y


def _net(depth):
    torch.manual_seed(5)
    return ResNet(4, 6, depth, 3).double()


def _shard(t):
    return t[shard_slice(t.shape[0], COMM.Get_rank(), COMM.Get_size())]


def _pair(levels, depth, options, epochs):
    """(serial history, serial parameters, sharded history, sharded parameters)."""
    X, y = _data()
    out = []
    for comm, (Xs, ys) in ((None, (X, y)), (COMM, (_shard(X), _shard(y)))):
        net = _net(depth)
        hist = RMTR(net, nn.CrossEntropyLoss(), levels=levels, comm=comm, progress=False,
                    **options).fit(Xs, ys, epochs=epochs)
        out += [hist, parameters_to_vector(net.parameters()).detach()]
    return out


def _close(a, b, tol=1e-10):
    return all(x == y or abs(x - y) <= tol * max(abs(y), 1e-300) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("levels,depth,options,epochs", [
    (1, 4, {}, 6),  # single-level L-SR1 trust region
    (3, 8, {"cycle": "V"}, 5),
    (3, 8, {"cycle": "F", "nested_window": 2, "nested_max": 3}, 10),  # climbs through every level
    (3, 8, {"cycle": "V", "subproblem": "cg", "prolongation": "linear"}, 4),
    (2, 4, {"cycle": "V", "batch_size": 16, "batch_growth": 2.0}, 3),  # mini-batches from global indices
])
def test_sharded_rmtr_takes_the_serial_decisions_and_steps(levels, depth, options, epochs):
    ser, x_ser, par, x_par = _pair(levels, depth, options, epochs)
    assert len(par) == len(ser) > 0 and par.reason == ser.reason
    # identical decisions: accepted steps, radii of every level, batch sizes, active level
    assert par.accepted == ser.accepted
    assert par.batch_size == ser.batch_size
    assert par.level == ser.level
    assert [_close(a, b) for a, b in zip(par.radii, ser.radii, strict=True)] == [True] * len(ser)
    assert sum(ser.accepted) > 0
    assert all(math.isfinite(v) for v in par.loss)
    assert _close(par.loss, ser.loss), (par.loss, ser.loss)
    assert _close(par.accuracy, ser.accuracy)
    assert _close(par.work, ser.work)
    torch.testing.assert_close(x_par, x_ser, rtol=1e-10, atol=1e-12)
    if levels == 3 and options.get("cycle") == "F":
        assert sorted(set(par.level)) == [0, 1, 2]
    # every rank holds the same run (same decisions from the same reduced numbers)
    assert COMM.allgather(par.loss) == [par.loss] * COMM.Get_size()
    gathered = COMM.allgather(x_par)
    assert all(torch.equal(g, x_par) for g in gathered)


def test_sharded_rmtr_resumes_from_state_dict_on_every_rank():
    X, y = _data()
    Xs, ys = _shard(X), _shard(y)
    opts = {"cycle": "F", "nested_window": 2, "nested_max": 3, "batch_size": 20, "progress": False}

    def trainer():
        net = _net(8)
        return net, RMTR(net, nn.CrossEntropyLoss(), levels=3, comm=COMM, **opts)

    net, full = trainer()
    full.start(Xs, ys)
    for _ in range(8):
        full.step()
    ref = full.finish()
    net2, part = trainer()
    part.start(Xs, ys)
    for _ in range(4):
        part.step()
    state = part.state_dict()
    net3, resumed = trainer()
    resumed.start(Xs, ys)
    resumed.load_state_dict(state)
    for _ in range(4):
        resumed.step()
    hist = resumed.finish()
    assert hist.loss == ref.loss and hist.accepted == ref.accepted and hist.radii == ref.radii
    assert torch.equal(parameters_to_vector(net3.parameters()), parameters_to_vector(net.parameters()))


def test_bad_shard_on_one_rank_raises_on_every_rank():
    X, y = _data()
    Xs, ys = _shard(X).clone(), _shard(y)
    last = COMM.Get_size() - 1
    if COMM.Get_rank() == last:
        Xs[0, 1] = math.nan
    opt = RMTR(_net(4), nn.CrossEntropyLoss(), levels=2, comm=COMM, progress=False)
    where = f".*on rank {last}" if COMM.Get_size() > 1 else ""
    with pytest.raises(ValueError, match="contains NaN or Inf" + where):
        opt.fit(Xs, ys, epochs=2)
    # the communicator is still usable: the next collective call works on every rank
    assert COMM.allreduce(1) == COMM.Get_size()

