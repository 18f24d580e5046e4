"""pnode.multilevel.transfer: prolongation, restrictions, first-order consistency."""

import pytest
import torch
from torch.nn.utils import parameters_to_vector

from pnode.multilevel import RMTR, ResNet, Transfer, prolongation_matrix


def _pair(prolongation="constant", restriction="average"):
    fine = ResNet(3, 4, 8, 2).double()
    coarse = fine.with_depth(4)
    return fine, coarse, Transfer.between(fine, coarse, prolongation=prolongation, restriction=restriction)


@pytest.mark.parametrize("kind", ["constant", "linear"])
def test_restrictions_are_adjoints_of_prolongation_up_to_level_scaling(kind):
    fine, coarse, tr = _pair(kind)
    u = torch.randn(tr.n_fine, dtype=torch.float64)
    v = torch.randn(tr.n_coarse, dtype=torch.float64)
    Pv = tr.prolong(v)
    # gradients: R = P^T in the Euclidean inner product
    assert float(tr.restrict_gradient(u) @ v) == pytest.approx(float(u @ Pv), rel=1e-13)
    # iterates: Pi = P^T / 2 is the adjoint of P in the h-weighted inner products of L2(0, T)
    flags = torch.cat([torch.full((p.numel(),), float(t), dtype=torch.float64)
                       for p, t in zip(fine.parameters(), fine.time_parameter_flags(), strict=True)])
    flags_c = torch.cat([torch.full((p.numel(),), float(t), dtype=torch.float64)
                         for p, t in zip(coarse.parameters(), coarse.time_parameter_flags(), strict=True)])
    h, H = fine.field.h, coarse.field.h
    w_f = torch.where(flags > 0, h, 1.0)
    w_c = torch.where(flags_c > 0, H, 1.0)
    assert float((w_c * tr.restrict(u)) @ v) == pytest.approx(float((w_f * u) @ Pv), rel=1e-13)


@pytest.mark.parametrize("kind", ["constant", "linear"])
def test_prolongation_preserves_constants_and_columns_sum_to_two(kind):
    P = prolongation_matrix(5, kind)
    assert torch.allclose(P.sum(dim=1), torch.ones(10, dtype=torch.float64))
    assert torch.allclose(P.sum(dim=0), torch.full((5,), 2.0, dtype=torch.float64))


@pytest.mark.parametrize("restriction", ["average", "injection"])
def test_restriction_inverts_piecewise_constant_prolongation(restriction):
    _, _, tr = _pair("constant", restriction)
    v = torch.randn(tr.n_coarse, dtype=torch.float64)
    assert torch.allclose(tr.restrict(tr.prolong(v)), v, rtol=0, atol=1e-15)


def test_shared_layers_transfer_by_identity():
    fine, coarse, tr = _pair("linear")
    x = parameters_to_vector(fine.parameters()).detach()
    xc = tr.restrict(x)
    n_in = sum(p.numel() for p in fine.inp.parameters())
    assert torch.equal(xc[:n_in], x[:n_in]) and torch.equal(tr.prolong(xc)[:n_in], xc[:n_in])


def test_norm_bounds_prolongation():
    for kind in ("constant", "linear"):
        _, _, tr = _pair(kind)
        v = torch.randn(tr.n_coarse, dtype=torch.float64)
        assert float(tr.prolong(v).norm()) <= tr.norm * float(v.norm()) * (1 + 1e-12)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="2:1"):
        Transfer([torch.Size([6, 2])], [torch.Size([4, 2])], [True])
    with pytest.raises(ValueError, match="Invalid prolongation"):
        prolongation_matrix(3, "cubic")
    with pytest.raises(ValueError, match="Invalid restriction"):
        Transfer([torch.Size([4])], [torch.Size([2])], [True], restriction="mean")


@pytest.mark.parametrize("kind", ["constant", "linear"])
def test_restricted_gradient_is_derivative_along_prolongated_directions(kind):
    """d/ds f_fine(x + P s) at s = 0 equals R grad f_fine(x) (engine gradient, finite differences)."""
    fine, _, tr = _pair(kind)
    X, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
    loss_fn = torch.nn.CrossEntropyLoss()
    params = list(fine.parameters())
    x = parameters_to_vector(params).detach()
    g = torch.cat([gi.reshape(-1) for gi in torch.autograd.grad(loss_fn(fine(X), y), params)])
    v = torch.randn(tr.n_coarse, dtype=torch.float64)

    def f(vec):
        torch.nn.utils.vector_to_parameters(vec, params)
        with torch.no_grad():
            return float(loss_fn(fine(X), y))

    eps = 1e-6
    fd = (f(x + eps * tr.prolong(v)) - f(x - eps * tr.prolong(v))) / (2 * eps)
    assert float(tr.restrict_gradient(g) @ v) == pytest.approx(fd, rel=1e-7)


@pytest.mark.parametrize("levels", [2, 3])
def test_coarse_model_gradient_at_zero_step_equals_restricted_fine_gradient(levels):
    """First-order consistency of the RMTR coarse model h_c = f_c + <R g - grad f_c(Pi x), . - Pi x>."""
    net = ResNet(3, 4, 8, 2).double()
    X, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
    rm = RMTR(net, torch.nn.CrossEntropyLoss(), levels=levels, progress=False)
    rm._batch, rm._batch_fraction = (X, y), 1.0
    fine = levels - 1
    x = parameters_to_vector(net.parameters()).detach()
    f, g, _ = rm._objective(fine, x)
    c = rm.levels[fine - 1]
    xc0 = c.transfer.restrict(x)
    c.v, c.x0 = None, xc0
    fc0, gfc0, _ = rm._objective(fine - 1, xc0)
    assert float((gfc0 - c.transfer.restrict_gradient(g)).norm()) > 1e-6  # the correction matters
    c.v = c.transfer.restrict_gradient(g) - gfc0
    hc0, ghc0, _ = rm._objective(fine - 1, xc0)
    assert hc0 == fc0
    assert torch.allclose(ghc0, c.transfer.restrict_gradient(g), rtol=1e-12, atol=1e-14)
