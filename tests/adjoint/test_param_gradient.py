"""ParamGradient: batched stage products add up bit for bit as stage by stage."""

import torch

from pnode.adjoint.param_gradient import ParamGradient


def _sequential(stages, params):
    acc = [torch.zeros_like(p) for p in params]
    for grads, w in stages:
        for a, g in zip(acc, grads, strict=True):
            a.add_(g * w)  # scale, then add: PETSc's VecScale and VecAXPY
    return torch.cat([a.reshape(-1) for a in acc])


def test_batched_products_match_stage_by_stage():
    torch.manual_seed(0)
    params = [torch.zeros(3, 4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)]
    # magnitudes far apart: any change of summation order or fused rounding shows
    stages = [([torch.randn(3, 4, dtype=torch.float64) * 10.0 ** (k % 7 - 3),
                torch.randn(4, dtype=torch.float64)], float(torch.randn(())) / 7)
              for k in range(53)]
    pg = ParamGradient()
    pg.reset()
    cotangent = torch.zeros(5, dtype=torch.float64)
    for k, (grads, w) in enumerate(stages):
        pg.add(grads, w, params, cotangent)
        if k == 20:  # a finiteness check between segments adds what is held
            assert pg.finite()
    assert torch.equal(pg.value(16), _sequential(stages, params))


def test_product_sharing_the_cotangent_is_added_at_once():
    params = [torch.zeros(4, dtype=torch.float64)]
    pg = ParamGradient()
    v = torch.ones(4, dtype=torch.float64)
    pg.add([v], 0.5, params, v)  # autograd handed the incoming vector on as it is
    v.fill_(7.0)  # PETSc reuses its work vector
    assert torch.equal(pg.value(4), torch.full((4,), 0.5, dtype=torch.float64))


def test_product_viewing_part_of_the_cotangent_is_added_at_once():
    # e.g. func = cat([g(y), p]) or y + p in the state's shape: the gradient is a view of v
    params = [torch.zeros(2, 2, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)]
    pg = ParamGradient()
    pg.reset()
    other = torch.ones(3, dtype=torch.float64)
    for k in range(3):
        v = torch.arange(7.0, dtype=torch.float64) + k
        pg.add([v[3:].view(2, 2), other], 0.5, params, v)
        v.fill_(-1e9)  # PETSc reuses its work vector
    want = 0.5 * sum(torch.arange(3.0, 7.0, dtype=torch.float64) + k for k in range(3))
    assert torch.equal(pg.value(7), torch.cat([want, torch.full((3,), 1.5, dtype=torch.float64)]))
