"""DAE solves per method: adaptive steps, the midpoint form, and why ARKIMEX is refused."""

import pytest
import torch

import pnode
from pnode.adjoint import dae
from pnode.adjoint.dae import constraint_residual
from pnode.adjoint.methods import resolve_method
from pnode.adjoint.options import SolveOptions
from pnode.adjoint.reference import gradient_errors_mass
from tests.adjoint.test_dae import DIAG, TIGHT, SemiExplicit, Vanishing, consistent, dense_mass

T = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=torch.float64)


@pytest.mark.timeout(120)  # a guard: these solves used to be where adaptive DAEs hung
@pytest.mark.parametrize("method,options", [
    ("implicit_euler", {}),
    ("trapezoid", {}),
    ("theta", {"theta": 0.6, "endpoint": True}),
])
def test_adaptive_steps_exact_gradient(method, options):
    func = SemiExplicit()
    y0 = consistent(func, torch.tensor([0.5, -0.3, 0.0], dtype=torch.float64))
    err_y, err_g = gradient_errors_mass(func, y0, T, mass=DIAG, method=method, rtol=1e-4,
                                        atol=1e-6, options={**TIGHT, **options})
    st = pnode.last_stats()
    assert st.steps > len(T)  # TSAdapt chose the steps (the reference replays them)
    assert err_y < 1e-11
    assert max(err_g) < 1e-10, err_g
    with torch.no_grad():
        ys = pnode.odeint(func, y0, T, method=method, mass=DIAG, rtol=1e-4, atol=1e-6,
                          options=options)
    assert float(constraint_residual(func, DIAG, T, ys).abs().max()) <= 1e-10


def test_adaptive_midpoint_with_singular_mass_is_refused():
    func = SemiExplicit()
    y0 = consistent(func, torch.tensor([0.5, -0.3, 0.0], dtype=torch.float64))
    # this solve used to shrink its steps to 1.6e-15 at t = 0.905 and crawl there
    with pytest.raises(ValueError, match="fixed steps only"):
        pnode.odeint(func, y0, T, method="theta", mass=DIAG)
    with pytest.raises(ValueError, match="fixed steps only"):
        pnode.odeint(func, y0, T, method="theta", mass=DIAG, options={"theta": 0.7})
    # fixed steps, theta = 1 (backward Euler) and a nonsingular mass are fine
    with torch.no_grad():
        pnode.odeint(func, y0, T, method="theta", mass=DIAG, options={"step_size": 0.1})
        pnode.odeint(func, y0, T, method="theta", mass=DIAG, options={"theta": 1.0})
        pnode.odeint(func, y0, T, method="theta", rtol=1e-5,
                     mass=torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["implicit_euler", "trapezoid"])
