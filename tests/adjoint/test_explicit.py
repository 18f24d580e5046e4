"""Explicit RK methods: gradients equal backprop through the same scheme (reference.py)."""

import pytest
import torch

import pnode
from pnode.adjoint.reference import gradient_errors, odeint_reference
from tests.adjoint import method_checks
from tests.models import TimeMLP, TupleField, rel_err

# from the registry: every explicit RK method, and those with an embedded pair
FIXED = method_checks.explicit()
ADAPTIVE = method_checks.adaptive_explicit()
T = method_checks.T


def _compare(func, y0, method, **kw):
    err_y, err_g = gradient_errors(func, y0, T, method=method, **kw)
    assert err_y < 1e-13
    assert max(err_g) < 1e-10, (method, err_g)
    return pnode.last_stats()


@pytest.mark.parametrize("method", FIXED)
def test_fixed_step_gradients_exact(method):
    func = TimeMLP().double()
    y0 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    stats = _compare(func, y0, method, options={"step_size": 0.1})
    # output times are step boundaries (to rounding); steps of 0.1, shortened before outputs
    assert stats.steps >= 12
    for tk, i in zip(T.tolist(), stats.output_steps, strict=True):
        assert stats.step_times[i] == pytest.approx(tk, rel=1e-15, abs=1e-15)


@pytest.mark.parametrize("method", ADAPTIVE)
def test_adaptive_gradients_exact(method):
    func = TimeMLP().double()
    y0 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    stats = _compare(func, y0, method, rtol=1e-6, atol=1e-8)
    assert stats.steps > len(T) - 1


def test_default_steps_are_output_intervals_for_fixed_methods():
    func = TimeMLP().double()
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    _compare(func, y0, "rk4")
    st = pnode.last_stats()
    assert st.step_times == pytest.approx(T.tolist(), rel=1e-15, abs=1e-15)
    assert st.output_steps == [0, 1, 2, 3]


@pytest.mark.parametrize("method", ["rk4", "dopri5"])
def test_tuple_state_gradients_exact(method):
    func = TupleField().double()
    x0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    v0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    opts = {"options": {"step_size": 0.05}} if method == "rk4" else {"rtol": 1e-8}
    xs, vs = pnode.odeint(func, (x0, v0), T, method=method, **opts)
    assert xs.shape == (4, 3, 2) and vs.shape == (4, 3, 2)
    st = pnode.last_stats()
    wx, wv = torch.randn_like(xs), torch.randn_like(vs)
    params = list(func.parameters())
    g = torch.autograd.grad((xs * wx).sum() + (vs * wv).sum(), [x0, v0, *params])
    rx, rv = odeint_reference(func, (x0, v0), T, method=method, step_times=st.step_times,
                                  output_steps=st.output_steps)
    r = torch.autograd.grad((rx * wx).sum() + (rv * wv).sum(), [x0, v0, *params])
    for a, b in zip(g, r, strict=True):
        assert rel_err(a, b) < 1e-10


def test_adjoint_params_closure():
    W = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    y0 = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def f(t, y):
        return torch.sin(W @ y)

    ys = pnode.odeint(f, y0, T, method="rk4", options={"step_size": 0.1}, adjoint_params=(W,))
    st = pnode.last_stats()
    g = torch.autograd.grad(ys[-1].sum(), [y0, W])
    ref = odeint_reference(f, y0, T, method="rk4", step_times=st.step_times,
                                  output_steps=st.output_steps)
    r = torch.autograd.grad(ref[-1].sum(), [y0, W])
    assert rel_err(g[0], r[0]) < 1e-10 and rel_err(g[1], r[1]) < 1e-10


