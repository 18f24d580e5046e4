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
    from pnode.adjoint.cache import CACHE
    assert CACHE.last.problem.graphs is None


def _scheduled_steps(n, ram, disk):
    import checkpoint_schedules as cs

    total = 0
    for action in cs.MultistageCheckpointSchedule(n, ram, disk):
        if isinstance(action, cs.Forward):
            total += action.n1 - action.n0
        elif isinstance(action, cs.EndReverse):
            break
    return total


@pytest.mark.parametrize("method,kw", [
    ("rk4", {"options": {"step_size": 0.05}}),
    ("dopri5", {"rtol": 1e-7}),
    ("trapezoid", {"options": {"step_size": 0.05}}),
    ("kencarp4", {"rtol": 1e-5}),
])
@pytest.mark.parametrize("ram,disk", [(1, 2), (2, None)])
def test_disk_matches_stages_and_removes_its_files(tmp_path, method, kw, ram, disk):
    func = TimeMLP().double()
    y0 = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.2, 0.45, 1.0], dtype=torch.float64)
    w = torch.randn(4, 3, 3, dtype=torch.float64)
    grads = []
    for policy in ("stages", pnode.Checkpoint.disk(tmp_path, ram_budget=ram, disk_budget=disk)):
        ys = pnode.odeint(func, y0, t, method=method, checkpoint=policy, **kw)
        grads.append(torch.autograd.grad((ys * w).sum(), [y0, *func.parameters()]))
    st = pnode.last_stats()
    for a, b in zip(*grads, strict=True):
        assert rel_err(a, b) < 1e-12
    n = st.steps
    assert st.recomputed_steps == _scheduled_steps(n, ram, n if disk is None else disk)
    assert st.disk_writes > 0
    assert st.max_stored_states <= ram + (n if disk is None else disk)
    assert list(tmp_path.iterdir()) == []


def test_disk_files_removed_when_the_adjoint_fails(tmp_path):
    class Flaky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3).double()
            self.calls, self.fail_after = 0, None

        def forward(self, t, y):
            self.calls += 1
            if self.fail_after is not None and self.calls > self.fail_after:
                raise RuntimeError("injected failure")
            return torch.tanh(self.lin(y))

    func = Flaky()
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    policy = pnode.Checkpoint.disk(tmp_path, ram_budget=1)
    ys = pnode.odeint(func, y0, T, method="rk4", options={"step_size": 0.05}, checkpoint=policy)
    func.fail_after = func.calls + 30  # inside the replay, after some states reached disk
    with pytest.raises(RuntimeError, match="injected failure"):
        ys.sum().backward()
    assert list(tmp_path.iterdir()) == []
    func.fail_after = None  # the solver is usable again
    ys = pnode.odeint(func, y0, T, method="rk4", options={"step_size": 0.05}, checkpoint=policy)
    (g,) = torch.autograd.grad(ys.sum(), [y0])
    ref = pnode.odeint(func, y0, T, method="rk4", options={"step_size": 0.05})
    (g_ref,) = torch.autograd.grad(ref.sum(), [y0])
    assert rel_err(g, g_ref) < 1e-12
    assert list(tmp_path.iterdir()) == []


def test_disk_full_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    from pnode.adjoint import store as store_mod

    writes = []
    real = store_mod._write_state

    def write(path, x):
        if len(writes) >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        writes.append(path)
        real(path, x)

    monkeypatch.setattr(store_mod, "_write_state", write)
    func = TimeMLP().double()
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    ys = pnode.odeint(func, y0, T, method="rk4", options={"step_size": 0.05},
                      checkpoint=pnode.Checkpoint.disk(tmp_path, ram_budget=1))
    with pytest.raises(pnode.CheckpointError, match="No space left on device") as info:
        ys.sum().backward()
    assert info.value.directory == str(tmp_path)
    assert len(writes) == 2 and list(tmp_path.iterdir()) == []


def test_disk_directory_and_budgets_validated(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        pnode.Checkpoint.disk(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        pnode.Checkpoint.disk(tmp_path / "file")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="Invalid RAM budget"):
            pnode.Checkpoint.disk(tmp_path, ram_budget=bad)
        with pytest.raises(ValueError, match="Invalid disk budget"):
            pnode.Checkpoint.disk(tmp_path, ram_budget=2, disk_budget=bad)


@pytest.mark.parametrize("memory_mib,expect", [(None, "all"), (0, "none"), (0.02, "some")])
def test_graph_memory_budget_keeps_the_latest_graphs(memory_mib, expect):
    func = TimeMLP().double()
    y0 = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    grads = []
    for policy in ("stages", pnode.Checkpoint.graph(memory_mib)):
        ys = pnode.odeint(func, y0, T, method="rk4", options={"step_size": 0.05}, checkpoint=policy)
        grads.append(torch.autograd.grad(ys.pow(2).sum(), [y0, *func.parameters()]))
    st = pnode.last_stats()
    for a, b in zip(*grads, strict=True):
        assert rel_err(a, b) < 1e-14
    hits = {"all": st.vjps, "none": 0}.get(expect)
    if hits is not None:
        assert st.graph_hits == hits
    else:
        assert 0 < st.graph_hits < st.vjps


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "1"])
def test_graph_memory_budget_validated(bad):
    with pytest.raises(ValueError, match="Invalid memory_mib"):
        pnode.Checkpoint.graph(bad)


