"""The benchmark suite on tiny sizes: every section produces its tables with finite numbers.

Timings are not checked (the machine is shared); content is: the expected rows
and columns, finite values, and discrete-adjoint gradients exact to rounding.
"""

import math

import numpy as np
import pytest
import torch

from benchmarks import accuracy, memory, profile, stiff, timing
from benchmarks.common import CONFIGS, Problem, build, gradient, md_table, rk4_loop
from benchmarks.sensitivities import reference_gradient, van_der_pol

TINY = Problem(steps=3, batch=4, width=8)


def test_rk4_loop_matches_pnode_gradient():
    func, y0, t = build(TINY)
    y = y0.clone().requires_grad_()
    grads = torch.autograd.grad(rk4_loop(func, y, TINY.steps).pow(2).sum(), [y, *func.parameters()])
    ref = torch.cat([g.reshape(-1) for g in grads])
    got = gradient("pnode-stages", func, y0, t, TINY.steps)
    assert float((got - ref).norm() / ref.norm()) < 1e-12


def test_timing_tables_have_every_config_and_goal():
    rows = timing.run(sizes=[TINY, Problem(steps=2, batch=4, width=8)])
    assert [r["problem"]["steps"] for r in rows] == [3, 2]
    for r in rows:
        assert set(r["seconds"]) == set(CONFIGS)
        assert all(math.isfinite(v) and v > 0 for v in r["seconds"].values())
    goals = timing.goal_rows(rows)
    assert len(goals) == len(timing.GOALS) and all(math.isfinite(g["ratio"]) for g in goals)
    text = timing.tables(rows)
    assert all(c in text for c in CONFIGS) and "tdq-adjoint / stages" in text


def test_timing_default_sizes_cover_the_issue():
    sizes = timing.problems(quick=False)
    assert {p.steps for p in sizes} == {20, 100, 500}
    assert {p.batch for p in sizes} == {16, 64, 256} and {p.width for p in sizes} == {64, 128, 256}


def test_accuracy_discrete_adjoints_are_exact():
    rows = accuracy.run(sizes=[TINY])
    errs = rows[0]["errors"]
    assert set(errs) == set(CONFIGS)
    for c in ("pnode-stages", "pnode-solution", "pnode-graph", "pnode-binomial8", "torchdiffeq-backprop"):
        assert errs[c]["own_scheme"] < 1e-12, c
    assert math.isfinite(errs["torchdiffeq-adjoint"]["own_scheme"])
    assert "pnode-graph" in accuracy.tables(rows)


def test_memory_child_reports_a_peak():
    res = memory._child("pnode-stages", TINY)
    assert res["mib"] >= 0 and res["baseline_mib"] > 0 and math.isfinite(res["seconds"])
    assert "pnode-stages" in memory.tables([{"problem": TINY.as_dict(), "memory": {"pnode-stages": res}}])


def test_profile_splits_callbacks():
    res = profile.run(prob=TINY, repeats=1)
    assert res["forward"]["callbacks"] == 4 * TINY.steps
    for part in ("forward", "adjoint"):
        assert all(math.isfinite(v) for v in res[part].values())
    assert "forward RHS callback" in profile.tables(res)


def test_reference_sensitivities_match_pnode():
    model = stiff.VDP.model()
    with torch.no_grad():
        model.log_mu.fill_(math.log(10.0))
    y0 = torch.tensor([2.0, 0.0], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.1, 0.2], dtype=torch.float64)
    w = torch.tensor([[0.0, 0.0], [1.0, 0.5], [-1.0, 0.2]], dtype=torch.float64)
    import pnode

    ys = pnode.odeint(model, y0, t, method="kencarp4", rtol=1e-9, atol=1e-11)
    got = torch.cat([g.reshape(-1) for g in torch.autograd.grad((ys * w).sum(), [y0, model.log_mu])])
    ref, states = reference_gradient(van_der_pol(10.0), np.array([2.0, 0.0]), t.numpy(), w.numpy(), 1e-12)
    assert np.allclose(states, ys.detach().numpy(), rtol=1e-6)
    assert np.linalg.norm(got.numpy() - ref) / np.linalg.norm(ref) < 1e-5


def test_stiff_tables_and_goal():
    rows = [{"case": "rober", "solver": "pnode kencarp4", "rtol": 1e-6, "seconds": 0.5, "radau_seconds": 0.1,
             "ratio_to_radau": 5.0, "err_y0": 1e-7, "err_p": 2e-7, "steps": 48, "status": "ok"},
            {"case": "vdp", "solver": "torchdiffeq dopri5 adjoint", "rtol": 1e-6,
             "status": "timeout after 60 s"}]
    g = stiff.goal(rows)
    assert g["time_met"] and g["error_met"]
    assert "timeout after 60 s" in stiff.tables(rows)


@pytest.mark.parametrize("value,text", [(0.5, "0.5"), (1.2e-16, "1.2e-16"), (0.0, "0")])
def test_md_table_formats(value, text):
    assert md_table(["a"], [[value]]).splitlines()[-1] == f"| {text} |"


def test_small_section_rows_goals_and_exact_gradients():
    from benchmarks import small

    tiny_rk4 = (small.Case("mlp-small", "mlp", 3, 2, 2, 4), small.Case("mlp", "mlp", 2, 1, 3, 5),
                small.Case("conv", "conv", 2, 1, 2, side=3))
    tiny_adaptive = (small.Case("conv", "conv", 2, 0, 2, side=3),)
    res = small.run(rk4_cases=tiny_rk4, adaptive_cases=tiny_adaptive, repeats=1)
    assert [r["case"]["name"] for r in res["rk4"]] == ["mlp-small", "mlp", "conv"]
    for r in res["rk4"]:
        assert set(r["seconds"]) == set(small.RK4_CONFIGS)
    assert set(res["adaptive"][0]["seconds"]) == set(small.ADAPTIVE_CONFIGS)
    for part in ("pnode", "backprop"):
        assert all(math.isfinite(v) for v in res["fixed"][part].values())
    assert res["rober"]["ratio"] > 0 and max(res["rober"]["err_y0"], res["rober"]["err_p"]) < 1e-3
    goals = small.goal_rows(res)
    assert len(goals) == len(small.GOALS) + 3
    text = small.tables(res)
    assert "conv 2ch 3x3, batch 2" in text and "fixed cost" in text and "ROBER" in text
    # the timed pnode configurations compute the exact gradient of the scheme they are compared with
    for case in tiny_rk4:
        func, y0, t = case.build()
        y = y0.clone().requires_grad_()
        params = [y, *func.parameters()]
        ref = torch.autograd.grad(rk4_loop(func, y, case.steps).pow(2).sum(), params)
        for cfg in ("pnode-stages", "pnode-graph"):
            y = y0.clone().requires_grad_()
            got = torch.autograd.grad(small.final_state(cfg, func, y, t, case.steps).pow(2).sum(),
                                      [y, *func.parameters()])
            for g, r in zip(got, ref, strict=True):
                assert float((g - r).norm()) <= 1e-12 * float(r.norm()) + 1e-15, (case.name, cfg)
