"""Implicit and IMEX methods: exact against Newton-solved reference schemes or finite differences."""

import pytest
import torch
from torch import nn

import pnode
from pnode.adjoint.reference import odeint_reference
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
    params = list(func.parameters())
    ys = pnode.odeint(func, y0, T, method=method, options={"step_size": 0.1, **options})
    st = pnode.last_stats()
    w = torch.randn_like(ys)
    g = torch.autograd.grad((ys * w).sum(), [y0, *params])
    ref = odeint_reference(func, y0, T, method=method, step_times=st.step_times,
                           output_steps=st.output_steps, theta=options.get("theta"),
                           endpoint=options.get("endpoint"))
    r = torch.autograd.grad((ref * w).sum(), [y0, *params])
    assert rel_err(ys, ref) < 1e-11
    tol = 1e-9 if options.get("jacobian") == "matfree" else 1e-10
    for a, b in zip(g, r, strict=True):
        assert rel_err(a, b) < tol, rel_err(a, b)
    assert st.newton_iters > 0


def _fd_check(func, y0, method, params, tol=1e-6, **kw):
    """Directional central differences, one random direction per variable."""
    ys = pnode.odeint(func, y0, T, method=method, **kw)
    w = torch.randn_like(ys)
    g = torch.autograd.grad((ys * w).sum(), [y0, *params])

    def loss():
        with torch.no_grad():
            return float((pnode.odeint(func, y0, T, method=method, **kw) * w).sum())

    eps = 1e-6
    for var, gv in zip([y0, *params], g, strict=True):
        d = torch.randn_like(var)
        var.data.add_(d, alpha=eps)
        fp = loss()
        var.data.add_(d, alpha=-2 * eps)
        fm = loss()
        var.data.add_(d, alpha=eps)
        fd = (fp - fm) / (2 * eps)
        exact = float((gv * d).sum())
        assert abs(exact - fd) <= tol * max(1.0, abs(fd)), (exact, fd)


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
