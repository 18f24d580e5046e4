"""Layer decomposition: a pipeline over time sub-intervals gives the serial gradients.

Every rank builds the same serial model (p ODE blocks on [r/p, (r+1)/p], same
seeds) as the reference and keeps block ``r`` as its pipeline stage.
"""

import time

import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI

import pnode
from pnode.parallel import LayerParallel
from tests.models import rel_err

pytestmark = pytest.mark.mpi

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()


class Field(torch.nn.Module):
    def __init__(self, fail_at=None):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3).double()
        self.fail_at, self.calls = fail_at, 0

    def forward(self, t, y):
        self.calls += 1
        if self.fail_at is not None and self.calls > self.fail_at:
            raise RuntimeError("injected stage failure")
        return torch.tanh(self.lin(y))


def _blocks(method, kw):
    torch.manual_seed(3)
    return [pnode.NeuralODE(Field(), t=(r / SIZE, (r + 1) / SIZE), method=method, **kw)
            for r in range(SIZE)]


@pytest.mark.parametrize("method,kw", [("rk4", {"options": {"step_size": 0.1}}),
                                       ("dopri5", {"rtol": 1e-8})])
@pytest.mark.parametrize("micro", [1, 3])
def test_pipeline_gradients_equal_serial(method, kw, micro):
    torch.manual_seed(4)
    x = torch.randn(7, 3, dtype=torch.float64)
    y = torch.randn(7, 3, dtype=torch.float64)
    serial = _blocks(method, kw)
    # the serial run over the same micro-batches (adaptive methods choose steps per micro-batch;
    # with fixed steps this is the full-batch gradient)
    sizes = [7 // micro + (1 if i < 7 % micro else 0) for i in range(micro)]
    loss_ref = 0.0
    for xm, ym in zip(x.split(sizes), y.split(sizes), strict=True):
        h = xm
        for block in serial:
            h = block(h)
        loss_ref = loss_ref + F.mse_loss(h, ym) * (len(xm) / 7)
    loss_ref.backward()
    stage = _blocks(method, kw)[RANK]
    lp = LayerParallel(stage, COMM, micro_batches=micro)
    loss = lp.train_step(x if RANK == 0 else None, y if RANK == SIZE - 1 else None, F.mse_loss)
    ref = float(loss_ref.detach())
    assert abs(loss - ref) < 1e-12 * abs(ref)
    for p, q in zip(stage.parameters(), serial[RANK].parameters(), strict=True):
        assert rel_err(p.grad, q.grad) < 1e-10
    assert lp.sent_bytes == (0 if RANK == SIZE - 1 else 7 * 3 * 8) + (0 if RANK == 0 else 7 * 3 * 8)


def test_failure_in_one_stage_ends_every_rank():
    bad = min(1, SIZE - 1)
    torch.manual_seed(3)
    stage = pnode.NeuralODE(Field(fail_at=12 if RANK == bad else None), t=(RANK, RANK + 1),
                            method="rk4", options={"step_size": 0.25})
    lp = LayerParallel(stage, COMM, micro_batches=3)
    x = torch.randn(6, 3, dtype=torch.float64)
    start = time.perf_counter()
    if RANK == bad:
        with pytest.raises(RuntimeError, match="injected stage failure"):
            lp.train_step(x, x, F.mse_loss)
    else:
        with pytest.raises(pnode.PnodeError, match=f"rank {bad} failed with RuntimeError"):
            lp.train_step(x, x, F.mse_loss)
    assert time.perf_counter() - start < 30


def test_missing_batch_on_rank_zero_raises_everywhere():
    lp = LayerParallel(torch.nn.Identity(), COMM, micro_batches=2)
    with pytest.raises((ValueError, pnode.PnodeError), match="batch tensor"):
        lp.train_step(None, None, F.mse_loss)


def test_micro_batches_validated():
    with pytest.raises(ValueError, match="Invalid micro_batches"):
        LayerParallel(torch.nn.Identity(), COMM, micro_batches=0)
