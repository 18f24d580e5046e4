"""``pnode run`` under mpiexec: data-parallel examples equal the serial run, rank-0 I/O, resume.

Launched by test.sh as ``mpiexec -n 2`` and ``-n 3`` (uneven shards).  Every rank
trains its shard of each batch; the serial reference is the same example run on
``COMM_SELF`` by every rank.  Tolerance: the loss histories agree to 1e-9
relative (sums over shards instead of one sum over the batch change the rounding
only; a few iterations of Adam or SNOpt do not amplify it beyond that).
"""

import math
import os
import signal
import tempfile
from pathlib import Path

import pytest
import torch
from mpi4py import MPI

from pnode.examples import EXAMPLES, ExampleError, InterruptedRun, NotParallelError
from pnode.examples.runner import run_example

pytestmark = pytest.mark.mpi
COMM = MPI.COMM_WORLD

CASES = {
    "digits": ["--iters", "4", "--batch", "48"],
    "spiral": ["--iters", "4", "--n-samples", "120", "--t-end", "3", "--batch", "12"],
    "cnf-tabular": ["--iters", "3", "--width", "16", "--batch", "30"],
    "cnf2d": ["--iters", "3", "--width", "16", "--batch", "30", "--n-test", "60", "--grid", "10",
              "--n-train", "300"],
    "snopt": ["--iters", "4", "--batch", "48", "--update-freq", "2"],
    "pde": ["--iters", "3", "--n-train", "6", "--batch", "5"],
    "rmtr": ["--iters", "6", "--depth", "4", "--width", "6"],
}


def _shared_dir() -> Path:
    """One temporary folder, the same on every rank (rank 0 creates it)."""
    return Path(COMM.bcast(tempfile.mkdtemp(prefix="pnode-mpi-") if COMM.Get_rank() == 0 else None))


def _run(name, argv, out, comm=COMM):
    return run_example(EXAMPLES[name], ["--quick", "--no-progress", "--out", str(out), *argv], comm=comm)


@pytest.mark.parametrize("name", list(CASES))
def test_data_parallel_equals_serial(name):
    root = _shared_dir()
    rank = COMM.Get_rank()
    par = _run(name, CASES[name], root / "par")
    ser = _run(name, CASES[name], root / f"serial-{rank}", comm=MPI.COMM_SELF)
    assert len(par.losses) == len(ser.losses)
    for a, b in zip(par.losses, ser.losses, strict=True):
        assert math.isfinite(a) and abs(a - b) <= 1e-9 * abs(b), (a, b)
    # every rank holds the same result; only rank 0 wrote files (and left no temporary ones)
    assert COMM.allgather(par.losses) == [par.losses] * COMM.Get_size()
    assert par.metrics["ranks"] == COMM.Get_size()
    COMM.Barrier()
    files = sorted(p.name for p in (root / "par").iterdir())
    assert "checkpoint.pt" in files and "metrics.json" in files
    assert not [f for f in files if f.startswith(".")]


@pytest.mark.parametrize("name", ["digits", "rmtr"])
def test_resume_on_every_rank_repeats_the_uninterrupted_run(name):
    root = _shared_dir()
    argv = [a for a in CASES[name]]
    n = int(argv[argv.index("--iters") + 1])
    full = _run(name, argv, root / "full")
    argv[argv.index("--iters") + 1] = str(n // 2)
    _run(name, argv, root / "part")
    argv[argv.index("--iters") + 1] = str(n)
    resumed = run_example(EXAMPLES[name], ["--resume", "--no-progress", "--out", str(root / "part"),
                                           "--iters", str(n)], comm=COMM)
    assert resumed.resumed_from == n // 2
    assert resumed.losses == full.losses  # bit for bit
    if COMM.Get_rank() == 0:
        a = torch.load(root / "full" / "checkpoint.pt", weights_only=True)
        b = torch.load(root / "part" / "checkpoint.pt", weights_only=True)
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), k


def test_serial_only_example_exits_on_every_rank():
    with pytest.raises(NotParallelError, match="cannot train data-parallel"):
        _run("rober", [], _shared_dir() / "r")


def test_failure_on_one_rank_ends_every_rank(monkeypatch):
    step = EXAMPLES["digits"].train_step

    def failing(self, iteration):
        loss = step(self, iteration)
        if iteration == 1 and self.rank == self.size - 1:
            raise RuntimeError("bad shard on the last rank")
        return loss

    monkeypatch.setattr(EXAMPLES["digits"], "train_step", failing)
    last = COMM.Get_rank() == COMM.Get_size() - 1
    with pytest.raises(RuntimeError if last else ExampleError, match="bad shard on the last rank"):
        _run("digits", CASES["digits"], _shared_dir() / "f")


def test_bad_option_fails_on_every_rank():
    root = _shared_dir()
    with pytest.raises(ExampleError, match="Invalid --lr nan"):
        _run("digits", ["--lr", "nan"], root / "x")


def test_sigterm_on_one_rank_stops_every_rank_with_a_resumable_checkpoint(monkeypatch):
    """A scheduler's SIGTERM reaching one rank only: every rank stops after the same iteration,
    rank 0 writes the checkpoint, and --resume on every rank repeats the uninterrupted run."""
    root = _shared_dir()
    argv = CASES["digits"]
    n = int(argv[argv.index("--iters") + 1])
    full = _run("digits", argv, root / "full")
    step = EXAMPLES["digits"].train_step

    def signalled(self, iteration):
        loss = step(self, iteration)
        if iteration == 1 and self.rank == self.size - 1:
            os.kill(os.getpid(), signal.SIGTERM)  # handled between bytecodes: the iteration finishes
        return loss

    monkeypatch.setattr(EXAMPLES["digits"], "train_step", signalled)
    with pytest.raises(InterruptedRun, match=r"interrupted after iteration 2 \((SIGTERM|stop requested)\)"):
        _run("digits", argv, root / "part")
    monkeypatch.setattr(EXAMPLES["digits"], "train_step", step)
    COMM.Barrier()
    resumed = run_example(EXAMPLES["digits"], ["--resume", "--no-progress", "--out", str(root / "part"),
                                               "--iters", str(n)], comm=COMM)
    assert resumed.resumed_from == 2
    assert resumed.losses == full.losses  # bit for bit, on every rank
