"""``pnode run pde``: learn the closure of a method-of-lines viscous Burgers equation (IMEX).

``u_t = nu u_xx - (u^2/2)_x`` on a periodic grid of ``n`` points.  The data are
trajectories from random smooth initial conditions, integrated by pnode.  The
model knows the stiff linear diffusion and treats it implicitly; the nonlinear
flux is unknown and replaced by a learned translation-invariant stencil
(:class:`pnode.models.StencilClosure`) treated explicitly::

    f = pnode.IMEX(implicit=Diffusion(n, nu=nu), explicit=StencilClosure(n))
    u = pnode.odeint(f, u0, t, method="kencarp4", options={"step_size": dt, "jacobian": "blocks"})

Reports the relative L2 error of test rollouts next to the diffusion-only model's.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

import pnode

from ..adjoint import IMEX, odeint
from ..models.pde import BurgersAdvection, Diffusion, StencilClosure, random_fourier_fields
from .plotting import pyplot, save
from .runner import Example, ExampleError, Option

__all__ = ["BurgersClosure"]


class BurgersClosure(Example):
    """Burgers' flux as a learned explicit closure, with implicit diffusion (ARKIMEX)."""

    name = "pde"
    summary = "learn a closure for method-of-lines viscous Burgers with an IMEX method"
    # Data-parallel without comm=: fixed steps and a block-diagonal (per trajectory) Jacobian make
    # each trajectory's solve independent of the others, so every rank solves its shard alone
    # and DataParallel sums all gradients (the block LU solve is serial, a comm= solve is not).
    data_parallel = True
    options = (
        Option("iters", int, 400, "training iterations", quick=100),
        Option("lr", float, 2e-2, "Adam learning rate"),
        Option("n", int, 64, "grid points", quick=32),
        Option("nu", float, 0.1, "viscosity"),
        Option("amplitude", float, 1.0, "max |u0| of the initial conditions"),
        Option("t_end", float, 1.0, "time horizon"),
        Option("n_out", int, 11, "output times over [0, --t-end]", quick=6),
        Option("dt", float, 0.05, "fixed step of the model", quick=0.1),
        Option("method", str, "kencarp4", "IMEX pnode method (kencarp3/4/5 or arkimex:<type>)"),
        Option("radius", int, 2, "stencil radius of the closure"),
        Option("hidden", int, 16, "channels of the closure"),
        Option("n_train", int, 32, "training trajectories", quick=8),
        Option("n_test", int, 8, "test trajectories", quick=4),
        Option("batch", int, 8, "trajectories per iteration", quick=4),
    )

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        c = self.config
        imex = {m.name: m.imex for m in pnode.methods()}
        if not (imex.get(c["method"]) or c["method"].startswith("arkimex:")):
            raise ExampleError(f"--method {c['method']} is not an IMEX method; use one of "
                               + ", ".join(k for k, v in imex.items() if v))
        g = torch.Generator().manual_seed(int(c["seed"]))
        u0 = random_fourier_fields(c["n_train"] + c["n_test"], c["n"], amplitude=c["amplitude"],
                                   generator=g)
        self.t = torch.linspace(0.0, c["t_end"], c["n_out"], dtype=torch.float64)
        self.diffusion = Diffusion(c["n"], nu=c["nu"])
        truth = IMEX(implicit=self.diffusion, explicit=BurgersAdvection(c["n"]))
        with torch.no_grad():  # reference data: same scheme family, 10x finer steps
            u = odeint(truth, u0, self.t, method="kencarp5",
                       options={"step_size": c["dt"] / 10, "jacobian": "blocks"})
        self.u = u.transpose(0, 1).to(self.dtype)  # [trajectory, time, n]
        self.train_idx = torch.arange(c["n_train"])
        self.test_idx = torch.arange(c["n_train"], c["n_train"] + c["n_test"])
        self.model = StencilClosure(c["n"], radius=c["radius"], hidden=c["hidden"]).to(self.dtype)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=c["lr"])

    def _rollout(self, u0: torch.Tensor, closure: torch.nn.Module | None) -> torch.Tensor:
        c = self.config
        opts = {"step_size": c["dt"], "jacobian": "blocks"}
        if closure is None:  # diffusion only: the baseline without closure
            return odeint(self.diffusion, u0, self.t.to(self.dtype), method="trapezoid",
                          options=opts).transpose(0, 1)
        f = IMEX(implicit=self.diffusion, explicit=closure)
        return odeint(f, u0, self.t.to(self.dtype), method=c["method"], options=opts).transpose(0, 1)

    def train_step(self, iteration: int) -> float:
        pick = torch.randperm(len(self.train_idx), generator=self.generator)[: self.config["batch"]]
        u = self.u[self.train_idx[self.shard(pick)]]
        pred = self._rollout(u[:, 0], self.model)
        loss = (pred[:, 1:] - u[:, 1:]).pow(2).sum() / (len(pick) * (u.shape[1] - 1) * u.shape[2])
        self.optimizer.zero_grad()
        loss.backward()
        self.reduce_gradients()
        self.optimizer.step()
        return self.global_sum(loss.item())

    def _rel_error(self, pred: torch.Tensor, u: torch.Tensor) -> float:
        return float((pred[:, 1:] - u[:, 1:]).norm() / u[:, 1:].norm())

    def evaluate(self) -> dict[str, float]:
        u = self.u[self.test_idx]
        with torch.no_grad():
            learned = self._rollout(u[:, 0], self.model)
            base = self._rollout(u[:, 0], None)
        return {"test_rel_l2_error": self._rel_error(learned, u),
                "diffusion_only_rel_l2_error": self._rel_error(base, u),
                "test_mse": float((learned[:, 1:] - u[:, 1:]).pow(2).mean())}

    def figures(self, out: Path) -> list[str]:
        plt = pyplot()
        u = self.u[self.test_idx[:1]]
        with torch.no_grad():
            pred = self._rollout(u[:, 0], self.model)
        u, pred = u[0].double().numpy(), pred[0].double().numpy()
        ext = (0, 2 * torch.pi, float(self.t[-1]), 0)
        fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
        vmax = abs(u).max()
        for ax, data, title in ((axes[0], u, "truth"), (axes[1], pred, "learned closure"),
                                (axes[2], pred - u, "error")):
            im = ax.imshow(data, aspect="auto", extent=ext, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
            ax.set_title(title)
            ax.set_xlabel("x")
            ax.set_ylabel("t")
        fig.colorbar(im, ax=axes[2])
        x = torch.arange(u.shape[1]) * (2 * torch.pi / u.shape[1])
        axes[3].plot(x, u[0], "k:", label="u(0)")
        axes[3].plot(x, u[-1], "k-", label="truth u(T)")
        axes[3].plot(x, pred[-1], "C3--", label="learned u(T)")
        axes[3].legend(fontsize=8)
        axes[3].set_title("final state")
        return [save(fig, out, "solution.png")]
