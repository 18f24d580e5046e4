"""The checks every registered method gets (used by the parametrized tests and by the
throwaway-registration test): gradient against backprop through the same tableau,
observer weights, and the registry's tableau against PETSc's own."""

import torch

import pnode
from pnode.adjoint.methods import resolve_method
from pnode.adjoint.petsc_register import rk_tableau
from pnode.adjoint.reference import gradient_errors
from tests.models import TimeMLP, rel_err

T = torch.tensor([0.0, 0.3, 0.75, 1.2], dtype=torch.float64)
FIXED = {"options": {"step_size": 0.1}}
ADAPTIVE = {"rtol": 1e-6, "atol": 1e-8}


def with_tableau() -> list[str]:
    """Every method whose tableau the registry holds (all explicit RK, the DIRKs)."""
    return [m.name for m in pnode.methods() if m.tableau is not None]


def explicit() -> list[str]:
    return [m.name for m in pnode.methods() if m.explicit_rk]


def adaptive_explicit() -> list[str]:
    return [m.name for m in pnode.methods() if m.explicit_rk and m.adaptive]


def check_gradient(method: str, **kw) -> pnode.adjoint.SolveStats:
    """pnode's solution and y0/parameter gradients equal the plain-torch scheme's."""
    func = TimeMLP().double()
    y0 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    err_y, err_g = gradient_errors(func, y0, T, method=method, **kw)
    implicit = resolve_method(method).implicit
    # implicit stages are Newton solves: the solution agrees to the nonlinear tolerance
    assert err_y < (1e-12 if implicit else 1e-13), (method, err_y)
    assert len(err_g) == 1 + len(list(func.parameters()))
    assert max(err_g) < 1e-10, (method, err_g)
    return pnode.last_stats()


def _flat(grads, params):
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                      for g, p in zip(grads, params, strict=True)])


def check_observer_weights(method: str, **kw) -> None:
    """Every parameter product carries a weight, and the weighted sum is the gradient."""
    func = TimeMLP().double()
    params = list(func.parameters())
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    events = []
    handle = pnode.adjoint.observe_vjps(events.append)
    try:
        ys = pnode.odeint(func, y0, T, method=method, **kw)
        grads = torch.autograd.grad(ys.pow(2).sum(), params)
    finally:
        handle.remove()
    assert events and all(ev.weight is not None for ev in events), method
    assert len(events) == pnode.last_stats().vjps
    total = sum(ev.weight * _flat(ev.param_grads, params) for ev in events)
    assert rel_err(total, _flat(grads, params)) < 1e-12, method


def check_tableau_is_petscs(method: str) -> None:
    """The tableau the registry (reference, observers) uses is the one PETSc integrates."""
    m = resolve_method(method)
    m.register()
    theirs = rk_tableau(m.subtype)
    ours = m.tableau
    assert theirs.A == ours.A and theirs.b == ours.b and theirs.c == ours.c
    assert theirs.b_embedded == ours.b_embedded and theirs.order == ours.order
    assert theirs.fsal == ours.fsal
