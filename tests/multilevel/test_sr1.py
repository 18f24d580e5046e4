"""pnode.multilevel.sr1: limited-memory SR1 in compact form."""

import pytest
import torch

from pnode.multilevel import LSR1


def test_secant_condition_holds_for_the_latest_pair():
    A = torch.randn(8, 8, dtype=torch.float64)
    A = A + A.T  # indefinite
    B = LSR1(memory=4)
    for _ in range(6):
        s = torch.randn(8, dtype=torch.float64)
        assert B.update(s, A @ s)
        assert torch.allclose(B.matvec(s), A @ s, rtol=1e-10, atol=1e-10)
    assert len(B) == 4 and B.skipped == 0


def test_quadratic_pairs_are_hereditary_and_recover_the_hessian():
    """SR1 on a quadratic: every stored pair satisfies the secant condition; n pairs give A."""
    A = torch.randn(5, 5, dtype=torch.float64)
    A = A + A.T + torch.diag(torch.tensor([3.0, -2.0, 1.0, 4.0, -1.0], dtype=torch.float64))
    B = LSR1(memory=5)
    S = torch.randn(5, 5, dtype=torch.float64)
    for i in range(5):
        B.update(S[:, i], A @ S[:, i])
    for i in range(5):
        assert torch.allclose(B.matvec(S[:, i]), A @ S[:, i], rtol=1e-8, atol=1e-8)
    assert torch.allclose(B.dense(), A, rtol=1e-7, atol=1e-7)


def test_matvec_matches_dense_compact_form():
    B = LSR1(memory=3)
    for _ in range(3):
        s = torch.randn(6, dtype=torch.float64)
        B.update(s, 2.0 * s + 0.1 * torch.randn(6, dtype=torch.float64))
    v = torch.randn(6, dtype=torch.float64)
    assert torch.allclose(B.matvec(v), B.dense() @ v, rtol=1e-12)
    assert torch.allclose(B.dense(), B.dense().T)


def test_unsafe_update_is_skipped():
    B = LSR1(memory=3, r=1e-8)
    s1 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    assert B.update(s1, 3.0 * s1)
    before = B.dense().clone()
    # y - B s is orthogonal to s: the SR1 denominator vanishes
    s = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    y = B.matvec(s) + torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    assert not B.update(s, y)
    assert B.skipped == 1
    assert torch.equal(B.dense(), before)
    # y = B s carries no information either
    assert not B.update(s, B.matvec(s))
    # non-finite or zero pairs
    assert not B.update(torch.zeros(3, dtype=torch.float64), s)
    assert not B.update(s, torch.full((3,), float("nan"), dtype=torch.float64))
    assert B.skipped == 4


def test_reset_and_invalid_arguments():
    B = LSR1()
    B.update(torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64) * 2)
    B.reset()
    assert len(B) == 0 and torch.equal(B.matvec(torch.ones(2)), B.gamma * torch.ones(2))
    with pytest.raises(ValueError, match="Invalid memory"):
        LSR1(memory=0)
    with pytest.raises(ValueError, match="Invalid gamma"):
        LSR1(gamma=0.0)
