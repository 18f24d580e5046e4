"""Kronecker factors and their damped inverses (pnode/control/kfac.py)."""

import pytest
import torch
from torch import nn

from pnode.control import kfac


def _spd(n, rank=None):
    m = torch.randn(n, rank or n, dtype=torch.float64)
    return m @ m.t() / n


def _vec(m):  # column stacking, the convention of (A ⊗ G) vec(X) = vec(G X A^T)
    return m.t().reshape(-1)


@pytest.mark.parametrize("rank_a", [None, 2])  # a singular A is fine with damping
def test_eig_preconditioner_is_the_exactly_damped_kronecker_inverse(rank_a):
    A, G = _spd(5, rank_a), _spd(3)
    grad = torch.randn(3, 5, dtype=torch.float64)
    lam = 1e-2
    inv = kfac.invert(A, G, lam, "eig")
    got = kfac.precondition(inv, grad)
    explicit = torch.linalg.solve(torch.kron(A, G) + lam * torch.eye(15, dtype=torch.float64), _vec(grad))
    torch.testing.assert_close(_vec(got), explicit, rtol=1e-10, atol=1e-12)


def test_cholesky_preconditioner_is_the_factored_damped_kronecker_inverse():
    A, G = _spd(4), 7.0 * _spd(3)
    grad = torch.randn(3, 4, dtype=torch.float64)
    lam = 1e-3
    pi = ((torch.trace(A) / 4) / (torch.trace(G) / 3)).sqrt()
    Ad = A + pi * lam ** 0.5 * torch.eye(4, dtype=torch.float64)
    Gd = G + lam ** 0.5 / pi * torch.eye(3, dtype=torch.float64)
    explicit = torch.linalg.solve(torch.kron(Ad, Gd), _vec(grad))
    got = kfac.precondition(kfac.invert(A, G, lam, "cholesky"), grad)
    torch.testing.assert_close(_vec(got), explicit, rtol=1e-10, atol=1e-12)


def test_cholesky_raises_damping_with_a_warning_on_a_singular_factor():
    A = torch.zeros(3, 3, dtype=torch.float64)
    A[0, 0] = -1e-3  # not positive semi-definite: the first damping fails
    G = _spd(2)
    with pytest.warns(RuntimeWarning, match="damping raised"):
        inv = kfac.invert(A, G, 1e-8, "cholesky")
    assert all(torch.isfinite(v).all() for v in inv.values())


def test_non_finite_factors_raise():
    A = _spd(3)
    A[1, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        kfac.invert(A, _spd(2), 1e-3, "eig")


def test_linear_factors_give_the_gradient_rows():
    lin = nn.Linear(4, 3).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    out = lin(x)
    gy = torch.randn_like(out) / 6
    out.backward(gy)
    a, g = kfac.activation_matrix(lin, x), kfac.grad_matrix(lin, gy)
    torch.testing.assert_close(g.t() @ a, kfac.weight_matrix_grad(lin))
    fac = kfac.Factors(5, 3, torch.float64)
    fac.add(lin, x, gy, 2.0)
    torch.testing.assert_close(fac.A_new, 2.0 * a.t() @ a / 6)
    torch.testing.assert_close(fac.G_new, 2.0 * 6 * g.t() @ g)


def test_conv_factors_give_the_gradient_rows():
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=2).double()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    out = conv(x)
    gy = torch.randn_like(out)
    out.backward(gy)
    a, g = kfac.activation_matrix(conv, x), kfac.grad_matrix(conv, gy)
    torch.testing.assert_close(g.t() @ a, kfac.weight_matrix_grad(conv))
    w, b = kfac.split_matrix(conv, kfac.weight_matrix_grad(conv))
    torch.testing.assert_close(w, conv.weight.grad)
    torch.testing.assert_close(b, conv.bias.grad)
