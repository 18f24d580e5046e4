"""torchdiffeq parity: 0-d and tuple states, fields independent of y, single and reverse times,
repeated backward passes, double backward, closure parameters (issues 15 and 20)."""

import math

import pytest
import torch

import pnode
from pnode.adjoint.reference import odeint_reference
from pnode.adjoint.timegrid import Reversed
from tests.models import TimeMLP, rel_err

T = torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64)
METHODS = [("dopri5", {"rtol": 1e-8}), ("rk4", {"options": {"step_size": 0.1}}),
           ("implicit_euler", {"options": {"step_size": 0.1}}), ("trapezoid", {"rtol": 1e-4, "atol": 1e-6}),
           ("sdirk2", {"rtol": 1e-6})]


def _reference_grads(func, y0, t, method, ys, params):
    """Backprop through the same scheme on pnode's recorded steps (in s = -t if t decreases)."""
    st = pnode.last_stats()
    rev = bool(t[-1] < t[0])
    ref = odeint_reference(Reversed(func) if rev else func, y0, -t if rev else t, method=method,
                           step_times=st.step_times, output_steps=st.output_steps)
    w = torch.randn_like(ref if isinstance(ref, torch.Tensor) else torch.cat(ref))
    flat = ys if isinstance(ys, torch.Tensor) else torch.cat(ys)
    ins = [*(y0 if isinstance(y0, tuple) else (y0,)), *params]
    got = torch.autograd.grad((flat * w).sum(), ins)
    ref_flat = ref if isinstance(ref, torch.Tensor) else torch.cat(ref)
    want = torch.autograd.grad((ref_flat * w).sum(), ins)
    return rel_err(flat, ref_flat), [rel_err(a, b) for a, b in zip(got, want, strict=True)]


@pytest.mark.parametrize("method,kw", METHODS)
def test_zero_dim_state(method, kw):
    k = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    ys = pnode.odeint(lambda t, y: -k * y + torch.sin(t), y0, T, method=method, **kw)
    assert ys.shape == (3,)
    err_y, err_g = _reference_grads(lambda t, y: -k * y + torch.sin(t), y0, T, method, ys, [k])
    assert err_y < 1e-10 and max(err_g) < 1e-10, (err_y, err_g)


def test_tuple_of_zero_dim_states():
    y0 = (torch.tensor(1.0, dtype=torch.float64, requires_grad=True),
          torch.tensor(0.0, dtype=torch.float64, requires_grad=True))
    xs, vs = pnode.odeint(lambda t, y: (y[1], -y[0]), y0, T, method="dopri5", rtol=1e-10,
                          atol=1e-12)
    assert xs.shape == (3,) and vs.shape == (3,)
    assert float(xs[-1].detach()) == pytest.approx(float(torch.cos(T[-1])), abs=1e-8)
    gx, gv = torch.autograd.grad(xs[-1], y0)
    assert float(gx) == pytest.approx(float(torch.cos(T[-1])), abs=1e-8)
    assert float(gv) == pytest.approx(float(torch.sin(T[-1])), abs=1e-8)


@pytest.mark.parametrize("method,kw", METHODS)
def test_field_independent_of_y(method, kw):
    # dy/dt = -0.1 c exp(-0.1 t): the state Jacobian is zero, the parameter one is not
    c = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    y0 = torch.ones(3, dtype=torch.float64, requires_grad=True)

    def f(t, y):
        return -0.1 * c * torch.exp(-0.1 * t) * torch.ones(3, dtype=torch.float64)

    ys = pnode.odeint(f, y0, T, method=method, **kw)
    exact = 1 + c.detach() * (torch.exp(-0.1 * T[-1]) - 1)
    assert torch.allclose(ys[-1], exact.expand(3), atol=1e-2)
    err_y, err_g = _reference_grads(f, y0, T, method, ys, [c])
    assert err_y < 1e-10 and max(err_g) < 1e-10, (err_y, err_g)


