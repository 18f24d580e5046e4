"""The starting-step heuristic (pnode/adjoint/initial_step.py) as a free function, no PETSc."""

import math

import pytest
import torch

from pnode.adjoint.initial_step import initial_step


def test_linear_decay_matches_hairer_norsett_wanner():
    # y' = -y, y0 = 1, atol = 0: d0 = d1 = 1/rtol, h0 = 0.01, d2 = 0.01/rtol/h0,
    # h1 = (0.01 / d2)^(1/(p+1)) with p = 5.
    rtol = 1e-6
    h = initial_step(lambda t, y: -y, 0.0, torch.ones(1, dtype=torch.float64), 10.0,
                     order=5, rtol=rtol, atol=0.0)
    assert h == pytest.approx((0.01 / (0.01 / rtol / 0.01)) ** (1 / 6), rel=1e-12)
    assert h == pytest.approx(10 ** (-4 / 3), rel=1e-12)


def test_bounded_by_span_and_zero_slope():
    y0 = torch.ones(4, dtype=torch.float64)
    assert initial_step(lambda t, y: -y, 0.0, y0, 1e-3, order=4, rtol=1e-6, atol=1e-9) == 1e-3
    # f = 0: the fallback branch (h0 = 1e-6, h1 = 1e-6)
    h = initial_step(lambda t, y: torch.zeros_like(y), 0.0, y0, 1.0, order=2, rtol=1e-6, atol=1e-9)
    assert h == 1e-6


def test_reduction_and_check_called_once_per_evaluation():
    calls = []

    def reduce(x):
        calls.append("reduce")
        return 2 * x  # two identical "ranks": the RMS norms do not change

    serial = initial_step(lambda t, y: -3 * y, 0.5, torch.full((3,), 2.0, dtype=torch.float64),
                          2.0, order=3, rtol=1e-5, atol=1e-7)
    dist = initial_step(lambda t, y: -3 * y, 0.5, torch.full((3,), 2.0, dtype=torch.float64),
                        2.0, order=3, rtol=1e-5, atol=1e-7, reduce=reduce,
                        after_eval=lambda: calls.append("check"))
    assert calls == ["reduce", "check", "reduce", "check"]
    assert math.isclose(dist, serial, rel_tol=1e-14)
