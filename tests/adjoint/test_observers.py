"""The observer extension point: one event per parameter product, with exact weights."""

import pytest
import torch

import pnode
from pnode.adjoint.methods import resolve_method
from pnode.adjoint.observers import stage_weights
from tests.adjoint import method_checks
from tests.models import TimeMLP, rel_err

T = torch.tensor([0.0, 0.35, 1.0], dtype=torch.float64)


def _flat(grads, params):
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                      for g, p in zip(grads, params, strict=True)])


@pytest.mark.parametrize("method,kw", [
    ("euler", {"options": {"step_size": 0.05}}),
    ("rk4", {"options": {"step_size": 0.1}}),
    ("bosh3", {"rtol": 1e-6}),
    ("dopri5", {"rtol": 1e-7}),
    ("rk:2a", {"options": {"step_size": 0.1}}),
    ("midpoint", {"options": {"step_size": 0.1}}),
    ("rk:5f", {"rtol": 1e-6}),
])
def test_weighted_products_sum_to_the_parameter_gradient(method, kw):
    func = TimeMLP().double()
    params = list(func.parameters())
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    events = []
    handle = pnode.adjoint.observe_vjps(events.append)
    try:
        ys = pnode.odeint(func, y0, T, method=method, **kw)
        grads = torch.autograd.grad(ys.pow(2).sum(), params)
    finally:
        handle.remove()
    st = pnode.last_stats()
    assert events and all(ev.weight is not None for ev in events)
    total = sum(ev.weight * _flat(ev.param_grads, params) for ev in events)
    assert rel_err(total, _flat(grads, params)) < 1e-12
    assert len(events) == st.vjps
    assert all(T[0] - 1e-12 <= ev.t <= T[-1] + 1e-12 for ev in events)
    ev = events[0]
    assert ev.func is func and ev.y.shape == y0.shape and ev.cotangent.shape == y0.shape
    # removed: no more events
    pnode.odeint(func, y0, T, method=method, **kw).sum().backward()
    assert len(events) == st.vjps


@pytest.mark.parametrize("method", method_checks.explicit())
def test_every_explicit_method_has_exact_weights_fixed_steps(method):
    method_checks.check_observer_weights(method, **method_checks.FIXED)


@pytest.mark.parametrize("method", method_checks.adaptive_explicit())
def test_every_explicit_method_has_exact_weights_adaptive_steps(method):
    method_checks.check_observer_weights(method, rtol=1e-6)


def test_stages_sharing_a_node_get_their_own_weights():
    """Verner 7(6) has two stages at c = 1 with different b: told apart by visiting order."""
    tab = resolve_method("verner7").tableau
    shared = [i for i in range(tab.stages) if abs(tab.c[i] - 1.0) < 1e-12]
    assert len(shared) == 2 and tab.b[shared[0]] != tab.b[shared[1]] and not tab.fsal
    weight = stage_weights(tab)
    ptime, h = 2.0, -0.25
    seen = [weight(ptime + h * (1 - tab.c[i]), ptime, h) for i in reversed(range(tab.stages))]
    want = [-h * (b if b != 0 else 1.0) for b in reversed(tab.b)]
    assert seen == want
    # a second sweep over the same step starts again from the last stage
    assert weight(ptime, ptime, h) == want[0]


def test_implicit_methods_report_no_weight():
    func = TimeMLP().double()
    events = []
    handle = pnode.adjoint.observe_vjps(events.append)
    try:
        y0 = torch.randn(2, 3, dtype=torch.float64)
        pnode.odeint(func, y0, T, method="trapezoid", options={"step_size": 0.1}).sum().backward()
    finally:
        handle.remove()
    assert events and all(ev.weight is None for ev in events)


def test_observer_exception_fails_the_backward_and_leaves_the_solver_usable():
    func = TimeMLP().double()
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)

    def boom(ev):
        raise KeyError("observer failed")

    handle = pnode.adjoint.observe_vjps(boom)
    try:
        ys = pnode.odeint(func, y0, T, method="rk4", options={"step_size": 0.1})
        with pytest.raises(KeyError, match="observer failed"):
            ys.sum().backward()
    finally:
        handle.remove()
    ys = pnode.odeint(func, y0, T, method="rk4", options={"step_size": 0.1})
    (g,) = torch.autograd.grad(ys.sum(), [y0])
    assert torch.isfinite(g).all()


def test_observe_vjps_needs_a_callable():
    with pytest.raises(TypeError, match="callable"):
        pnode.adjoint.observe_vjps(3)
