"""pnode.multilevel.rmtr: the multilevel trust-region trainer."""

import math

import pytest
import torch
from torch import nn

from pnode.multilevel import RMTR, ConvResNet, ResNet
from pnode.multilevel import rmtr as rmtr_module


def _data(n=48, classes=3, features=4):
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(n, features, dtype=torch.float64, generator=gen)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).long() + (X[:, 2] > 1).long()
    return X, y.clamp(max=classes - 1)


def _net(depth=8):
    return ResNet(4, 6, depth, 3).double()


@pytest.fixture
def trial_log(monkeypatch):
    """Record (level, f before, f after, accepted) of every trust-region trial."""
    log = []
    orig = rmtr_module.RMTR._try

    def spy(self, l, st, s, predicted, r):
        before = st.f
        ok = orig(self, l, st, s, predicted, r)
        log.append((l, before, st.f, ok, predicted))
        return ok

    monkeypatch.setattr(rmtr_module.RMTR, "_try", spy)
    return log


@pytest.mark.parametrize("levels,options", [
    (1, {}), (2, {"cycle": "V"}), (3, {"cycle": "V"}),
    (3, {"cycle": "V", "subproblem": "cg", "prolongation": "linear"}),
    (3, {"cycle": "V", "restriction": "injection", "post_smoothing": 0}),
])
def test_deterministic_accepted_steps_never_increase_the_loss(levels, options, trial_log):
    X, y = _data()
    hist = RMTR(_net(), nn.CrossEntropyLoss(), levels=levels, progress=False, **options).fit(X, y, epochs=8)
    assert len(hist) == 8 and hist.reason == "epochs"
    assert all(b == len(X) for b in hist.batch_size)
    assert all(b <= a for a, b in zip(hist.loss, hist.loss[1:], strict=False))  # full batch: monotone
    assert hist.loss[-1] < 0.8 * hist.loss[0]
    accepted = [e for e in trial_log if e[3]]
    assert accepted and all(after < before for _, before, after, _, _ in accepted)
    assert all(after == before for _, before, after, ok, _ in trial_log if not ok)
    assert all(p > 0 for *_, p in trial_log)
    if levels > 1:  # coarse levels did work
        assert any(e[0] < levels - 1 and e[3] for e in trial_log)


def test_fit_leaves_the_trained_parameters_in_the_model():
    X, y = _data()
    net = _net()
    loss_fn = nn.CrossEntropyLoss()
    hist = RMTR(net, loss_fn, levels=2, progress=False).fit(X, y, epochs=4)
    with torch.no_grad():
        assert float(loss_fn(net(X), y)) == pytest.approx(hist.loss[-1], rel=1e-12)


def test_history_records_every_field():
    X, y = _data()
    hist = RMTR(_net(), nn.CrossEntropyLoss(), levels=3, cycle="V", progress=False).fit(X, y, epochs=3)
    n = len(hist)
    for name in ("loss", "accuracy", "radius", "batch_size", "work", "time", "accepted", "level"):
        assert len(getattr(hist, name)) == n
    assert all(0.0 <= a <= 1.0 for a in hist.accuracy)
    assert all(b > a for a, b in zip(hist.work, hist.work[1:], strict=False))
    assert all(b >= a for a, b in zip(hist.time, hist.time[1:], strict=False))
    # a V-cycle costs more than one fine gradient but less than levels x (smoothing + 1)
    assert 1.0 < hist.work[0] < 3 * 4


def test_f_cycle_climbs_from_the_coarsest_level(trial_log):
    X, y = _data()
    hist = RMTR(_net(), nn.CrossEntropyLoss(), levels=3, cycle="F", nested_max=2,
                progress=False).fit(X, y, epochs=10)
    assert all(after < before for _, before, after, ok, _ in trial_log if ok)
    fine = [loss for loss, level in zip(hist.loss, hist.level, strict=True) if level == 2]
    assert all(b <= a for a, b in zip(fine, fine[1:], strict=False))
    assert hist.level[0] == 0 and hist.level[-1] == 2
    assert hist.level == sorted(hist.level)
    assert hist.work[0] == pytest.approx(0.5)  # two gradients of the quarter-depth net


