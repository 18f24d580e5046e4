"""Adversarial cases (issues 19, 20): every failure is a clear error within seconds.

Each case runs for every method family (explicit fixed, explicit adaptive, theta,
ARKIMEX) under a wall-clock guard far above its expected time (pytest-timeout),
and checks the exception type and reason, the statistics of the failed solve,
and that a following normal solve works.  Signals are sent to subprocesses.
"""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import pnode
from pnode.adjoint import detector
from pnode.adjoint.forward import StepLog
from tests.models import TimeMLP

F64 = torch.float64
SPAN = torch.tensor([0.0, 2.0], dtype=F64)
FAMILIES = [  # (method, kwargs): explicit fixed, explicit adaptive, theta, ARKIMEX
    ("rk4", {"options": {"step_size": 0.01}}),
    ("dopri5", {}),
    ("bosh3", {}),
    ("implicit_euler", {"rtol": 1e-5, "atol": 1e-7}),  # first order: few steps, loosely
    ("theta", {"rtol": 1e-5, "atol": 1e-7}),
    ("trapezoid", {"rtol": 1e-5, "atol": 1e-7}),
    ("kencarp3", {}),
    ("kencarp4", {}),
]
ADAPTIVE = [m for m in FAMILIES if "options" not in m[1]]
LOOSE = {"rtol": 1e-5, "atol": 1e-7}


def _square(t, y):
    return y * y


def _solver_still_works(method, kw):
    """A normal solve with the same method right after the failure: y' = -y."""
    y0 = torch.ones(2, dtype=F64, requires_grad=True)
    ys = pnode.odeint(lambda t, y: -y, y0, torch.tensor([0.0, 1.0], dtype=F64), method=method, **kw)
    ys[-1].sum().backward()
    exact = torch.exp(torch.tensor(-1.0, dtype=F64)) * torch.ones(2, dtype=F64)
    assert torch.allclose(ys[-1].detach(), exact, rtol=1e-2)  # any method, loose tolerances
    assert torch.isfinite(y0.grad).all()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method,kw", FAMILIES)
def test_blow_up_is_a_clear_error(method, kw):
    """dy/dt = y^2, y(0) = 1 blows up at t = 1: an error naming t ~ 1, not a hang."""
    start = time.perf_counter()
    with pytest.raises(pnode.SolverError) as exc:
        pnode.odeint(_square, torch.ones(1, dtype=F64), SPAN, method=method, **kw)
    elapsed = time.perf_counter() - start
    err = exc.value
    assert err.reason in ("DIVERGED_STEP_UNDERFLOW", "DIVERGED_NONFINITE"), err
    assert err.phase == "forward" and err.steps > 0
    # where it blows up: the time reached, or the predicted blow-up time in the message
    near = re.search(r"blows? up near t = ([0-9.e+-]+)", str(err))
    t_blow = float(near.group(1)) if near else err.t
    assert 0.95 < t_blow < 1.05, err
    assert pnode.last_stats().steps == err.steps  # the steps actually taken
    assert pnode.last_stats().forward_seconds <= elapsed
    _solver_still_works(method, kw)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["dopri5", "bosh3", "rk:3bs"])
def test_explicit_method_on_stiff_problem_fails_fast_naming_implicit_methods(method):
    """dy/dt = -1e6 (y - cos t): the explicit method's projected step count is over budget."""
    with pytest.raises(pnode.SolverError) as exc:
        pnode.odeint(lambda t, y: -1e6 * (y - torch.cos(t)), torch.ones(1, dtype=F64),
                     torch.tensor([0.0, 10.0], dtype=F64), method=method)
    err = exc.value
    assert err.reason == "MAX_STEPS"
    assert err.steps <= detector.PROJECTION_MIN_STEPS + detector.PROJECTION_WINDOWS * detector.WINDOW
    assert "stiff" in str(err) and "kencarp4" in str(err) and "implicit_euler" in str(err)
    _solver_still_works(method, {})


def test_stiff_problem_under_budget_is_solved():
    """The projection does not fire when the budget suffices: the same stiff problem, short."""
    ys = pnode.odeint(lambda t, y: -1e3 * (y - torch.cos(t)), torch.ones(1, dtype=F64),
                      torch.tensor([0.0, 0.5], dtype=F64), method="dopri5", rtol=1e-6)
    assert abs(float(ys[-1, 0]) - 0.8787) < 1e-3  # cos(0.5) + O(1e-3)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method,kw", ADAPTIVE)
