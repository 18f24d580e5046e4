"""Mass-matrix systems and index-1 DAEs (``odeint(..., mass=M)``): exact gradients, errors."""

import numpy as np
import pytest
import torch
from torch import nn

import pnode
from pnode.adjoint.dae import constraint_residual
from pnode.adjoint.reference import finite_difference_errors, gradient_errors_mass
from tests.models import rel_err

T = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=torch.float64)
# Newton to round-off: the reference solves its stages exactly, and the algebraic
# components carry the SNES tolerance directly
TIGHT = {"snes_rtol": 1e-14, "jacobian_lag": 1}
THETA_METHODS = [
    ("implicit_euler", {}),
    ("trapezoid", {}),
    ("theta", {}),
    ("theta", {"theta": 0.6, "endpoint": True}),
]


class SemiExplicit(nn.Module):
    """y1' = -a y1 + z,  y2' = y1 - b y2,  0 = y1 + c y2 - z - 0.2 z^3 (index 1: dg/dz < 0)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(0.4, dtype=torch.float64))
        self.c = nn.Parameter(torch.tensor(0.8, dtype=torch.float64))

    def forward(self, t, y):
        y1, y2, z = y[..., 0], y[..., 1], y[..., 2]
        return torch.stack([
            -self.a * y1 + z + 0.3 * torch.sin(t),
            y1 - self.b * y2 * (1 + 0.1 * z),
            y1 + self.c * y2 - z - 0.2 * z**3,
        ], dim=-1)


DIAG = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)


def consistent(func, y0, mass=DIAG):
    """A consistent y0 (leaf), solved by pnode's consistent initialisation."""
    with torch.no_grad():
        ys = pnode.odeint(func, y0, T[:2], method="implicit_euler", mass=mass,
                          options={"consistent_init": True, "step_size": 0.1})
    return ys[0].clone().requires_grad_(True)


def dense_mass():
    """A full singular 3x3 mass (rank 2) whose null spaces mix all components."""
    g = torch.Generator().manual_seed(3)
    A = torch.eye(3, dtype=torch.float64) + 0.3 * torch.randn(3, 3, generator=g, dtype=torch.float64)
    B = torch.eye(3, dtype=torch.float64) + 0.3 * torch.randn(3, 3, generator=g, dtype=torch.float64)
    return A @ torch.diag(torch.tensor([1.0, 1.5, 0.0], dtype=torch.float64)) @ B


@pytest.mark.parametrize("method,options", THETA_METHODS)
@pytest.mark.parametrize("jacobian", ["dense", "matfree"])
def test_diagonal_mass_matches_reference(method, options, jacobian):
    func = SemiExplicit()
    y0 = consistent(func, torch.tensor([[0.5, -0.3, 0.0], [1.0, 0.2, 0.0]], dtype=torch.float64))
    err_y, err_g = gradient_errors_mass(
        func, y0, T, mass=DIAG.repeat(2), method=method,
        options={"step_size": 0.05, "jacobian": jacobian, **TIGHT, **options})
    assert err_y < 1e-11
    assert max(err_g) < (1e-9 if jacobian == "matfree" else 1e-10), err_g
    assert pnode.last_stats().newton_iters > 0


@pytest.mark.parametrize("method,options", THETA_METHODS[:2])
def test_dense_singular_mass_matches_reference(method, options):
    func = SemiExplicit()
    M = dense_mass()
    y0 = consistent(func, torch.tensor([0.5, -0.3, 0.1], dtype=torch.float64), M)
    err_y, err_g = gradient_errors_mass(func, y0, T, mass=M, method=method,
                                        options={"step_size": 0.05, **TIGHT, **options})
    assert err_y < 1e-11
    assert max(err_g) < 1e-10, err_g


@pytest.mark.parametrize("kind", ["diag", "dense"])
@pytest.mark.parametrize("method", ["implicit_euler", "trapezoid"])
def test_trainable_mass_gradient(kind, method):
    func = SemiExplicit()
    base = DIAG.clone() * torch.tensor([0.8, 1.3, 1.0], dtype=torch.float64) if kind == "diag" \
        else dense_mass()
    y0 = consistent(func, torch.tensor([0.5, -0.3, 0.0], dtype=torch.float64), base)
    M = base.clone().requires_grad_(True)
    err_y, err_g = gradient_errors_mass(func, y0, T, mass=M, method=method,
                                        options={"step_size": 0.1, **TIGHT})
    assert err_y < 1e-11
    assert max(err_g) < 1e-10, err_g
    # the mass's algebraic pattern is kept: a diagonal mass's zero row has a gradient too
    assert M.grad is None  # gradient_errors_mass uses autograd.grad, nothing accumulated


