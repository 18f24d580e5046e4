"""``pnode run cnf-tabular``: a continuous normalizing flow on a standardized scikit-learn dataset.

The same flow as ``cnf2d`` in ``d`` = 13 (wine), 30 (breast cancer) or 64 (digits
pixels, dequantized with uniform noise) dimensions.  Training uses Hutchinson's
trace estimator (one Rademacher vector per sample, fixed for the solve and its
adjoint, so each gradient is the exact gradient of an unbiased estimate); the
reported test log-likelihood uses the exact trace.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..adjoint import odeint
from ..models.cnf import CNF, standard_normal_logprob
from .cnf2d import gaussian_baseline_loglik, odeint_options
from .datasets import TABULAR, split, tabular
from .plotting import pyplot, save
from .runner import Example, Option

__all__ = ["CNFTabular"]


class CNFTabular(Example):
    """Continuous normalizing flow on wine, breast cancer or digits features."""

    name = "cnf-tabular"
    summary = "continuous normalizing flow (Hutchinson trace) on a standardized scikit-learn dataset"
    data_parallel = True
    options = (
        Option("iters", int, 1500, "training iterations", quick=300),
        Option("lr", float, 3e-3, "Adam learning rate"),
        Option("dataset", str, "breast_cancer", "bundled scikit-learn dataset", choices=TABULAR),
        Option("width", int, 128, "hidden width of the field", quick=64),
        Option("depth", int, 2, "hidden layers of the field"),
        Option("T", float, 1.0, "flow time"),
        Option("method", str, "rk4", "pnode method"),
        Option("steps", int, 8, "fixed steps over [0, T]; 0: adaptive", quick=4),
        Option("rtol", float, 1e-5, "relative tolerance (adaptive)"),
        Option("atol", float, 1e-7, "absolute tolerance (adaptive)"),
        Option("batch", int, 128, "samples per iteration"),
        Option("test_fraction", float, 0.2, "held-out fraction"),
    )

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        c = self.config
        x, _ = tabular(c["dataset"])
        data_gen = torch.Generator().manual_seed(int(c["seed"]))
        if c["dataset"] == "digits":  # integer pixels: dequantize, drop constant pixels
            x = x + torch.rand(x.shape, generator=data_gen, dtype=torch.float64)
            x = x[:, x.std(0) > 0.3]
        tr, te = split(len(x), c["test_fraction"], generator=data_gen)
        mu, sd = x[tr].mean(0), x[tr].std(0)
        x = (x - mu) / sd  # statistics of the training part only
        self.train, self.test = x[tr].to(self.dtype), x[te].to(self.dtype)
        self.dim = x.shape[1]
        self.model = CNF(self.dim, (c["width"],) * c["depth"], T=c["T"], trace="hutchinson",
                         comm=self.solve_comm, **odeint_options(c)).to(self.dtype)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=c["lr"])

    def train_step(self, iteration: int) -> float:
        b = min(self.config["batch"], len(self.train))
        idx = torch.randperm(len(self.train), generator=self.generator)[:b]
        # the whole batch's Hutchinson noise, drawn as CNF.log_prob draws it; each rank keeps its rows
        bits = torch.randint(0, 2, (b, self.dim), generator=self.generator)
        x, noise = self.train[self.shard(idx)], self.shard(2 * bits - 1)
        loss = -self._log_prob_hutchinson(x, noise).sum() / b
        self.optimizer.zero_grad()
        loss.backward()
        self.reduce_gradients()
        self.optimizer.step()
        return self.global_sum(loss.item())

    def _log_prob_hutchinson(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``CNF.log_prob`` with given Rademacher noise (a shard of the batch's noise)."""
        field = self.model.field
        saved, field.trace, field.noise = field.trace, "hutchinson", noise.to(x.dtype)
        try:
            z, delta = odeint(field, (x, torch.zeros(x.shape[0], 1, dtype=x.dtype)),
                              torch.tensor([0.0, self.model.T], dtype=x.dtype), **self.model.odeint_kwargs)
        finally:
            field.trace = saved
        return standard_normal_logprob(z[-1]) - delta[-1, :, 0]

    def engine_reduced_parameters(self) -> list[torch.Tensor]:
        return list(self.model.parameters())  # the flow's field is solved directly on comm=

    def evaluate(self) -> dict[str, float]:
        with torch.no_grad():
            ll = self.model.log_prob(self.test, trace="exact")
        base = gaussian_baseline_loglik(self.train.double(), self.test.double())
        return {"dim": self.dim, "n_train": len(self.train), "n_test": len(self.test),
                "test_loglik": float(ll.mean()), "test_loglik_per_dim": float(ll.mean()) / self.dim,
                "test_loglik_stderr": float(ll.std() / math.sqrt(len(ll))),
                "gaussian_baseline_test_loglik": base}

    def figures(self, out: Path) -> list[str]:
        plt = pyplot()
        samples = self.model.sample(len(self.test), generator=torch.Generator().manual_seed(1))
        x = self.train.double()
        _, _, v = torch.linalg.svd(x - x.mean(0), full_matrices=False)
        proj = v[:2].T  # two leading principal directions of the training data
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.8), sharex=True, sharey=True)
        for ax, data, title in ((axes[0], self.test, "test data"), (axes[1], samples, "flow samples")):
            p = (data.double() @ proj).numpy()
            ax.scatter(p[:, 0], p[:, 1], s=6, alpha=0.6)
            ax.set_title(f"{title} (PCA 1-2)")
        return [save(fig, out, "samples.png")]
