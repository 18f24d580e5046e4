"""torchdiffeq's step callbacks (func.callback_step, callback_accept_step, callback_reject_step
and the *_adjoint ones), called from PETSc's step monitor with torchdiffeq's arguments."""

import pytest
import torch

import pnode

T = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)


class Logged(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2).double()
        self.log = []

    def forward(self, t, y):
        return torch.tanh(self.lin(y)) * (1 + t)

    def callback_step(self, t0, y0, dt):
        self.log.append(("step", float(t0), y0.clone(), float(dt)))

    def callback_accept_step(self, t0, y0, dt):
        self.log.append(("accept", float(t0), y0.clone(), float(dt)))

    def callback_reject_step(self, t0, y0, dt):
        self.log.append(("reject", float(t0), y0.clone(), float(dt)))

    def callback_step_adjoint(self, t0, state, dt):
        self.log.append(("adjoint", float(t0), state, float(dt)))


def test_forward_callbacks_see_every_step():
    f = Logged()
    y0 = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    ys = pnode.odeint(f, y0, T, rtol=1e-6)
    st = pnode.last_stats()
    steps = [e for e in f.log if e[0] == "step"]
    accepts = [e for e in f.log if e[0] == "accept"]
    assert len(accepts) == st.steps and len(steps) == st.steps + st.rejected
    assert len([e for e in f.log if e[0] == "reject"]) == st.rejected
    for k, (_, t0, _y, dt) in enumerate(accepts):
        assert t0 == st.step_times[k] and dt == pytest.approx(st.step_times[k + 1] - t0, abs=1e-15)
    # the state passed at the step after an output is that output
    at_half = [e for e in accepts if e[1] == 0.5][0]
    assert torch.equal(at_half[2], ys[1].detach())
    assert steps[0][1] == 0.0 and torch.equal(steps[0][2], y0.detach())


def test_fixed_step_methods_call_callback_step_only():
    f = Logged()
    pnode.odeint(f, torch.ones(2, dtype=torch.float64), T, method="rk4",
                 options={"step_size": 0.1})
    assert {e[0] for e in f.log} == {"step"} and len(f.log) == 10
    assert [e[3] for e in f.log] == pytest.approx([0.1] * 10)


def test_rejections_are_reported():
    f = Logged()
    with torch.no_grad():
        f.lin.weight.mul_(20.0)
    pnode.odeint(f, torch.ones(2, dtype=torch.float64), T, rtol=1e-9, options={"first_step": 0.5})
    st = pnode.last_stats()
    assert st.rejected > 0
    assert len([e for e in f.log if e[0] == "reject"]) == st.rejected


def test_adjoint_callbacks_walk_the_steps_backwards():
    f = Logged()
    y0 = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    ys = pnode.odeint(f, y0, T, rtol=1e-6)
    st = pnode.last_stats()
    f.log.clear()
    ys[-1].sum().backward()
    adj = [e for e in f.log if e[0] == "adjoint"]
    assert [e[1] for e in adj] == st.step_times[:0:-1]
    y, lam, *grads = adj[0][2]
    assert torch.equal(y, ys[-1].detach()) and torch.equal(lam, torch.ones(2, dtype=torch.float64))
    assert len(grads) == 2 and float(grads[0].abs().sum()) == 0.0  # nothing accumulated yet
    at_half = [e for e in adj if e[1] == 0.5][0]
    assert torch.equal(at_half[2][0], ys[1].detach())


def test_reverse_time_callbacks_get_user_times():
    f = Logged()
    pnode.odeint(f, torch.ones(2, dtype=torch.float64), T.flip(0), method="rk4",
                 options={"step_size": 0.25})
    assert [e[1] for e in f.log] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert all(e[3] == pytest.approx(0.25) for e in f.log)


def test_a_failing_callback_raises_its_own_error():
    class Bad(Logged):
        def callback_step(self, t0, y0, dt):
            raise KeyError("from the callback")

    with pytest.raises(KeyError, match="from the callback"):
        pnode.odeint(Bad(), torch.ones(2, dtype=torch.float64), T)
    # the cached solver still works
    assert torch.isfinite(pnode.odeint(Logged(), torch.ones(2, dtype=torch.float64), T)).all()
