"""Stiff systems: adjoint gradients agree with independently computed forward sensitivities.

The reference integrates the sensitivity equations S' = J S + f_p with scipy's
Radau at rtol 1e-12, using hand-written (numpy) Jacobians, so it shares no
code with pnode.
"""

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import pnode
from pnode.models.stiff import Robertson, VanDerPol


def _rober(k):
    def f(y):
        y1, y2, y3 = y
        return np.array([-k[0] * y1 + k[2] * y2 * y3, k[0] * y1 - k[1] * y2**2 - k[2] * y2 * y3,
                         k[1] * y2**2])

    def jac(y):
        y1, y2, y3 = y
        return np.array([[-k[0], k[2] * y3, k[2] * y2],
                         [k[0], -2 * k[1] * y2 - k[2] * y3, -k[2] * y2],
                         [0.0, 2 * k[1] * y2, 0.0]])

    def fp(y):  # derivative with respect to log k
        y1, y2, y3 = y
        return np.array([[-k[0] * y1, 0.0, k[2] * y2 * y3],
                         [k[0] * y1, -k[1] * y2**2, -k[2] * y2 * y3],
                         [0.0, k[1] * y2**2, 0.0]])

    return f, jac, fp


def _vdp(mu):
    def f(y):
        return np.array([y[1], mu * ((1 - y[0] ** 2) * y[1] - y[0])])

    def jac(y):
        return np.array([[0.0, 1.0], [mu * (-2 * y[0] * y[1] - 1), mu * (1 - y[0] ** 2)]])

    def fp(y):  # derivative with respect to log mu
        return np.array([[0.0], [mu * ((1 - y[0] ** 2) * y[1] - y[0])]])

    return f, jac, fp


def _sensitivities(f, jac, fp, y0, t_out, n_p, atol):
    n = len(y0)

    def rhs(_, z):
        y = z[:n]
        S = z[n:].reshape(n, n + n_p)
        J = jac(y)
        dS = J @ S
        dS[:, n:] += fp(y)
        return np.concatenate([f(y), dS.ravel()])

    z0 = np.concatenate([y0, np.hstack([np.eye(n), np.zeros((n, n_p))]).ravel()])
    sol = solve_ivp(rhs, (t_out[0], t_out[-1]), z0, method="Radau", t_eval=t_out,
                    rtol=1e-12, atol=atol)
    assert sol.success
    return sol.y[:n].T, sol.y[n:].T.reshape(len(t_out), n, n + n_p)


def _check(model, fp_funcs, y0, t, w, method, rtol, atol, ref_atol):
    y0t = torch.tensor(y0, dtype=torch.float64, requires_grad=True)
    tt = torch.tensor(t, dtype=torch.float64)
    ys = pnode.odeint(model, y0t, tt, method=method, rtol=rtol, atol=atol)
    wt = torch.tensor(w, dtype=torch.float64)
    g_y0, g_p = torch.autograd.grad((ys * wt).sum(), [y0t, *model.parameters()])
    Y, S = _sensitivities(*fp_funcs, np.array(y0), np.array(t), g_p.numel(), ref_atol)
    n = len(y0)
    ref = np.einsum("ki,kij->j", w, S)
    assert np.allclose(ys.detach().numpy(), Y, rtol=1e-3, atol=1e-9)
    got = np.concatenate([g_y0.numpy(), g_p.numpy().ravel()])
    err_y0 = np.linalg.norm(got[:n] - ref[:n]) / np.linalg.norm(ref[:n])
    err_p = np.linalg.norm(got[n:] - ref[n:]) / np.linalg.norm(ref[n:])
    assert err_y0 < 1e-3 and err_p < 1e-3, (err_y0, err_p, got, ref)
    return pnode.last_stats()


@pytest.mark.parametrize("method", ["kencarp4", "trapezoid"])
def test_robertson_gradient_matches_sensitivities(method):
    model = Robertson()
    t = [0.0, 1.0, 10.0, 100.0]
    w = np.array([[0.0, 0.0, 0.0], [1.0, 1e4, 1.0], [0.5, -2e4, 1.0], [1.0, 3e4, -0.5]])
    stats = _check(model, _rober(np.exp(model.log_k.detach().numpy())), [1.0, 0.0, 0.0], t, w,
                   method, rtol=1e-6, atol=1e-10, ref_atol=1e-16)
    if method == "kencarp4":
        assert stats.steps < 200


@pytest.mark.parametrize("method,rtol,t", [
    # the initial layer and slow phase, up to just before the first relaxation jump (t ~ 0.81)
    ("kencarp4", 1e-6, [0.0, 0.25, 0.5, 0.75]),
    ("trapezoid", 1e-6, [0.0, 0.25, 0.5, 0.75]),
    # through the jump the sensitivity error of the scheme scales with the tolerance
    ("kencarp4", 1e-8, [0.0, 0.5, 1.0, 1.5]),
])
def test_van_der_pol_mu1000_gradient_matches_sensitivities(method, rtol, t):
    model = VanDerPol(1000.0)
    w = np.array([[0.0, 0.0], [1.0, 0.1], [-1.0, 0.05], [2.0, -0.1]])
    _check(model, _vdp(1000.0), [2.0, 0.0], t, w, method, rtol=rtol, atol=1e-2 * rtol,
           ref_atol=1e-10)


def test_explicit_method_on_stiff_problem_fails_cleanly():
    """dopri5 on ROBER: step size collapses -> SolverError (or max steps), never a NaN gradient."""
    model = Robertson()
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    with pytest.raises(pnode.SolverError) as exc:
        pnode.odeint(model, y0, torch.tensor([0.0, 100.0], dtype=torch.float64),
                     method="dopri5", options={"max_num_steps": 2000})
    assert exc.value.reason == "MAX_STEPS" and 0 < exc.value.t < 100