def test_adaptive_solve_into_an_impasse_point_stops(method):
    # z = sqrt(0.5 - t): no solution after t = 0.5, where dg/dz = 2 z vanishes; adaptive
    # steps shrink geometrically towards it, so the step budget ends the solve
    func = Vanishing()
    m = torch.tensor([1.0, 0.0], dtype=torch.float64)
    y0 = torch.tensor([1.0, 0.5**0.5], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with pytest.raises(pnode.SolverError) as info:
        pnode.odeint(func, y0, t, method=method, mass=m, rtol=1e-4, atol=1e-8,
                     options={"max_num_steps": 3000})
    assert 0.3 < info.value.t <= 0.5 + 1e-9
    ys = pnode.odeint(func, y0, torch.tensor([0.0, 0.3], dtype=torch.float64), method=method,
                      mass=m, rtol=1e-6)
    ys.sum().backward()
    assert torch.isfinite(y0.grad).all()


@pytest.mark.parametrize("kind", ["diag", "dense"])
@pytest.mark.parametrize("theta", [0.5, 0.7])
def test_trainable_mass_midpoint_form(kind, theta):
    func = SemiExplicit()
    base = DIAG.clone() * torch.tensor([0.8, 1.3, 1.0], dtype=torch.float64) if kind == "diag" \
        else dense_mass()
    y0 = consistent(func, torch.tensor([0.5, -0.3, 0.0], dtype=torch.float64), base)
    M = base.clone().requires_grad_(True)
    err_y, err_g = gradient_errors_mass(func, y0, T, mass=M, method="theta",
                                        options={"step_size": 0.1, "theta": theta, **TIGHT})
    assert err_y < 1e-11
    assert max(err_g) < 1e-10, err_g


def test_solve_options():
    m = resolve_method("theta")
    opts = SolveOptions(step_size=0.1)
    alg = torch.tensor([[0.0], [0.0], [1.0]], dtype=torch.float64)
    info = dae.Mass("diag", DIAG, True, alg, alg)
    # a trainable mass with the midpoint form recomputes stages in the adjoint
    assert dae.solve_options(info, m, opts).checkpoint.kind == "solution"
    endpoint = SolveOptions(step_size=0.1, endpoint=True)
    assert dae.solve_options(info, m, endpoint) is endpoint  # restores y_{n+1} itself
    info.trainable = False
    assert dae.solve_options(info, m, opts) is opts
    # adaptive steps with a singular mass need nothing extra: the engine bounds the
    # rejections of one step for every solve (the impasse test below ends on it)
    adaptive = SolveOptions()
    assert dae.solve_options(info, resolve_method("trapezoid"), adaptive) is adaptive
    # a trainable mass with a policy that recomputes stages anyway keeps its options
    info.trainable = True
    for policy in ("solution", pnode.Checkpoint.binomial(2)):
        recompute = SolveOptions(step_size=0.1, checkpoint=pnode.Checkpoint.parse(policy))
        assert dae.solve_options(info, m, recompute) is recompute


def test_arkimex_adjoint_assumes_the_identity_mass(monkeypatch):
    """The measured reason for refusing ARKIMEX: its adjoint is wrong for M != I."""
    with pytest.raises(ValueError, match="identity mass matrix, forward and adjoint"):
        pnode.odeint(SemiExplicit(), torch.zeros(3, dtype=torch.float64), T, method="kencarp4",
                     mass=torch.tensor([2.0, 0.5, 1.5], dtype=torch.float64))
    check = dae._check_method

    def allow_arkimex(method, *args):
        if method.ts_type != "arkimex":
            check(method, *args)

    monkeypatch.setattr(dae, "_check_method", allow_arkimex)
    func = SemiExplicit()
    m = torch.tensor([2.0, 0.5, 1.5], dtype=torch.float64)  # nonsingular, not the identity
    y0 = torch.tensor([0.5, -0.3, 0.1], dtype=torch.float64)
    w = torch.randn(len(T), 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def loss():
        return (pnode.odeint(func, y0, T, method="kencarp4", mass=m,
                             options={"step_size": 0.05, **TIGHT}) * w).sum()

    (g,) = torch.autograd.grad(loss(), [func.a])
    with torch.no_grad():
        a, h = float(func.a), 1e-6
        func.a.fill_(a + h)
        up = float(loss())
        func.a.fill_(a - h)
        down = float(loss())
        func.a.fill_(a)
    fd = (up - down) / (2 * h)
    # both are wrong: the forward (kencarp4 at h = 0.05 is accurate to ~1e-6 when right:
    # its first stage slope is f instead of M^-1 f) ...
    with torch.no_grad():
        ref = pnode.odeint(func, y0, T, method="trapezoid", mass=m, options={"step_size": 0.005})
        ys = pnode.odeint(func, y0, T, method="kencarp4", mass=m, options={"step_size": 0.05})
    assert float((ys - ref).abs().max()) > 1e-2
    # ... and the adjoint (shift * I cancelled out of shift * M - df/dy): not even the
    # derivative of the wrong forward
    assert abs(float(g) - fd) > abs(fd)
