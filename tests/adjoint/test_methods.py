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


# torchdiffeq's method table (torchdiffeq/_impl/odeint.py SOLVERS): the spec of issue 15
TORCHDIFFEQ_RUN = {"dopri8": "dopri8", "dopri5": "dopri5", "tsit5": "tsit5", "bosh3": "bosh3",
                   "fehlberg2": "fehlberg2", "adaptive_heun": "heun", "euler": "euler",
                   "midpoint": "midpoint", "heun2": "heun2", "heun3": "heun3", "rk4": "rk4",
                   "implicit_euler": "implicit_euler", "implicit_midpoint": "theta",
                   "trapezoid": "trapezoid", "sdirk2": "sdirk2", "trbdf2": "trbdf2"}
TORCHDIFFEQ_REFUSED = {"explicit_adams": "rk4", "implicit_adams": "trapezoid",
                       "fixed_adams": "trapezoid", "radauIIA3": "kencarp3",
                       "radauIIA5": "kencarp5", "gl4": "kencarp4", "gl6": "kencarp5",
                       "scipy_solver": "dopri5"}


@pytest.mark.parametrize("name,pnode_name", sorted(TORCHDIFFEQ_RUN.items()))
def test_torchdiffeq_names_run_the_same_scheme(name, pnode_name):
    m = resolve_method(name)
    assert m.name == pnode_name
    # every torchdiffeq Runge-Kutta method runs through PETSc with a registry tableau
    assert m.tableau is not None or m.ts_type in ("beuler", "cn", "theta")


def test_torchdiffeq_fixed_grid_methods_are_fixed_step():
    for name in ["euler", "midpoint", "heun2", "heun3", "rk4", "sdirk2", "trbdf2"]:
        assert not resolve_method(name).adaptive, name
    for name in ["dopri8", "dopri5", "tsit5", "bosh3", "fehlberg2", "adaptive_heun"]:
        assert resolve_method(name).adaptive, name


def test_rk4_stays_classical_and_the_38_rule_has_its_own_name():
    classical = resolve_method("rk4").tableau
    assert classical.b == (1 / 6, 1 / 3, 1 / 3, 1 / 6) and resolve_method("rk4").subtype == "4"
    rule = resolve_method("rk38").tableau
    assert rule.b == (1 / 8, 3 / 8, 3 / 8, 1 / 8) and rule.c == (0.0, 1 / 3, 2 / 3, 1.0)
    assert resolve_method("rk4_38").name == "rk38"


@pytest.mark.parametrize("name,nearest", sorted(TORCHDIFFEQ_REFUSED.items()))
def test_torchdiffeq_names_without_adjoint_are_refused_with_the_nearest_method(name, nearest):
    with pytest.raises(ValueError, match="nearest pnode method is " + nearest) as info:
        resolve_method(name)
    for m in pnode.methods():  # the message lists every valid name
        assert m.name in str(info.value)


def test_unknown_method_message_lists_every_name():
    with pytest.raises(ValueError, match="unknown method 'nosuch'") as info:
        resolve_method("nosuch")
    assert all(m.name in str(info.value) for m in pnode.methods())
    with pytest.raises(ValueError, match="valid methods are") as info:
        resolve_method(3)
    assert all(m.name in str(info.value) for m in pnode.methods())


def test_none_is_the_default_method():
    from pnode.adjoint.methods import DEFAULT_METHOD

    assert DEFAULT_METHOD == "dopri5" and resolve_method(None).name == "dopri5"


def test_petsc_type_names_resolve_to_their_first_row():
    assert resolve_method("rk:2a").name == "heun" and resolve_method("rk:2a").adaptive
    assert resolve_method("rk:8vr").name == "verner8"


def test_every_method_row_is_consistent():
    for m in pnode.methods():
        tab = m.tableau
        if m.ts_type == "rk":
            assert tab is not None and tab.explicit and not m.implicit, m.name
            assert tab.order == m.order, m.name
            assert not m.adaptive or tab.adaptive, m.name
        elif tab is not None:  # a diagonally implicit tableau run by ARKIMEX
            assert m.ts_type == "arkimex" and m.implicit and not m.imex and not tab.explicit


def test_register_method_refuses_taken_and_bad_names():
    from pnode.adjoint.methods import register_method, rk_method, unregister_method
    from pnode.adjoint.tableau import ButcherTableau

    tab = ButcherTableau(A=[[0]], b=[1], order=1)
    with pytest.raises(ValueError, match="already taken"):
        register_method(rk_method("euler", tab))
    with pytest.raises(ValueError, match="already taken"):
        register_method(rk_method("gl4", tab))
    with pytest.raises(ValueError, match="lower-case identifier"):
        register_method(rk_method("My Method", tab))
    with pytest.raises(ValueError, match="needs a Method"):
        register_method("euler")
    with pytest.raises(ValueError, match="no method named"):
        unregister_method("nosuch")
    with pytest.raises(ValueError, match="embedded weights"):
        rk_method("fixed_only", tab, adaptive=True)
