"""The models behind the examples: CNF log-densities, trace estimators, gradients, PDE operators."""

import math

import pytest
import torch

import pnode
from pnode.adjoint.reference import odeint_reference
from pnode.models import (
    CNF,
    BurgersAdvection,
    Diffusion,
    ODEClassifier,
    Robertson,
    StencilClosure,
    random_fourier_fields,
)
from pnode.models.cnf import CNFField, ConcatMLP


def _flow(trace="exact", dim=2):
    torch.manual_seed(3)
    return CNF(dim, (16,), T=1.0, trace=trace, method="rk4", options={"step_size": 0.1}).double()


def test_cnf_density_integrates_to_one():
    flow = _flow()
    n, lim = 150, 7.0
    axis = torch.linspace(-lim, lim, n, dtype=torch.float64)
    gx, gy = torch.meshgrid(axis, axis, indexing="xy")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    with torch.no_grad():
        logp = flow.log_prob(grid)
    mass = float(logp.exp().sum()) * (2 * lim / (n - 1)) ** 2
    # a sign error in the trace or the change of variables is off by far more than this
    assert mass == pytest.approx(1.0, abs=1e-4)
    gauss = -0.5 * (grid ** 2).sum(1) - math.log(2 * math.pi)
    assert float((logp - gauss).abs().max()) > 1.0  # and the flow is far from the identity


def test_exact_trace_of_a_linear_field():
    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.A = torch.nn.Parameter(torch.tensor([[0.3, -1.0, 0.2], [0.5, -0.7, 0.0], [0.1, 0.4, 1.1]],
                                                     dtype=torch.float64))

        def forward(self, t, z):
            return z @ self.A.T

    field = CNFField(Linear(), "exact")
    z = torch.randn(5, 3, dtype=torch.float64)
    f, dlogp = field(torch.tensor(0.0, dtype=torch.float64), (z, torch.zeros(5, 1, dtype=torch.float64)))
    assert torch.allclose(dlogp, torch.full((5, 1), -0.7, dtype=torch.float64))
    field.trace = "hutchinson"
    field.noise = torch.ones(5, 3, dtype=torch.float64)
    _, est = field(torch.tensor(0.0, dtype=torch.float64), (z, torch.zeros(5, 1, dtype=torch.float64)))
    assert torch.allclose(est, torch.full((5, 1), -float(field.net.A.detach().sum()), dtype=torch.float64))


def test_hutchinson_is_unbiased():
    torch.manual_seed(0)
    net = ConcatMLP(4, (8,)).double()
    z = torch.randn(1, 4, dtype=torch.float64).expand(4000, 4).contiguous()
    t = torch.tensor(0.3, dtype=torch.float64)
    exact = CNFField(net, "exact")(t, (z, None))[1].detach()
    h = CNFField(net, "hutchinson")
    h.noise = (2 * torch.randint(0, 2, z.shape) - 1).double()
    est = h(t, (z, None))[1].detach()
    se = float(est.std()) / math.sqrt(len(est))
    assert abs(float(est.mean()) - float(exact[0])) < 4 * se


def test_cnf_gradient_is_the_discrete_adjoint():
    flow = _flow()
    x = torch.randn(6, 2, dtype=torch.float64)
    params = list(flow.parameters())
    g_pnode = torch.autograd.grad(flow.log_prob(x).sum(), params)
    stats = pnode.last_stats()

    def reference_logp():
        z, delta = odeint_reference(flow.field, (x, torch.zeros(6, 1, dtype=torch.float64)),
                                    torch.tensor([0.0, 1.0], dtype=torch.float64), method="rk4",
                                    step_times=stats.step_times, output_steps=stats.output_steps)
        return (-0.5 * (z[-1] ** 2).sum(1) - math.log(2 * math.pi) - delta[-1, :, 0]).sum()

    g_ref = torch.autograd.grad(reference_logp(), params)
    for a, b in zip(g_pnode, g_ref, strict=True):
        assert float((a - b).norm()) <= 1e-10 * max(float(b.norm()), 1e-300)


def test_cnf_sample_inverts_log_prob_direction():
    flow = _flow()
    g = torch.Generator().manual_seed(0)
    x = flow.sample(500, generator=g)
    assert x.shape == (500, 2) and torch.isfinite(x).all()
    with torch.no_grad():
        z, _ = pnode.odeint(flow.field, (x, torch.zeros(500, 1, dtype=torch.float64)),
                            torch.tensor([0.0, 1.0], dtype=torch.float64), method="rk4",
                            options={"step_size": 0.1})
    z0 = torch.randn(500, 2, generator=torch.Generator().manual_seed(0)).double()
    assert float((z[-1] - z0).abs().max()) < 1e-4  # RK4 forward after RK4 backward, h = 0.1


def test_classifier_shapes_and_bad_arch():
    for arch in ("mlp", "conv"):
        m = ODEClassifier((1, 8, 8), 10, arch=arch, width=4, hidden=8, method="rk4",
                          options={"step_size": 0.5}).double()
        assert m(torch.randn(3, 1, 8, 8, dtype=torch.float64)).shape == (3, 10)
    with pytest.raises(ValueError, match="Invalid arch"):
        ODEClassifier((1, 8, 8), 10, arch="resnet")


def test_pde_operators():
    n = 64
    x = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
    u = torch.sin(3 * x)[None]
    dx = 2 * math.pi / n
    d = Diffusion(n, nu=0.2)(None, u)
    symbol = -0.2 * (2 - 2 * math.cos(3 * dx)) / dx ** 2  # eigenvalue of the discrete Laplacian
    assert torch.allclose(d, symbol * u, atol=1e-12)
    adv = BurgersAdvection(n)(None, torch.ones(2, n, dtype=torch.float64))
    assert torch.allclose(adv, torch.zeros_like(adv))
    closure = StencilClosure(n).double()
    assert torch.equal(closure(None, u), torch.zeros_like(u))  # starts as "no closure"
    v = random_fourier_fields(4, n, generator=torch.Generator().manual_seed(0))
    assert v.shape == (4, n) and torch.allclose(v.abs().amax(1), torch.ones(4, dtype=torch.float64))
    # translation invariance of the learned stencil
    torch.nn.init.normal_(closure.mix.weight)
    assert torch.allclose(closure(None, torch.roll(v, 5, -1)), torch.roll(closure(None, v), 5, -1))


def test_robertson_is_the_written_out_kinetics_bit_for_bit():
    """The lean Robertson (index picks and one stoichiometry product) computes exactly
    -k1 y1 + k3 y2 y3, k1 y1 - k2 y2^2 - k3 y2 y3, k2 y2^2, with any batch dimensions."""
    model = Robertson()
    k1, k2, k3 = torch.exp(model.log_k)
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([1.0, 1e-4, 1.0], dtype=torch.float64)
    for shape in [(3,), (5, 3), (2, 4, 3), (0, 3)]:
        y = torch.rand(*shape, generator=g, dtype=torch.float64) * scale
        y1, y2, y3 = y[..., 0], y[..., 1], y[..., 2]
        want = torch.stack([-k1 * y1 + k3 * y2 * y3, k1 * y1 - k2 * y2 * y2 - k3 * y2 * y3,
                            k2 * y2 * y2], dim=-1)
        assert torch.equal(model(torch.tensor(0.0), y), want), shape
    assert list(model.state_dict()) == ["log_k"]
    assert model.float()(torch.tensor(0.0), torch.rand(4, 3)).dtype == torch.float32
