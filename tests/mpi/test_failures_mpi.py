"""Failures on one rank of a collective solve end every rank within seconds (issue 20).

Run under ``mpiexec -n 2`` and ``-n 3`` (test.sh).  Each test fails something on
one rank only (a raising func with an adaptive implicit method, a full disk, a
missing checkpoint directory, Ctrl-C), checks the exception on every rank, that
every rank ended within 10 s, that no checkpoint files are left and that a
following collective solve works.  pytest-timeout (thread method) guards
against a hang.
"""

import errno
import os
import time

import pytest
import torch
from mpi4py import MPI

import pnode
from pnode.adjoint import store

pytestmark = pytest.mark.mpi

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()
LAST = SIZE - 1
T = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)


class _Field(torch.nn.Module):
    """tanh(W y); raises ``exc`` on rank ``rank`` once t passes ``t_fail`` (while armed)."""

    def __init__(self, rank, t_fail, exc=None):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(3, 3).double()
        self.rank, self.t_fail, self.armed = rank, t_fail, True
        self.exc = RuntimeError("injected failure") if exc is None else exc

    def forward(self, t, y):
        if self.armed and RANK == self.rank and float(t) >= self.t_fail:
            raise self.exc
        return torch.tanh(self.lin(y))


def _normal_solve(func, **kw):
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    ys = pnode.odeint(func, y0, T, comm=COMM, **kw)
    ys.sum().backward()
    assert torch.isfinite(ys).all() and torch.isfinite(y0.grad).all()


def _ended_together(start):
    """Every rank ended within 10 s (and they all got here: no rank is stuck)."""
    elapsed = COMM.allgather(time.perf_counter() - start)
    assert max(elapsed) < 10, elapsed


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["trapezoid", "implicit_euler", "kencarp4"])
def test_adaptive_implicit_method_with_one_failing_rank_ends_every_rank(method):
    """The failing rank returns NaN; Newton then fails on every rank at every step size."""
    func = _Field(LAST, 0.1)
    y0 = torch.randn(2, 3, dtype=torch.float64)
    kw = {"method": method, "rtol": 1e-4, "atol": 1e-6}  # few steps before t_fail
    start = time.perf_counter()
    if RANK == LAST:
        with pytest.raises(RuntimeError, match="injected failure"):
            pnode.odeint(func, y0, T, comm=COMM, **kw)
    else:
        with pytest.raises(pnode.SolverError, match=f"rank {LAST} failed with RuntimeError") as e:
            pnode.odeint(func, y0, T, comm=COMM, **kw)
        assert e.value.reason == "RANK_FAILED"
    _ended_together(start)
    # every rank reports the steps it took before the failure
    assert len(set(COMM.allgather(pnode.last_stats().steps))) == 1
    func.armed = False
    _normal_solve(func, **kw)


@pytest.mark.timeout(120)
def test_blow_up_is_diagnosed_at_the_same_step_on_every_rank():
    y0 = torch.ones(1 if RANK else 2, 1, dtype=torch.float64)
    start = time.perf_counter()
    with pytest.raises(pnode.SolverError) as e:
        pnode.odeint(lambda t, y: y * y, y0, torch.tensor([0.0, 2.0], dtype=torch.float64),
                     method="dopri5", comm=COMM)
    _ended_together(start)
    assert e.value.reason in ("DIVERGED_STEP_UNDERFLOW", "DIVERGED_NONFINITE")
    assert len(set(COMM.allgather((str(e.value.reason), e.value.steps)))) == 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method,kw", [("rk4", {"options": {"step_size": 0.01}}),
                                       ("kencarp4", {})])
def test_interrupt_on_one_rank_ends_every_rank_with_keyboard_interrupt(method, kw):
    func = _Field(0, 0.4, KeyboardInterrupt())
    y0 = torch.randn(2, 3, dtype=torch.float64)
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        pnode.odeint(func, y0, T, method=method, comm=COMM, **kw)
    _ended_together(start)
    func.armed = False
    _normal_solve(func, method=method, **kw)


@pytest.mark.timeout(120)
def test_disk_full_on_one_rank_raises_on_every_rank_and_removes_all_files(tmp_path, monkeypatch):
    real_write = store._write_state

    def full_disk(path, x):
        if RANK == LAST and "state-" in path:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real_write(path, x)

    monkeypatch.setattr(store, "_write_state", full_disk)
    func = _Field(-1, 0.0)  # never raises
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    policy = pnode.Checkpoint.disk(tmp_path, ram_budget=1)
    kw = {"method": "rk4", "options": {"step_size": 0.02}, "checkpoint": policy}
    ys = pnode.odeint(func, y0, T, comm=COMM, **kw)
    start = time.perf_counter()
    with pytest.raises(pnode.CheckpointError) as e:
        ys.sum().backward()
    _ended_together(start)
    assert ("No space left" in str(e.value)) if RANK == LAST else f"rank {LAST}" in str(e.value)
    assert list(tmp_path.iterdir()) == []  # removed on every rank
    monkeypatch.undo()
    _normal_solve(func, **kw)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.timeout(120)
def test_checkpoint_directory_missing_on_one_rank_raises_on_every_rank(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    policy = pnode.Checkpoint.disk(scratch, ram_budget=1)  # valid on every rank when built
    if RANK == LAST:
        scratch.rmdir()  # node-local scratch gone on one node
    COMM.Barrier()
    func = _Field(-1, 0.0)
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="does not exist"):
        pnode.odeint(func, y0, T, method="rk4", options={"step_size": 0.05}, checkpoint=policy,
                     comm=COMM)
    _ended_together(start)
    scratch.mkdir(exist_ok=True)
    _normal_solve(func, method="rk4", options={"step_size": 0.05}, checkpoint=policy)
    assert list(scratch.iterdir()) == []
