"""torchdiffeq's keywords and options: each mapped onto PETSc, refused with a reason, or
accepted with a one-time warning where an exact discrete adjoint has nothing to change."""

import warnings

import pytest
import torch

import pnode
from pnode.adjoint import compat
from pnode.adjoint.reference import odeint_reference
from tests.models import TimeMLP, rel_err

T = torch.tensor([0.0, 0.9, 2.0], dtype=torch.float64)


def _field(t, y):
    return -y + torch.sin(3 * t)


def _steps(**kw):
    pnode.odeint(_field, torch.ones(2, dtype=torch.float64), T, **kw)
    st = pnode.last_stats()
    return [b - a for a, b in zip(st.step_times, st.step_times[1:], strict=False)]


@pytest.fixture(autouse=True)
def _fresh_warnings():
    compat._warned.clear()
    yield


def _exact(func, y0, t, method, **kw):
    """pnode's gradient equals backprop through the same scheme on the same steps."""
    ys = pnode.odeint(func, y0, t, method=method, **kw)
    st = pnode.last_stats()
    ref = odeint_reference(func, y0, t, method=method, step_times=st.step_times,
                           output_steps=st.output_steps)
    w = torch.randn_like(ys)
    params = list(func.parameters())
    got = torch.autograd.grad((ys * w).sum(), [y0, *params])
    want = torch.autograd.grad((ref * w).sum(), [y0, *params])
    assert rel_err(ys, ref) < 1e-12
    assert max(rel_err(a, b) for a, b in zip(got, want, strict=True)) < 1e-10
    return st


def test_max_step_and_min_step():
    base = _steps(rtol=1e-4)
    capped = _steps(rtol=1e-4, options={"max_step": 0.05})
    assert max(base) > 0.2 and max(capped) <= 0.05 + 1e-12
    # min_step: PETSc accepts a step at the floor even if the error test fails
    floored = _steps(rtol=1e-12, atol=1e-12, options={"min_step": 0.1})
    assert len(floored) <= 2.0 / 0.1 + len(T)
    assert len(_steps(rtol=1e-12, atol=1e-12)) > 3 * len(floored)
    func = TimeMLP(dim=2).double()
    _exact(func, torch.randn(3, 2, dtype=torch.float64, requires_grad=True), T, "dopri5",
           options={"max_step": 0.1})


