"""``pnode run cnf2d``: a continuous normalizing flow on a 2-D density, exact trace.

Maximum likelihood: minimise ``-mean log p(x)`` over mini-batches of samples from
the density; ``log p`` comes from integrating ``(z, delta)`` with
:class:`pnode.models.CNF` (fixed-step RK4 by default), gradients from PETSc's
discrete adjoint.  Reports the test log-likelihood in nats (higher is better)
next to the best single Gaussian's, and draws data, learned density and samples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..models.cnf import CNF, standard_normal_logprob
from .datasets import TOY_2D, toy_2d
from .plotting import pyplot, save
from .runner import Example, Option

__all__ = ["CNF2D", "gaussian_baseline_loglik"]


def gaussian_baseline_loglik(train: torch.Tensor, test: torch.Tensor) -> float:
    """Mean test log-likelihood (nats) of the maximum-likelihood full-covariance Gaussian."""
    mu = train.mean(0)
    cov = torch.cov((train - mu).T).reshape(train.shape[1], train.shape[1])
    chol = torch.linalg.cholesky(cov)
    w = torch.linalg.solve_triangular(chol, (test - mu).T, upper=False).T
    return float((standard_normal_logprob(w) - torch.log(torch.diagonal(chol)).sum()).mean())


class CNF2D(Example):
    """Continuous normalizing flow on moons, 8 Gaussians, checkerboard or pinwheel."""

    name = "cnf2d"
    summary = "continuous normalizing flow (FFJORD-style, exact trace) on a 2-D density"
    data_parallel = True
    options = (
        Option("iters", int, 2000, "training iterations", quick=300),
        Option("lr", float, 3e-3, "Adam learning rate", quick=5e-3),
        Option("dataset", str, "moons", "2-D density", choices=tuple(TOY_2D)),
        Option("width", int, 64, "hidden width of the field"),
        Option("depth", int, 2, "hidden layers of the field"),
        Option("T", float, 1.0, "flow time"),
        Option("method", str, "rk4", "pnode method (fixed steps unless adaptive with --steps 0)"),
        Option("steps", int, 10, "fixed steps over [0, T]; 0: adaptive with --rtol/--atol", quick=6),
        Option("rtol", float, 1e-5, "relative tolerance (adaptive)"),
        Option("atol", float, 1e-7, "absolute tolerance (adaptive)"),
        Option("batch", int, 256, "samples per iteration", quick=128),
        Option("n_train", int, 20000, "training samples", quick=5000),
        Option("n_test", int, 5000, "test samples", quick=1000),
        Option("grid", int, 120, "density plot resolution", quick=50),
    )

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        c = self.config
        data_gen = torch.Generator().manual_seed(int(c["seed"]))
        self.train = toy_2d(c["dataset"], c["n_train"], generator=data_gen, dtype=self.dtype)
        self.test = toy_2d(c["dataset"], c["n_test"], generator=data_gen, dtype=self.dtype)
        self.model = CNF(2, (c["width"],) * c["depth"], T=c["T"], trace="exact",
                         comm=self.solve_comm, **odeint_options(c)).to(self.dtype)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=c["lr"])

    def train_step(self, iteration: int) -> float:
        idx = torch.randint(0, len(self.train), (self.config["batch"],), generator=self.generator)
        loss = -self.model.log_prob(self.train[self.shard(idx)]).sum() / len(idx)
        self.optimizer.zero_grad()
        loss.backward()
        self.reduce_gradients()
        self.optimizer.step()
        return self.global_sum(loss.item())

    def engine_reduced_parameters(self) -> list[torch.Tensor]:
        return list(self.model.parameters())  # the flow's field is solved directly on comm=

    def evaluate(self) -> dict[str, float]:
        with torch.no_grad():
            ll = torch.cat([self.model.log_prob(x) for x in self.test.split(2000)])
        return {
            "test_loglik": float(ll.mean()),
            "test_loglik_stderr": float(ll.std() / math.sqrt(len(ll))),
            "gaussian_baseline_test_loglik": gaussian_baseline_loglik(self.train.double(),
                                                                      self.test.double()),
        }

    def figures(self, out: Path) -> list[str]:
        plt = pyplot()
        lim, n = 3.0, self.config["grid"]
        axis = torch.linspace(-lim, lim, n, dtype=self.dtype)
        gx, gy = torch.meshgrid(axis, axis, indexing="xy")
        grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
        with torch.no_grad():
            logp = torch.cat([self.model.log_prob(x) for x in grid.split(4000)])
            samples = self.model.sample(2000, generator=torch.Generator().manual_seed(1))
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.8))
        data = self.test[:4000].double().numpy()
        axes[0].hist2d(data[:, 0], data[:, 1], bins=n // 2, range=[[-lim, lim]] * 2, cmap="viridis")
        axes[0].set_title(f"data ({self.config['dataset']})")
        axes[1].imshow(logp.exp().reshape(n, n).double().numpy(), extent=(-lim, lim, -lim, lim),
                       origin="lower", cmap="viridis")
        axes[1].set_title("learned density")
        s = samples.double().numpy()
        axes[2].hist2d(s[:, 0], s[:, 1], bins=n // 2, range=[[-lim, lim]] * 2, cmap="viridis")
        axes[2].set_title("samples of the flow")
        for ax in axes:
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
        return [save(fig, out, "density.png")]


def odeint_options(c: Mapping[str, Any]) -> dict[str, Any]:
    """``pnode.odeint`` keywords from an example's ``method``/``steps``/``rtol``/``atol`` options."""
    kw = {"method": c["method"], "rtol": c["rtol"], "atol": c["atol"]}
    if c["steps"] > 0:
        kw["options"] = {"step_size": c["T"] / c["steps"]}
    return kw