def test_float32_model():
    func = TimeMLP()
    y0 = torch.randn(4, 3, requires_grad=True)
    ys = pnode.odeint(func, y0, T, method="rk4", options={"step_size": 0.1})
    assert ys.dtype == torch.float32
    ys.sum().backward()
    assert y0.grad.dtype == torch.float32
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in func.parameters())
    # same solve in float64 agrees to float32 precision
    f64 = TimeMLP().double()
    f64.load_state_dict({k: v.double() for k, v in func.state_dict().items()})
    y64 = y0.detach().double().requires_grad_()
    ys64 = pnode.odeint(f64, y64, T, method="rk4", options={"step_size": 0.1})
    ys64.sum().backward()
    assert rel_err(ys.double(), ys64) < 1e-5
    assert rel_err(y0.grad.double(), y64.grad) < 1e-4


def test_time_gradient_matches_finite_differences():
    func = TimeMLP().double()
    y0 = torch.randn(2, 3, dtype=torch.float64)
    t = T.clone().requires_grad_()
    kw = {"method": "dopri5", "rtol": 1e-11, "atol": 1e-12}
    w = torch.randn(4, 2, 3, dtype=torch.float64)
    ys = pnode.odeint(func, y0, t, **kw)
    (gt,) = torch.autograd.grad((ys * w).sum(), [t])
    eps = 1e-6
    for k in range(len(T)):
        tp, tm = T.clone(), T.clone()
        tp[k] += eps
        tm[k] -= eps
        with torch.no_grad():
            fp = (pnode.odeint(func, y0, tp, **kw) * w).sum()
            fm = (pnode.odeint(func, y0, tm, **kw) * w).sum()
        fd = float(fp - fm) / (2 * eps)
        assert abs(float(gt[k]) - fd) < 1e-5 * max(1.0, abs(fd)), (k, float(gt[k]), fd)


def test_neural_ode_module():
    block = pnode.NeuralODE(TimeMLP().double(), t=(0.0, 0.5), method="rk4",
                            options={"step_size": 0.1})
    y0 = torch.randn(4, 3, dtype=torch.float64)
    y1 = block(y0)
    assert y1.shape == (4, 3)
    y1.pow(2).sum().backward()
    assert all(p.grad is not None for p in block.parameters())


def test_odeint_adjoint_alias_and_no_grad():
    assert pnode.odeint_adjoint is pnode.odeint
    func = TimeMLP().double()
    with torch.no_grad():
        ys = pnode.odeint(func, torch.randn(3, dtype=torch.float64), T, method="dopri5")
    assert ys.shape == (4, 3) and not ys.requires_grad


def test_solver_reuse_and_interleaved_solves():
    """Two solves with one func before one backward: each keeps its own trajectory."""
    func = TimeMLP().double()
    y0a = torch.randn(3, dtype=torch.float64, requires_grad=True)
    y0b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    kw = {"method": "rk4", "options": {"step_size": 0.1}}
    ya = pnode.odeint(func, y0a, T, **kw)
    yb = pnode.odeint(func, y0b, T, **kw)
    ga, gb = torch.autograd.grad(ya[-1].sum() + 2 * yb[-1].sum(), [y0a, y0b])
    ra = torch.autograd.grad(pnode.odeint(func, y0a, T, **kw)[-1].sum(), [y0a])[0]
    rb = torch.autograd.grad(pnode.odeint(func, y0b, T, **kw)[-1].sum(), [y0b])[0]
    assert rel_err(ga, ra) < 1e-13 and rel_err(gb, 2 * rb) < 1e-13


@pytest.mark.parametrize("checkpoint", ["stages", "graph"])
def test_large_state_gradients_exact(checkpoint):
    # a state past vecs.VECSUM_MAX: finiteness checks by torch instead of VecSum
    from pnode.adjoint.vecs import VECSUM_MAX

    func = TimeMLP().double()
    y0 = torch.randn(VECSUM_MAX // 3 + 7, 3, dtype=torch.float64, requires_grad=True)
    _compare(func, y0, "rk4", options={"step_size": 0.25}, checkpoint=checkpoint)