@pytest.mark.parametrize("method", ["implicit_euler", "dopri5"])
def test_field_of_t_only_without_parameters(method):
    # nothing in func requires grad: every Jacobian block is zero, d y_N / d y0 = I
    y0 = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    ys = pnode.odeint(lambda t, y: torch.cos(t).expand(2).clone(), y0, T, method=method)
    (g,) = torch.autograd.grad(ys[-1].sum(), y0)
    assert torch.allclose(g, torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-13)


def test_single_time_returns_y0():
    y0 = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    ys = pnode.odeint(TimeMLP(dim=2).double(), y0, torch.tensor([0.3]))
    assert ys.shape == (1, 4, 2) and torch.equal(ys[0], y0)
    (g,) = torch.autograd.grad(ys.sum(), y0)
    assert torch.equal(g, torch.ones_like(y0))
    a, b = pnode.odeint(lambda t, y: y, (y0, y0[:, :1]), [1.0])
    assert a.shape == (1, 4, 2) and b.shape == (1, 4, 1)


@pytest.mark.parametrize("method,kw", METHODS)
def test_reverse_time_gradients_exact(method, kw):
    func = TimeMLP(dim=2).double()
    y0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1.0, 0.6, -0.2], dtype=torch.float64)
    ys = pnode.odeint(func, y0, t, method=method, **kw)
    err_y, err_g = _reference_grads(func, y0, t, method, ys, list(func.parameters()))
    assert err_y < 1e-10 and max(err_g) < 1e-10, (err_y, err_g)


