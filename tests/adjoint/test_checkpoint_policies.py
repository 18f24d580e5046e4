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


@pytest.mark.parametrize("method,kw", [
    ("rk4", {"options": {"step_size": 0.05}}),
    ("dopri5", {"rtol": 1e-7}),
    ("trapezoid", {"options": {"step_size": 0.05}}),
    ("kencarp4", {"rtol": 1e-5}),
])
@pytest.mark.parametrize("budget", [1, 3, 8])
def test_binomial_matches_stages_with_optimal_recomputation(method, kw, budget):
    import checkpoint_schedules

    func = TimeMLP().double()
    y0 = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.2, 0.45, 1.0], dtype=torch.float64)
    w = torch.randn(4, 3, 3, dtype=torch.float64)
    grads = []
    for policy in ("stages", pnode.Checkpoint.binomial(budget)):
        ys = pnode.odeint(func, y0, t, method=method, checkpoint=policy, **kw)
        grads.append(torch.autograd.grad((ys * w).sum(), [y0, *func.parameters()]))
    st = pnode.last_stats()
    for a, b in zip(*grads, strict=True):
        assert rel_err(a, b) < 1e-12
    assert st.recomputed_steps == checkpoint_schedules.optimal_steps_binomial(st.steps, budget)
    assert 1 <= st.max_stored_states <= budget


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "8"])
def test_binomial_budget_validated(bad):
    with pytest.raises(ValueError, match="Invalid checkpoint budget"):
        pnode.Checkpoint.binomial(bad)


def test_checkpoint_object_and_names():
    assert pnode.Checkpoint.parse("all") == pnode.Checkpoint("stages")
    with pytest.raises(ValueError, match="checkpoint policy"):
        pnode.Checkpoint.parse("disk")


@pytest.mark.parametrize("method,kw", [
    ("rk4", {"options": {"step_size": 0.1}}),
    ("dopri5", {"rtol": 1e-6}),
    ("euler", {"options": {"step_size": 0.1}}),
])
def test_graph_policy_reuses_forward_graphs_exactly(method, kw):
    from tests.models import TupleField

    func = TupleField().double()
    x0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    v0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    grads = []
    for policy in ("stages", "graph"):
        xs, vs = pnode.odeint(func, (x0, v0), T, method=method, checkpoint=policy, **kw)
        loss = xs.pow(2).sum() + (vs * torch.arange(3.0, dtype=torch.float64)[:, None, None]).sum()
        grads.append(torch.autograd.grad(loss, [x0, v0, *func.parameters()]))
    st = pnode.last_stats()
    for a, b in zip(*grads, strict=True):
        assert rel_err(a, b) < 1e-14
    assert st.graph_hits >= 0.8 * st.vjps > 0  # FSAL stages may fall back to re-evaluation


def test_graph_policy_is_for_explicit_methods():
    with pytest.raises(ValueError, match="explicit methods"):
        pnode.odeint(lambda t, y: -y, torch.ones(2, dtype=torch.float64), T,
                     method="trapezoid", checkpoint="graph")


def test_graph_policy_without_backward_keeps_nothing():
    func = TimeMLP().double()
    with torch.no_grad():
        pnode.odeint(func, torch.randn(2, 3, dtype=torch.float64), T, method="rk4",
                     checkpoint="graph")
    from pnode.adjoint.odeint import _last
    assert _last["solver"].problem.graphs is None
