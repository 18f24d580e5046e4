"""Every example runs in a tiny configuration and writes metrics, figures and a checkpoint."""

import math

import pytest
import torch

from pnode.examples import EXAMPLES

from .conftest import PNG_MAGIC, read_metrics, run_cli

EXPECTED = {
    "spiral": ("rollout_rmse", ["trajectories.png"]),
    "cnf2d": ("test_loglik", ["density.png"]),
    "cnf-tabular": ("test_loglik", ["samples.png"]),
    "digits": ("test_accuracy", ["predictions.png"]),
    "rober": ("k_max_rel_error", ["trajectories.png"]),
    "pde": ("test_rel_l2_error", ["solution.png"]),
    "snopt": ("test_accuracy", ["predictions.png"]),
    "dae": ("position_rmse_vs_clean", ["trajectories.png", "constraint.png"]),
    "rmtr": ("test_accuracy", ["rmtr.png"]),
}


def test_every_example_is_covered():
    assert set(EXPECTED) == set(EXAMPLES)


def _check_outputs(name, out, iters):
    m = read_metrics(out)
    key, figures = EXPECTED[name]
    assert m["example"] == name and m["iterations"] == iters
    assert math.isfinite(m["metrics"][key])
    assert all(math.isfinite(v) for v in m["metrics"].values() if isinstance(v, float))
    assert m["figures"] == ["loss.png", *figures]
    for f in m["figures"]:
        assert (out / f).read_bytes().startswith(PNG_MAGIC)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["example"] == name and ckpt["iteration"] == iters
    assert len(ckpt["history"]["loss"]) == iters and all(math.isfinite(x) for x in ckpt["history"]["loss"])
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    return m


# rober's tiny run is test_rober_recovers_rates (its --quick run is already small)
@pytest.mark.parametrize("name", [n for n in EXPECTED if n != "rober"])
def test_tiny_run_writes_outputs(name, out):
    extra = {"cnf2d": ["--n-test", "200", "--grid", "20"], "pde": ["--n-train", "4"]}.get(name, [])
    assert run_cli(name, "--quick", "--iters", "3", "--out", str(out), *extra) == 0
    _check_outputs(name, out, 3)


def test_float32_model(out):
    assert run_cli("digits", "--iters", "3", "--dtype", "float32", "--out", str(out)) == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())
    assert read_metrics(out)["metrics"]["test_accuracy"] > 0.1


def test_rober_recovers_rates(out):
    assert run_cli("rober", "--quick", "--iters", "9", "--out", str(out)) == 0
    m = _check_outputs("rober", out, 9)["metrics"]
    assert m["k_initial_max_rel_error"] > 0.3
    assert m["k_max_rel_error"] < 0.05  # 1% noise: the rates come back to a few percent


def test_plain_script(out):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}  # this checkout's pnode, not another install
    cmd = [sys.executable, str(root / "examples" / "digits.py"), "--iters", "2", "--out", str(out),
           "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert read_metrics(out)["iterations"] == 2
