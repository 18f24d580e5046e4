"""Every documented raise: bad input -> ValueError/TypeError, failed solves -> SolverError."""

import subprocess
import sys

import pytest
import torch

import pnode
from tests.models import TimeMLP

T = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)


def _f(t, y):
    return -y


@pytest.mark.parametrize("y0,match", [
    (torch.tensor([1.0, float("nan")], dtype=torch.float64), "NaN or Inf"),
    (torch.tensor([1.0, float("inf")], dtype=torch.float64), "NaN or Inf"),
    (torch.tensor([1, 2]), "floating point"),
    (torch.tensor([1.0], dtype=torch.float16), "not supported"),
])
def test_bad_y0(y0, match):
    with pytest.raises(ValueError, match=match):
        pnode.odeint(_f, y0, T)


def test_y0_not_a_tensor():
    with pytest.raises(TypeError, match="torch.Tensor"):
        pnode.odeint(_f, [1.0, 2.0], T)


@pytest.mark.parametrize("t,match", [
    (torch.tensor([0.0, 1.0, 0.5]), "strictly increasing"),
    (torch.tensor([0.0, 0.0, 1.0]), "strictly increasing"),
    (torch.tensor([[0.0, 1.0]]), "1-D"),
    (torch.tensor([0.0, float("nan")]), "NaN"),
])
def test_bad_times(t, match):
    with pytest.raises(ValueError, match=match):
        pnode.odeint(_f, torch.ones(2, dtype=torch.float64), t)


def test_nan_parameter():
    func = TimeMLP().double()
    with torch.no_grad():
        func.l1.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="parameter"):
        pnode.odeint(func, torch.ones(3, dtype=torch.float64), T)


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown method 'rk45'.*dopri5"):
        pnode.odeint(_f, torch.ones(2, dtype=torch.float64), T, method="rk45")


@pytest.mark.parametrize("name", ["bdf", "rosw", "radau"])
def test_method_without_adjoint(name):
    with pytest.raises(ValueError, match="no discrete adjoint"):
        pnode.odeint(_f, torch.ones(2, dtype=torch.float64), T, method=name)