def test_nan_from_frozen_parameter_is_a_solver_error(method, kw):
    """NaN from a tensor pnode does not differentiate (a closure) surfaces in the first step."""
    frozen = torch.tensor(float("nan"), dtype=F64)
    with pytest.raises(pnode.SolverError) as exc:
        pnode.odeint(lambda t, y: frozen * y, torch.ones(2, dtype=F64), SPAN, method=method, **kw)
    assert exc.value.reason == "DIVERGED_NONFINITE" and exc.value.t == 0.0
    assert "NaN" in str(exc.value)
    _solver_still_works(method, kw)


@pytest.mark.parametrize("method,kw", [FAMILIES[1], FAMILIES[3], FAMILIES[7]])
def test_step_budget_from_petsc_options_is_reported(method, kw):
    """ts_max_steps=3 (as -pnode_ts_max_steps 3): reported as 3 steps, and last_stats agrees."""
    with pytest.raises(pnode.SolverError) as exc:
        pnode.odeint(lambda t, y: -y, torch.ones(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                     method=method, **{**kw, "rtol": 1e-10, "atol": 1e-12},
                     petsc_options={"ts_max_steps": 3})
    err = exc.value
    assert err.reason == "MAX_STEPS" and err.steps == 3
    assert "budget of 3 steps" in str(err) and "1000000" not in str(err)
    stats = pnode.last_stats()
    assert stats.steps == 3 and len(stats.step_times) == 4


def test_fixed_step_count_over_budget_is_refused_before_solving():
    with pytest.raises(pnode.SolverError, match="needs 1000 steps") as exc:
        pnode.odeint(lambda t, y: -y, torch.ones(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                     method="rk4", options={"step_size": 1e-3, "max_num_steps": 10})
    assert exc.value.reason == "MAX_STEPS" and exc.value.steps == 0
    _solver_still_works("rk4", {"options": {"step_size": 0.01}})


@pytest.mark.parametrize("method,kw", [FAMILIES[0], FAMILIES[1], FAMILIES[3], FAMILIES[7]])
def test_nan_loss_is_not_blamed_on_the_solver(method, kw):
    func = TimeMLP().double()
    y0 = torch.randn(3, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    ys = pnode.odeint(func, y0, t, method=method, **kw)
    loss = (ys[1] * float("nan")).sum() + ys[-1].sum()
    with pytest.raises(ValueError, match=r"loss.*NaN or Inf at output 1 \(t=0.5\)") as exc:
        loss.backward()
    assert "Jacobian" not in str(exc.value)
    ys = pnode.odeint(func, y0, t, method=method, **kw)
    ys.sum().backward()
    assert torch.isfinite(y0.grad).all()


@pytest.mark.parametrize("petsc_options,match", [
    ({"ts_type": "bogus"}, r"PETSC_ERR_ARG_UNKNOWN_TYPE.*Unknown TS type: bogus"),
    ({"ksp_type": "nonsense"}, r"PETSC_ERR_ARG_UNKNOWN_TYPE.*nonsense"),
    ({"ksp_rtol": -1}, r"ksp_rtol.*negative"),
])
def test_bad_petsc_options_are_value_errors_with_petsc_names(petsc_options, match):
    with pytest.raises(ValueError, match=match):
        pnode.odeint(lambda t, y: -y, torch.ones(2, dtype=F64), SPAN, method="implicit_euler",
                     petsc_options=petsc_options, **LOOSE)
    assert "error code" not in match
    _solver_still_works("implicit_euler", LOOSE)


@pytest.mark.parametrize("key", ["ksp_rtol", "snes_rtol"])
def test_bad_tolerance_options(key):
    with pytest.raises(ValueError, match=key):
        pnode.odeint(lambda t, y: -y, torch.ones(2, dtype=F64), SPAN, method="implicit_euler",
                     options={key: -1})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method,kw", [FAMILIES[3], FAMILIES[7]])
def test_rejected_steps_are_bounded(method, kw):
    """Newton fails at every step size (NaN Jacobian-vector products): ends, never retries forever."""
    class Bad(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(y):
            return -y

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, g):
            return g * float("nan")

        @staticmethod
        def jvp(ctx, v):
            return v * float("nan")

    def f(t, y):
        return Bad.apply(y)

    with pytest.raises(pnode.SolverError) as exc:
        pnode.odeint(f, torch.ones(2, dtype=F64), SPAN, method=method, **kw)
    assert exc.value.reason in ("DIVERGED_STEP_REJECTED", "DIVERGED_NONFINITE",
                                "DIVERGED_NONLINEAR_SOLVE")
    _solver_still_works(method, kw)


@pytest.mark.parametrize("hook", ["monitor", "to_next_output"])
@pytest.mark.parametrize("method,kw", [("rk4", {}), ("dopri5", {}), ("implicit_euler", LOOSE),
                                       ("kencarp4", {})])
def test_interrupt_in_a_step_hook_is_a_keyboard_interrupt(monkeypatch, hook, method, kw):
    """Ctrl-C landing in the TS monitor or post-step hook is not a SolverError (error 101)."""
    original = getattr(StepLog, hook)

    def interrupted(self, ts, *args):
        if ts.getStepNumber() == 3:
            raise KeyboardInterrupt
        return original(self, ts, *args)

    monkeypatch.setattr(StepLog, hook, interrupted)
    t = torch.linspace(0, 1, 11, dtype=F64)
    with pytest.raises(KeyboardInterrupt):
        pnode.odeint(lambda t, y: -y, torch.ones(2, dtype=F64), t, method=method, **kw)
    monkeypatch.undo()
    _solver_still_works(method, {"options": {"step_size": 0.01}} if method == "rk4" else kw)


# -- signals, in subprocesses ---------------------------------------------------------------
_SLOW_BACKWARD = textwrap.dedent("""
    import os, sys, time, torch, pnode

    slow = [False]

    def func(t, y):
        if slow[0]:  # the adjoint sweep: slow evaluations
            time.sleep(0.005)
        return -y

    method, policy = sys.argv[1], sys.argv[2]
    checkpoint = pnode.Checkpoint.disk(sys.argv[3], ram_budget=1) if policy == "disk" else policy
    kw = {"options": {"step_size": 1e-3}} if method != "dopri5" else {"rtol": 1e-12, "atol": 1e-12}
    y0 = torch.ones(4, dtype=torch.float64, requires_grad=True)
    ys = pnode.odeint(func, y0, torch.tensor([0.0, 1.0], dtype=torch.float64), method=method,
                      checkpoint=checkpoint, **kw)
    print("backward", flush=True)
    slow[0] = True
    try:
        ys[-1].sum().backward()
        print("finished", flush=True)
    except KeyboardInterrupt:
        print("interrupted", time.perf_counter(), flush=True)
    slow[0] = False
    ys = pnode.odeint(lambda t, y: -y, y0, torch.tensor([0.0, 1.0], dtype=torch.float64),
                      method=method, **kw)
    ys[-1].sum().backward()
    print("usable", float(ys[-1, 0].detach()), flush=True)
""")


def _start(tmp_path, *args):
    script = tmp_path / "slow_backward.py"
    script.write_text(_SLOW_BACKWARD)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()  # the forward solve is done, the backward starts
    assert line.strip() == "backward", proc.stderr.read()
    time.sleep(0.5)
    return proc


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method,policy", [("rk4", "stages"), ("dopri5", "solution"),
                                           ("implicit_euler", "stages"), ("rk4", "disk")])
def test_sigint_during_backward_is_a_prompt_keyboard_interrupt(tmp_path, method, policy):
    proc = _start(tmp_path, method, policy, str(tmp_path))
    sent = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    lines = out.split("\n")
    interrupted = [ln for ln in lines if ln.startswith("interrupted")]
    assert interrupted, out + err
    assert float(interrupted[0].split()[1]) - sent < 5.0  # CLOCK_MONOTONIC, shared by both
    assert any(ln.startswith("usable 0.36") for ln in lines), out  # exp(-1)
    assert "PETSC ERROR" not in err
    assert not list(tmp_path.glob("pnode-checkpoints-*"))  # no files left


@pytest.mark.timeout(120)
def test_sigterm_during_disk_checkpointed_backward_terminates_and_cleans_up(tmp_path):
    proc = _start(tmp_path, "rk4", "disk", str(tmp_path))
    for _ in range(200):  # until the sweep is writing states (a wall-clock guard, 20 s)
        if list(tmp_path.glob("pnode-checkpoints-*/state-*")):
            break
        time.sleep(0.1)
    assert list(tmp_path.glob("pnode-checkpoints-*/state-*"))
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM, err[-3000:]  # Python's default: killed by SIGTERM
    assert "PETSC ERROR" not in err and "finished" not in out
    assert not list(tmp_path.glob("pnode-checkpoints-*"))
