"""pnode.multilevel.trust_region: exact compact solver and Steihaug-CG."""

import pytest
import torch

from pnode.multilevel import LSR1, solve_compact, steihaug_cg


def _sr1(n, m, shift, seed):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, dtype=torch.float64, generator=gen)
    A = 0.5 * (A + A.T) + shift * torch.eye(n, dtype=torch.float64)
    B = LSR1(memory=m)
    for _ in range(m):
        s = torch.randn(n, dtype=torch.float64, generator=gen)
        B.update(s, A @ s)
    return B, gen


def _check_optimality(B, g, radius, sol, tol=1e-8):
    Bd = B.dense()
    s, lam = sol.step, sol.multiplier
    n = g.numel()
    assert float(((Bd + lam * torch.eye(n, dtype=torch.float64)) @ s + g).norm()) <= tol * float(g.norm())
    assert lam >= 0
    assert float(s.norm()) <= radius * (1 + 1e-10)
    assert abs(lam * (radius - float(s.norm()))) <= tol * max(1.0, lam * radius)
    assert float(torch.linalg.eigvalsh(Bd + lam * torch.eye(n, dtype=torch.float64)).min()) >= -tol
    assert sol.predicted == pytest.approx(-float(g @ s + 0.5 * s @ Bd @ s), rel=1e-10, abs=1e-14)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("radius", [0.05, 1.0, 100.0])
@pytest.mark.parametrize("shift", [-3.0, 6.0])
def test_compact_solution_satisfies_trust_region_optimality(seed, radius, shift):
    B, gen = _sr1(12, 4, shift, seed)
    g = torch.randn(12, dtype=torch.float64, generator=gen)
    sol = solve_compact(g, B, radius)
    _check_optimality(B, g, radius, sol)
    # exact solution: no worse than Steihaug's approximation
    cg = steihaug_cg(g, B.matvec, radius)
    assert sol.predicted >= cg.predicted - 1e-10


def test_interior_newton_step_for_positive_definite_model():
    B, gen = _sr1(10, 3, 8.0, 1)
    g = torch.randn(10, dtype=torch.float64, generator=gen)
    assert float(torch.linalg.eigvalsh(B.dense()).min()) > 0
    sol = solve_compact(g, B, 1e6)
    assert sol.multiplier == 0.0 and not sol.on_boundary
    assert torch.allclose(sol.step, -torch.linalg.solve(B.dense(), g), rtol=1e-10)


def test_no_pairs_gives_scaled_gradient_step():
    B = LSR1(gamma=2.0)
    g = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert torch.allclose(solve_compact(g, B, 10.0).step, -g / 2)
    sol = solve_compact(g, B, 1.0)
    assert torch.allclose(sol.step, -g / 5) and sol.multiplier == pytest.approx(3.0)


def test_hard_case_reaches_the_boundary_along_the_negative_eigenvector():
    # B = diag(-1, 1, 2, ...) with g orthogonal to the negative eigenvector
    n = 5
    d = torch.tensor([-1.0, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    B = LSR1(memory=n, gamma_bounds=(1.0, 1.0), gamma=1.0)
    for i in range(n):
        e = torch.zeros(n, dtype=torch.float64)
        e[i] = 1.0
        B.update(e, d * e)
    assert torch.allclose(B.dense(), torch.diag(d), atol=1e-12)
    g = torch.tensor([0.0, 0.1, 0.1, 0.1, 0.1], dtype=torch.float64)
    sol = solve_compact(g, B, 2.0)
    assert sol.hard_case and sol.multiplier == pytest.approx(1.0)
    _check_optimality(B, g, 2.0, sol)
    assert abs(float(sol.step[0])) > 1.0


@pytest.mark.parametrize("shift", [-3.0, 0.5, 6.0])
def test_steihaug_guarantees(shift):
    B, gen = _sr1(15, 5, shift, 7)
    g = torch.randn(15, dtype=torch.float64, generator=gen)
    Bd = B.dense()
    for radius in (0.01, 0.5, 50.0):
        sol = steihaug_cg(g, B.matvec, radius, rtol=1e-12, max_iter=200)
        assert float(sol.step.norm()) <= radius * (1 + 1e-10)
        # at least the Cauchy decrease
        gBg = float(g @ Bd @ g)
        gn = float(g.norm())
        t = radius / gn if gBg <= 0 else min(gn ** 2 / gBg, radius / gn)
        cauchy = t * gn ** 2 - 0.5 * t * t * gBg
        assert sol.predicted >= cauchy - 1e-12
    if float(torch.linalg.eigvalsh(Bd).min()) > 0:  # convex and a large radius: the Newton step
        sol = steihaug_cg(g, B.matvec, 1e8, rtol=1e-13, max_iter=200)
        assert torch.allclose(sol.step, -torch.linalg.solve(Bd, g), rtol=1e-8)


def test_invalid_radius():
    with pytest.raises(ValueError, match="Invalid radius"):
        solve_compact(torch.ones(2, dtype=torch.float64), LSR1(), 0.0)
    with pytest.raises(ValueError, match="Invalid radius"):
        steihaug_cg(torch.ones(2, dtype=torch.float64), lambda v: v, -1.0)
