"""ROBER as a DAE: pnode solve + gradient vs scipy Radau forward-only on the equivalent ODE.

Run from the repository root: ``python docs/dae_timing.py`` (numbers in docs/dae.rst).
"""

import statistics
import time

import numpy as np
import torch
from scipy.integrate import solve_ivp

import pnode
from tests.adjoint.test_dae import DIAG, RoberDAE

torch.set_num_threads(1)
T = torch.tensor([0.0, 1.0, 10.0, 100.0], dtype=torch.float64)
W = torch.tensor([[0, 0, 0], [1.0, 1e4, 1.0], [1.0, 1e4, 1.0], [1.0, 1e4, 1.0]],
                 dtype=torch.float64)
RTOL, ATOL = 1e-6, 1e-10


def rober_ode(logk):
    k1, k2, k3 = np.exp(logk)

    def rhs(_, y):
        return [-k1 * y[0] + k3 * y[1] * y[2], k1 * y[0] - k2 * y[1] ** 2 - k3 * y[1] * y[2],
                k2 * y[1] ** 2]

    def jac(_, y):
        return [[-k1, k3 * y[2], k3 * y[1]], [k1, -2 * k2 * y[1] - k3 * y[2], -k3 * y[1]],
                [0.0, 2 * k2 * y[1], 0.0]]

    return rhs, jac


def radau(logk, rtol=RTOL, atol=ATOL):
    rhs, jac = rober_ode(logk)
    return solve_ivp(rhs, (0.0, 100.0), [1.0, 0.0, 0.0], method="Radau", t_eval=T.numpy()[1:],
                     rtol=rtol, atol=atol, jac=jac)


def pnode_dae(func, method):
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64, requires_grad=True)
    ys = pnode.odeint(func, y0, T, method=method, mass=DIAG, rtol=RTOL, atol=ATOL)
    steps = pnode.last_stats().steps
    return torch.autograd.grad((ys * W).sum(), [y0, func.logk]), steps


def main() -> None:
    func = RoberDAE()
    lk = func.logk.detach().numpy()

    def loss(logk):  # the ODE's loss, tightly solved: reference sensitivities by differences
        return float((radau(logk, 1e-12, 1e-16).y.T * W.numpy()[1:]).sum())

    fd = np.array([(loss(lk + e) - loss(lk - e)) / 2e-5 for e in np.eye(3) * 1e-5])
    runs = {"radau": lambda: radau(lk), "implicit_euler": lambda: pnode_dae(func, "implicit_euler"),
            "trapezoid": lambda: pnode_dae(func, "trapezoid")}
    times = {k: [] for k in runs}
    for rep in range(5):  # round-robin: each repetition runs every solver once
        for name, run in runs.items():
            start = time.perf_counter()
            out = run()
            times[name].append(time.perf_counter() - start)
            if rep == 0 and name != "radau":
                (_, g), steps = out
                err = np.abs(g.numpy() - fd).max() / np.abs(fd).max()
                print(f"{name}: {steps} steps, log-rate gradient error vs ODE sensitivities "
                      f"{err:.1e}")
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, m in med.items():
        print(f"{name}: median {m:.3f} s, x Radau {m / med['radau']:.0f}")


if __name__ == "__main__":
    main()
