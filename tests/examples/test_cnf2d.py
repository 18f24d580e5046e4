"""The acceptance run: `pnode run cnf2d --quick` learns a density better than a Gaussian."""

import math

from .conftest import PNG_MAGIC, read_metrics, run_cli


def test_cnf2d_quick_writes_finite_loglik_and_density(out):
    assert run_cli("cnf2d", "--quick", "--out", str(out)) == 0
    m = read_metrics(out)
    ll = m["metrics"]["test_loglik"]
    assert math.isfinite(ll)
    # the quick flow must beat the best single Gaussian on the (non-Gaussian) moons
    assert ll > m["metrics"]["gaussian_baseline_test_loglik"] + 0.2
    assert m["iterations"] == 300 and m["config"]["quick"] is True
    assert (out / "density.png").read_bytes().startswith(PNG_MAGIC)
    assert (out / "loss.png").read_bytes().startswith(PNG_MAGIC)
