"""Reference gradients for the stiff benchmarks: forward sensitivity equations solved by scipy.

For ``y' = f(y, p)`` the sensitivities ``S = dy/d(y0, p)`` obey
``S' = J S + [0 | f_p]`` with ``S(0) = [I | 0]``.  Integrating state and
sensitivities together with scipy's Radau at a tight tolerance, with Jacobians
written by hand in numpy, gives gradients that share no code with pnode or torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.integrate import solve_ivp

__all__ = ["StiffSystem", "robertson", "van_der_pol", "reference_gradient"]


@dataclass(frozen=True)
class StiffSystem:
    """Right-hand side, its Jacobian and its derivative with respect to log-parameters (numpy)."""

    f: Callable[[np.ndarray], np.ndarray]
    jac: Callable[[np.ndarray], np.ndarray]
    f_logp: Callable[[np.ndarray], np.ndarray]
    n_params: int


def robertson(k: np.ndarray) -> StiffSystem:
    """ROBER with rate constants ``k``; parameters are ``log k``."""
    k1, k2, k3 = k

    def f(y):
        r1, r2, r3 = k1 * y[0], k2 * y[1] ** 2, k3 * y[1] * y[2]
        return np.array([r3 - r1, r1 - r2 - r3, r2])

    def jac(y):
        return np.array([[-k1, k3 * y[2], k3 * y[1]],
                         [k1, -2 * k2 * y[1] - k3 * y[2], -k3 * y[1]],
                         [0.0, 2 * k2 * y[1], 0.0]])

    def f_logp(y):  # column j: d f / d log k_j = k_j * d f / d k_j
        r1, r2, r3 = k1 * y[0], k2 * y[1] ** 2, k3 * y[1] * y[2]
        return np.array([[-r1, 0.0, r3], [r1, -r2, -r3], [0.0, r2, 0.0]])

    return StiffSystem(f, jac, f_logp, 3)


def van_der_pol(mu: float) -> StiffSystem:
    """Van der Pol in first-order form; the parameter is ``log mu``."""
    def f(y):
        return np.array([y[1], mu * ((1 - y[0] ** 2) * y[1] - y[0])])

    def jac(y):
        return np.array([[0.0, 1.0], [-mu * (2 * y[0] * y[1] + 1), mu * (1 - y[0] ** 2)]])

    def f_logp(y):
        return np.array([[0.0], [mu * ((1 - y[0] ** 2) * y[1] - y[0])]])

    return StiffSystem(f, jac, f_logp, 1)


def reference_gradient(system: StiffSystem, y0: np.ndarray, t: np.ndarray, weights: np.ndarray,
                       atol: float) -> tuple[np.ndarray, np.ndarray]:
    """Gradient of ``sum(weights * y(t))`` with respect to ``(y0, log p)``, and the states ``y(t)``.

    Parameters
    ----------
    system : StiffSystem
        The ODE and its derivatives.
    y0 : ndarray, shape (n,)
    t : ndarray, shape (m,)
        Output times, ``t[0]`` the initial time.
    weights : ndarray, shape (m, n)
    atol : float
        Absolute tolerance of the sensitivity solve (rtol is 1e-12).

    Returns
    -------
    grad : ndarray, shape (n + n_params,)
    states : ndarray, shape (m, n)
    """
    n, q = len(y0), system.n_params

    def rhs(_, z):
        y, s = z[:n], z[n:].reshape(n, n + q)
        ds = system.jac(y) @ s
        ds[:, n:] += system.f_logp(y)
        return np.concatenate([system.f(y), ds.ravel()])

    z0 = np.concatenate([y0, np.hstack([np.eye(n), np.zeros((n, q))]).ravel()])
    sol = solve_ivp(rhs, (t[0], t[-1]), z0, method="Radau", t_eval=t, rtol=1e-12, atol=atol)
    if not sol.success:
        raise RuntimeError(f"reference sensitivity solve failed: {sol.message}")
    states = sol.y[:n].T
    sens = sol.y[n:].T.reshape(len(t), n, n + q)
    return np.einsum("ki,kij->j", weights, sens), states