def test_safety_ifactor_dfactor_steer_the_controller():
    base = _steps(rtol=1e-5)
    assert _steps(rtol=1e-5, options={"safety": 0.5}) != base
    slow = _steps(rtol=1e-5, options={"ifactor": 1.05, "dfactor": 0.5})
    assert max(b / a for a, b in zip(slow, slow[1:], strict=False) if b < 0.5) <= 1.05 + 1e-9 \
        or len(slow) > len(base)
    for bad in ({"safety": 0.0}, {"safety": 1.5}, {"ifactor": 0.5}, {"dfactor": 2.0},
                {"min_step": -1.0}, {"max_step": 0.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            _steps(options=bad)


@pytest.mark.parametrize("key", ["jump_t", "step_t"])
def test_steps_end_at_jump_and_step_times(key):
    func = TimeMLP(dim=2).double()
    y0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        at = torch.tensor([0.37, 1.5, 5.0], dtype=torch.float64)
        ys = pnode.odeint(func, y0, T, rtol=1e-6, options={key: at})
    st = pnode.last_stats()
    assert ys.shape == (3, 3, 2)
    assert 0.37 in st.step_times and 1.5 in st.step_times and len(st.output_steps) == 3
    # the same solve with the jump times as outputs gives the same values at T
    full = pnode.odeint(func, y0, torch.tensor([0.0, 0.37, 0.9, 1.5, 2.0]), rtol=1e-6)
    assert rel_err(ys, full[[0, 2, 4]]) < 1e-6  # same tolerance, steps may differ
    ref = odeint_reference(func, y0, T, method="dopri5", step_times=st.step_times,
                           output_steps=st.output_steps)
    w = torch.randn_like(ys)
    got = torch.autograd.grad((ys * w).sum(), [y0, *func.parameters()])
    want = torch.autograd.grad((ref * w).sum(), [y0, *func.parameters()])
    assert max(rel_err(a, b) for a, b in zip(got, want, strict=True)) < 1e-10


def test_jump_t_in_reverse_time():
    y0 = torch.ones(2, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pnode.odeint(_field, y0, T.flip(0), rtol=1e-6, options={"jump_t": [1.25]})
    assert -1.25 in pnode.last_stats().step_times  # the solver runs in s = -t


def test_grid_constructor():
    func = TimeMLP(dim=2).double()
    y0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    seen = []

    def grid(f, y, t):
        seen.append((f, t))
        return torch.linspace(float(t[0]), float(t[-1]), 11, dtype=torch.float64)

    st = _exact(func, y0, T, "rk4", options={"grid_constructor": grid})
    assert st.step_times == pytest.approx(sorted({*torch.linspace(0, 2, 11).tolist(), 0.9}))
    assert seen[0][0] is func
    with pytest.raises(ValueError, match="mutually exclusive"):
        pnode.odeint(func, y0, T, method="rk4", options={"grid_constructor": grid,
                                                         "step_size": 0.1})
    with pytest.raises(ValueError, match="fixed-step"):
        pnode.odeint(func, y0, T, method="dopri5", options={"grid_constructor": grid})


def test_tolerances_as_tensors():
    a = pnode.odeint(_field, torch.ones(2, dtype=torch.float64), T, rtol=1e-5, atol=1e-7)
    b = pnode.odeint(_field, torch.ones(2, dtype=torch.float64), T,
                     rtol=torch.tensor(1e-5, dtype=torch.float64),
                     atol=torch.tensor([1e-7], dtype=torch.float64))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="per-component"):
        pnode.odeint(_field, torch.ones(2, dtype=torch.float64), T, rtol=torch.ones(2))
    with pytest.raises(ValueError, match="per part"):
        pnode.odeint(lambda t, y: y, (torch.ones(2, dtype=torch.float64),) * 2, T,
                     atol=(1e-6, 1e-8))


def test_adjoint_keywords_warn_once_and_change_nothing():
    func = TimeMLP(dim=2).double()
    y0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    ys = pnode.odeint(func, y0, T)
    g = torch.autograd.grad(ys.sum(), [y0, *func.parameters()])
    kw = dict(adjoint_rtol=1e-3, adjoint_atol=1e-4, adjoint_method="rk4",
              adjoint_options={"norm": "seminorm"})
    with pytest.warns(UserWarning, match="no effect") as rec:
        ys2 = pnode.odeint_adjoint(func, y0, T, **kw)
    assert len(rec) == 4
    g2 = torch.autograd.grad(ys2.sum(), [y0, *func.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(g, g2, strict=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: a training loop is not flooded
        pnode.odeint_adjoint(func, y0, T, **kw)
        # equal to the forward values: torchdiffeq would not differ either, no warning
        pnode.odeint(func, y0, T, adjoint_rtol=1e-7, adjoint_atol=1e-9, adjoint_method="dopri5")
    with pytest.raises(ValueError, match="adjoint_rtol"):
        pnode.odeint(func, y0, T, adjoint_rtol=-1.0)
    with pytest.raises(ValueError, match="unknown"):
        pnode.odeint(func, y0, T, adjoint_method="nosuchmethod")
    with pytest.raises(ValueError, match="seminorm"):
        pnode.odeint(func, y0, T, adjoint_options={"norm": "l2"})


@pytest.mark.parametrize("key,value", [("dtype", torch.float32), ("interp", "cubic"),
                                       ("perturb", True)])
def test_options_without_effect_warn(key, value):
    ref = pnode.odeint(_field, torch.ones(2, dtype=torch.float64), T, method="rk4")
    with pytest.warns(UserWarning, match="no effect"):
        ys = pnode.odeint(_field, torch.ones(2, dtype=torch.float64), T, method="rk4",
                          options={key: value})
    assert torch.equal(ys, ref)


@pytest.mark.parametrize("options,match", [
    ({"norm": lambda x: x.abs().max()}, "TSAdapt"),
    ({"max_order": 3}, "Adams"),
    ({"solver": "LSODA"}, "scipy_solver"),
    ({"interp": "spline"}, "interp"),
    ({"perturb": "yes"}, "perturb"),
    ({"dtype": torch.int32}, "dtype"),
    ({"max_iters": 0}, "max_iters"),
    ({"jump_t": "soon"}, "jump_t"),
    ({"grid_constructor": 3}, "grid_constructor"),
])
def test_bad_or_refused_options(options, match):
    with pytest.raises(ValueError, match=match):
        pnode.odeint(_field, torch.ones(2, dtype=torch.float64), T, method="rk4", options=options)


def test_max_iters_limits_newton():
    def stiff(t, y):
        return -5.0 * y ** 3

    y0 = torch.ones(2, dtype=torch.float64)
    ok = pnode.odeint(stiff, y0, T, method="implicit_euler",
                      options={"step_size": 0.2, "max_iters": 50})
    assert torch.isfinite(ok).all()
    with pytest.raises(pnode.SolverError):
        pnode.odeint(stiff, y0, T, method="implicit_euler",
                     options={"step_size": 0.2, "max_iters": 1})
