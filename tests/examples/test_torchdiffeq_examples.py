"""torchdiffeq's example tasks (spiral demo, bouncing ball with events, FFJORD-style reverse-time
sampling) run with only `import pnode as torchdiffeq` (examples/torchdiffeq/, written for pnode)."""

import importlib.util
import math
import pathlib

import pytest
import torch

import pnode

ROOT = pathlib.Path(__file__).resolve().parents[2] / "examples" / "torchdiffeq"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"tdq_{name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "import pnode as torchdiffeq" in (ROOT / f"{name}.py").read_text()
    return module


def test_pnode_has_torchdiffeq_names():
    for name in ("odeint", "odeint_adjoint", "odeint_event"):
        assert callable(getattr(pnode, name))


@pytest.mark.parametrize("adjoint", [False, True])
def test_ode_demo_trains(adjoint):
    demo = _load("ode_demo")
    args = ["--niters", "30", "--data_size", "100", "--batch_size", "8"]
    first = demo.main([*args[:1], "1", *args[2:]] + (["--adjoint"] if adjoint else []))
    last = demo.main(args + (["--adjoint"] if adjoint else []))
    assert math.isfinite(last) and last < first


def test_bouncing_ball_collision_times_and_gradients():
    ball = _load("bouncing_ball")
    event_times, grads, _ = ball.main(["--bounces", "3"])
    # drop from 10 - radius 0.2 at g = 9.8: t1 = sqrt(2); each flight after a bounce lasts
    # 2 e v / g with restitution e = 0.5 (the 1e-7 lift-off offset changes times by ~1e-8)
    t1 = math.sqrt(2.0)
    want = [t1, t1 + t1, t1 + t1 + 0.5 * t1]
    assert [float(e.detach()) for e in event_times] == pytest.approx(want, abs=1e-6)
    # t_last = 2.5 t1 with t1 = sqrt(2 (h - r) / g): d t_last / d h = 2.5 / (g t1)
    assert float(grads[0]) == pytest.approx(2.5 / (9.8 * t1), rel=1e-5)
    assert float(grads[1]) == pytest.approx(-2.5 * t1 / (2 * 9.8), rel=1e-5)


def test_ffjord_reverse_time_sampling_inverts_the_flow():
    ffjord = _load("ffjord_sampling")
    losses, samples, z, field = ffjord.main(["--niters", "4", "--batch", "32"])
    assert all(math.isfinite(v) for v in losses)
    with torch.no_grad():
        back, _ = pnode.odeint(field, (samples, torch.zeros(32, 1, dtype=torch.float64)),
                               torch.tensor([0.0, 1.0], dtype=torch.float64), rtol=1e-7,
                               atol=1e-9)
    assert float((back[-1] - z).abs().max()) < 1e-5
