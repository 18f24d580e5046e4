"""SNOpt (pnode/control/snopt.py): factors from the adjoint sweep, updates, state, bad input."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pnode
from pnode.control import SNOpt
from pnode.control.snopt import assign_layers


class Field(nn.Module):
    def __init__(self, d=4, width=5):
        super().__init__()
        self.l1 = nn.Linear(d + 1, width)
        self.l2 = nn.Linear(width, d)
        self.scale = nn.Parameter(torch.tensor(0.8))  # not a layer: plain update

    def forward(self, t, y):
        ty = torch.cat([y, t.expand(y.shape[0], 1)], dim=1)
        return self.scale * self.l2(torch.tanh(self.l1(ty)))


def make_model(method="rk4", **kw):
    torch.manual_seed(1)
    options = kw.pop("options", {"step_size": 0.25} if method != "dopri5" else None)
    return nn.Sequential(nn.Linear(6, 4), nn.Tanh(),
                         pnode.NeuralODE(Field(), method=method, options=options, **kw),
                         nn.Linear(4, 3)).double()


def data(n=16, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def loss_fn(model, x, y):
    return F.cross_entropy(model(x), y)


@pytest.mark.parametrize("method,kw", [("rk4", {}), ("midpoint", {}), ("dopri5", {"rtol": 1e-6}),
                                       ("rk4", {"checkpoint": "graph"})])
def test_ode_factors_equal_a_brute_force_recomputation_over_the_adjoint_events(method, kw):
    model = make_model(method, **kw)
    field = model[2].func
    opt = SNOpt(model)
    events = []
    # the event's tensors may view PETSc's work vectors: copy them while the event is current
    handle = pnode.adjoint.observe_vjps(lambda ev: events.append(
        (ev.t, ev.y.clone(), ev.cotangent.clone(), ev.weight)))
    x, y = data()
    try:
        loss_fn(model, x, y).backward()
    finally:
        handle.remove()
    assert events and all(ev[3] is not None for ev in events)
    # brute force: re-evaluate func at each event's stage, pull its cotangent back to each layer
    opt.collecting = False
    want = {lin: [0, 0] for lin in (field.l1, field.l2)}
    for ev_t, ev_y, ev_cot, ev_w in events:
        seen = {}
        hooks = [lin.register_forward_hook(lambda m, i, o, seen=seen: seen.__setitem__(m, (i[0], o)))
                 for lin in want]
        with torch.enable_grad():
            out = field(torch.tensor(ev_t, dtype=torch.float64), ev_y)
            outs = [seen[lin][1] for lin in want]
            gs = torch.autograd.grad(out, outs, ev_cot)
        for h in hooks:
            h.remove()
        for (lin, acc), g in zip(want.items(), gs, strict=True):
            a = torch.cat([seen[lin][0], torch.ones(len(g), 1, dtype=torch.float64)], dim=1)
            w = abs(ev_w)
            acc[0] = acc[0] + w * a.t() @ a / len(a)
            acc[1] = acc[1] + w * len(g) * g.t() @ g
    for lin, (A, G) in want.items():
        fac = opt.factors[id(lin)]
        assert fac.n_new == len(events)
        torch.testing.assert_close(fac.A_new, A, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(fac.G_new, G, rtol=1e-12, atol=1e-14)
    # the weighted event rows also rebuild the layer's gradient: the factors see what the gradient sees
    # (outer layer: ordinary K-FAC of the main pass)
    outer = opt.factors[id(model[0])]
    a = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(outer.A_new, a.t() @ a / len(x))


def test_preconditioned_update_equals_the_explicit_damped_kronecker_solve():
    model = make_model()
    lam = 3e-3
    opt = SNOpt(model, lr=1.0, momentum=0.0, kl_clip=None, damping=lam)
    before = {p: p.detach().clone() for p in model.parameters()}
    x, y = data()
    loss_fn(model, x, y).backward()
    grads = {p: p.grad.clone() for p in model.parameters()}
    opt.step()
    field = model[2].func
    for lin in (field.l1, field.l2, model[0], model[3]):
        fac = opt.factors[id(lin)]
        n = fac.d_in * fac.d_out
        gm = torch.cat([grads[lin.weight], grads[lin.bias][:, None]], dim=1)
        explicit = torch.linalg.solve(torch.kron(fac.A, fac.G) + lam * torch.eye(n, dtype=torch.float64),
                                      gm.t().reshape(-1))
        step = torch.cat([lin.weight - before[lin.weight], (lin.bias - before[lin.bias])[:, None]], dim=1)
        torch.testing.assert_close(-step.t().reshape(-1), explicit, rtol=1e-9, atol=1e-12)
    # a parameter outside any layer gets the plain base update
    torch.testing.assert_close(field.scale - before[field.scale], -grads[field.scale])


def _train(model, opt, steps, seed):
    for i in range(steps):
        x, y = data(seed=seed + i)
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()


@pytest.mark.parametrize("base,inverse", [("sgd", "eig"), ("adam", "cholesky")])
def test_state_dict_round_trip_resumes_identical_updates(base, inverse):
    model = make_model()
    opt = SNOpt(model, base=base, inverse=inverse, update_freq=2, inv_freq=3)
    _train(model, opt, 4, seed=10)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, 4, seed=20)
    resumed = make_model()
    resumed.load_state_dict(saved_model)
    opt2 = SNOpt(resumed, base=base, inverse=inverse, update_freq=2, inv_freq=3)
    opt2.load_state_dict(saved_opt)
    _train(resumed, opt2, 4, seed=20)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_training_reduces_the_loss():
    model = make_model()
    opt = SNOpt(model)
    x, y = data(64)
    first = float(loss_fn(model, x, y).detach())
    for _ in range(25):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    assert float(loss_fn(model, x, y).detach()) < 0.6 * first


def test_a_model_without_layers_inside_an_ode_is_refused():
    class Decay(nn.Module):
        def __init__(self):
            super().__init__()
            self.k = nn.Parameter(torch.tensor(1.0))

        def forward(self, t, y):
            return -self.k * y

    model = nn.Sequential(nn.Linear(3, 3), pnode.NeuralODE(Decay()))
    with pytest.raises(ValueError, match="Invalid model: no nn.Linear"):
        SNOpt(model)


@pytest.mark.parametrize("kw", [{"lr": -1.0}, {"damping": 0.0}, {"factor_decay": 1.0}, {"update_freq": 0},
                                {"inv_freq": 1.5}, {"base": "lbfgs"}, {"inverse": "svd"}, {"momentum": 1.0},
                                {"kl_clip": 0.0}, {"weight_decay": -1.0}])
def test_invalid_hyperparameters(kw):
    with pytest.raises(ValueError, match="Invalid"):
        SNOpt(make_model(), **kw)


def test_nan_gradient_raises_and_leaves_everything_unchanged():
    model = make_model()
    opt = SNOpt(model)
    _train(model, opt, 2, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    steps = opt.steps
    x, y = data()
    opt.zero_grad()
    loss_fn(model, x, y).backward()
    model[3].weight.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        opt.step()
    assert opt.steps == steps
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_singular_factor_gives_a_finite_damped_step():
    # the outer layer sees all-zero inputs: its A is rank one (the bias column)
    model = make_model()
    opt = SNOpt(model, inverse="eig", damping=1e-6)
    x, y = data()
    x = torch.zeros_like(x)
    loss_fn(model, x, y).backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_implicit_method_is_refused_in_the_backward():
    model = make_model("implicit_euler", options={"step_size": 0.25})
    opt = SNOpt(model)
    x, y = data()
    with pytest.raises(ValueError, match="explicit Runge-Kutta"):
        loss_fn(model, x, y).backward()
    opt.remove_hooks()


def test_one_rank_communicator_gives_the_serial_updates():
    from mpi4py import MPI

    m1, m2 = make_model(), make_model()
    o1, o2 = SNOpt(m1, inv_freq=2), SNOpt(m2, inv_freq=2, comm=MPI.COMM_SELF)
    _train(m1, o1, 3, seed=5)
    _train(m2, o2, 3, seed=5)
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_layer_inversion_is_shared_out_evenly():
    costs = [1000.0, 10.0, 10.0, 990.0, 5.0]
    owners = assign_layers(costs, 2)
    loads = [sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in range(2)]
    assert sorted(owners) != [0] * 5 and max(loads) <= 1010
    assert assign_layers(costs, 1) == [0] * 5


def test_optimizer_does_not_outlive_its_hooks():
    import gc
    import weakref

    model = make_model()
    ref = weakref.ref(SNOpt(model))
    gc.collect()
    assert ref() is None
    x, y = data()
    loss_fn(model, x, y).backward()  # no optimizer listens any more: nothing breaks


class ConvField(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 2, 3, padding=1, bias=False)

    def forward(self, t, y):
        return self.c2(torch.tanh(self.c1(y)))


def test_conv_factors_inside_an_ode_equal_a_brute_force_recomputation():
    torch.manual_seed(3)
    field = ConvField().double()
    model = nn.Sequential(pnode.NeuralODE(field, method="midpoint", options={"step_size": 0.5}),
                          nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()
    opt = SNOpt(model)
    events = []
    handle = pnode.adjoint.observe_vjps(lambda ev: events.append(
        (ev.t, ev.y.clone(), ev.cotangent.clone(), ev.weight)))
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    try:
        F.cross_entropy(model(x), y).backward()
    finally:
        handle.remove()
    opt.collecting = False
    for conv in (field.c1, field.c2):
        A = G = 0
        for ev_t, ev_y, ev_cot, ev_w in events:
            seen = {}
            h = conv.register_forward_hook(lambda m, i, o, seen=seen: seen.update(x=i[0], out=o))
            with torch.enable_grad():
                out = field(torch.tensor(ev_t, dtype=torch.float64), ev_y)
                (g,) = torch.autograd.grad(out, seen["out"], ev_cot)
            h.remove()
            a = F.unfold(seen["x"], 3, padding=1).transpose(1, 2).reshape(-1, conv.weight[0].numel())
            if conv.bias is not None:
                a = torch.cat([a, torch.ones(len(a), 1, dtype=torch.float64)], dim=1)
            gm = g.flatten(2).transpose(1, 2).reshape(-1, g.shape[1])
            A = A + abs(ev_w) * a.t() @ a / len(a)
            G = G + abs(ev_w) * 3 * gm.t() @ gm
        torch.testing.assert_close(opt.factors[id(conv)].A_new, A, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(opt.factors[id(conv)].G_new, G, rtol=1e-12, atol=1e-14)
    opt.collecting = True
    before = field.c1.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, field.c1.weight) and torch.isfinite(field.c1.weight).all()
