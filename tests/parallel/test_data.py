"""Serial checks of pnode.parallel's data-parallel helpers (the MPI runs are in tests/mpi)."""

import pytest
import torch
from mpi4py import MPI

import pnode
from pnode.parallel import DataParallel, shard_slice


@pytest.mark.parametrize("n,size", [(7, 3), (2, 3), (10, 1), (0, 2)])
def test_shards_cover_the_data_once_in_order(n, size):
    idx = [i for r in range(size) for i in range(n)[shard_slice(n, r, size)]]
    assert idx == list(range(n))
    sizes = [len(range(n)[shard_slice(n, r, size)]) for r in range(size)]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("rank,size", [(-1, 2), (2, 2), (0, 0)])
def test_shard_slice_rejects_bad_ranks(rank, size):
    with pytest.raises(ValueError, match="Invalid rank"):
        shard_slice(5, rank, size)


def test_single_rank_data_parallel_is_plain_training():
    field = torch.nn.Linear(2, 2).double()
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 2).double(),
        pnode.NeuralODE(lambda t, y: field(y), method="rk4", options={"step_size": 0.5}))
    dp = DataParallel(model, MPI.COMM_SELF)
    x = torch.randn(4, 3, dtype=torch.float64)
    assert torch.equal(dp.shard(x), x) and dp.global_count(4) == 4
    model(x).sum().backward()
    before = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    dp.reduce_gradients()
    after = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