def test_finite_differences_parameters():
    func = SemiExplicit()
    y0 = consistent(func, torch.tensor([0.5, -0.3, 0.0], dtype=torch.float64))
    M = (DIAG * 1.2).requires_grad_(True)
    w = torch.randn(len(T), 3, dtype=torch.float64)

    def loss():
        # perturbing c moves the constraint: re-solve the algebraic component of y0
        return (pnode.odeint(func, y0, T, method="trapezoid", mass=M,
                             options={"step_size": 0.05, "consistent_init": True, **TIGHT})
                * w).sum()

    # (the mass's gradient is checked against the reference above: a finite difference of
    # its zero entry would change the structure of the system)
    errs = finite_difference_errors(loss, list(func.parameters()))
    assert max(errs) < 1e-7, errs


def test_constraint_residual_at_outputs_below_newton_tolerance():
    func = SemiExplicit()
    y0 = consistent(func, torch.tensor([0.5, -0.3, 0.0], dtype=torch.float64))
    for method in ("implicit_euler", "trapezoid"):
        with torch.no_grad():
            ys = pnode.odeint(func, y0, T, method=method, mass=DIAG, rtol=1e-6)
        res = constraint_residual(func, DIAG, T, ys)
        assert res.shape == (len(T), 1)
        # snes_rtol 1e-10 of the stage residual (O(1) here), snes_atol 1e-14
        assert float(res.abs().max()) <= 1e-10, (method, res)


def test_consistent_init_and_its_gradient():
    func = SemiExplicit()
    y0 = torch.tensor([0.5, -0.3, 2.0], dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="inconsistent.*consistent_init"):
        pnode.odeint(func, y0, T, method="implicit_euler", mass=DIAG)
    opts = {"consistent_init": True, "step_size": 0.1}
    ys = pnode.odeint(func, y0, T, method="trapezoid", mass=DIAG, options=opts)
    assert float(constraint_residual(func, DIAG, T[:1], ys[:1]).abs().max()) < 1e-13
    assert float(ys[0, 0].detach()) == 0.5 and float(ys[0, 1].detach()) == -0.3  # differential kept
    w = torch.randn_like(ys)

    def loss():
        return (pnode.odeint(func, y0, T, method="trapezoid", mass=DIAG, options=opts) * w).sum()

    (g,) = torch.autograd.grad(loss(), [y0])
    assert float(g[2]) == 0.0  # the algebraic guess does not change the consistent y0
    errs = finite_difference_errors(loss, [y0, *func.parameters()])
    assert max(errs) < 1e-7, errs


def test_index2_is_refused():
    class Index2(nn.Module):  # the constraint does not involve the algebraic variable
        def forward(self, t, y):
            return torch.stack([y[1], -y[0] + y[2], y[0] - 1.0])

    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="not of index 1"):
        pnode.odeint(Index2(), y0, T, method="implicit_euler", mass=DIAG)