def test_target_loss_and_time_limits():
    X, y = _data()
    hist = RMTR(_net(), nn.CrossEntropyLoss(), levels=2, progress=False).fit(X, y, target_loss=0.9)
    assert hist.reason == "target_loss" and hist.loss[-1] <= 0.9
    assert hist.first_reaching(0.9) == hist.time[-1]
    assert hist.first_reaching(-1.0) is None
    hist = RMTR(_net(), nn.CrossEntropyLoss(), levels=2, progress=False).fit(X, y, max_seconds=0.2)
    assert hist.reason == "max_seconds"


def test_batch_grows_when_progress_stalls():
    X, y = _data(n=64)
    hist = RMTR(_net(), nn.CrossEntropyLoss(), levels=2, batch_size=8, stall_tol=0.99,
                progress=False).fit(X, y, epochs=6)
    sizes = hist.batch_size
    assert sizes[0] == 8 and max(sizes) > 8
    assert all(b >= a for a, b in zip(sizes, sizes[1:], strict=False))


def test_regression_with_single_level_on_any_module():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(40, 3, dtype=torch.float64, generator=gen)
    y = torch.sin(X.sum(dim=1, keepdim=True))
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    hist = RMTR(net, nn.MSELoss(), levels=1, progress=False).fit(X, y, epochs=20)
    assert hist.loss[-1] < 0.5 * hist.loss[0]
    assert all(math.isnan(a) for a in hist.accuracy)


def test_conv_resnet_trains_on_two_levels():
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(24, 1, 4, 4, dtype=torch.float64, generator=gen)
    y = (X.mean(dim=(1, 2, 3)) > 0).long()
    net = ConvResNet(1, 3, 4, 2).double()
    hist = RMTR(net, nn.CrossEntropyLoss(), levels=2, progress=False).fit(X, y, epochs=5)
    assert hist.loss[-1] < hist.loss[0]
    assert any(a > 0 for a in hist.accepted)


# -- bad input --------------------------------------------------------------------------
def test_depth_not_divisible_names_the_fix():
    with pytest.raises(ValueError, match=r"divisible by 2\*\*\(levels-1\) = 4.*multiple of 4"):
        RMTR(ResNet(4, 6, 6, 3).double(), nn.CrossEntropyLoss(), levels=3)


def test_non_finite_loss_names_the_fix():
    X, y = _data()

    def bad_loss(out, target):
        return out.sum() * float("nan")

    with pytest.raises(ValueError, match="non-finite loss.*check the data"):
        RMTR(_net(), bad_loss, levels=2, progress=False).fit(X, y, epochs=1)


def test_zero_size_batch_is_rejected():
    X, y = _data()
    with pytest.raises(ValueError, match="Invalid batch_size.*at least one sample"):
        RMTR(_net(), nn.CrossEntropyLoss(), levels=2, batch_size=0)
    with pytest.raises(ValueError, match="zero samples"):
        RMTR(_net(), nn.CrossEntropyLoss(), levels=2, progress=False).fit(X[:0], y[:0], epochs=1)


@pytest.mark.parametrize("options,match", [
    ({"radius": -1.0}, "Invalid radius"),
    ({"eta1": 0.9, "eta2": 0.5}, "Invalid eta1"),
    ({"subproblem": "lbfgs"}, "Invalid subproblem"),
    ({"cycle": "W"}, "Invalid cycle"),
    ({"memory": 0}, "Invalid memory"),
    ({"unknown_option": 1}, "Invalid options"),
    ({"shrink": 1.5}, "Invalid shrink"),
])
def test_invalid_options(options, match):
    with pytest.raises(ValueError, match=match):
        RMTR(_net(), nn.CrossEntropyLoss(), levels=2, **options)


def test_bad_data_and_limits():
    X, y = _data()
    rm = RMTR(_net(), nn.CrossEntropyLoss(), levels=2, progress=False)
    with pytest.raises(ValueError, match="matching"):
        rm.fit(X, y[:-1], epochs=1)
    Xn = X.clone()
    Xn[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        rm.fit(Xn, y, epochs=1)
    with pytest.raises(ValueError, match="Invalid epochs"):
        rm.fit(X, y, epochs=0)
    with pytest.raises(TypeError, match="ResNet"):
        RMTR(nn.Linear(2, 2), nn.MSELoss(), levels=2)