def test_no_grad_forward_records_nothing():
    # Under torch.no_grad() no backward can follow: the solver must not keep a trajectory
    # (memory in proportion to the steps) nor stay checked out.
    from pnode.adjoint.cache import CACHE

    func = TimeMLP().double()
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        ys = pnode.odeint(func, y0, T, method="rk4", options={"step_size": 0.1})
    assert not ys.requires_grad
    assert not CACHE.last.busy
    ys = pnode.odeint(func, y0, T, method="rk4", options={"step_size": 0.1})
    assert CACHE.last.busy  # with grad enabled the trajectory waits for backward
    ys.sum().backward()
    assert not CACHE.last.busy


def test_policies_are_classes_owning_their_behaviour():
    policies = [pnode.Checkpoint("stages"), pnode.Checkpoint.parse("solution"),
                pnode.Checkpoint.graph(1.0), pnode.Checkpoint.binomial(2)]
    assert all(isinstance(p, pnode.Checkpoint) for p in policies)
    assert len({type(p) for p in policies}) == 4  # one class per policy
    assert [p.replays for p in policies] == [False, False, False, True]
    assert [p.petsc_defaults()["ts_trajectory_solution_only"] for p in policies[:3]] == ["0", "1", "0"]
    assert repr(policies[3]).startswith("Checkpoint(kind='binomial', budget=2")


def test_unknown_schedule_action_is_refused(monkeypatch):
    from pnode.adjoint import checkpoint as ck

    class Bogus:
        pass

    monkeypatch.setattr(type(pnode.Checkpoint.binomial(2)), "schedule", lambda self, n: iter([Bogus()]))
    func = TimeMLP().double()
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    ys = pnode.odeint(func, y0, T, method="rk4", options={"step_size": 0.1},
                      checkpoint=ck.Checkpoint.binomial(2))
    with pytest.raises(NotImplementedError, match="Bogus.*has no handler"):
        ys.sum().backward()
    monkeypatch.undo()
    ys = pnode.odeint(func, y0, T, method="rk4", options={"step_size": 0.1},
                      checkpoint=pnode.Checkpoint.binomial(2))
    ys.sum().backward()  # the solver stays usable
    assert torch.isfinite(y0.grad).all()


class _ConvField(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, t, y):
        return torch.tanh(self.conv(y)) * (1 + t)


class _ScalarField(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(-0.6, dtype=torch.float64))

    def forward(self, t, y):
        return self.a * y + torch.sin(t)


@pytest.mark.parametrize("state", ["0-d", "4-d", "float32"])
def test_shaped_states_graph_and_stages_agree_with_the_reference(state):
    """A single state tensor that is not 1-D is evaluated in its own shape (no flat views
    per stage): kept graphs and re-evaluations give the same gradient (to rounding, as in
    the test above), and it is backprop's through the same scheme."""
    from pnode.adjoint.reference import gradient_errors

    if state == "0-d":
        func, y0 = _ScalarField(), torch.tensor(0.7, dtype=torch.float64)
    elif state == "4-d":
        func, y0 = _ConvField().double(), torch.randn(2, 2, 4, 4, dtype=torch.float64)
    else:
        func, y0 = TimeMLP(), torch.randn(4, 3)
    t = T.to(y0.dtype)
    kw = {"method": "rk4", "options": {"step_size": 0.1}}
    grads = []
    for policy in ("stages", "graph"):
        y = y0.clone().requires_grad_(True)
        ys = pnode.odeint(func, y, t, checkpoint=policy, **kw)
        assert ys.shape == (len(t), *y0.shape)
        grads.append(torch.autograd.grad(ys.pow(2).sum(), [y, *func.parameters()]))
        st = pnode.last_stats()
        assert st.graph_hits == (st.vjps if policy == "graph" else 0) and st.vjps > 0
    for a, b in zip(*grads, strict=True):
        assert a.shape == b.shape and rel_err(a, b) < (1e-14 if a.dtype == torch.float64 else 1e-6)
    if y0.dtype == torch.float64:
        err_y, err_g = gradient_errors(func, y0.requires_grad_(True), t, **kw)
        assert err_y < 1e-13 and max(err_g) < 1e-10


def test_shaped_state_output_of_wrong_shape_is_a_clear_error():
    func = TimeMLP().double()
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    for policy in ("stages", "graph"):
        with pytest.raises(ValueError, match="shape"):
            pnode.odeint(lambda t, y: func(t, y).reshape(-1), y0, T, method="rk4",
                         options={"step_size": 0.1}, checkpoint=policy)