def test_reverse_time_undoes_forward_and_time_gradient():
    func = TimeMLP(dim=2).double()
    y0 = torch.randn(3, 2, dtype=torch.float64)
    fwd = pnode.odeint(func, y0, T, rtol=1e-11, atol=1e-12)
    back = pnode.odeint(func, fwd[-1], T.flip(0), rtol=1e-11, atol=1e-12)
    assert rel_err(back[-1], y0) < 1e-8
    # dL/dt_k for a decreasing t, against central differences of the solve
    t = torch.tensor([1.0, 0.4], dtype=torch.float64, requires_grad=True)
    (gt,) = torch.autograd.grad(pnode.odeint(func, y0, t, method="rk4",
                                             options={"step_size": 0.01})[-1].sum(), t)
    eps = 1e-6
    for k in range(2):
        d = torch.zeros(2, dtype=torch.float64)
        d[k] = eps
        fp = pnode.odeint(func, y0, t.detach() + d, method="rk4", options={"step_size": 0.01})
        fm = pnode.odeint(func, y0, t.detach() - d, method="rk4", options={"step_size": 0.01})
        fd = float((fp[-1].sum() - fm[-1].sum()).detach() / (2 * eps))
        assert float(gt[k]) == pytest.approx(fd, rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("t,match", [
    ([0.0, 1.0, 0.5], "changes direction"),
    ([1.0, 0.0, 0.5], "changes direction"),
    ([0.0, 0.5, 0.5], "repeated"),
    ([], "empty"),
])
def test_bad_time_direction(t, match):
    with pytest.raises(ValueError, match=match):
        pnode.odeint(lambda t, y: -y, torch.ones(2, dtype=torch.float64), t)


def test_retain_graph_second_backward_is_identical():
    func = TimeMLP(dim=2).double()
    y0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    for method, kw in (("dopri5", {}), ("trapezoid", {"rtol": 1e-4, "atol": 1e-6})):
        loss = pnode.odeint(func, y0, T, method=method, **kw).square().sum()
        g1 = torch.autograd.grad(loss, [y0, *func.parameters()], retain_graph=True)
        g2 = torch.autograd.grad(loss, [y0, *func.parameters()], retain_graph=True)
        g3 = torch.autograd.grad(loss, [y0, *func.parameters()])
        for a, b, c in zip(g1, g2, g3, strict=True):
            assert torch.equal(a, b) and torch.equal(a, c)


def test_gradcheck_and_functional_jacobian():
    lin = torch.nn.Linear(2, 2).double()
    x = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def solve(x):
        return pnode.odeint(lambda t, y: torch.tanh(lin(y)), x, T, method="rk4",
                            options={"step_size": 0.05})

    assert torch.autograd.gradcheck(solve, (x,))
    jac = torch.autograd.functional.jacobian(lambda x: solve(x)[-1], x)
    ref = torch.autograd.functional.jacobian(
        lambda x: odeint_reference(lambda t, y: torch.tanh(lin(y)), x, T, method="rk4",
                                   step_times=pnode.last_stats().step_times,
                                   output_steps=pnode.last_stats().output_steps)[-1], x)
    assert rel_err(jac, ref) < 1e-12


def test_second_backward_after_inplace_change_is_refused():
    lin = torch.nn.Linear(2, 2).double()
    ys = pnode.odeint(lambda t, y: lin(y), torch.randn(2, dtype=torch.float64, requires_grad=True), T)
    loss = ys.sum()
    loss.backward(retain_graph=True)
    with torch.no_grad():
        lin.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        loss.backward()


def test_double_backward_is_refused_not_zero():
    lin = torch.nn.Linear(2, 2).double()
    x = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def f(x):
        return pnode.odeint(lambda t, y: torch.tanh(lin(y)), x, T).square().sum()

    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.functional.hvp(f, x, torch.ones(2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.functional.hessian(f, x)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(f(x), x, create_graph=True)
    # a first-order gradient still works afterwards
    (g,) = torch.autograd.grad(f(x), x)
    assert torch.isfinite(g).all()


def test_closure_parameters_are_found():
    # the odeint docstring's own pattern: a lambda around a module
    lin = torch.nn.Linear(2, 2).double()
    scale = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    frozen = torch.nn.Linear(2, 2).double().requires_grad_(False)
    y0 = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)

    def f(t, y):
        return scale * torch.tanh(lin(y)) + frozen(y)

    ys = pnode.odeint(f, y0, T, method="rk4", options={"step_size": 0.1})
    ys.square().sum().backward()
    assert lin.weight.grad is not None and lin.bias.grad is not None and scale.grad is not None
    assert frozen.weight.grad is None
    err_y, err_g = _reference_grads(f, y0, T, "rk4", pnode.odeint(
        f, y0, T, method="rk4", options={"step_size": 0.1}), [lin.weight, lin.bias, scale])
    assert err_y < 1e-12 and max(err_g) < 1e-10
    # adjoint_params restricts what is differentiated, as in torchdiffeq
    lin.weight.grad = None
    ys = pnode.odeint(f, y0, T, method="rk4", options={"step_size": 0.1}, adjoint_params=())
    (g,) = torch.autograd.grad(ys.sum(), y0)
    assert lin.weight.grad is None and torch.isfinite(g).all()


@pytest.mark.parametrize("jacobian", ["dense", "blocks", "matfree"])
def test_field_independent_of_y_every_implicit_jacobian(jacobian):
    c = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    y0 = torch.ones(4, 2, dtype=torch.float64, requires_grad=True)

    def f(t, y):
        return -0.1 * c * torch.exp(-0.1 * t) * torch.ones(4, 2, dtype=torch.float64)

    ys = pnode.odeint(f, y0, T, method="trapezoid", options={"jacobian": jacobian})
    gy, gc = torch.autograd.grad(ys[-1].sum(), [y0, c])
    # trapezoid integrates this forcing to 1e-4; the gradients are those of the scheme
    assert float(ys[-1, 0, 0].detach()) == pytest.approx(1 + 2 * (math.exp(-0.1) - 1), abs=1e-4)
    assert torch.allclose(gy, torch.ones_like(y0), rtol=0, atol=1e-12)
    assert float(gc) == pytest.approx(8 * float(ys[-1, 0, 0].detach() - 1) / 2, rel=1e-10)