@pytest.mark.parametrize("method,match", [
    ("dopri5", "explicit, but mass is singular"),
    ("rk4", "explicit, but mass is singular"),
    ("kencarp4", "ARKIMEX is written for the identity mass"),
])
def test_refused_methods(method, match):
    func = SemiExplicit()
    y0 = torch.tensor([0.5, -0.3, 0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        pnode.odeint(func, y0, T, method=method, mass=DIAG)


def test_bad_mass_inputs():
    func = SemiExplicit()
    y0 = consistent(func, torch.tensor([0.5, -0.3, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="explicit; mass= is supported"):
        pnode.odeint(func, y0, T, method="rk4", mass=torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="mass has shape"):
        pnode.odeint(func, y0, T, method="implicit_euler", mass=torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN"):
        pnode.odeint(func, y0, T, method="implicit_euler",
                     mass=torch.tensor([1.0, float("nan"), 0.0], dtype=torch.float64))
    with pytest.raises(TypeError, match="mass must be a torch.Tensor"):
        pnode.odeint(func, y0, T, method="implicit_euler", mass=[1.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="IMEX|ARKIMEX"):
        pnode.odeint(pnode.IMEX(implicit=func, explicit=func), y0, T, method="kencarp3",
                     mass=DIAG)
    with pytest.raises(ValueError, match="blocks"):
        pnode.odeint(func, y0.reshape(1, 3), T, method="implicit_euler",
                     mass=DIAG, options={"jacobian": "blocks"})
    with pytest.raises(ValueError, match="consistent_init.*needs mass"):
        pnode.odeint(func, y0, T, method="implicit_euler", options={"consistent_init": True})
    with pytest.raises(ValueError, match="True or False"):
        pnode.odeint(func, y0, T, method="implicit_euler", mass=DIAG,
                     options={"consistent_init": 1})
    with pytest.raises(ValueError, match="output times"):
        pnode.odeint(func, y0, T.clone().requires_grad_(True), method="implicit_euler", mass=DIAG)


class Vanishing(nn.Module):
    """0 = z^2 - (0.5 - t): no real algebraic solution after t = 0.5."""

    def forward(self, t, y):
        return torch.stack([-y[0] + y[1], y[1] ** 2 - (0.5 - t)])


def test_newton_failure_raises_solver_error_and_solver_recovers():
    func = Vanishing()
    m = torch.tensor([1.0, 0.0], dtype=torch.float64)
    y0 = torch.tensor([1.0, 0.5**0.5], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with pytest.raises(pnode.SolverError) as info:
        pnode.odeint(func, y0, t, method="implicit_euler", mass=m, options={"step_size": 0.1})
    err = info.value
    assert err.reason == "DIVERGED_NONLINEAR_SOLVE"
    assert 0.3 <= err.t <= 0.6  # the step from t to t + 0.1 that passes t = 0.5
    # the cached solver is usable afterwards
    ys = pnode.odeint(func, y0, torch.tensor([0.0, 0.3], dtype=torch.float64),
                      method="implicit_euler", mass=m, options={"step_size": 0.1})
    ys.sum().backward()
    assert torch.isfinite(y0.grad).all()
    assert abs(float(ys[1, 1].detach()) - 0.2**0.5) < 1e-6  # the algebraic row, to the Newton tolerance


@pytest.mark.parametrize("checkpoint", ["solution", pnode.Checkpoint.binomial(3), "disk"])
def test_checkpoint_policies_give_the_same_gradient(checkpoint, tmp_path):
    if checkpoint == "disk":
        checkpoint = pnode.Checkpoint.disk(str(tmp_path), ram_budget=1)
    func = SemiExplicit()
    y0 = consistent(func, torch.tensor([0.5, -0.3, 0.0], dtype=torch.float64))
    M = (DIAG * 1.1).requires_grad_(True)
    wrt = [y0, *func.parameters(), M]
    grads = []
    for policy in ("stages", checkpoint):
        ys = pnode.odeint(func, y0, T, method="trapezoid", mass=M, checkpoint=policy,
                          options={"step_size": 0.05, **TIGHT})
        grads.append(torch.autograd.grad(ys.pow(2).sum(), wrt))
    for a, b in zip(*grads, strict=True):
        assert rel_err(b, a) < 1e-10


# -- the stiff DAE: Robertson kinetics with its conservation law as the algebraic row -------
class RoberDAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.logk = nn.Parameter(torch.log(torch.tensor([0.04, 3e7, 1e4], dtype=torch.float64)))

    def forward(self, t, y):
        k1, k2, k3 = self.logk.exp()
        y1, y2, y3 = y[0], y[1], y[2]
        return torch.stack([
            -k1 * y1 + k3 * y2 * y3,
            k1 * y1 - k2 * y2**2 - k3 * y2 * y3,
            y1 + y2 + y3 - 1.0,
        ])


def _rober_scipy(logk, t_out):
    from scipy.integrate import solve_ivp

    k1, k2, k3 = np.exp(logk)

    def rhs(t, y):
        return [-k1 * y[0] + k3 * y[1] * y[2],
                k1 * y[0] - k2 * y[1] ** 2 - k3 * y[1] * y[2],
                k2 * y[1] ** 2]

    sol = solve_ivp(rhs, (0.0, t_out[-1]), [1.0, 0.0, 0.0], method="Radau", t_eval=t_out,
                    rtol=1e-11, atol=1e-14)
    return sol.y.T


def test_rober_dae_gradient_matches_ode_sensitivities():
    func = RoberDAE()
    t = torch.tensor([0.0, 0.4, 4.0, 40.0], dtype=torch.float64)
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    ys = pnode.odeint(func, y0, t, method="implicit_euler", mass=DIAG, rtol=1e-7, atol=1e-12)
    w = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1e4, 0.5], [1.0, 1e4, 0.5], [1.0, 1e4, 0.5]],
                     dtype=torch.float64)
    (g,) = torch.autograd.grad((ys * w).sum(), [func.logk])
    lk = func.logk.detach().numpy()
    wn = w.numpy()
    fd = np.zeros(3)
    for i in range(3):
        e = np.zeros(3)
        e[i] = 1e-5
        fd[i] = ((_rober_scipy(lk + e, t.numpy()) * wn).sum()
                 - (_rober_scipy(lk - e, t.numpy()) * wn).sum()) / 2e-5
    assert np.abs(g.numpy() - fd).max() <= 1e-3 * np.abs(fd).max(), (g, fd)
    assert float(constraint_residual(func, DIAG, t, ys).abs().max()) < 1e-10
