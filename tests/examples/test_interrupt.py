"""SIGINT / SIGTERM during ``pnode run``: a resumable checkpoint, and --resume repeats the run bit for bit."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pnode.examples import InterruptedRun, Spiral, run

from .conftest import SMALL_SPIRAL

ARGS = ["--quick", "--no-progress", *SMALL_SPIRAL]
N = 24  # iterations compared with the uninterrupted run


def _state(folder):
    return torch.load(folder / "checkpoint.pt", weights_only=True)


def _assert_same_training(a, b):
    sa, sb = _state(a), _state(b)
    assert sa["iteration"] == sb["iteration"]
    assert sa["history"]["loss"] == sb["history"]["loss"]
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    assert torch.equal(sa["rng"]["generator"], sb["rng"]["generator"])
    assert torch.equal(sa["rng"]["torch"], sb["rng"]["torch"])
    ea, eb = sa["optimizer"]["state"], sb["optimizer"]["state"]
    for k in ea:
        for name in ea[k]:
            assert torch.equal(torch.as_tensor(ea[k][name]), torch.as_tensor(eb[k][name])), (k, name)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    run("spiral", [*ARGS, "--iters", str(N), "--out", str(out)])
    return out


def _interrupt_subprocess(out, sig):
    """Start a long `pnode run spiral`, send ``sig`` once training is under way; (status, stderr)."""
    cmd = [sys.executable, "-m", "pnode.cli", "run", "spiral", *ARGS, "--iters", "100000",
           "--checkpoint-every", "1", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120  # a guard against a hang, not a timing assertion
        while not (out / "checkpoint.pt").exists():  # written after the first iteration
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.02)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_writes_a_checkpoint_that_resumes_bit_for_bit(sig, uninterrupted, tmp_path):
    out = tmp_path / "run"
    status, err = _interrupt_subprocess(out, sig)
    assert status == 128 + sig, err
    name = signal.Signals(sig).name
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"({name})" in lines[0] and "--resume" in lines[0], err
    assert "Traceback" not in err and "MPI_Abort" not in err
    k = _state(out)["iteration"]
    assert f"interrupted after iteration {k} " in lines[0]
    assert 1 <= k < N, k  # it stopped after the iteration during which the signal came
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files
    resumed = run("spiral", ["--resume", "--no-progress", "--iters", str(N), "--out", str(out)])
    assert resumed.resumed_from == k
    _assert_same_training(uninterrupted, out)


def test_hard_interrupt_after_the_update_checkpoints_the_state_before_the_iteration(
        uninterrupted, tmp_path, monkeypatch):
    """A second Ctrl-C can land after the optimizer changed the model: the checkpoint must
    hold the state after the last complete iteration, not a half-done one."""
    out = tmp_path / "run"
    step = Spiral.train_step

    def update_then_interrupt(self, iteration):
        loss = step(self, iteration)  # parameters, Adam moments and generator all moved on
        if iteration == 5:
            raise KeyboardInterrupt
        return loss

    monkeypatch.setattr(Spiral, "train_step", update_then_interrupt)
    with pytest.raises(InterruptedRun, match="interrupted after iteration 5 ") as e:
        run("spiral", [*ARGS, "--iters", str(N), "--out", str(out)])
    assert e.value.exit_status == 130
    assert _state(out)["iteration"] == 5 and len(_state(out)["history"]["loss"]) == 5
    monkeypatch.setattr(Spiral, "train_step", step)
    run("spiral", ["--resume", "--no-progress", "--out", str(out)])
    _assert_same_training(uninterrupted, out)
