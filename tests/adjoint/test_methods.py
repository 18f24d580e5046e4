"""The method table and name resolution."""

import pytest

import pnode
from pnode.adjoint.methods import resolve_method

REQUIRED = ["euler", "midpoint", "heun", "bosh3", "rk4", "dopri5", "implicit_euler", "trapezoid",
            "theta", "kencarp3", "kencarp4", "kencarp5"]


def test_required_methods_present_with_petsc_types():
    table = {m.name: m for m in pnode.methods()}
    for name in REQUIRED:
        assert name in table
    assert table["rk4"].petsc == "rk/4" and not table["rk4"].adaptive
    assert table["dopri5"].petsc == "rk/5dp" and table["dopri5"].order == 5
    assert table["kencarp4"].petsc == "arkimex/4" and table["kencarp4"].imex
    assert table["trapezoid"].implicit and not table["trapezoid"].imex


@pytest.mark.parametrize("alias,name", [("explicit_midpoint", "midpoint"), ("cn", "trapezoid"),
                                        ("backward_euler", "implicit_euler"), ("RK4", "rk4")])
def test_aliases(alias, name):
    assert resolve_method(alias).name == name


def test_petsc_tableau_names():
    assert resolve_method("rk:5bs").subtype == "5bs"
    m = resolve_method("arkimex:2e")
    assert m.ts_type == "arkimex" and m.subtype == "2e" and m.imex


def test_unknown_petsc_tableau_is_reported_by_petsc():
    import torch

    with pytest.raises(ValueError, match="no RK tableau named 'nosuch'"):
        pnode.odeint(lambda t, y: -y, torch.ones(1, dtype=torch.float64),
                     torch.tensor([0.0, 1.0], dtype=torch.float64), method="rk:nosuch")
