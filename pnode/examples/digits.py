"""``pnode run digits``: image classification with an ODE block on scikit-learn's 8x8 digits.

An encoder lifts each image to the ODE state, a :class:`pnode.NeuralODE` block
(fixed-step RK4 by default) transforms it, a linear head gives the logits;
cross-entropy, Adam, gradients by PETSc's discrete adjoint.  Reports held-out
accuracy and draws the confusion matrix.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from ..models.classifier import ODEClassifier
from .datasets import split, tabular
from .plotting import pyplot, save
from .runner import Example, Option

__all__ = ["Digits"]


class Digits(Example):
    """ODE-block classifier on the 1797 bundled 8x8 digit images."""

    name = "digits"
    summary = "classification with an ODE block on scikit-learn's bundled 8x8 digits"
    data_parallel = True
    options = (
        Option("iters", int, 2000, "training iterations", quick=300),
        Option("lr", float, 3e-3, "Adam learning rate"),
        Option("arch", str, "mlp", "encoder and field: dense or convolutional", choices=("mlp", "conv")),
        Option("width", int, 32, "ODE state width (features or channels)", quick=24),
        Option("hidden", int, 64, "hidden width of the MLP field", quick=32),
        Option("T", float, 1.0, "integration time of the block"),
        Option("method", str, "rk4", "pnode method"),
        Option("steps", int, 4, "fixed steps over [0, T]; 0: adaptive", quick=2),
        Option("rtol", float, 1e-5, "relative tolerance (adaptive)"),
        Option("atol", float, 1e-7, "absolute tolerance (adaptive)"),
        Option("batch", int, 128, "images per iteration"),
        Option("test_fraction", float, 0.2, "held-out fraction"),
    )

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        c = self.config
        x, y = tabular("digits")
        x = (x / 16.0).reshape(-1, 1, 8, 8)
        tr, te = split(len(x), c["test_fraction"], generator=torch.Generator().manual_seed(int(c["seed"])))
        mu, sd = x[tr].mean(), x[tr].std()
        x = (x - mu) / sd
        self.xtr, self.ytr = x[tr].to(self.dtype), y[tr]
        self.xte, self.yte = x[te].to(self.dtype), y[te]
        kw = {"method": c["method"], "rtol": c["rtol"], "atol": c["atol"]}
        if c["steps"] > 0:
            kw["options"] = {"step_size": c["T"] / c["steps"]}
        self.model = ODEClassifier((1, 8, 8), 10, arch=c["arch"], width=c["width"], hidden=c["hidden"],
                                   T=c["T"], comm=self.solve_comm, **kw).to(self.dtype)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=c["lr"])

    def train_step(self, iteration: int) -> float:
        idx = torch.randperm(len(self.xtr), generator=self.generator)[: self.config["batch"]]
        mine = self.shard(idx)  # the global batch is drawn on every rank; each keeps its part
        loss = F.cross_entropy(self.model(self.xtr[mine]), self.ytr[mine], reduction="sum") / len(idx)
        self.optimizer.zero_grad()
        loss.backward()
        self.reduce_gradients()
        self.optimizer.step()
        return self.global_sum(loss.item())

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self.model(b) for b in x.split(512)])

    def evaluate(self) -> dict[str, float]:
        logits = self._predict(self.xte)
        self._pred = logits.argmax(1)
        train_acc = float((self._predict(self.xtr).argmax(1) == self.ytr).double().mean())
        return {"test_accuracy": float((self._pred == self.yte).double().mean()),
                "train_accuracy": train_acc,
                "test_loss": float(F.cross_entropy(logits, self.yte)),
                "n_train": len(self.xtr), "n_test": len(self.xte)}

    def figures(self, out: Path) -> list[str]:
        plt = pyplot()
        pred = getattr(self, "_pred", None)
        if pred is None:
            pred = self._predict(self.xte).argmax(1)
        cm = torch.zeros(10, 10, dtype=torch.long)
        cm.index_put_((self.yte, pred), torch.ones_like(pred), accumulate=True)
        fig, axes = plt.subplots(1, 2, figsize=(9, 4), gridspec_kw={"width_ratios": [1, 1.2]})
        axes[0].imshow(cm.numpy(), cmap="Blues")
        axes[0].set_xlabel("predicted")
        axes[0].set_ylabel("true")
        axes[0].set_xticks(range(10))
        axes[0].set_yticks(range(10))
        acc = float((pred == self.yte).double().mean())
        axes[0].set_title(f"confusion matrix, test accuracy {acc:.3f}")
        grid = torch.zeros(4 * 9, 6 * 9)
        for k in range(24):
            r, c = divmod(k, 6)
            grid[r * 9:r * 9 + 8, c * 9:c * 9 + 8] = self.xte[k, 0].double()
        axes[1].imshow(grid.numpy(), cmap="gray_r")
        for k in range(24):
            r, c = divmod(k, 6)
            ok = bool(pred[k] == self.yte[k])
            axes[1].text(c * 9 + 7, r * 9 + 1, str(int(pred[k])), color="green" if ok else "red",
                         fontsize=9, ha="right", va="top")
        axes[1].set_title("test images, predicted label")
        axes[1].axis("off")
        return [save(fig, out, "predictions.png")]
