"""Checkpoint policies built into the engine give the same gradient."""

import pytest
import torch

import pnode
from tests.models import TimeMLP, rel_err

T = torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64)


@pytest.mark.parametrize("method,kw", [
    ("rk4", {"options": {"step_size": 0.1}}),
    ("dopri5", {"rtol": 1e-6}),
    ("trapezoid", {"options": {"step_size": 0.1}}),
    ("kencarp4", {"options": {"step_size": 0.1}}),
])
def test_solution_only_matches_stages(method, kw):
    func = TimeMLP().double()
    y0 = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    grads = {}
    for policy in ("stages", "solution", "all"):
        ys = pnode.odeint(func, y0, T, method=method, checkpoint=policy, **kw)
        grads[policy] = torch.autograd.grad(ys.pow(2).sum(), [y0, *func.parameters()])
    for policy in ("solution", "all"):
        for a, b in zip(grads[policy], grads["stages"], strict=True):
            assert rel_err(a, b) < 1e-12, (policy, rel_err(a, b))
