"""IntegrationTime (pnode/control/time_control.py): dL/dT from the engine, the feedback rule."""

import pytest
import torch
from torch import nn

import pnode
from pnode.control import IntegrationTime, SNOpt


class Field(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(2, 6)
        self.l2 = nn.Linear(6, 2)

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(y)))


def _loss(func, y0, span):
    y1 = pnode.odeint(func, y0, span, method="rk4", options={"step_size": 0.01})[-1]
    return (y1 - 0.3).pow(2).sum()


def test_end_time_gradient_matches_finite_differences():
    func = Field().double()
    y0 = torch.randn(5, 2, dtype=torch.float64)
    tc = IntegrationTime(1.0)
    _loss(func, y0, tc.span()).backward()
    eps = 1e-5
    with torch.no_grad():
        lp = _loss(func, y0, torch.tensor([0.0, 1.0 + eps], dtype=torch.float64))
        lm = _loss(func, y0, torch.tensor([0.0, 1.0 - eps], dtype=torch.float64))
    fd = float(lp - lm) / (2 * eps)
    assert float(tc.t1.grad) == pytest.approx(fd, rel=1e-6)


class _Opt:
    last_directional_derivative = -0.2


def test_feedback_rule():
    tc = IntegrationTime(2.0, lr=0.5, damping=0.1, max_step=10.0)
    tc.t1.grad = torch.tensor(0.4, dtype=torch.float64)
    delta = tc.step(0.8, _Opt())
    assert delta == pytest.approx(-0.5 * 0.4 * (1 - 0.2 / 1.6) / (0.16 / 1.6 + 0.1))
    assert tc.value == pytest.approx(2.0 + delta)


def test_step_is_capped_and_bounded():
    tc = IntegrationTime(1.0, max_step=0.1, max_t1=1.05)
    tc.t1.grad = torch.tensor(-1.0, dtype=torch.float64)  # wants a longer horizon
    assert tc.step(1.0) == pytest.approx(0.05)
    assert tc.value == pytest.approx(1.05)
    tc.t1.grad = torch.tensor(1e-3, dtype=torch.float64)
    assert tc.step(1.0) < 0


def test_learns_the_end_time_of_a_decay():
    # y' = -y from y0 to the data exp(-1.5) y0: T -> 1.5
    func = nn.Linear(2, 2, bias=False).double().requires_grad_(False)
    func.weight.copy_(-torch.eye(2))
    y0 = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    target = torch.exp(torch.tensor(-1.5, dtype=torch.float64)) * y0
    tc = IntegrationTime(1.0)
    for _ in range(12):
        tc.zero_grad()
        y1 = pnode.odeint(lambda t, y: func(y), y0, tc.span(), method="rk4", options={"step_size": 0.05})[-1]
        loss = (y1 - target).pow(2).sum()
        loss.backward()
        tc.step(loss)
    assert tc.value == pytest.approx(1.5, abs=1e-3)


def test_snopt_leaves_the_end_time_to_its_controller():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.func = Field()
            self.time = IntegrationTime(1.0)

        def forward(self, y):
            return pnode.odeint(self.func, y, self.time.span(), method="rk4", options={"step_size": 0.1})[-1]

    model = Block().double()
    opt = SNOpt(model, ode_funcs=[model.func])
    assert all(p is not model.time.t1 for g in opt.param_groups for p in g["params"])
    y0 = torch.randn(8, 2, dtype=torch.float64)
    loss = model(y0).pow(2).mean()
    loss.backward()
    opt.step()
    before = model.time.value
    model.time.step(loss, opt)
    assert model.time.value != before
    assert opt.last_directional_derivative < 0  # a descent step


@pytest.mark.parametrize("kw", [{"t1": 0.0}, {"t1": float("nan")}, {"lr": 0.0}, {"damping": -1.0},
                                {"max_step": 0.0}, {"max_t1": 0.5}])
def test_invalid_arguments(kw):
    with pytest.raises(ValueError, match="Invalid"):
        IntegrationTime(**kw)


def test_step_without_gradient_or_with_nan():
    tc = IntegrationTime(1.0)
    with pytest.raises(RuntimeError, match="no gradient"):
        tc.step(1.0)
    tc.t1.grad = torch.tensor(float("nan"), dtype=torch.float64)
    with pytest.raises(FloatingPointError):
        tc.step(1.0)
    tc.t1.grad = torch.tensor(0.1, dtype=torch.float64)
    with pytest.raises(ValueError, match="Invalid loss"):
        tc.step(float("nan"))
    assert tc.value == 1.0
