"""pnode.multilevel.resnet: Euler-block networks integrated by the engine."""

import pytest
import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

import pnode
from pnode.multilevel import ConvResNet, ResNet, Transfer


def _explicit(net, x):
    """Plain-torch residual loop (the scheme the engine must reproduce)."""
    z = net.act(net.inp(x))
    f = net.field
    for k in range(f.depth):
        z = z + f.h * f.block(k, z)
    if isinstance(net, ConvResNet):
        return net.out(z.mean(dim=(2, 3)))
    return net.out(z)


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


@pytest.mark.parametrize("make,shape", [
    (lambda: ResNet(5, 6, 8, 3, T=1.5), (7, 5)),
    (lambda: ConvResNet(1, 3, 4, 2), (3, 1, 5, 5)),
])
def test_gradient_equals_backprop_through_residual_loop(make, shape):
    net = make().double()
    with torch.no_grad():  # non-zero biases so every parameter matters
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(*shape, dtype=torch.float64)
    params = list(net.parameters())
    out = net(x)
    g = torch.autograd.grad((out.sin() ** 2).sum(), params)
    ref = _explicit(net, x)
    g_ref = torch.autograd.grad((ref.sin() ** 2).sum(), params)
    assert _rel(out, ref) <= 1e-12
    for a, b in zip(g, g_ref, strict=True):
        assert _rel(a, b) <= 1e-10


def test_engine_takes_exactly_depth_euler_steps():
    net = ResNet(3, 4, 12, 2, T=0.7).double()
    net(torch.randn(2, 3, dtype=torch.float64))
    stats = pnode.last_stats()
    assert stats.method == "euler" and stats.steps == 12
    assert stats.step_times[-1] == pytest.approx(0.7, abs=1e-14)


def test_block_index_is_robust_to_time_drift():
    f = ResNet(2, 2, 10, 1).field
    assert [f.index(k * 0.1 + 1e-13) for k in range(10)] == list(range(10))
    assert f.index(-1.0) == 0 and f.index(5.0) == 9


def test_coarse_resnet_equals_fine_with_duplicated_parameters():
    coarse = ResNet(4, 5, 8, 3).double()
    fine = coarse.with_depth(16)
    tr = Transfer.between(fine, coarse, prolongation="constant")
    vector_to_parameters(tr.prolong(parameters_to_vector(coarse.parameters())), fine.parameters())
    x = torch.randn(6, 4, dtype=torch.float64)
    z = torch.randn(6, 5, dtype=torch.float64)
    # the same vector field: block j of the coarse net is blocks 2j and 2j+1 of the fine net
    for j in range(8):
        assert torch.equal(fine.field.block(2 * j, z), coarse.field.block(j, z))
        assert torch.equal(fine.field.block(2 * j + 1, z), coarse.field.block(j, z))
    # the fine net is the coarse net with each block applied twice at half the step
    zc = coarse.act(coarse.inp(x))
    for j in range(8):
        for _ in range(2):
            zc = zc + fine.field.h * coarse.field.block(j, zc)
    assert _rel(fine(x), coarse.out(zc)) <= 1e-13
    # both discretise the same ODE (parameters piecewise constant on the 8 intervals):
    # the gap between depth d and depth 2d is first order in h
    with torch.no_grad():
        gaps = [float((_refine(coarse, 2 * d)(x) - _refine(coarse, d)(x)).norm()) for d in (8, 16, 32)]
    assert 1.6 < gaps[0] / gaps[1] < 2.5 and 1.6 < gaps[1] / gaps[2] < 2.5


def _refine(net, depth):
    """``net`` with ``depth`` blocks holding the same piecewise-constant parameters."""
    new = net.with_depth(depth)
    with torch.no_grad():
        for pn, p in zip(new.parameters(), net.parameters(), strict=True):
            pn.copy_(p.repeat_interleave(depth // net.depth, dim=0) if pn.shape != p.shape else p)
    return new


def test_with_depth_keeps_shared_layers_and_resizes_blocks():
    net = ResNet(3, 4, 8, 2).double()
    half = net.with_depth(4)
    assert half.depth == 4 and half.field.weight.shape == (4, 4, 4)
    assert torch.equal(half.inp.weight, net.inp.weight) and torch.equal(half.out.bias, net.out.bias)
    assert half.time_parameter_flags() == [False, False, True, True, False, False]


@pytest.mark.parametrize("kwargs,match", [
    ({"depth": 0}, "Invalid depth"),
    ({"width": 0}, "Invalid width"),
    ({"T": -1.0}, "Invalid T"),
    ({"activation": "sigmoid"}, "Invalid activation"),
])
def test_bad_constructor_arguments(kwargs, match):
    args = {"in_features": 3, "width": 4, "depth": 4, "out_features": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        ResNet(**args)


def test_conv_resnet_rejects_flat_input():
    with pytest.raises(ValueError, match="images"):
        ConvResNet(1, 2, 2, 2).double()(torch.randn(3, 64, dtype=torch.float64))
