"""Interrupted-and-resumed training repeats the uninterrupted run exactly."""

import subprocess
import sys

import pytest
import torch

from pnode.examples import ExampleError, Spiral, run

from .conftest import SMALL_SPIRAL, read_metrics


def _state(folder):
    return torch.load(folder / "checkpoint.pt", weights_only=True)


def _same_training(a, b):
    sa, sb = _state(a), _state(b)
    assert sa["history"]["loss"] == sb["history"]["loss"]
    assert sa["model"].keys() == sb["model"].keys()
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    assert torch.equal(sa["rng"]["generator"], sb["rng"]["generator"])


# spiral: mini-batches from the generator; cnf-tabular: Hutchinson noise too; rober: adaptive implicit
# (rober with LBFGS, whose curvature history must survive the checkpoint; snopt: Kronecker
# factors, inverses and the step counter of SNOpt's state_dict)
@pytest.mark.parametrize("name,n,extra", [
    ("spiral", 6, SMALL_SPIRAL), ("cnf-tabular", 4, []), ("rober", 2, ["--n-obs", "6", "--t-end", "1"]),
    ("snopt", 10, ["--update-freq", "2"])])
def test_resume_equals_uninterrupted(name, n, extra, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    a = run(name, ["--quick", "--iters", str(n), "--out", str(full), "--no-progress", *extra])
    b = run(name, ["--quick", "--iters", str(n // 2), "--out", str(part), "--no-progress", *extra])
    c = run(name, ["--resume", "--iters", str(n), "--out", str(part), "--no-progress"])
    assert b.losses == a.losses[: n // 2]
    assert c.resumed_from == n // 2
    assert c.losses == a.losses  # the next loss after resuming is the uninterrupted one, exactly
    _same_training(full, part)
    assert read_metrics(part)["config"]["quick"] is True  # resumed with the checkpoint's options


def test_keyboard_interrupt_checkpoints_and_resumes(tmp_path, monkeypatch):
    full, part = tmp_path / "full", tmp_path / "part"
    run("spiral", ["--quick", "--iters", "5", "--out", str(full), "--no-progress", *SMALL_SPIRAL])
    step = Spiral.train_step

    def interrupted(self, iteration):
        if iteration == 3:
            raise KeyboardInterrupt
        return step(self, iteration)

    monkeypatch.setattr(Spiral, "train_step", interrupted)
    with pytest.raises(ExampleError, match="interrupted after iteration 3.*--resume"):
        run("spiral", ["--quick", "--iters", "5", "--out", str(part), "--no-progress", *SMALL_SPIRAL])
    assert _state(part)["iteration"] == 3
    monkeypatch.setattr(Spiral, "train_step", step)
    run("spiral", ["--resume", "--out", str(part), "--no-progress"])
    _same_training(full, part)


def test_resume_in_a_new_process(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    run("spiral", ["--quick", "--iters", "4", "--out", str(full), "--no-progress", *SMALL_SPIRAL])
    run("spiral", ["--quick", "--iters", "2", "--out", str(part), "--no-progress", *SMALL_SPIRAL])
    cmd = [sys.executable, "-m", "pnode.cli", "run", "spiral", "--resume", "--iters", "4",
           "--out", str(part), "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "4 iterations" in res.stdout
    _same_training(full, part)


def test_resume_when_already_done_only_evaluates(tmp_path):
    out = tmp_path / "r"
    run("spiral", ["--quick", "--iters", "2", "--out", str(out), "--no-progress", *SMALL_SPIRAL])
    before = (out / "checkpoint.pt").read_bytes()
    r = run("spiral", ["--resume", "--out", str(out), "--no-progress", "--iters", "2"])
    assert r.resumed_from == 2 and r.metrics["iterations"] == 2
    assert (out / "checkpoint.pt").read_bytes() == before
