"""Butcher tableaux: validation, PETSc agreement, registration of new tableaux with PETSc."""

import dataclasses
from fractions import Fraction as F

import pytest
import torch

import pnode
from pnode.adjoint.methods import register_method, resolve_method, rk_method, unregister_method
from pnode.adjoint.petsc_register import register_dirk, register_rk, rk_tableau
from pnode.adjoint.reference import odeint_reference
from pnode.adjoint.tableau import ButcherTableau
from tests.adjoint import method_checks


def test_tableau_derives_nodes_and_flags():
    tab = ButcherTableau(A=[[], [F(1, 2)], [0, F(3, 4)], [F(2, 9), F(1, 3), F(4, 9)]],
                         b=[F(2, 9), F(1, 3), F(4, 9), 0], b_embedded=[F(7, 24), F(1, 4),
                                                                      F(1, 3), F(1, 8)], order=3)
    assert tab.c == (0.0, 0.5, 0.75, 1.0) and tab.stages == 4
    assert tab.explicit and tab.fsal and tab.adaptive
    assert not ButcherTableau(A=[[0, 0], [1, 0]], b=[0.5, 0.5], order=2).fsal
    dirk = ButcherTableau(A=[[0.5]], b=[1], order=2)
    assert not dirk.explicit and not dirk.fsal
    with pytest.raises(dataclasses.FrozenInstanceError):
        tab.order = 4


@pytest.mark.parametrize("kwargs,match", [
    ({"A": [[0, 0], [0.5, 0]], "b": [0.5, 0.4]}, "weights b sum to"),
    ({"A": [[0, 0], [0.5, 0]], "b": [0, 1], "c": [0, 0.6]}, "row 1 of A sums to"),
    ({"A": [[0, 0], [0.5, 0]], "b": [0, 1], "b_embedded": [1, 1]}, "b_embedded sum to"),
    ({"A": [[0, 0.5], [0.5, 0]], "b": [0, 1]}, "above the diagonal"),
    ({"A": [[0, 0], [0.5, 0]], "b": [1]}, "2 rows but b has 1"),
    ({"A": [[0, 0], [0.5, 0, 0]], "b": [0, 1]}, "more than the 2 stages"),
    ({"A": [[0, 0], [0.5, 0]], "b": [0, 1], "c": [0]}, "c has 1 entries"),
    ({"A": [[0, 0], [float("nan"), 0]], "b": [0, 1]}, "non-finite"),
    ({"A": [[0, 0], ["x", 0]], "b": [0, 1]}, "real numbers"),
    ({"A": [], "b": []}, "non-empty"),
    ({"A": [[0, 0], [0.5, 0]], "b": [0, 1], "order": 0}, "positive int"),
])
def test_bad_tableaux_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ButcherTableau(**kwargs)


@pytest.mark.parametrize("method", method_checks.explicit())
def test_registry_tableau_is_the_one_petsc_integrates(method):
    method_checks.check_tableau_is_petscs(method)


def test_unknown_petsc_type_and_misregistration():
    with pytest.raises(ValueError, match="no RK tableau named 'nosuch'"):
        rk_tableau("nosuch")
    euler = ButcherTableau(A=[[0]], b=[1], order=1)
    with pytest.raises(ValueError, match="explicit tableaux only"):
        register_rk("pnode_test_dirk", ButcherTableau(A=[[1]], b=[1], order=1))
    with pytest.raises(ValueError, match="belongs to TSRK"):
        register_dirk("pnode_test_explicit", euler)
    register_rk("pnode_test_euler", euler)
    register_rk("pnode_test_euler", euler)  # same tableau again: a no-op
    with pytest.raises(ValueError, match="already registered"):
        register_rk("pnode_test_euler", ButcherTableau(A=[[0, 0], [1, 0]], b=[0.5, 0.5], order=2))


@pytest.mark.parametrize("method", [m.name for m in pnode.methods()
                                    if m.tableau is not None and not m.tableau.explicit])
def test_diagonally_implicit_methods_have_exact_gradients(method):
    """sdirk2 / TR-BDF2 through ARKIMEX with a zero explicit part: PETSc's adjoint is exact."""
    method_checks.check_gradient(method, **method_checks.FIXED)


def test_reference_step_equals_petscs_one_step_solution():
    """One step of each tableau: PETSc's solution equals the plain-torch stage formulas."""
    y0 = torch.tensor([0.3, -1.1], dtype=torch.float64)
    t = torch.tensor([0.2, 0.45], dtype=torch.float64)

    def f(s, y):
        return torch.stack([y[1] * torch.cos(s), -torch.sin(y[0]) + 0.3 * s * y[1]])

    for name in method_checks.with_tableau():
        ys = pnode.odeint(f, y0, t, method=name, options={"step_size": 0.25})
        assert pnode.last_stats().steps == 1
        ref = odeint_reference(f, y0, t, method=name,
                                                       step_times=t.tolist())
        # implicit stages: PETSc's Newton solve stops at its tolerance (the gradient is still
        # exact for the scheme, see test_diagonally_implicit_methods_have_exact_gradients)
        tol = 1e-10 if resolve_method(name).implicit else 1e-15
        assert float((ys - ref).abs().max()) <= tol, name


def test_a_newly_registered_tableau_gets_every_generic_check():
    """A newcomer's method (Ralston's RK2, not in PETSc) is one registry entry; the generic
    checks then hold for it with no other edit."""
    ralston = ButcherTableau(A=[[], [F(2, 3)]], b=[F(1, 4), F(3, 4)], order=2)
    m = register_method(rk_method("ralston_test", ralston, description="Ralston's RK2"))
    try:
        assert m.petsc == "rk/pnode_ralston_test" and not m.adaptive
        assert "ralston_test" in [x.name for x in pnode.methods()]
        assert "ralston_test" in method_checks.explicit()
        method_checks.check_tableau_is_petscs("ralston_test")
        method_checks.check_gradient("ralston_test", **method_checks.FIXED)
        method_checks.check_observer_weights("ralston_test", **method_checks.FIXED)
        # and it is a different scheme from PETSc's Heun (2a) and midpoint (2b)
        func = method_checks.TimeMLP().double()
        y0 = torch.randn(3, dtype=torch.float64)
        kw = {"options": {"step_size": 0.3}}
        with torch.no_grad():
            ys = pnode.odeint(func, y0, method_checks.T, method="ralston_test", **kw)
            for other in ("heun2", "midpoint"):
                other_ys = pnode.odeint(func, y0, method_checks.T, method=other, **kw)
                assert float((ys - other_ys).abs().max()) > 1e-8
    finally:
        unregister_method("ralston_test")
    assert "ralston_test" not in [x.name for x in pnode.methods()]
    # registering the same tableau again reuses PETSc's registration
    register_method(rk_method("ralston_test", ralston))
    unregister_method("ralston_test")
