"""``pnode run spiral``: fit a 2-D spiral ODE from samples of one noisy trajectory.

The data are samples of ``dy/dt = A y^3`` (elementwise cube, ``A`` a damped
rotation) from ``y(0) = (2, 0)``, integrated by pnode itself with tight
tolerances, plus Gaussian noise.  An MLP field is fitted on short trajectory
segments (mini-batches of starting points), as in the classic neural-ODE demo;
evaluation integrates the learned field over the whole horizon.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adjoint import odeint
from .plotting import pyplot, save
from .runner import Example, Option

__all__ = ["Spiral", "SpiralTruth"]


class SpiralTruth(nn.Module):
    """The data-generating field ``dy/dt = A y^3`` with ``A = [[-0.1, -2], [2, -0.1]]``."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("A", torch.tensor([[-0.1, -2.0], [2.0, -0.1]], dtype=torch.float64))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (y ** 3) @ self.A.T.to(y.dtype)


class _Field(nn.Module):
    """An autonomous MLP field; cubing the input helps it represent ``y^3`` dynamics."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 2))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(y ** 3)


class Spiral(Example):
    """Learn a spiral's vector field from noisy trajectory samples."""

    name = "spiral"
    summary = "fit a 2-D spiral ODE from samples of a noisy trajectory"
    data_parallel = True
    options = (
        Option("iters", int, 1000, "training iterations", quick=300),
        Option("lr", float, 1e-2, "Adam learning rate"),
        Option("hidden", int, 50, "hidden width of the field"),
        Option("method", str, "rk4", "pnode method (steps of the sample spacing)"),
        Option("n_samples", int, 500, "trajectory samples over [0, --t-end]"),
        Option("t_end", float, 12.0, "time span of the data"),
        Option("noise", float, 0.01, "standard deviation of the observation noise"),
        Option("segment", int, 10, "samples per training segment"),
        Option("batch", int, 32, "segments per iteration"),
    )

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        c = self.config
        self.t = torch.linspace(0.0, c["t_end"], c["n_samples"], dtype=torch.float64)
        y0 = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
        with torch.no_grad():
            self.truth = odeint(SpiralTruth(), y0, self.t, method="dopri5", rtol=1e-10, atol=1e-12)[:, 0]
        noise = torch.randn(self.truth.shape, generator=torch.Generator().manual_seed(int(c["seed"])),
                            dtype=torch.float64)
        self.obs = (self.truth + c["noise"] * noise).to(self.dtype)
        self.dt = float(self.t[1] - self.t[0])
        self.model = _Field(c["hidden"]).to(self.dtype)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=c["lr"])

    def _solve(self, y0: torch.Tensor, n: int) -> torch.Tensor:
        t = torch.arange(n, dtype=self.dtype) * self.dt
        return odeint(self.model, y0, t, method=self.config["method"], options={"step_size": self.dt},
                      comm=self.solve_comm)

    def engine_reduced_parameters(self) -> list[torch.Tensor]:
        return list(self.model.parameters())  # the field is solved directly on comm=

    def train_step(self, iteration: int) -> float:
        c = self.config
        s = torch.randint(0, c["n_samples"] - c["segment"], (c["batch"],), generator=self.generator)
        mine = self.shard(s)  # segments of this rank (all of them in a serial run)
        idx = mine[None, :] + torch.arange(c["segment"])[:, None]  # [segment, local batch]
        pred = self._solve(self.obs[mine], c["segment"])
        loss = (pred - self.obs[idx]).abs().sum() / (c["segment"] * len(s) * self.obs.shape[1])
        self.optimizer.zero_grad()
        loss.backward()
        self.reduce_gradients()
        self.optimizer.step()
        return self.global_sum(loss.item())

    def _rollout(self) -> torch.Tensor:
        with torch.no_grad():
            return self._solve(self.truth[:1].to(self.dtype), len(self.t))[:, 0].double()

    def evaluate(self) -> dict[str, float]:
        pred = self._rollout()
        err = (pred - self.truth).norm(dim=1)
        half = len(self.t) // 2
        return {"rollout_rmse": float(err.pow(2).mean().sqrt()),
                "rollout_rmse_first_half": float(err[:half].pow(2).mean().sqrt()),
                "rollout_max_error": float(err.max())}

    def figures(self, out: Path) -> list[str]:
        plt = pyplot()
        pred = self._rollout().numpy()
        truth, obs, t = self.truth.numpy(), self.obs.double().numpy(), self.t.numpy()
        fig, axes = plt.subplots(1, 3, figsize=(13, 4))
        axes[0].plot(t, truth[:, 0], "k-", lw=1, label="true x")
        axes[0].plot(t, truth[:, 1], "k--", lw=1, label="true y")
        axes[0].plot(t, pred[:, 0], "C0-", lw=1.5, label="learned x")
        axes[0].plot(t, pred[:, 1], "C1--", lw=1.5, label="learned y")
        axes[0].set_xlabel("t")
        axes[0].legend(fontsize=8)
        axes[0].set_title("trajectories")
        axes[1].plot(obs[:, 0], obs[:, 1], ".", ms=2, color="0.6", label="observations")
        axes[1].plot(truth[:, 0], truth[:, 1], "k-", lw=1, label="truth")
        axes[1].plot(pred[:, 0], pred[:, 1], "C0-", lw=1.5, label="learned")
        axes[1].set_title("phase portrait")
        axes[1].legend(fontsize=8)
        g = torch.linspace(-2.2, 2.2, 21, dtype=self.dtype)
        gx, gy = torch.meshgrid(g, g, indexing="xy")
        pts = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
        with torch.no_grad():
            v = self.model(torch.zeros((), dtype=self.dtype), pts).double()
        axes[2].quiver(pts[:, 0].double().numpy(), pts[:, 1].double().numpy(), v[:, 0].numpy(),
                       v[:, 1].numpy(), color="C0")
        axes[2].set_title("learned vector field")
        for ax in axes[1:]:
            ax.set_aspect("equal")
        return [save(fig, out, "trajectories.png")]
