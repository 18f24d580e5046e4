"""Implicit and IMEX methods: exact against Newton-solved reference schemes or finite differences."""

import pytest
import torch
from torch import nn
from torch.autograd.function import once_differentiable

import pnode
from pnode.adjoint.reference import finite_difference_errors, gradient_errors
from tests.models import TimeMLP, rel_err

T = torch.tensor([0.0, 0.25, 0.6, 1.0], dtype=torch.float64)


class Damped(nn.Module):
    """A mildly stiff nonlinear field with few parameters (for finite differences)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([0.7, -1.3], dtype=torch.float64))
        self.k = nn.Parameter(torch.tensor(20.0, dtype=torch.float64))

    def forward(self, t, y):
        return torch.stack([
            -self.k * y[0] + torch.sin(self.a[0] * y[1]) + t,
            self.a[1] * y[1] + 0.5 * torch.tanh(y[0] * y[1]),
        ])


@pytest.mark.parametrize("method,options", [
    ("implicit_euler", {}),
    ("trapezoid", {}),
    ("theta", {}),
    ("theta", {"theta": 0.7}),
    ("theta", {"theta": 0.6, "endpoint": True}),
    ("trapezoid", {"jacobian": "matfree"}),
])
def test_theta_methods_match_reference(method, options):
    func = TimeMLP().double()
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    err_y, err_g = gradient_errors(func, y0, T, method=method,
                                   options={"step_size": 0.1, **options})
    assert err_y < 1e-11
    tol = 1e-9 if options.get("jacobian") == "matfree" else 1e-10
    assert max(err_g) < tol, err_g
    assert pnode.last_stats().newton_iters > 0


def _fd_check(func, y0, method, params, tol=1e-6, **kw):
    """Directional central differences, one random direction per variable."""
    w = torch.randn(len(T), *y0.shape, dtype=torch.float64)

    def loss():
        return (pnode.odeint(func, y0, T, method=method, **kw) * w).sum()

    errs = finite_difference_errors(loss, [y0, *params])
    assert max(errs) <= tol, errs


@pytest.mark.parametrize("method", ["kencarp3", "kencarp4", "kencarp5"])
def test_kencarp_fully_implicit_finite_differences(method):
    func = Damped()
    y0 = torch.tensor([1.0, -0.5], dtype=torch.float64, requires_grad=True)
    _fd_check(func, y0, method, list(func.parameters()), options={"step_size": 0.05})


class Diffusion(nn.Module):
    """Stiff linear diffusion on a 1-D grid (Dirichlet), the implicit half."""

    def __init__(self, n=16, nu=0.5):
        super().__init__()
        dx = 1.0 / (n + 1)
        L = (torch.diag(torch.full((n,), -2.0)) + torch.diag(torch.ones(n - 1), 1)
             + torch.diag(torch.ones(n - 1), -1)) / dx**2
        self.register_buffer("L", (nu * L).double())

    def forward(self, t, u):
        return u @ self.L.T


class Reaction(nn.Module):
    """Nonlinear neural reaction term, the explicit half."""

    def __init__(self, n=16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n, 8), nn.Tanh(), nn.Linear(8, n)).double()

    def forward(self, t, u):
        return self.net(u)


@pytest.mark.parametrize("method", ["kencarp3", "kencarp4"])
def test_imex_finite_differences(method):
    torch.manual_seed(3)
    diff, react = Diffusion(), Reaction()
    u0 = torch.sin(torch.linspace(0, 3.14, 16, dtype=torch.float64)).unsqueeze(0)
    u0.requires_grad_()
    f = pnode.IMEX(implicit=diff, explicit=react)
    params = list(react.parameters())
    _fd_check(f, u0, method, params, tol=1e-6, options={"step_size": 0.02})
    assert pnode.last_stats() is not None


def test_imex_explicit_part_is_really_explicit():
    """A step size far beyond the explicit stability limit of diffusion stays bounded."""
    diff, react = Diffusion(n=32), Reaction(n=32)
    u0 = torch.rand(1, 32, dtype=torch.float64)
    ys = pnode.odeint(pnode.IMEX(implicit=diff, explicit=react), u0, T, method="kencarp4",
                      options={"step_size": 0.05})
    assert torch.isfinite(ys).all() and ys.abs().max() < 10


def test_imex_requires_imex_method():
    with pytest.raises(ValueError, match="IMEX"):
        pnode.odeint(pnode.IMEX(implicit=Diffusion(), explicit=Reaction()),
                     torch.zeros(1, 16, dtype=torch.float64), T, method="trapezoid")


@pytest.mark.parametrize("method", ["implicit_euler", "trapezoid", "theta"])
def test_block_jacobian_matches_reference(method):
    func = TimeMLP().double()
    y0 = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    err_y, err_g = gradient_errors(func, y0, T, method=method,
                                   options={"step_size": 0.1, "jacobian": "blocks"})
    assert err_y < 1e-11 and max(err_g) < 1e-10, err_g
    assert pnode.last_stats().jacobians > 0


def test_block_jacobian_kencarp_same_as_dense():
    func = TimeMLP().double()
    y0 = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    out = {}
    for jac in ("dense", "blocks"):
        ys = pnode.odeint(func, y0, T, method="kencarp4", options={"jacobian": jac})
        out[jac] = (ys, *torch.autograd.grad(ys.pow(2).sum(), [y0, *func.parameters()]))
    for a, b in zip(out["dense"], out["blocks"], strict=True):
        assert rel_err(a, b) < 1e-9


def test_block_jacobian_refuses_coupled_samples():
    def coupled(t, y):
        return -(y - y.mean(dim=0, keepdim=True)) * 3.0 - y

    with pytest.raises(ValueError, match="couples"):
        pnode.odeint(coupled, torch.randn(4, 2, dtype=torch.float64), T, method="implicit_euler",
                     options={"step_size": 0.1, "jacobian": "blocks"})


def test_block_jacobian_needs_batched_state():
    with pytest.raises(ValueError, match="batch"):
        pnode.odeint(lambda t, y: -y, torch.ones(3, dtype=torch.float64), T,
                     method="implicit_euler", options={"jacobian": "blocks"})


@pytest.mark.parametrize("jac", ["dense", "blocks"])
@pytest.mark.parametrize("method,points", [("implicit_euler", 0), ("trapezoid", 1)])
def test_adjoint_assembles_each_points_jacobian_once(monkeypatch, jac, method, points):
    """PETSc's theta adjoint asks twice per step (the Crank-Nicolson one at both ends); a
    request at the point of the last one (the same time and state, bit for bit) reuses its
    Jacobian and graph: one Jacobian per step (and the initial point for trapezoid)."""
    from pnode.adjoint import jacobians

    name = "dense_jacobian" if jac == "dense" else "block_jacobian"
    real, calls = getattr(jacobians, name), []
    monkeypatch.setattr(jacobians, name, lambda *a: calls.append(1) or real(*a))
    func = TimeMLP().double()
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    ys = pnode.odeint(func, y0, T, method=method, options={"step_size": 0.1, "jacobian": jac})
    steps, forward = pnode.last_stats().steps, len(calls)
    assert forward == steps
    torch.autograd.grad(ys.pow(2).sum(), [y0, *func.parameters()])
    assert len(calls) - forward == steps + points


def test_forward_newton_passes_the_jacobian_from_stage_to_stage():
    """With a Jacobian lag (default 100) one step's stage solves share a Jacobian while
    they converge quickly; lag 1 is full Newton.  Both solve the same stage equations."""
    func = Damped()
    y0 = torch.tensor([1.0, -0.5], dtype=torch.float64)
    ys = pnode.odeint(func, y0, T, method="kencarp4", options={"step_size": 0.05})
    st = pnode.last_stats()
    assert st.jacobians == st.steps  # five implicit stages per step, one Jacobian
    full = pnode.odeint(func, y0, T, method="kencarp4",
                        options={"step_size": 0.05, "jacobian_lag": 1})
    assert pnode.last_stats().jacobians == pnode.last_stats().newton_iters
    assert rel_err(ys, full) < 1e-10


class _Cube(torch.autograd.Function):
    """x^3 with a backward that cannot be differentiated again (and a forward-mode rule)."""

    @staticmethod
    def forward(x):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x * x * g

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return 3 * x * x * t


def test_matrix_free_products_equal_forward_mode():
    """J v by two reverse passes (DoubleVjp) is forward mode's J v; a func whose backward
    is once_differentiable falls back to forward mode; one that ignores y gives zeros."""
    from pnode.adjoint.jacobians import DoubleVjp

    func, t = TimeMLP().double(), torch.tensor(0.3, dtype=torch.float64)
    x, v = torch.randn(2, 3, 3, dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    with torch.enable_grad():
        graph = (xr, func(t, xr))
    jv = DoubleVjp().product("point", lambda: graph, v)
    assert torch.equal(jv, torch.func.jvp(lambda z: func(t, z), (x,), (v,))[1])
    with torch.enable_grad():
        cube = (xr, _Cube.apply(xr))
    assert DoubleVjp().product("point", lambda: cube, v) is None
    const = (xr, torch.ones_like(x))
    assert torch.equal(DoubleVjp().product("point", lambda: const, v), torch.zeros_like(v))


def test_matrix_free_newton_with_a_once_differentiable_func():
    def func(t, y):
        return -_Cube.apply(y) - y

    y0 = torch.tensor([0.8, -0.4], dtype=torch.float64, requires_grad=True)
    out = {}
    for jac in ("dense", "matfree"):
        ys = pnode.odeint(func, y0, T, method="implicit_euler",
                          options={"step_size": 0.1, "jacobian": jac})
        out[jac] = (ys, *torch.autograd.grad(ys.sum(), [y0]))
    for a, b in zip(out["dense"], out["matfree"], strict=True):
        assert rel_err(a, b) < 1e-9
