"""pnode against torchdiffeq itself, as the behavioural reference for the parity paths."""

import torch
import torchdiffeq

import pnode
from tests.models import TimeMLP, rel_err

T = torch.linspace(1.0, -0.5, 7, dtype=torch.float64)  # decreasing


def test_fixed_grid_matches_torchdiffeq_in_reverse_time_and_for_0d_states():
    func = TimeMLP(dim=2).double()
    y0 = torch.randn(3, 2, dtype=torch.float64)
    # torchdiffeq's rk4 is the 3/8 rule: pnode's rk38; both step once per output interval
    ours = pnode.odeint(func, y0, T, method="rk38")
    theirs = torchdiffeq.odeint(func, y0, T, method="rk4")
    assert rel_err(ours, theirs) < 1e-13
    for m in ("euler", "midpoint"):
        assert rel_err(pnode.odeint(func, y0, T, method=m),
                       torchdiffeq.odeint(func, y0, T, method=m)) < 1e-13
    k = torch.tensor(0.3, dtype=torch.float64)
    y = torch.tensor(2.0, dtype=torch.float64)
    a = pnode.odeint(lambda t, y: -k * y * t, y, T, method="rk38")
    b = torchdiffeq.odeint(lambda t, y: -k * y * t, y, T, method="rk4")
    assert a.shape == b.shape == (7,) and rel_err(a, b) < 1e-13


def test_single_time_and_adaptive_reverse_solution_agree():
    func = TimeMLP(dim=2).double()
    y0 = torch.randn(3, 2, dtype=torch.float64)
    one = torch.tensor([0.25], dtype=torch.float64)
    assert torch.equal(pnode.odeint(func, y0, one), torchdiffeq.odeint(func, y0, one))
    ours = pnode.odeint(func, y0, T, rtol=1e-10, atol=1e-12)
    theirs = torchdiffeq.odeint(func, y0, T, rtol=1e-10, atol=1e-12)
    assert rel_err(ours, theirs) < 1e-8


def test_event_time_matches_torchdiffeq():
    def f(t, s):
        x, v = s
        return v, -9.8 * torch.ones_like(x) - 0.2 * v

    s0 = (torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64))
    t0 = torch.tensor(0.0, dtype=torch.float64)
    ev = lambda t, s: s[0]  # noqa: E731
    ours, _ = pnode.odeint_event(f, s0, t0, event_fn=ev, rtol=1e-10, atol=1e-12)
    theirs, _ = torchdiffeq.odeint_event(f, s0, t0, event_fn=ev, rtol=1e-10, atol=1e-12)
    assert abs(float(ours.detach()) - float(theirs.detach())) < 1e-8
