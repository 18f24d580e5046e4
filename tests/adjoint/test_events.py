"""Events: odeint(..., event_fn=...) and pnode.odeint_event, with event times differentiable
with respect to y0, t0 and parameters (checked against closed forms and finite differences)."""

import math

import pytest
import torch

import pnode
from pnode.adjoint.reference import finite_difference_errors
from tests.models import TimeMLP


class Ball(torch.nn.Module):
    """Free fall x'' = -g with drag on v: the event is x = 0."""

    def __init__(self, drag: float = 0.0):
        super().__init__()
        self.g = torch.nn.Parameter(torch.tensor(9.8, dtype=torch.float64))
        self.drag = drag

    def forward(self, t, state):
        x, v = state
        return v, -self.g * torch.ones_like(x) - self.drag * v


def test_event_time_and_gradient_match_the_closed_form():
    ball = Ball()
    x0 = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    v0 = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    t0 = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    event_t, (xs, vs) = pnode.odeint_event(ball, (x0, v0), t0, event_fn=lambda t, s: s[0],
                                           rtol=1e-10, atol=1e-12)
    assert xs.shape == (2,) and vs.shape == (2,)
    assert abs(float(xs[-1].detach())) < 1e-12  # the scheme's own state is on the surface
    # t_e = t0 + (v0 + sqrt(v0^2 + 2 g x0)) / g
    x, v, g = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (1.0, 0.5, 9.8))
    exact = (v + torch.sqrt(v ** 2 + 2 * g * x)) / g
    assert float(event_t.detach()) == pytest.approx(0.2 + float(exact.detach()), rel=1e-9)
    got = torch.autograd.grad(event_t, [x0, v0, ball.g, t0])
    want = torch.autograd.grad(exact, [x, v, g])
    for a, b in zip(got[:3], want, strict=True):
        assert float(a) == pytest.approx(float(b), rel=1e-7)
    assert float(got[3]) == pytest.approx(1.0, rel=1e-9)  # autonomous: shifts with t0


@pytest.mark.parametrize("method,kw", [("dopri5", {"rtol": 1e-9, "atol": 1e-11}),
                                       ("rk4", {"options": {"step_size": 0.01}}),
                                       ("trapezoid", {"options": {"step_size": 0.02}})])
def test_event_gradients_against_finite_differences(method, kw):
    ball = Ball(drag=0.3)
    x0 = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    v0 = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)

    def loss():
        event_t, (xs, vs) = pnode.odeint_event(ball, (x0, v0), torch.tensor(0.0),
                                               event_fn=lambda t, s: s[0], method=method, **kw)
        return event_t + 0.3 * vs[-1]

    errs = finite_difference_errors(loss, [x0, v0, ball.g], eps=1e-5)
    # d y(t_e)/d t_e is taken as f(t_e, y_e) (as for output times): it differs from the
    # derivative of the last discrete step by the local error, O(h^2) for fixed-step trapezoid
    assert max(errs) < (1e-4 if method == "trapezoid" else 1e-5), errs


def test_event_in_reverse_time_and_with_a_vector_event():
    field = TimeMLP(dim=2).double()
    y0 = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)

    def event_fn(t, y):  # two surfaces; the first one crossed counts
        return torch.stack([t + 0.7, y[0] - 5.0])

    event_t, ys = pnode.odeint_event(field, y0, torch.tensor(0.0), event_fn=event_fn,
                                     reverse_time=True, rtol=1e-10, atol=1e-12)
    assert float(event_t.detach()) == pytest.approx(-0.7, abs=1e-12)
    assert ys.shape == (2, 2)
    (g,) = torch.autograd.grad(event_t, y0, allow_unused=True, materialize_grads=True)
    assert float(g.abs().max()) < 1e-12  # the first surface does not depend on y


def test_odeint_with_event_fn_returns_event_time_and_two_states():
    f = lambda t, y: torch.ones_like(y)  # noqa: E731
    y0 = torch.zeros(3, dtype=torch.float64)
    event_t, ys = pnode.odeint(f, y0, torch.tensor([0.0, 1.0]), event_fn=lambda t, y: y[1] - 2.5)
    assert float(event_t) == pytest.approx(2.5, rel=1e-12)  # beyond t1: t1 gives a direction
    assert torch.allclose(ys[-1], torch.full((3,), 2.5, dtype=torch.float64), rtol=1e-12)


def test_event_parameter_of_event_fn_is_differentiable():
    level = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    y0 = torch.ones(1, dtype=torch.float64)
    event_t, _ = pnode.odeint_event(lambda t, y: y, y0, 0.0, event_fn=lambda t, y: y[0] - level,
                                    rtol=1e-11, atol=1e-12)
    assert float(event_t.detach()) == pytest.approx(math.log(2.0), rel=1e-8)
    (g,) = torch.autograd.grad(event_t, level)
    assert float(g) == pytest.approx(0.5, rel=1e-7)  # d log(level) / d level


@pytest.mark.parametrize("event_fn,match", [
    (lambda t: t, "two arguments"),
    (lambda t, y, z: t, "two arguments"),
    ("x", "callable"),
    (lambda t, y: 1.0, "tensor"),
    (lambda t, y: y.sum() - y.sum(), "zero"),
])
def test_bad_event_functions(event_fn, match):
    with pytest.raises(ValueError, match=match):
        pnode.odeint_event(lambda t, y: -y, torch.ones(2, dtype=torch.float64), 0.0,
                           event_fn=event_fn)


def test_no_event_is_a_solver_error():
    with pytest.raises(pnode.SolverError, match="no event|max_num_steps"):
        pnode.odeint_event(lambda t, y: -y, torch.ones(1, dtype=torch.float64), 0.0,
                           event_fn=lambda t, y: y[0] + 1.0, options={"max_num_steps": 200})