@pytest.mark.parametrize("kwargs,match", [
    ({"options": {"stepsize": 0.1}}, "unknown options"),
    ({"options": {"step_size": -0.1}}, "step_size"),
    ({"options": {"max_num_steps": 0}}, "max_num_steps"),
    ({"options": {"theta": 0.3}}, "theta"),
    ({"options": {"jacobian": "sparse"}}, "jacobian"),
    ({"rtol": -1.0}, "rtol"),
    ({"atol": float("nan")}, "atol"),
    ({"checkpoint": "everything"}, "checkpoint"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pnode.odeint(_f, torch.ones(2, dtype=torch.float64), T, **kwargs)


def test_func_wrong_shape():
    with pytest.raises(ValueError, match="shape"):
        pnode.odeint(lambda t, y: y[:1], torch.ones(2, dtype=torch.float64), T)


def test_func_wrong_dtype():
    with pytest.raises(ValueError, match="dtype"):
        pnode.odeint(lambda t, y: y.float(), torch.ones(2, dtype=torch.float64), T)


def test_func_wrong_structure():
    with pytest.raises(ValueError, match="structure"):
        pnode.odeint(lambda t, y: y[0], (torch.ones(2, dtype=torch.float64),) * 2, T)


def test_user_exception_propagates_and_solver_recovers():
    calls = {"n": 0}

    def f(t, y):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyError("boom")
        return -y

    y0 = torch.ones(2, dtype=torch.float64)
    with pytest.raises(KeyError, match="boom"):
        pnode.odeint(f, y0, T, method="rk4", options={"step_size": 0.1})
    ys = pnode.odeint(f, y0, T, method="rk4", options={"step_size": 0.1})
    assert torch.allclose(ys[-1], torch.exp(-torch.tensor(1.0, dtype=torch.float64)) * y0)


def test_nan_during_solve_is_a_solver_error_with_time():
    def f(t, y):
        return torch.where(t > 0.3, torch.full_like(y, float("nan")), -y)

    y0 = torch.ones(2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(pnode.SolverError) as exc:
        pnode.odeint(f, y0, T, method="rk4", options={"step_size": 0.1})
    assert exc.value.reason == "DIVERGED_NONFINITE"
    assert 0.3 < exc.value.t <= 0.5 and exc.value.phase == "forward"


def test_blow_up_adaptive_is_a_solver_error():
    """y' = y^2, y(0) = 1 blows up at t = 1."""
    with pytest.raises(pnode.SolverError) as exc:
        pnode.odeint(lambda t, y: y * y, torch.ones(1, dtype=torch.float64),
                     torch.tensor([0.0, 2.0], dtype=torch.float64), method="dopri5")
    assert 0.9 < exc.value.t <= 1.0 + 1e-6


def test_newton_failure_is_a_solver_error_and_solver_recovers():
    """Backward Euler on y' = y^2 with y0 = 1, h = 1 has no real solution."""
    f = lambda t, y: y * y  # noqa: E731
    tt = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with pytest.raises(pnode.SolverError) as exc:
        pnode.odeint(f, torch.ones(1, dtype=torch.float64), tt, method="implicit_euler",
                     options={"step_size": 1.0})
    assert exc.value.reason == "DIVERGED_NONLINEAR_SOLVE"
    ys = pnode.odeint(f, torch.full((1,), -1.0, dtype=torch.float64), tt,
                      method="implicit_euler", options={"step_size": 1.0})
    assert torch.isfinite(ys).all()


def test_second_backward_through_same_solve_gives_the_same_gradient():
    # issue 15: once refused ("already used"); now the forward is replayed
    func = TimeMLP().double()
    y0 = torch.randn(3, dtype=torch.float64, requires_grad=True)
    ys = pnode.odeint(func, y0, T, method="rk4")
    ys.sum().backward(retain_graph=True)
    first = y0.grad.clone()
    ys.sum().backward()
    assert torch.equal(y0.grad, 2 * first)


def test_petsc_options_reach_the_ts():
    """Switching the RK tableau through PETSc options: rk4 becomes forward Euler."""
    y0 = torch.ones(2, dtype=torch.float64)
    ys = pnode.odeint(_f, y0, T, method="rk4", options={"step_size": 0.1},
                      petsc_options={"ts_rk_type": "1fe"})
    euler = pnode.odeint(_f, y0, T, method="euler", options={"step_size": 0.1})
    assert torch.equal(ys, euler)


def test_command_line_options_win(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(
        "import torch, pnode\n"
        "y0 = torch.ones(2, dtype=torch.float64)\n"
        "t = torch.tensor([0.0, 1.0], dtype=torch.float64)\n"
        "ys = pnode.odeint(lambda t, y: -y, y0, t, method='rk4', options={'step_size': 0.5})\n"
        "print(repr(float(ys[-1, 0])))\n"
    )
    out = subprocess.run([sys.executable, str(script), "-pnode_ts_rk_type", "1fe"],
                         capture_output=True, text=True, check=True)
    assert float(out.stdout.strip()) == pytest.approx(0.25, abs=1e-15)  # (1 - 0.5)^2


def test_one_reason_enum():
    from petsc4py import PETSc

    from pnode.adjoint.failures import petsc_reason
    from pnode.errors import Reason

    enum = PETSc.TS.ConvergedReason
    names = {k for k in dir(enum) if not k.startswith("_")} - {"ITERATING"}  # an alias
    for name in names:
        assert petsc_reason(getattr(enum, name)) == Reason[name] == name
    assert petsc_reason(enum.ITERATING) is Reason.CONVERGED_ITERATING
    err = pnode.SolverError("x", t=0.0, reason="MAX_STEPS")
    assert err.reason is Reason.MAX_STEPS and "reason=MAX_STEPS" in str(err)
    with pytest.raises(ValueError):
        pnode.SolverError("x", t=0.0, reason="NOT_A_REASON")
